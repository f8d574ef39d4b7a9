//! The file provider: every YAML/JSON document under a directory (nested directories and
//! multi-document files included) of kinds ServiceRoute, ServicePolicy, v1 Service,
//! discovery.k8s.io/v1 EndpointSlice and v1 Secret (`data`/`stringData`; only the TLS keys of
//! Secrets a ServicePolicy references are kept), watched for edits.
//!
//! A file that fails to parse, or an object that fails validation, is reported (file, document
//! index, field path, reason) and the rest keeps being served. An object whose new version is
//! invalid keeps its last valid version in effect; so do the objects of a file that stops
//! parsing, until it parses again.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

use notify::{RecursiveMode, Watcher};
use tokio::sync::mpsc;

use super::parse::{self, Decoded, Kind, Object};
use crate::store::{Diagnostic, ObjectKey, Store, StoreSnapshot};

/// The namespace of objects that name none.
pub const DEFAULT_NAMESPACE: &str = "default";

/// The objects read from a directory, keyed by kind and name, with the file each came from.
#[derive(Clone, Debug, Default)]
pub struct Loaded {
    pub objects: BTreeMap<(Kind, ObjectKey), (Object, PathBuf)>,
    pub diagnostics: Vec<Diagnostic>,
    /// Files that could not be read or parsed at all.
    pub broken_files: BTreeSet<PathBuf>,
}

fn yaml_files(dir: &Path, out: &mut Vec<PathBuf>, diagnostics: &mut Vec<Diagnostic>) {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) => {
            diagnostics.push(Diagnostic {
                source: dir.display().to_string(),
                object: None,
                message: format!("cannot read directory: {e}"),
            });
            return;
        }
    };
    let mut paths: Vec<PathBuf> = entries.flatten().map(|e| e.path()).collect();
    paths.sort();
    for path in paths {
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default();
        // Editors' swap and backup files, and Kubernetes' ConfigMap-mount `..data` links.
        if name.starts_with('.') {
            continue;
        }
        if path.is_dir() {
            yaml_files(&path, out, diagnostics);
        } else if matches!(
            path.extension().and_then(|e| e.to_str()),
            Some("yaml" | "yml" | "json")
        ) {
            out.push(path);
        }
    }
}

/// Reads every document under `dir`. `previous` supplies last valid versions for objects
/// that are now invalid and for files that no longer parse.
pub fn load_dir(dir: &Path, previous: Option<&Loaded>) -> Loaded {
    let mut loaded = Loaded::default();
    let mut files = Vec::new();
    yaml_files(dir, &mut files, &mut loaded.diagnostics);
    for file in &files {
        load_file(file, previous, &mut loaded);
    }
    loaded
}

fn load_file(file: &Path, previous: Option<&Loaded>, loaded: &mut Loaded) {
    let shown = file.display().to_string();
    let text = match std::fs::read_to_string(file) {
        Ok(t) => t,
        Err(e) => {
            loaded.diagnostics.push(Diagnostic {
                source: shown,
                object: None,
                message: format!("cannot read file: {e}"),
            });
            keep_file(file, previous, loaded);
            return;
        }
    };
    let docs: Vec<serde_json::Value> = match serde_saphyr::from_multiple(&text) {
        Ok(d) => d,
        Err(e) => {
            loaded.diagnostics.push(Diagnostic {
                source: shown,
                object: None,
                // Only the position and reason: the parser's source excerpt could quote a
                // Secret's contents into logs and statuses.
                message: format!(
                    "YAML syntax error: {}",
                    e.to_string().lines().next().unwrap_or_default()
                ),
            });
            keep_file(file, previous, loaded);
            return;
        }
    };
    for (index, doc) in docs.into_iter().enumerate() {
        if doc.is_null() {
            continue;
        }
        let source = format!("{shown}#{index}");
        match parse::decode(doc, DEFAULT_NAMESPACE) {
            Ok(Decoded::Object(key, object)) => {
                let id = (object.kind(), key);
                if let Some((_, other)) = loaded.objects.get(&id) {
                    loaded.diagnostics.push(Diagnostic {
                        source,
                        object: Some(describe(&id)),
                        message: format!(
                            "defined again (first in {}); this definition is ignored",
                            other.display()
                        ),
                    });
                    continue;
                }
                loaded.objects.insert(id, (object, file.to_path_buf()));
            }
            Ok(Decoded::Skipped(s)) => {
                tracing::debug!(%source, api_version = %s.api_version, kind = %s.kind, "skipping a kind the file provider does not read");
            }
            Err(e) => {
                let kept = e.object.as_ref().and_then(|id| {
                    let (obj, from) = previous?.objects.get(id)?;
                    Some((id.clone(), obj.clone(), from.clone()))
                });
                let suffix = if kept.is_some() {
                    " (keeping its last valid version)"
                } else {
                    ""
                };
                for m in &e.messages {
                    loaded.diagnostics.push(Diagnostic {
                        source: source.clone(),
                        object: e.object.as_ref().map(describe),
                        message: format!("{m}{suffix}"),
                    });
                }
                if let Some((id, obj, from)) = kept {
                    loaded.objects.entry(id).or_insert((obj, from));
                }
            }
        }
    }
}

