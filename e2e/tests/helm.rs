//! The Helm chart (`charts/capstan`) and the image Dockerfiles (`docker/`).
//!
//! `helm lint` and `helm template` run on the default values and on non-default ones; the
//! rendered objects are parsed and checked against what the control plane is promised (its
//! environment, RBAC, probes, the webhook's selection and names that must agree across
//! objects). Also checked without helm: the chart's CRDs are byte-identical to `crds/`, its
//! appVersion is the workspace version, and each Dockerfile builds a crate and binary that
//! exist in the workspace.
//!
//! Needs `helm` on PATH or in `.tools/bin` (scripts/test.sh installs it there with
//! scripts/install-helm.sh); under `CI=true` its absence fails, otherwise the helm tests are
//! reported as not run.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::{Value, json};

const RELEASE: &str = "capstan";
const NAMESPACE: &str = "capstan-system";

/// The environment variables the control plane reads in-cluster (the chart's contract).
const CONTRACT_ENV: &[&str] = &[
    "CAPSTAN_PROVIDER",
    "CAPSTAN_XDS_ADDR",
    "CAPSTAN_ADMIN_ADDR",
    "CAPSTAN_LOG_FORMAT",
    "CAPSTAN_WATCH_NAMESPACES",
    "CAPSTAN_WATCH_SECRETS",
    "CAPSTAN_NAMESPACE",
    "CAPSTAN_POD_NAME",
    "CAPSTAN_LEASE_NAME",
    "CAPSTAN_LEASE_DURATION_S",
    "CAPSTAN_LEASE_RENEW_S",
    "CAPSTAN_WEBHOOK_ADDR",
    "CAPSTAN_WEBHOOK_SERVICE",
    "CAPSTAN_WEBHOOK_CONFIG",
    "CAPSTAN_WEBHOOK_SECRET",
    "CAPSTAN_INJECTOR_CONFIG",
];

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf()
}

fn chart_dir() -> PathBuf {
    root().join("charts/capstan")
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
}

// ---------------------------------------------------------------------------------------------
// helm

/// Finds helm: on PATH, else in the repository's `.tools/bin` (where scripts/install-helm.sh
/// puts it). Under `CI=true` a missing helm is a failure, never a skip.
fn helm_binary() -> Option<PathBuf> {
    let on_path = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|p| p.join("helm"))
            .find(|p| p.is_file())
    });
    let found = on_path.or_else(|| {
        let local = root().join(".tools/bin/helm");
        local.is_file().then_some(local)
    });
    if found.is_none() && std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!(
            "helm is not on PATH nor in .tools/bin (CI=true): run scripts/test.sh, which installs it with scripts/install-helm.sh"
        );
    }
    found
}

/// `Some(helm)`, or `None` after reporting the test as not run.
fn helm_or_not_run(test: &str) -> Option<Helm> {
    match helm_binary() {
        Some(binary) => Some(Helm::new(binary, test)),
        None => {
            eprintln!(
                "NOT RUN: {test}: helm is not installed (run scripts/install-helm.sh or scripts/test.sh)"
            );
            None
        }
    }
}

/// helm with its cache, config and data directories in a private temporary directory, so the
/// tests neither read nor write the user's helm state and can run in parallel.
struct Helm {
    binary: PathBuf,
    work: PathBuf,
}

impl Helm {
    fn new(binary: PathBuf, test: &str) -> Helm {
        let work = std::env::temp_dir().join(format!("capstan-helm-{test}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&work);
        std::fs::create_dir_all(&work).expect("mkdir helm work dir");
        Helm { binary, work }
    }

    /// Runs helm; returns (success, stdout, stderr).
    fn run(&self, args: &[&str]) -> (bool, String, String) {
        let out = Command::new(&self.binary)
            .args(args)
            .env("HELM_CACHE_HOME", self.work.join("cache"))
            .env("HELM_CONFIG_HOME", self.work.join("config"))
            .env("HELM_DATA_HOME", self.work.join("data"))
            .env("KUBECONFIG", self.work.join("no-kubeconfig"))
            .output()
            .unwrap_or_else(|e| panic!("run {}: {e}", self.binary.display()));
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    fn values_file(&self, name: &str, values: &str) -> PathBuf {
        let file = self.work.join(format!("{name}.yaml"));
        std::fs::write(&file, values).expect("write values");
        file
    }

    fn lint(&self, name: &str, values: &str) {
        let file = self.values_file(name, values);
        let chart = chart_dir();
        let (ok, stdout, stderr) = self.run(&[
            "lint",
            "--strict",
            chart.to_str().unwrap(),
            "--namespace",
            NAMESPACE,
            "-f",
            file.to_str().unwrap(),
        ]);
        assert!(
            ok,
            "helm lint --strict ({name} values) failed:\n{stdout}\n{stderr}"
        );
        assert!(
            stdout.contains("0 chart(s) failed"),
            "helm lint ({name}):\n{stdout}"
        );
        assert!(
            !stdout.contains("[WARNING]") && !stdout.contains("[ERROR]"),
            "helm lint ({name}) reports problems:\n{stdout}"
        );
    }

    /// `helm template` → the rendered YAML text, or the error output.
    fn template_text(
        &self,
        release: &str,
        namespace: &str,
        name: &str,
        values: &str,
    ) -> Result<String, String> {
        let file = self.values_file(name, values);
        let chart = chart_dir();
        let (ok, stdout, stderr) = self.run(&[
            "template",
            release,
            chart.to_str().unwrap(),
            "--namespace",
            namespace,
            "--include-crds",
            "-f",
            file.to_str().unwrap(),
        ]);
        if ok { Ok(stdout) } else { Err(stderr) }
    }

    fn render(&self, release: &str, namespace: &str, name: &str, values: &str) -> Rendered {
        let text = self
            .template_text(release, namespace, name, values)
            .unwrap_or_else(|e| panic!("helm template ({name} values) failed:\n{e}"));
        let docs: Vec<Value> = serde_saphyr::from_multiple(&text)
            .unwrap_or_else(|e| panic!("rendered YAML ({name}) does not parse: {e}\n{text}"));
        let objects: Vec<Value> = docs.into_iter().filter(|d| !d.is_null()).collect();
        for o in &objects {
            assert!(
                o["apiVersion"].is_string()
                    && o["kind"].is_string()
                    && o["metadata"]["name"].is_string(),
                "rendered document without apiVersion/kind/metadata.name: {o}"
            );
        }
        Rendered {
            objects,
            namespace: namespace.to_string(),
        }
    }
}

impl Drop for Helm {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.work);
    }
}

// ---------------------------------------------------------------------------------------------
// The rendered objects

struct Rendered {
    objects: Vec<Value>,
    namespace: String,
}

impl Rendered {
    fn all(&self, kind: &str) -> Vec<&Value> {
        self.objects.iter().filter(|o| o["kind"] == kind).collect()
    }

