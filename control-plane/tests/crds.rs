//! `crds/` holds the CRDs generated from the Rust types; this fails when they are stale.
//! Regenerate with `UPDATE_GOLDEN=1 cargo test -p capstan-control-plane --test crds`
//! (or `capstan-control-plane crds --out-dir crds`).

use std::path::PathBuf;

#[test]
fn checked_in_crds_match_the_rust_types() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../crds");
    let update = std::env::var_os("UPDATE_GOLDEN").is_some();
    for (file, yaml) in capstan_control_plane::api::crd::manifests() {
        let path = dir.join(file);
        if update {
            std::fs::write(&path, &yaml).expect("write crd");
            continue;
        }
        let checked_in = std::fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("{}: {e} (run with UPDATE_GOLDEN=1)", path.display()));
        assert!(
            checked_in == yaml,
            "{} is stale: regenerate with `UPDATE_GOLDEN=1 cargo test -p capstan-control-plane --test crds`",
            path.display()
        );
    }
}

#[test]
fn crds_carry_schema_validation() {
    let all: String = capstan_control_plane::api::crd::manifests()
        .into_iter()
        .map(|(_, y)| y)
        .collect();
    // Enums, bounds, required fields, CEL rules and the status subresource must survive
    // schema generation.
    for needle in [
        "- RegularExpression",
        "maximum: 65535",
        "x-kubernetes-validations",
        "a rule with a RequestRedirect filter must not have backendRefs",
        "exactly one of http, tcp, grpc must be set",
        "subresources:",
        "- parentRefs",
        "pattern: ^([0-9]{1,5}(h|m|s|ms)){1,4}$",
        "caCertificateFile and caCertificateSecret exclude each other",
        "clientCertificateSecret excludes certificateChainFile and privateKeyFile",
        "mode Mutual needs clientCertificateSecret",
    ] {
        assert!(all.contains(needle), "generated CRDs lack {needle:?}");
    }
}