/// Keeps the objects last read from a file that can no longer be read or parsed.
fn keep_file(file: &Path, previous: Option<&Loaded>, loaded: &mut Loaded) {
    loaded.broken_files.insert(file.to_path_buf());
    let Some(previous) = previous else { return };
    for (id, (obj, from)) in &previous.objects {
        if from == file {
            loaded
                .objects
                .entry(id.clone())
                .or_insert((obj.clone(), from.clone()));
        }
    }
}

fn describe((kind, key): &(Kind, ObjectKey)) -> String {
    format!("{} {key}", kind.as_str())
}

/// Replaces the store's objects with `loaded`.
pub fn apply(loaded: &Loaded, snapshot: &mut StoreSnapshot) {
    super::clear_objects(snapshot);
    for ((_, key), (object, _)) in &loaded.objects {
        super::insert(snapshot, key, object);
    }
    snapshot.diagnostics = loaded.diagnostics.clone();
    super::retain_referenced_secrets(snapshot);
    snapshot.synced = true;
}

/// Loads `dir` once into a fresh snapshot (for `translate` and tests).
pub fn load_snapshot(dir: &Path) -> StoreSnapshot {
    let mut snapshot = StoreSnapshot::default();
    apply(&load_dir(dir, None), &mut snapshot);
    snapshot
}

fn report(loaded: &Loaded) {
    for d in &loaded.diagnostics {
        tracing::warn!(source = %d.source, object = d.object.as_deref().unwrap_or(""), "{}", d.message);
    }
}