    fn one(&self, kind: &str) -> &Value {
        let all = self.all(kind);
        assert_eq!(
            all.len(),
            1,
            "expected exactly one {kind}, got {}",
            all.len()
        );
        all[0]
    }

    fn named(&self, kind: &str, name: &str) -> &Value {
        self.all(kind)
            .into_iter()
            .find(|o| o["metadata"]["name"] == name)
            .unwrap_or_else(|| panic!("no {kind} named {name:?} was rendered"))
    }

    fn deployment(&self) -> &Value {
        self.one("Deployment")
    }

    fn container(&self) -> &Value {
        let containers = at(self.deployment(), "/spec/template/spec/containers")
            .as_array()
            .expect("containers");
        assert_eq!(containers.len(), 1, "one control-plane container");
        &containers[0]
    }

    /// The container's environment: name → literal value, or `fieldRef:<path>`.
    fn env(&self) -> BTreeMap<String, String> {
        let mut env = BTreeMap::new();
        for e in at(self.container(), "/env").as_array().expect("env") {
            let name = e["name"].as_str().expect("env name").to_string();
            let value = if let Some(v) = e.get("value") {
                v.as_str()
                    .unwrap_or_else(|| panic!("env {name}: value must be a string, got {v}"))
                    .to_string()
            } else if let Some(path) = e.pointer("/valueFrom/fieldRef/fieldPath") {
                format!("fieldRef:{}", path.as_str().unwrap())
            } else {
                panic!("env {name}: neither value nor fieldRef: {e}")
            };
            assert!(
                env.insert(name.clone(), value).is_none(),
                "env {name} is set twice"
            );
        }
        env
    }

    /// The injector settings: the ConfigMap mounted where CAPSTAN_INJECTOR_CONFIG points.
    fn injector_config(&self) -> Value {
        let env = self.env();
        let file = Path::new(&env["CAPSTAN_INJECTOR_CONFIG"]);
        let (dir, key) = (
            file.parent().unwrap().to_str().unwrap(),
            file.file_name().unwrap().to_str().unwrap(),
        );
        let mount = at(self.container(), "/volumeMounts")
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["mountPath"] == dir)
            .unwrap_or_else(|| panic!("nothing is mounted at {dir}"));
        assert_eq!(
            mount["readOnly"], true,
            "the injector config is mounted read-only"
        );
        let volume = at(self.deployment(), "/spec/template/spec/volumes")
            .as_array()
            .unwrap()
            .iter()
            .find(|v| v["name"] == mount["name"])
            .expect("volume of the injector mount");
        let cm_name = volume["configMap"]["name"]
            .as_str()
            .expect("the injector config comes from a ConfigMap");
        let cm = self.named("ConfigMap", cm_name);
        let text = cm["data"][key]
            .as_str()
            .unwrap_or_else(|| panic!("ConfigMap {cm_name} has no key {key}"));
        serde_saphyr::from_str(text).unwrap_or_else(|e| panic!("{key} does not parse: {e}"))
    }

    /// Every RBAC rule granted to the control plane's ServiceAccount, flattened to
    /// (scope, apiGroup, resource, verb, resourceName or "*any*").
    fn granted(&self) -> BTreeSet<Grant> {
        let sa = self.one("ServiceAccount");
        let sa_name = sa["metadata"]["name"].as_str().unwrap();
        let binds_sa = |binding: &Value| {
            binding["subjects"].as_array().unwrap().iter().any(|s| {
                s["kind"] == "ServiceAccount"
                    && s["name"] == sa_name
                    && s["namespace"] == self.namespace.as_str()
            })
        };
        let mut grants = BTreeSet::new();
        for (binding_kind, role_kind) in [
            ("ClusterRoleBinding", "ClusterRole"),
            ("RoleBinding", "Role"),
        ] {
            for binding in self.all(binding_kind) {
                let role_ref = &binding["roleRef"];
                assert_eq!(role_ref["kind"], role_kind, "{binding_kind} → {role_kind}");
                let role_name = role_ref["name"].as_str().unwrap();
                assert!(
                    binds_sa(binding),
                    "{binding_kind} {role_name} binds another subject"
                );
                let binding_ns = binding["metadata"]["namespace"].as_str();
                let role = self
                    .all(role_kind)
                    .into_iter()
                    .find(|r| {
                        r["metadata"]["name"] == role_name
                            && r["metadata"]["namespace"].as_str() == binding_ns
                    })
                    .unwrap_or_else(|| {
                        panic!("{binding_kind} refers to missing {role_kind} {role_name}")
                    });
                let scope = binding_ns.map_or("cluster".to_string(), str::to_string);
                for rule in role["rules"].as_array().expect("rules") {
                    let strings = |key: &str| -> Vec<String> {
                        rule.get(key)
                            .and_then(Value::as_array)
                            .map_or(Vec::new(), |a| {
                                a.iter().map(|s| s.as_str().unwrap().to_string()).collect()
                            })
                    };
                    assert!(
                        rule.get("nonResourceURLs").is_none(),
                        "no non-resource URLs: {rule}"
                    );
                    let names = strings("resourceNames");
                    let names = if names.is_empty() {
                        vec!["*any*".to_string()]
                    } else {
                        names
                    };
                    for group in strings("apiGroups") {
                        for resource in strings("resources") {
                            for verb in strings("verbs") {
                                for name in &names {
                                    grants.insert(Grant {
                                        scope: scope.clone(),
                                        group: group.clone(),
                                        resource: resource.clone(),
                                        verb: verb.clone(),
                                        name: name.clone(),
                                    });
                                }
                            }
                        }
                    }
                }
            }
        }
        // Roles that nothing binds are dead weight at best.
        for role in self.all("Role").into_iter().chain(self.all("ClusterRole")) {
            let name = &role["metadata"]["name"];
            assert!(
                self.all("RoleBinding")
                    .into_iter()
                    .chain(self.all("ClusterRoleBinding"))
                    .any(|b| &b["roleRef"]["name"] == name && b["roleRef"]["kind"] == role["kind"]),
                "{} {name} is not bound",
                role["kind"]
            );
        }
        grants
    }

    fn webhook_configuration(&self) -> &Value {
        self.one("MutatingWebhookConfiguration")
    }

    fn has(&self, kind: &str) -> bool {
        !self.all(kind).is_empty()
    }
}

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Grant {
    scope: String,
    group: String,
    resource: String,
    verb: String,
    name: String,
}

fn grant(scope: &str, group: &str, resource: &str, verb: &str, name: &str) -> Grant {
    Grant {
        scope: scope.into(),
        group: group.into(),
        resource: resource.into(),
        verb: verb.into(),
        name: name.into(),
    }
}

/// The read and status grants of the control plane in `scope` ("cluster" or a namespace);
/// with `secrets` (controlPlane.watchSecrets) also reading Secrets there.
fn read_grants(scope: &str, secrets: bool) -> Vec<Grant> {
    let mut g = Vec::new();
    for verb in ["get", "list", "watch"] {
        if secrets {
            g.push(grant(scope, "", "secrets", verb, "*any*"));
        }
        g.push(grant(scope, "", "services", verb, "*any*"));
        g.push(grant(
            scope,
            "discovery.k8s.io",
            "endpointslices",
            verb,
            "*any*",
        ));
        g.push(grant(scope, "capstan.dev", "serviceroutes", verb, "*any*"));
        g.push(grant(
            scope,
            "capstan.dev",
            "servicepolicies",
            verb,
            "*any*",
        ));
    }
    for verb in ["patch", "update"] {
        g.push(grant(
            scope,
            "capstan.dev",
            "serviceroutes/status",
            verb,
            "*any*",
        ));
        g.push(grant(
            scope,
            "capstan.dev",
            "servicepolicies/status",
            verb,
            "*any*",
        ));
    }
    g
}

/// Grants in the release namespace and on the webhook configuration (always the same shape).
fn own_grants(namespace: &str, lease: &str, secret: &str, webhook_config: &str) -> Vec<Grant> {
    vec![
        grant(namespace, "coordination.k8s.io", "leases", "get", lease),
        grant(namespace, "coordination.k8s.io", "leases", "update", lease),
        grant(
            namespace,
            "coordination.k8s.io",
            "leases",
            "create",
            "*any*",
        ),
        grant(namespace, "", "secrets", "get", secret),
        grant(namespace, "", "secrets", "update", secret),
        grant(namespace, "", "secrets", "create", "*any*"),
        grant(
            "cluster",
            "admissionregistration.k8s.io",
            "mutatingwebhookconfigurations",
            "get",
            webhook_config,
        ),
        grant(
            "cluster",
            "admissionregistration.k8s.io",
            "mutatingwebhookconfigurations",
            "patch",
            webhook_config,
        ),
    ]
}

fn at<'a>(v: &'a Value, pointer: &str) -> &'a Value {
    v.pointer(pointer)
        .unwrap_or_else(|| panic!("{pointer} is missing in {}", v["metadata"]["name"]))
}

fn labels(v: &Value) -> BTreeMap<String, String> {
    v.as_object().map_or(BTreeMap::new(), |m| {
        m.iter()
            .map(|(k, v)| (k.clone(), v.as_str().expect("label value").to_string()))
            .collect()
    })
}

/// A Kubernetes label selector (matchLabels and matchExpressions) applied to `labels`.
fn selects(selector: &Value, labels: &BTreeMap<String, String>) -> bool {
    if selector.is_null() {
        return true;
    }
    for (k, v) in selector["matchLabels"].as_object().into_iter().flatten() {
        if labels.get(k).map(String::as_str) != v.as_str() {
            return false;
        }
    }
    for e in selector["matchExpressions"]
        .as_array()
        .into_iter()
        .flatten()
    {
        let key = e["key"].as_str().unwrap();
        let values: Vec<&str> = e["values"].as_array().map_or(Vec::new(), |a| {
            a.iter().map(|v| v.as_str().unwrap()).collect()
        });
        let value = labels.get(key).map(String::as_str);
        let ok = match e["operator"].as_str().unwrap() {
            "In" => value.is_some_and(|v| values.contains(&v)),
            "NotIn" => value.is_none_or(|v| !values.contains(&v)),
            "Exists" => value.is_some(),
            "DoesNotExist" => value.is_none(),
            other => panic!("unknown selector operator {other}"),
        };
        if !ok {
            return false;
        }
    }
    true
}

/// Which webhook entries the API server would call for a pod with `pod_label` (value of
/// capstan.dev/inject, if any) in namespace `ns` whose label is `ns_label`.
fn webhooks_called(
    mwc: &Value,
    ns: &str,
    ns_label: Option<&str>,
    pod_label: Option<&str>,
) -> Vec<String> {
    let mut ns_labels =
        BTreeMap::from([("kubernetes.io/metadata.name".to_string(), ns.to_string())]);
    if let Some(l) = ns_label {
        ns_labels.insert("capstan.dev/inject".into(), l.into());
    }
    let mut pod_labels = BTreeMap::from([("app".to_string(), "web".to_string())]);
    if let Some(l) = pod_label {
        pod_labels.insert("capstan.dev/inject".into(), l.into());
    }
    mwc["webhooks"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|w| {
            selects(&w["namespaceSelector"], &ns_labels)
                && selects(&w["objectSelector"], &pod_labels)
        })
        .map(|w| w["name"].as_str().unwrap().to_string())
        .collect()
}

fn workspace_version() -> String {
    let cargo = read(&root().join("Cargo.toml"));
    let mut in_package = false;
    for line in cargo.lines() {
        let line = line.trim();
        if line.starts_with('[') {
            in_package = line == "[workspace.package]";
        } else if in_package && let Some(v) = line.strip_prefix("version") {
            return v
                .trim()
                .trim_start_matches('=')
                .trim()
                .trim_matches('"')
                .to_string();
        }
    }
    panic!("no version in [workspace.package] of Cargo.toml")
}

// ---------------------------------------------------------------------------------------------
// The checks that apply to every rendering

struct Expect<'a> {
    release_ns: &'a str,
    replicas: i64,
    pdb: bool,
    failure_policy: &'a str,
    timeout: i64,
    watch_namespaces: &'a [&'a str],
    /// controlPlane.watchSecrets.
    watch_secrets: bool,
    lease: &'a str,
    lease_duration: &'a str,
    lease_renew: &'a str,
    log_format: &'a str,
    control_plane_image: String,
    proxy_image: String,
    excluded_namespaces: &'a [&'a str],
}