/// Loads `dir` into `store`, then reloads on every change (after `debounce` of quiet) until
/// `shutdown` resolves. Returns an error only if the directory cannot be watched at all.
pub async fn run(
    dir: PathBuf,
    store: Store,
    debounce: Duration,
    shutdown: impl std::future::Future<Output = ()>,
) -> anyhow::Result<()> {
    let (tx, mut rx) = mpsc::unbounded_channel();
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        // Our own reads of the directory show up as access events: reacting to them would
        // reload forever.
        if let Ok(e) = &event
            && matches!(e.kind, notify::EventKind::Access(_))
        {
            return;
        }
        // The receiver only disappears at shutdown.
        let _ = tx.send(event);
    })?;
    watcher
        .watch(&dir, RecursiveMode::Recursive)
        .map_err(|e| anyhow::anyhow!("cannot watch {}: {e}", dir.display()))?;

    let mut current = load_dir(&dir, None);
    report(&current);
    tracing::info!(dir = %dir.display(), objects = current.objects.len(), "loaded configuration directory");
    store.update(|s| apply(&current, s));

    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = &mut shutdown => return Ok(()),
            event = rx.recv() => {
                let Some(event) = event else { return Ok(()) };
                if let Err(e) = event {
                    tracing::warn!("file watch error: {e}");
                }
                // Debounce: editors write a file in several steps; wait for quiet.
                while let Ok(Some(_)) = tokio::time::timeout(debounce, rx.recv()).await {}
                let next = load_dir(&dir, Some(&current));
                report(&next);
                let changed = next.objects.len() != current.objects.len()
                    || next.diagnostics != current.diagnostics
                    || format!("{:?}", next.objects) != format!("{:?}", current.objects);
                current = next;
                if changed {
                    tracing::info!(objects = current.objects.len(), "configuration directory changed");
                    store.update(|s| apply(&current, s));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, text: &str) {
        let path = dir.join(name);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).expect("mkdir");
        }
        std::fs::write(path, text).expect("write");
    }

    const SVC: &str = "apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: shop}\nspec:\n  ports: [{port: 80}]\n";
    const ROUTE: &str = "apiVersion: capstan.dev/v1alpha1\nkind: ServiceRoute\nmetadata: {name: r, namespace: shop}\nspec:\n  parentRefs: [{name: web}]\n";

    #[test]
    fn reads_nested_multi_document_files() {
        let dir = tempdir();
        write(&dir, "a.yaml", &format!("---\n{SVC}---\n{ROUTE}"));
        write(
            &dir,
            "nested/deeper/b.yml",
            "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: x}\n",
        );
        let s = load_snapshot(&dir);
        assert_eq!(s.services.len(), 1);
        assert_eq!(s.routes.len(), 1);
        assert!(s.diagnostics.is_empty(), "{:?}", s.diagnostics);
    }

    #[test]
    fn invalid_object_keeps_last_valid_version_and_reports_document() {
        let dir = tempdir();
        write(&dir, "r.yaml", &format!("{SVC}---\n{ROUTE}"));
        let first = load_dir(&dir, None);
        write(
            &dir,
            "r.yaml",
            &format!(
                "{SVC}---\n{}",
                ROUTE.replace("[{name: web}]", "[{name: web, port: 0}]")
            ),
        );
        let second = load_dir(&dir, Some(&first));
        assert_eq!(second.objects.len(), 2, "route kept");
        let d = &second.diagnostics[0];
        assert!(d.source.ends_with("r.yaml#1"), "{d}");
        assert_eq!(d.object.as_deref(), Some("ServiceRoute shop/r"));
        assert!(
            d.message.contains("spec.parentRefs[0].port")
                && d.message.contains("keeping its last valid version"),
            "{d}"
        );
    }

    #[test]
    fn broken_file_keeps_its_objects_and_others_still_load() {
        let dir = tempdir();
        write(&dir, "svc.yaml", SVC);
        write(&dir, "route.yaml", ROUTE);
        let first = load_dir(&dir, None);
        write(&dir, "route.yaml", "spec: [unclosed\n");
        write(&dir, "svc2.yaml", &SVC.replace("web", "api"));
        let second = load_dir(&dir, Some(&first));
        assert_eq!(second.objects.len(), 3);
        assert!(
            second.diagnostics[0]
                .message
                .starts_with("YAML syntax error")
        );
        assert!(
            second
                .broken_files
                .iter()
                .any(|f| f.ends_with("route.yaml"))
        );
    }

    #[test]
    fn referenced_secrets_are_read_from_data_and_others_are_dropped() {
        use base64::Engine;
        let pem =
            "-----BEGIN CERTIFICATE-----\nMIIBszCCAVmgAwIBAgIUS3Ju\n-----END CERTIFICATE-----\n";
        let b64 = base64::engine::general_purpose::STANDARD.encode(pem);
        let policy = "apiVersion: capstan.dev/v1alpha1\nkind: ServicePolicy\nmetadata: {name: p, namespace: shop}\nspec:\n  targetRef: {name: web}\n  tls: {mode: Simple, caCertificateSecret: {name: ca}}\n";
        let secret = |name: &str, ca: &str| {
            format!(
                "apiVersion: v1\nkind: Secret\nmetadata: {{name: {name}, namespace: shop}}\ndata:\n  ca.crt: {ca}\n"
            )
        };
        let dir = tempdir();
        write(&dir, "svc.yaml", SVC);
        write(&dir, "policy.yaml", policy);
        write(&dir, "ca.yaml", &secret("ca", &b64));
        write(
            &dir,
            "other.yaml",
            &format!(
                "{}---\n{}",
                secret("other", &b64),
                secret("broken", "'%%%'")
            ),
        );
        let first = load_dir(&dir, None);
        let mut s = StoreSnapshot::default();
        apply(&first, &mut s);
        assert_eq!(
            s.secrets.keys().cloned().collect::<Vec<_>>(),
            vec![ObjectKey::new("shop", "ca")],
            "only the referenced Secret is kept"
        );
        assert_eq!(
            s.secrets[&ObjectKey::new("shop", "ca")].ca_crt.as_deref(),
            Some(pem.as_bytes())
        );
        assert!(
            s.diagnostics.is_empty(),
            "unreferenced Secrets are nobody's problem: {:?}",
            s.diagnostics
        );

        // A bad rotation keeps the last valid version and is reported, naming the key.
        write(&dir, "ca.yaml", &secret("ca", "bm90IGEgY2VydA=="));
        let second = load_dir(&dir, Some(&first));
        apply(&second, &mut s);
        assert_eq!(
            s.secrets[&ObjectKey::new("shop", "ca")].ca_crt.as_deref(),
            Some(pem.as_bytes())
        );
        assert_eq!(s.diagnostics.len(), 1, "{:?}", s.diagnostics);
        assert_eq!(s.diagnostics[0].object.as_deref(), Some("Secret shop/ca"));
        assert_eq!(
            s.diagnostics[0].message,
            "ca.crt: no PEM CERTIFICATE block (keeping its last valid version)"
        );
    }

    fn tempdir() -> PathBuf {
        use std::sync::atomic::{AtomicU32, Ordering};
        static N: AtomicU32 = AtomicU32::new(0);
        let dir = std::env::temp_dir().join(format!(
            "capstan-file-test-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("mkdir");
        dir
    }
}