fn check_rendering(r: &Rendered, x: &Expect<'_>) {
    let dep = r.deployment();
    let ns = x.release_ns;
    let app_version = workspace_version();

    // Everything namespaced lives in the release namespace (the per-namespace watch Roles
    // are the only exception), and carries the standard labels.
    for o in &r.objects {
        let kind = o["kind"].as_str().unwrap();
        if kind == "CustomResourceDefinition" {
            continue;
        }
        let meta_labels = labels(&o["metadata"]["labels"]);
        assert_eq!(
            meta_labels
                .get("app.kubernetes.io/managed-by")
                .map(String::as_str),
            Some("Helm"),
            "{kind} labels"
        );
        assert_eq!(
            meta_labels.get("app.kubernetes.io/version"),
            Some(&app_version),
            "{kind} labels"
        );
        let cluster_scoped = matches!(
            kind,
            "ClusterRole" | "ClusterRoleBinding" | "MutatingWebhookConfiguration"
        );
        let object_ns = o["metadata"]["namespace"].as_str();
        if cluster_scoped {
            assert_eq!(object_ns, None, "{kind} is cluster-scoped");
        } else if matches!(kind, "Role" | "RoleBinding") && object_ns != Some(ns) {
            assert!(
                x.watch_namespaces.contains(&object_ns.unwrap()),
                "{kind} in unexpected namespace {object_ns:?}"
            );
        } else {
            assert_eq!(
                object_ns,
                Some(ns),
                "{kind} {} namespace",
                o["metadata"]["name"]
            );
        }
    }

    // CRDs (with --include-crds): exactly the two of crds/.
    let crds: BTreeSet<&str> = r
        .all("CustomResourceDefinition")
        .into_iter()
        .map(|c| c["metadata"]["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        crds,
        BTreeSet::from(["servicepolicies.capstan.dev", "serviceroutes.capstan.dev"])
    );

    // Deployment: replicas, no arguments, environment of the contract.
    assert_eq!(at(dep, "/spec/replicas").as_i64(), Some(x.replicas));
    let c = r.container();
    assert_eq!(c["image"], x.control_plane_image.as_str());
    assert!(
        c.get("args").is_none() && c.get("command").is_none(),
        "the control plane is configured by its environment only (its run mode takes no subcommand)"
    );
    let env = r.env();
    for name in CONTRACT_ENV {
        assert!(env.contains_key(*name), "env {name} is missing: {env:?}");
    }
    assert_eq!(env["CAPSTAN_PROVIDER"], "kubernetes");
    assert_eq!(env["CAPSTAN_XDS_ADDR"], "0.0.0.0:18000");
    assert_eq!(env["CAPSTAN_ADMIN_ADDR"], "0.0.0.0:18001");
    assert_eq!(env["CAPSTAN_LOG_FORMAT"], x.log_format);
    assert_eq!(
        env["CAPSTAN_WATCH_NAMESPACES"],
        x.watch_namespaces.join(",")
    );
    assert_eq!(
        env["CAPSTAN_WATCH_SECRETS"],
        if x.watch_secrets { "true" } else { "false" }
    );
    assert_eq!(env["CAPSTAN_NAMESPACE"], "fieldRef:metadata.namespace");
    assert_eq!(env["CAPSTAN_POD_NAME"], "fieldRef:metadata.name");
    assert_eq!(env["CAPSTAN_LEASE_NAME"], x.lease);
    assert_eq!(env["CAPSTAN_LEASE_DURATION_S"], x.lease_duration);
    assert_eq!(env["CAPSTAN_LEASE_RENEW_S"], x.lease_renew);
    assert_eq!(env["CAPSTAN_WEBHOOK_ADDR"], "0.0.0.0:8443");
    assert_eq!(env["CAPSTAN_INJECTOR_CONFIG"], "/etc/capstan/injector.yaml");

    // Ports and probes.
    let ports: BTreeMap<String, i64> = at(c, "/ports")
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            (
                p["name"].as_str().unwrap().to_string(),
                p["containerPort"].as_i64().unwrap(),
            )
        })
        .collect();
    let mut port_numbers: Vec<i64> = ports.values().copied().collect();
    port_numbers.sort();
    assert_eq!(port_numbers, vec![8443, 18000, 18001], "container ports");
    let probe_port = |p: &Value| -> i64 {
        match p {
            Value::Number(n) => n.as_i64().unwrap(),
            Value::String(name) => ports[name],
            _ => panic!("probe port {p}"),
        }
    };
    assert_eq!(at(c, "/readinessProbe/httpGet/path"), "/readyz");
    assert_eq!(probe_port(at(c, "/readinessProbe/httpGet/port")), 18001);
    assert_eq!(at(c, "/livenessProbe/httpGet/path"), "/healthz");
    assert_eq!(probe_port(at(c, "/livenessProbe/httpGet/port")), 18001);
    assert!(
        c["readinessProbe"]["httpGet"]
            .get("scheme")
            .is_none_or(|s| s == "HTTP")
    );

    // Security: non-root, read-only root, no capabilities, RuntimeDefault seccomp.
    let pod_sc = at(dep, "/spec/template/spec/securityContext");
    let sc = at(c, "/securityContext");
    assert_eq!(pod_sc["runAsNonRoot"], true);
    assert!(pod_sc["runAsUser"].as_i64().is_some_and(|u| u != 0));
    assert_eq!(pod_sc["seccompProfile"]["type"], "RuntimeDefault");
    assert_eq!(sc["runAsNonRoot"], true);
    assert_eq!(sc["readOnlyRootFilesystem"], true);
    assert_eq!(sc["allowPrivilegeEscalation"], false);
    assert_eq!(sc["capabilities"]["drop"], json!(["ALL"]));
    assert!(
        sc["capabilities"].get("add").is_none(),
        "no capability is added"
    );
    assert!(sc.get("privileged").is_none_or(|p| p == false));
    assert_eq!(sc["seccompProfile"]["type"], "RuntimeDefault");
    assert!(c["resources"]["requests"]["cpu"].is_string(), "cpu request");
    assert!(
        c["resources"]["requests"]["memory"].is_string(),
        "memory request"
    );
    assert!(
        c["resources"]["limits"]["memory"].is_string(),
        "memory limit"
    );
    assert!(
        dep.pointer("/spec/template/spec/hostNetwork")
            .is_none_or(|h| h == false),
        "no host network"
    );

    // Spread across nodes.
    let pod_labels = labels(at(dep, "/spec/template/metadata/labels"));
    let selector = at(dep, "/spec/selector");
    assert!(
        selects(selector, &pod_labels),
        "the Deployment selects its own pods"
    );
    let anti = at(
        dep,
        "/spec/template/spec/affinity/podAntiAffinity/preferredDuringSchedulingIgnoredDuringExecution",
    )
    .as_array()
    .unwrap();
    assert!(
        anti.iter().any(
            |t| t["podAffinityTerm"]["topologyKey"] == "kubernetes.io/hostname"
                && selects(&t["podAffinityTerm"]["labelSelector"], &pod_labels)
        ),
        "preferred anti-affinity by hostname over the control-plane pods"
    );

    // The PodDisruptionBudget exists exactly when asked for with more than one replica.
    assert_eq!(
        r.has("PodDisruptionBudget"),
        x.pdb,
        "PodDisruptionBudget presence"
    );
    if x.pdb {
        let pdb = r.one("PodDisruptionBudget");
        assert_eq!(pdb["apiVersion"], "policy/v1");
        assert_eq!(at(pdb, "/spec/minAvailable").as_i64(), Some(1));
        assert_eq!(at(pdb, "/spec/selector"), selector);
    }

    // Services: xDS + metrics, and the webhook on 443 → the container's 8443.
    let services = r.all("Service");
    assert_eq!(services.len(), 2, "xDS/metrics and webhook Services");
    let resolve = |svc: &Value, port: i64| -> i64 {
        assert!(
            selects(
                &json!({ "matchLabels": svc["spec"]["selector"] }),
                &pod_labels
            ),
            "Service {} selects the control-plane pods",
            svc["metadata"]["name"]
        );
        let p = svc["spec"]["ports"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["port"] == port)
            .unwrap_or_else(|| panic!("Service {} has no port {port}", svc["metadata"]["name"]));
        probe_port(p.get("targetPort").unwrap_or(&p["port"]))
    };
    let injector = r.injector_config();
    let xds_address = injector["xdsAddress"].as_str().expect("xdsAddress");
    let xds_service_name = format!("{}.{ns}.svc:18000", services_named_xds(r));
    assert_eq!(
        xds_address, xds_service_name,
        "the proxy's xDS address is the xDS Service"
    );
    let xds_svc = r.named("Service", services_named_xds(r));
    assert_eq!(resolve(xds_svc, 18000), 18000);
    assert_eq!(resolve(xds_svc, 18001), 18001);
    let webhook_svc = r.named("Service", &env["CAPSTAN_WEBHOOK_SERVICE"]);
    assert_eq!(resolve(webhook_svc, 443), 8443);

    // The injector settings.
    assert_eq!(injector["image"], x.proxy_image.as_str());
    assert!(injector["imagePullPolicy"].is_string());
    assert_eq!(
        injector["ports"],
        json!({ "outbound": 15001, "inbound": 15006, "admin": 15000, "readiness": 15021 })
    );
    assert!(injector["runAsUser"].as_i64().is_some_and(|u| u > 0));
    assert!(injector["concurrency"].as_i64().is_some_and(|n| n > 0));
    assert!(injector["drainTimeSeconds"].as_i64().is_some_and(|n| n > 0));
    assert!(injector["logLevel"].is_string());
    assert!(injector["resources"]["requests"]["memory"].is_string());
    assert!(
        injector["startupProbe"]["failureThreshold"]
            .as_i64()
            .is_some()
    );
    assert!(
        injector["readinessProbe"]["periodSeconds"]
            .as_i64()
            .is_some()
    );
    assert!(
        at(
            dep,
            "/spec/template/metadata/annotations/checksum~1injector"
        )
        .is_string(),
        "the Deployment rolls when the injector settings change"
    );

    // RBAC: exactly the grants of the contract, nothing else.
    let mwc = r.webhook_configuration();
    let mwc_name = mwc["metadata"]["name"].as_str().unwrap();
    assert_eq!(env["CAPSTAN_WEBHOOK_CONFIG"], mwc_name);
    for role in r.all("Role").into_iter().chain(r.all("ClusterRole")) {
        let text = role.to_string();
        assert!(
            !text.contains("\"*\""),
            "no wildcard in {}: {text}",
            role["metadata"]["name"]
        );
    }
    let mut expected: BTreeSet<Grant> =
        own_grants(ns, x.lease, &env["CAPSTAN_WEBHOOK_SECRET"], mwc_name)
            .into_iter()
            .collect();
    if x.watch_namespaces.is_empty() {
        expected.extend(read_grants("cluster", x.watch_secrets));
    } else {
        for w in x.watch_namespaces {
            expected.extend(read_grants(w, x.watch_secrets));
        }
    }
    let granted = r.granted();
    let missing: Vec<_> = expected.difference(&granted).collect();
    let extra: Vec<_> = granted.difference(&expected).collect();
    assert!(
        missing.is_empty() && extra.is_empty(),
        "RBAC differs from the contract\nmissing: {missing:#?}\nextra: {extra:#?}"
    );
    // Secrets are readable cluster-wide or listable only when watchSecrets asks for it, and
    // then read-only, in exactly the scope the other inputs are read in.
    let secret_reads: BTreeSet<&Grant> = granted
        .iter()
        .filter(|g| {
            g.resource == "secrets"
                && (g.scope == "cluster" || g.verb == "list" || g.verb == "watch")
        })
        .collect();
    if x.watch_secrets {
        assert!(
            secret_reads
                .iter()
                .all(|g| ["get", "list", "watch"].contains(&g.verb.as_str())),
            "{secret_reads:#?}"
        );
    } else {
        assert!(
            secret_reads.is_empty(),
            "secrets are never readable cluster-wide nor listable: {secret_reads:#?}"
        );
    }

    // The webhook configuration.
    let webhooks = mwc["webhooks"].as_array().expect("webhooks");
    assert_eq!(webhooks.len(), 2, "namespace- and pod-selected entries");
    for w in webhooks {
        let name = w["name"].as_str().unwrap();
        let cc = &w["clientConfig"];
        assert!(
            cc.get("url").is_none(),
            "{name}: called through the Service"
        );
        assert_eq!(
            cc["service"]["name"],
            env["CAPSTAN_WEBHOOK_SERVICE"].as_str(),
            "{name}"
        );
        assert_eq!(cc["service"]["namespace"], ns, "{name}");
        assert_eq!(cc["service"]["path"], "/inject", "{name}");
        assert_eq!(cc["service"]["port"], 443, "{name}");
        assert!(
            cc.get("caBundle").is_none_or(|b| b == ""),
            "{name}: caBundle is the control plane's to patch"
        );
        assert_eq!(w["failurePolicy"], x.failure_policy, "{name}");
        assert_eq!(w["sideEffects"], "None", "{name}");
        assert_eq!(w["admissionReviewVersions"], json!(["v1"]), "{name}");
        assert_eq!(w["reinvocationPolicy"], "Never", "{name}");
        assert_eq!(w["timeoutSeconds"].as_i64(), Some(x.timeout), "{name}");
        assert_eq!(
            w["rules"],
            json!([{ "operations": ["CREATE"], "apiGroups": [""], "apiVersions": ["v1"], "resources": ["pods"], "scope": "Namespaced" }]),
            "{name}: pod creation only"
        );
    }

    // Selection: the label on the namespace or on the pod; never twice; a `disabled` label
    // opts out; the control plane's own namespace and the excluded ones never.
    let called = |ns_name: &str, ns_label, pod_label| {
        webhooks_called(mwc, ns_name, ns_label, pod_label).len()
    };
    for (ns_label, pod_label, expected) in [
        (None, None, 0),
        (None, Some("enabled"), 1),
        (None, Some("disabled"), 0),
        (None, Some("other"), 0),
        (Some("enabled"), None, 1),
        (Some("enabled"), Some("enabled"), 1),
        (Some("enabled"), Some("disabled"), 0),
        (Some("disabled"), None, 0),
        (Some("disabled"), Some("enabled"), 0),
        (Some("other"), None, 0),
        (Some("other"), Some("enabled"), 1),
    ] {
        assert_eq!(
            called("shop", ns_label, pod_label),
            expected,
            "namespace label {ns_label:?}, pod label {pod_label:?}"
        );
    }
    for never in x.excluded_namespaces.iter().chain([&ns]) {
        for (ns_label, pod_label) in [
            (Some("enabled"), None),
            (None, Some("enabled")),
            (Some("enabled"), Some("enabled")),
        ] {
            assert_eq!(
                called(never, ns_label, pod_label),
                0,
                "{never} is never injected"
            );
        }
    }
}

/// The xDS Service: the one that exposes 18000.
fn services_named_xds(r: &Rendered) -> &str {
    r.all("Service")
        .into_iter()
        .find(|s| {
            s["spec"]["ports"]
                .as_array()
                .unwrap()
                .iter()
                .any(|p| p["port"] == 18000)
        })
        .expect("a Service exposing 18000")["metadata"]["name"]
        .as_str()
        .unwrap()
}

// ---------------------------------------------------------------------------------------------
// Tests

const CUSTOM_VALUES: &str = r#"
controlPlane:
  replicas: 1
  image: { repository: registry.example.com/mesh/cp, tag: "1.2.3", pullPolicy: Always }
  logFormat: text
  logLevel: debug
  watchNamespaces: [shop, payments, shop]
  watchSecrets: true
  resources: { requests: { cpu: 250m, memory: 256Mi }, limits: { memory: 1Gi } }
leaderElection:
  leaseName: mesh-leader
  leaseDurationSeconds: 30
  renewSeconds: 10
webhook:
  failurePolicy: Fail
  timeoutSeconds: 5
  excludeNamespaces: [kube-system, monitoring]
  secretName: mesh-webhook-cert
proxy:
  image: { repository: registry.example.com/mesh/proxy, digest: "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef" }
  concurrency: 4
  logLevel: debug
  drainTimeSeconds: 20
  runAsUser: 2000
"#;

#[test]
fn helm_lint_passes_with_default_and_custom_values() {
    let Some(helm) = helm_or_not_run("lint") else {
        return;
    };
    let (ok, version, _) = helm.run(&["version", "--short"]);
    assert!(ok);
    eprintln!("helm {}", version.trim());
    helm.lint("default", "{}\n");
    helm.lint("custom", CUSTOM_VALUES);
    helm.lint(
        "three-replicas-no-pdb",
        "controlPlane: { replicas: 3, podDisruptionBudget: { enabled: false } }\n",
    );
}

#[test]
fn default_values_render_the_contract() {
    let Some(helm) = helm_or_not_run("default") else {
        return;
    };
    let r = helm.render(RELEASE, NAMESPACE, "default", "{}\n");
    let v = workspace_version();
    check_rendering(
        &r,
        &Expect {
            release_ns: NAMESPACE,
            replicas: 2,
            pdb: true,
            failure_policy: "Ignore",
            timeout: 10,
            watch_namespaces: &[],
            watch_secrets: false,
            lease: "capstan-control-plane",
            lease_duration: "15",
            lease_renew: "2",
            log_format: "json",
            control_plane_image: format!("ghcr.io/capstan/capstan-control-plane:{v}"),
            proxy_image: format!("ghcr.io/capstan/capstan-proxy:{v}"),
            excluded_namespaces: &["kube-system", "kube-public", "kube-node-lease"],
        },
    );
    // The documented defaults of the names the control plane is told about.
    let env = r.env();
    assert_eq!(env["CAPSTAN_WEBHOOK_SERVICE"], "capstan-webhook");
    assert_eq!(env["CAPSTAN_WEBHOOK_CONFIG"], "capstan-injector");
    assert_eq!(env["CAPSTAN_WEBHOOK_SECRET"], "capstan-webhook-tls");
    let injector = r.injector_config();
    assert_eq!(injector["xdsAddress"], "capstan.capstan-system.svc:18000");
    assert_eq!(injector["runAsUser"], 1337);
    assert_eq!(injector["drainTimeSeconds"], 5);
    // What the chart renders, by kind.
    let mut kinds: Vec<&str> = r
        .objects
        .iter()
        .map(|o| o["kind"].as_str().unwrap())
        .collect();
    kinds.sort();
    assert_eq!(
        kinds,
        vec![
            "ClusterRole",
            "ClusterRoleBinding",
            "ConfigMap",
            "CustomResourceDefinition",
            "CustomResourceDefinition",
            "Deployment",
            "MutatingWebhookConfiguration",
            "PodDisruptionBudget",
            "Role",
            "RoleBinding",
            "Service",
            "Service",
            "ServiceAccount",
        ]
    );
}

#[test]
fn custom_values_render_the_contract() {
    let Some(helm) = helm_or_not_run("custom") else {
        return;
    };
    let r = helm.render(RELEASE, NAMESPACE, "custom", CUSTOM_VALUES);
    check_rendering(
        &r,
        &Expect {
            release_ns: NAMESPACE,
            replicas: 1,
            pdb: false,
            failure_policy: "Fail",
            timeout: 5,
            watch_namespaces: &["shop", "payments"],
            watch_secrets: true,
            lease: "mesh-leader",
            lease_duration: "30",
            lease_renew: "10",
            log_format: "text",
            control_plane_image: "registry.example.com/mesh/cp:1.2.3".into(),
            proxy_image: "registry.example.com/mesh/proxy@sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef".into(),
            excluded_namespaces: &["kube-system", "monitoring"],
        },
    );
    let env = r.env();
    assert_eq!(env["CAPSTAN_WEBHOOK_SECRET"], "mesh-webhook-cert");
    assert_eq!(env["RUST_LOG"], "debug");
    assert_eq!(r.container()["imagePullPolicy"], "Always");
    assert_eq!(r.container()["resources"]["limits"]["memory"], "1Gi");
    let injector = r.injector_config();
    assert_eq!(injector["concurrency"], 4);
    assert_eq!(injector["drainTimeSeconds"], 20);
    assert_eq!(injector["runAsUser"], 2000);
    assert_eq!(injector["logLevel"], "debug");
    // With watchNamespaces the ClusterRole keeps only the webhook configuration rule.
    let cluster_role = r.one("ClusterRole");
    assert_eq!(cluster_role["rules"].as_array().unwrap().len(), 1);
}

#[test]
fn other_release_names_and_namespaces_stay_consistent() {
    let Some(helm) = helm_or_not_run("naming") else {
        return;
    };
    let r = helm.render(
        "mesh",
        "mesh-system",
        "three-replicas",
        "controlPlane: { replicas: 3 }\n",
    );
    let v = workspace_version();
    check_rendering(
        &r,
        &Expect {
            release_ns: "mesh-system",
            replicas: 3,
            pdb: true,
            failure_policy: "Ignore",
            timeout: 10,
            watch_namespaces: &[],
            watch_secrets: false,
            lease: "mesh-capstan-control-plane",
            lease_duration: "15",
            lease_renew: "2",
            log_format: "json",
            control_plane_image: format!("ghcr.io/capstan/capstan-control-plane:{v}"),
            proxy_image: format!("ghcr.io/capstan/capstan-proxy:{v}"),
            excluded_namespaces: &["kube-system", "kube-public", "kube-node-lease"],
        },
    );
    assert_eq!(
        r.injector_config()["xdsAddress"],
        "mesh-capstan.mesh-system.svc:18000"
    );

    // Disabling the PodDisruptionBudget is honoured even with several replicas.
    let r = helm.render(
        RELEASE,
        NAMESPACE,
        "no-pdb",
        "controlPlane: { replicas: 3, podDisruptionBudget: { enabled: false } }\n",
    );
    assert!(!r.has("PodDisruptionBudget"));
}

#[test]
fn watch_secrets_grants_secret_reads_only_where_the_control_plane_watches() {
    let Some(helm) = helm_or_not_run("watch-secrets") else {
        return;
    };
    let r = helm.render(
        RELEASE,
        NAMESPACE,
        "watch-secrets",
        "controlPlane: { watchSecrets: true }\n",
    );
    let v = workspace_version();
    // check_rendering asserts the exact grants: get/list/watch on secrets cluster-wide, as
    // for every other input when watchNamespaces is empty.
    check_rendering(
        &r,
        &Expect {
            release_ns: NAMESPACE,
            replicas: 2,
            pdb: true,
            failure_policy: "Ignore",
            timeout: 10,
            watch_namespaces: &[],
            watch_secrets: true,
            lease: "capstan-control-plane",
            lease_duration: "15",
            lease_renew: "2",
            log_format: "json",
            control_plane_image: format!("ghcr.io/capstan/capstan-control-plane:{v}"),
            proxy_image: format!("ghcr.io/capstan/capstan-proxy:{v}"),
            excluded_namespaces: &["kube-system", "kube-public", "kube-node-lease"],
        },
    );
    let granted = r.granted();
    for verb in ["get", "list", "watch"] {
        assert!(granted.contains(&grant("cluster", "", "secrets", verb, "*any*")));
    }
    assert!(
        !granted.iter().any(|g| g.resource == "secrets"
            && g.scope == "cluster"
            && !["get", "list", "watch"].contains(&g.verb.as_str())),
        "never more than reads"
    );
}

#[test]
fn invalid_values_are_rejected_at_render_time() {
    let Some(helm) = helm_or_not_run("invalid") else {
        return;
    };
    for (name, values, message) in [
        (
            "bad-policy",
            "webhook: { failurePolicy: Sometimes }\n",
            "webhook.failurePolicy",
        ),
        (
            "bad-timeout",
            "webhook: { timeoutSeconds: 60 }\n",
            "webhook.timeoutSeconds",
        ),
        (
            "bad-lease",
            "leaderElection: { leaseDurationSeconds: 5, renewSeconds: 5 }\n",
            "renewSeconds",
        ),
        (
            "zero-renew",
            "leaderElection: { renewSeconds: 0 }\n",
            "renewSeconds",
        ),
        (
            "bad-format",
            "controlPlane: { logFormat: xml }\n",
            "logFormat",
        ),
        ("root-proxy", "proxy: { runAsUser: 0 }\n", "runAsUser"),
    ] {
        match helm.template_text(RELEASE, NAMESPACE, name, values) {
            Ok(_) => panic!("{name}: helm template accepted {values}"),
            Err(e) => assert!(
                e.contains(message),
                "{name}: error does not name {message}: {e}"
            ),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Without helm

#[test]
fn chart_crds_are_byte_identical_to_crds_dir() {
    let list = |dir: &Path| -> BTreeSet<String> {
        std::fs::read_dir(dir)
            .unwrap_or_else(|e| panic!("read {}: {e}", dir.display()))
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect()
    };
    let source = root().join("crds");
    let chart = chart_dir().join("crds");
    let names = list(&source);
    assert!(
        names.iter().any(|n| n.ends_with(".yaml")),
        "crds/ holds the CRDs"
    );
    assert_eq!(
        list(&chart),
        names,
        "charts/capstan/crds/ holds exactly the files of crds/"
    );
    for name in &names {
        let a = std::fs::read(source.join(name)).unwrap();
        let b = std::fs::read(chart.join(name)).unwrap();
        assert!(
            a == b,
            "charts/capstan/crds/{name} differs from crds/{name}: cp crds/*.yaml charts/capstan/crds/"
        );
    }
}

#[test]
fn chart_metadata_matches_the_workspace() {
    let chart: Value =
        serde_saphyr::from_str(&read(&chart_dir().join("Chart.yaml"))).expect("Chart.yaml");
    assert_eq!(chart["apiVersion"], "v2");
    assert_eq!(chart["name"], "capstan");
    assert_eq!(
        chart["appVersion"],
        workspace_version(),
        "Chart.yaml appVersion is the workspace version of Cargo.toml"
    );
    // values.yaml is documented field by field: every key has a comment line right above it,
    // except the keys nested in the value of a documented field (`# -- ...` above e.g.
    // `resources:` covers `requests:` and `cpu:` below it).
    let values = read(&chart_dir().join("values.yaml"));
    let lines: Vec<&str> = values.lines().collect();
    let mut covering: Vec<usize> = Vec::new();
    for (i, line) in lines.iter().enumerate() {
        let t = line.trim_start();
        if t.is_empty() || t.starts_with('#') || t.starts_with('-') || !t.contains(':') {
            continue;
        }
        let indent = line.len() - t.len();
        while covering.last().is_some_and(|&c| c >= indent) {
            covering.pop();
        }
        // The comment block right above the key.
        let comments: Vec<&str> = lines[..i]
            .iter()
            .rev()
            .map(|l| l.trim_start())
            .take_while(|l| l.starts_with('#'))
            .collect();
        assert!(
            !covering.is_empty() || !comments.is_empty(),
            "values.yaml line {}: `{t}` has no comment above it",
            i + 1
        );
        if covering.is_empty() && comments.iter().any(|c| c.starts_with("# --")) {
            covering.push(indent);
        }
    }
}

/// Package name → its binary names, for every workspace member.
fn workspace_crates() -> BTreeMap<String, BTreeSet<String>> {
    let cargo = read(&root().join("Cargo.toml"));
    let members_start = cargo.find("members").expect("workspace members");
    let list = &cargo[members_start..];
    let list = &list[list.find('[').unwrap() + 1..list.find(']').unwrap()];
    let mut crates = BTreeMap::new();
    for member in list
        .split(',')
        .map(|m| m.trim().trim_matches('"'))
        .filter(|m| !m.is_empty())
    {
        let manifest = read(&root().join(member).join("Cargo.toml"));
        let mut section = String::new();
        let mut package = None;
        let mut bins = BTreeSet::new();
        for line in manifest.lines().map(str::trim) {
            if line.starts_with('[') {
                section = line.to_string();
                continue;
            }
            let Some((key, value)) = line.split_once('=') else {
                continue;
            };
            if key.trim() != "name" {
                continue;
            }
            let value = value.trim().trim_matches('"').to_string();
            match section.as_str() {
                "[package]" => package = Some(value),
                "[[bin]]" => {
                    bins.insert(value);
                }
                _ => {}
            }
        }
        let package = package.unwrap_or_else(|| panic!("{member}/Cargo.toml has no package name"));
        // A package without [[bin]] sections gets a binary of its own name from src/main.rs.
        if bins.is_empty() && root().join(member).join("src/main.rs").is_file() {
            bins.insert(package.clone());
        }
        crates.insert(package, bins);
    }
    crates
}

#[test]
fn dockerfiles_build_workspace_crates_into_distroless_images() {
    let crates = workspace_crates();
    let mut built = BTreeSet::new();
    for (file, expected_crate) in [
        ("control-plane.Dockerfile", "capstan-control-plane"),
        ("proxy.Dockerfile", "capstan-proxy"),
    ] {
        let path = root().join("docker").join(file);
        let text = read(&path);
        // Join continuation lines, drop comments.
        let joined = text.replace("\\\n", " ");
        let instructions: Vec<&str> = joined
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
            .collect();
        let froms: Vec<&str> = instructions
            .iter()
            .copied()
            .filter(|l| l.starts_with("FROM "))
            .collect();
        assert_eq!(froms.len(), 2, "{file}: a builder stage and a final stage");
        assert!(
            froms[0].starts_with("FROM rust:1-bookworm AS "),
            "{file}: builder is rust:1-bookworm: {}",
            froms[0]
        );
        assert_eq!(
            froms[1], "FROM gcr.io/distroless/cc-debian12:nonroot",
            "{file}: final image"
        );

        let build = instructions
            .iter()
            .find(|l| l.starts_with("RUN ") && l.contains("cargo build"))
            .unwrap_or_else(|| panic!("{file}: no `cargo build`"));
        let words: Vec<&str> = build.split_whitespace().collect();
        assert!(
            words.contains(&"--release") && words.contains(&"--locked"),
            "{file}: --release --locked"
        );
        let package = words
            .windows(2)
            .find(|w| w[0] == "-p" || w[0] == "--package")
            .map(|w| w[1])
            .unwrap_or_else(|| panic!("{file}: cargo build without -p"));
        assert_eq!(package, expected_crate, "{file}");
        let bins = crates.get(package).unwrap_or_else(|| {
            panic!(
                "{file}: -p {package} is not a workspace member ({:?})",
                crates.keys()
            )
        });
        let binary = words
            .iter()
            .find_map(|w| w.strip_prefix("target/release/"))
            .unwrap_or_else(|| panic!("{file}: the binary is not taken from target/release/"));
        assert!(
            bins.contains(binary),
            "{file}: crate {package} has no binary {binary} ({bins:?})"
        );

        // The final stage copies that binary from the builder and runs it, as non-root.
        let final_stage: Vec<&str> = instructions
            .iter()
            .copied()
            .skip_while(|l| *l != froms[1])
            .collect();
        let copy = final_stage
            .iter()
            .find(|l| l.starts_with("COPY --from="))
            .unwrap_or_else(|| panic!("{file}: the final stage copies nothing from the builder"));
        let installed = copy.split_whitespace().last().unwrap();
        assert!(
            copy.contains(&format!("/{binary} ")),
            "{file}: copies {binary}: {copy}"
        );
        let entrypoint = final_stage
            .iter()
            .find(|l| l.starts_with("ENTRYPOINT"))
            .unwrap_or_else(|| panic!("{file}: no ENTRYPOINT"));
        assert_eq!(
            *entrypoint,
            format!("ENTRYPOINT [\"{installed}\"]"),
            "{file}"
        );
        let user = final_stage
            .iter()
            .find(|l| l.starts_with("USER "))
            .unwrap_or_else(|| panic!("{file}: no USER"));
        assert!(
            !user.contains(" 0") && !user.contains("root:") && !user.ends_with(" root"),
            "{file}: {user}"
        );
        built.insert(package.to_string());
    }
    assert_eq!(built.len(), 2);

    // The build context must hold the whole workspace (every member, the lock file) and
    // nothing heavy.
    let ignore = read(&root().join(".dockerignore"));
    let ignored: BTreeSet<&str> = ignore
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .collect();
    for must in ["/target", "/.git"] {
        assert!(ignored.contains(must), ".dockerignore excludes {must}");
    }
    let cargo = read(&root().join("Cargo.toml"));
    let members: Vec<String> = crates_member_dirs(&cargo);
    for kept in
        members
            .iter()
            .map(String::as_str)
            .chain(["Cargo.toml", "Cargo.lock", "examples", "crds"])
    {
        assert!(
            !ignored.iter().any(|i| i.trim_start_matches('/') == kept),
            ".dockerignore must not exclude {kept}: the build needs it"
        );
    }
}

fn crates_member_dirs(cargo: &str) -> Vec<String> {
    let start = cargo.find("members").expect("members");
    let list = &cargo[start..];
    let list = &list[list.find('[').unwrap() + 1..list.find(']').unwrap()];
    list.split(',')
        .map(|m| m.trim().trim_matches('"').to_string())
        .filter(|m| !m.is_empty())
        .collect()
}
