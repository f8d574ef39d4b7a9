//! `AdmissionReview` in, `AdmissionReview` out: whether a pod gets the proxy, and the JSON patch
//! (RFC 6902) that adds it. Pure: no I/O, no clock, no panics on any input.
//!
//! # What is answered
//!
//! Every answer is `allowed: true`. An injector problem must never block pod creation (whether
//! a *failed call* blocks it is the webhook's `failurePolicy`, the API server's business):
//!
//! * not a pod `CREATE` (`request.kind` other than core `v1` `Pod`, another operation, a
//!   subresource): allowed unchanged, silently;
//! * opted out — label or annotation `capstan.dev/inject: disabled` (or `false`): unchanged;
//! * already injected — an init container named `capstan-proxy`, or the annotation
//!   `capstan.dev/status: injected`: unchanged (injection is idempotent);
//! * `hostNetwork: true`, a regular container already named `capstan-proxy`, or an app
//!   container port that is one of the proxy's ports: unchanged, with a warning in
//!   `response.warnings` (`kubectl` prints them) saying why;
//! * a pod that does not decode: unchanged, with a warning naming the field;
//! * a body that is not an `admission.k8s.io/v1` `AdmissionReview` with a `request.uid`:
//!   `allowed: true` with `response.uid: ""` and `response.status {code: 400, message}`
//!   explaining. `review` always produces an `AdmissionReview` (the HTTP layer answers 200);
//!   the API server rejects a response whose uid does not match and then applies
//!   `failurePolicy`, exactly as for a 400. The server may map `status.code` 400 to HTTP 400.
//!
//! Which pods are reviewed at all is the `MutatingWebhookConfiguration`'s selectors (namespace
//! or pod label `capstan.dev/inject=enabled`); everything that reaches [`review`] is injected
//! unless one of the cases above applies.
//!
//! # What is added
//!
//! The first init container, `capstan-proxy`, with `restartPolicy: Always` (a native sidecar:
//! the kubelet starts the app containers only after its `startupProbe` passes, and stops it
//! after them):
//!
//! ```text
//! capstan-proxy --xds-address http://<xdsAddress> --node-id $(POD_NAME).$(POD_NAMESPACE)
//!   --service-cluster <workload> --concurrency N --log-level L --drain-time-s D
//!   [--readiness-address 0.0.0.0:<readiness port>   only when it is not 15021]
//!   --node-metadata NAMESPACE=$(POD_NAMESPACE) --node-metadata APP_PORTS=<p1,p2,…>
//! ```
//!
//! `POD_NAME` / `POD_NAMESPACE` come from the downward API; `<workload>` is the pod label
//! `app.kubernetes.io/name`, else `app`, else its `generateName` without the ReplicaSet's
//! pod-template-hash (`reviews-v1-7d9f8c6b5d-` → `reviews-v1`), else its name; `APP_PORTS` is
//! every TCP `containerPort` of the app containers. The readiness port is exposed as
//! `capstan-ready` and probed on `/ready` by the `startupProbe` and `readinessProbe`; the admin
//! port is not exposed. The container runs as `runAsUser`/`runAsGroup` (never root), with a
//! read-only root filesystem, no privilege escalation, every capability dropped and the
//! `RuntimeDefault` seccomp profile. The pod gets the annotation `capstan.dev/status: injected`.
//!
//! Traffic is **not** redirected (no iptables, no init container with `NET_ADMIN`): the app
//! sends its requests to the outbound listener (`127.0.0.1:15001`) explicitly, and callers reach
//! the inbound listener through the Service's ports.
//!
//! # Per-pod overrides (pod annotations)
//!
//! | annotation                          | replaces                  | accepted values              |
//! |-------------------------------------|---------------------------|------------------------------|
//! | `capstan.dev/proxy-image`           | `image`                   | non-empty, no whitespace     |
//! | `capstan.dev/proxy-log-level`       | `logLevel`                | trace … off (proxy's levels) |
//! | `capstan.dev/proxy-concurrency`     | `concurrency`             | integer ≥ 1                  |
//! | `capstan.dev/proxy-cpu-request`     | `resources.requests.cpu`  | Kubernetes quantity          |
//! | `capstan.dev/proxy-memory-request`  | `resources.requests.memory` | Kubernetes quantity        |
//! | `capstan.dev/proxy-cpu-limit`       | `resources.limits.cpu`    | Kubernetes quantity          |
//! | `capstan.dev/proxy-memory-limit`    | `resources.limits.memory` | Kubernetes quantity          |
//!
//! An invalid value does not stop injection: the configured default is used and a warning names
//! the annotation. A request above its limit (after overrides) would make the API server
//! reject the pod, so both overrides of that resource are dropped, with a warning.

use std::collections::BTreeMap;

use base64::Engine as _;
use k8s_openapi::api::core::v1::{
    Capabilities, Container, ContainerPort, EnvVar, EnvVarSource, HTTPGetAction,
    ObjectFieldSelector, Pod, Probe, ResourceRequirements, SeccompProfile, SecurityContext,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use serde_json::{Value, json};

use super::config::{self, InjectorConfig, ProbeTimings};

/// The injected container's name.
pub const CONTAINER_NAME: &str = "capstan-proxy";
/// Label or annotation: `enabled` selects (webhook selectors), `disabled`/`false` opts out.
pub const INJECT: &str = "capstan.dev/inject";
/// Annotation set on injected pods (value [`INJECTED`]).
pub const STATUS: &str = "capstan.dev/status";
pub const INJECTED: &str = "injected";
/// Per-pod override annotations.
pub const PROXY_IMAGE: &str = "capstan.dev/proxy-image";
pub const PROXY_LOG_LEVEL: &str = "capstan.dev/proxy-log-level";
pub const PROXY_CONCURRENCY: &str = "capstan.dev/proxy-concurrency";
pub const PROXY_CPU_REQUEST: &str = "capstan.dev/proxy-cpu-request";
pub const PROXY_MEMORY_REQUEST: &str = "capstan.dev/proxy-memory-request";
pub const PROXY_CPU_LIMIT: &str = "capstan.dev/proxy-cpu-limit";
pub const PROXY_MEMORY_LIMIT: &str = "capstan.dev/proxy-memory-limit";
/// The name of the exposed readiness port.
pub const READY_PORT_NAME: &str = "capstan-ready";
/// The proxy's built-in readiness address port (`--readiness-address` default).
const DEFAULT_READINESS_PORT: u16 = 15021;

const API_VERSION: &str = "admission.k8s.io/v1";

/// Answers one `AdmissionReview` (the request body) with an `AdmissionReview` (the response
/// body). Never fails: see the module documentation for every case.
pub fn review(body: &[u8], config: &InjectorConfig) -> Vec<u8> {
    let answer = match decide(body, config) {
        Ok((uid, outcome)) => response(&uid, outcome, None),
        Err(message) => response(
            "",
            Outcome::default(),
            Some(format!("capstan injector: {message}")),
        ),
    };
    serde_json::to_vec(&answer).unwrap_or_else(|_| {
        // Unreachable for a `Value` (string keys only); still an answer rather than a panic.
        br#"{"apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview","response":{"uid":"","allowed":true}}"#.to_vec()
    })
}

/// What to answer for a review that has a uid.
#[derive(Debug, Default)]
struct Outcome {
    /// RFC 6902 operations; `None`: the pod is left unchanged.
    patch: Option<Vec<Value>>,
    warnings: Vec<String>,
    /// `response.status.message` (with code 400) for a review that could not be understood.
    message: Option<String>,
}

impl Outcome {
    fn unchanged() -> Outcome {
        Outcome::default()
    }

    fn warn(warning: String) -> Outcome {
        Outcome {
            warnings: vec![warning],
            ..Outcome::default()
        }
    }
}

fn response(uid: &str, outcome: Outcome, failure: Option<String>) -> Value {
    let mut r = serde_json::Map::new();
    r.insert("uid".into(), json!(uid));
    r.insert("allowed".into(), json!(true));
    if let Some(ops) = outcome.patch {
        let bytes = serde_json::to_vec(&ops).unwrap_or_default();
        r.insert("patchType".into(), json!("JSONPatch"));
        r.insert(
            "patch".into(),
            json!(base64::engine::general_purpose::STANDARD.encode(bytes)),
        );
    }
    if !outcome.warnings.is_empty() {
        r.insert("warnings".into(), json!(outcome.warnings));
    }
    if let Some(message) = failure.or(outcome.message) {
        r.insert("status".into(), json!({"code": 400, "message": message}));
    }
    json!({"apiVersion": API_VERSION, "kind": "AdmissionReview", "response": r})
}

/// `Err` only when there is no uid to answer to.
fn decide(body: &[u8], config: &InjectorConfig) -> Result<(String, Outcome), String> {
    let review: Value =
        serde_json::from_slice(body).map_err(|e| format!("the request body is not JSON: {e}"))?;
    let request = review
        .get("request")
        .filter(|r| r.is_object())
        .ok_or("the AdmissionReview has no request")?;
    let uid = request
        .get("uid")
        .and_then(Value::as_str)
        .filter(|u| !u.is_empty())
        .ok_or("the AdmissionReview's request has no uid")?
        .to_string();
    fn text<'a>(v: &'a Value, field: &str) -> &'a str {
        v.get(field).and_then(Value::as_str).unwrap_or_default()
    }
    let (api_version, kind) = (text(&review, "apiVersion"), text(&review, "kind"));
    if api_version != API_VERSION || kind != "AdmissionReview" {
        let message = format!(
            "capstan injector: expected {API_VERSION} AdmissionReview, got {api_version:?} {kind:?}; pod not injected"
        );
        return Ok((
            uid,
            Outcome {
                warnings: vec![message.clone()],
                message: Some(message),
                patch: None,
            },
        ));
    }
    let gvk = request.get("kind").unwrap_or(&Value::Null);
    let is_pod =
        text(gvk, "group").is_empty() && text(gvk, "version") == "v1" && text(gvk, "kind") == "Pod";
    if !is_pod || text(request, "operation") != "CREATE" || !text(request, "subResource").is_empty()
    {
        return Ok((uid, Outcome::unchanged()));
    }
    let Some(object) = request.get("object").filter(|o| o.is_object()) else {
        let message = "capstan injector: the pod CREATE review has no object; pod not injected";
        return Ok((
            uid,
            Outcome {
                warnings: vec![message.to_string()],
                message: Some(message.to_string()),
                patch: None,
            },
        ));
    };
    let pod: Pod = match serde_path_to_error::deserialize(object) {
        Ok(p) => p,
        Err(e) => {
            let message = format!(
                "capstan injector: cannot decode the pod ({}: {}); pod not injected",
                e.path(),
                e.inner()
            );
            return Ok((
                uid,
                Outcome {
                    warnings: vec![message.clone()],
                    message: Some(message),
                    patch: None,
                },
            ));
        }
    };
    Ok((uid, inject(&pod, object, config)))
}

/// The injection decision for a decoded pod; `raw` is the same pod as JSON (to tell absent
/// from empty when building the patch).
fn inject(pod: &Pod, raw: &Value, config: &InjectorConfig) -> Outcome {
    let meta = &pod.metadata;
    let label = |k: &str| {
        meta.labels
            .as_ref()
            .and_then(|l| l.get(k))
            .map(String::as_str)
    };
    let annotation = |k: &str| {
        meta.annotations
            .as_ref()
            .and_then(|a| a.get(k))
            .map(String::as_str)
    };
    let opted_out = |v: Option<&str>| {
        v.is_some_and(|v| matches!(v.trim().to_ascii_lowercase().as_str(), "disabled" | "false"))
    };
    if opted_out(label(INJECT)) || opted_out(annotation(INJECT)) {
        return Outcome::unchanged();
    }
    let Some(spec) = &pod.spec else {
        return Outcome::warn("capstan: the pod has no spec; not injected".into());
    };
    let init = spec.init_containers.as_deref().unwrap_or_default();
    if annotation(STATUS) == Some(INJECTED) || init.iter().any(|c| c.name == CONTAINER_NAME) {
        return Outcome::unchanged();
    }
    if spec.containers.iter().any(|c| c.name == CONTAINER_NAME) {
        return Outcome::warn(format!(
            "capstan: the pod already has a container named {CONTAINER_NAME}; not injected"
        ));
    }
    if spec.host_network == Some(true) {
        return Outcome::warn(
            "capstan: hostNetwork pods are not injected (the proxy's ports would be the node's)"
                .into(),
        );
    }
    let proxy_ports = [
        config.ports.outbound,
        config.ports.inbound,
        config.ports.admin,
        config.ports.readiness,
    ];
    let app_ports = tcp_ports(&spec.containers);
    let clash: Vec<String> = tcp_ports(spec.containers.iter().chain(init))
        .into_iter()
        .filter(|p| proxy_ports.contains(p))
        .map(|p| p.to_string())
        .collect();
    if !clash.is_empty() {
        return Outcome::warn(format!(
            "capstan: container port {} is one of the proxy's ports; not injected",
            clash.join(", ")
        ));
    }

    let mut warnings = Vec::new();
    let settings = Settings::from_annotations(config, meta.annotations.as_ref(), &mut warnings);
    let container = proxy_container(config, &settings, &workload(pod), &app_ports);
    let container = match serde_json::to_value(&container) {
        Ok(c) => c,
        Err(e) => {
            return Outcome::warn(format!("capstan: cannot render the proxy container: {e}"));
        }
    };

    let mut ops = Vec::new();
    match raw.pointer("/spec/initContainers") {
        Some(Value::Array(_)) => {
            ops.push(json!({"op": "add", "path": "/spec/initContainers/0", "value": container}))
        }
        _ => ops.push(json!({"op": "add", "path": "/spec/initContainers", "value": [container]})),
    }
    match raw.get("metadata") {
        Some(Value::Object(m)) => match m.get("annotations") {
            Some(Value::Object(_)) => ops.push(json!({
                "op": "add",
                "path": format!("/metadata/annotations/{}", escape_pointer(STATUS)),
                "value": INJECTED,
            })),
            _ => ops.push(json!({
                "op": "add",
                "path": "/metadata/annotations",
                "value": {STATUS: INJECTED},
            })),
        },
        _ => ops.push(json!({
            "op": "add",
            "path": "/metadata",
            "value": {"annotations": {STATUS: INJECTED}},
        })),
    }
    Outcome {
        patch: Some(ops),
        warnings,
        message: None,
    }
}

/// RFC 6901: `~` → `~0`, `/` → `~1`.
fn escape_pointer(segment: &str) -> String {
    segment.replace('~', "~0").replace('/', "~1")
}

/// Distinct TCP `containerPort`s, in order of appearance.
fn tcp_ports<'a>(containers: impl IntoIterator<Item = &'a Container>) -> Vec<u16> {
    let mut ports = Vec::new();
    for c in containers {
        for p in c.ports.iter().flatten() {
            let tcp = p.protocol.as_deref().is_none_or(|proto| proto == "TCP");
            if let Ok(port) = u16::try_from(p.container_port)
                && tcp
                && port != 0
                && !ports.contains(&port)
            {
                ports.push(port);
            }
        }
    }
    ports
}

/// The proxy's `--service-cluster`: label `app.kubernetes.io/name`, else `app`, else the
/// owner's name from `generateName`, else the pod's name.
fn workload(pod: &Pod) -> String {
    let meta = &pod.metadata;
    let label = |k: &str| {
        meta.labels
            .as_ref()
            .and_then(|l| l.get(k))
            .map(|v| v.trim())
            .filter(|v| !v.is_empty())
    };
    if let Some(name) = label("app.kubernetes.io/name").or_else(|| label("app")) {
        return name.to_string();
    }
    if let Some(generate) = meta.generate_name.as_deref() {
        let base = generate.trim_end_matches('-');
        if !base.is_empty() {
            return trim_template_hash(base, label("pod-template-hash")).to_string();
        }
    }
    match meta.name.as_deref() {
        Some(name) if !name.is_empty() => name.to_string(),
        _ => "unknown".to_string(),
    }
}

/// `reviews-v1-7d9f8c6b5d` → `reviews-v1`: a Deployment's pods are named after their
/// ReplicaSet, `<deployment>-<pod-template-hash>`. The hash is the pod's `pod-template-hash`
/// label when it has one; otherwise a last segment that looks like one (up to 10 characters of
/// Kubernetes' vowel-free "safe" alphabet, at least one of them a digit) is trimmed.
fn trim_template_hash<'a>(base: &'a str, hash_label: Option<&str>) -> &'a str {
    let Some((owner, last)) = base.rsplit_once('-') else {
        return base;
    };
    if owner.is_empty() {
        return base;
    }
    let looks_like_hash = match hash_label {
        Some(hash) => last == hash,
        None => {
            const SAFE: &str = "bcdfghjklmnpqrstvwxz2456789";
            (5..=10).contains(&last.len())
                && last.chars().all(|c| SAFE.contains(c))
                && last.chars().any(|c| c.is_ascii_digit())
        }
    };
    if looks_like_hash { owner } else { base }
}

/// The configured values with the pod's annotation overrides applied.
struct Settings {
    image: String,
    log_level: String,
    concurrency: u32,
    resources: ResourceRequirements,
}

impl Settings {
    fn from_annotations(
        config: &InjectorConfig,
        annotations: Option<&BTreeMap<String, String>>,
        warnings: &mut Vec<String>,
    ) -> Settings {
        let get = |k: &str| annotations.and_then(|a| a.get(k)).map(|v| v.trim());
        let mut invalid = |key: &str, value: &str, why: &str| {
            warnings.push(format!(
                "capstan: annotation {key}: {value:?} {why}; using the default"
            ));
        };
        let mut s = Settings {
            image: config.image.clone(),
            log_level: config.log_level.clone(),
            concurrency: config.concurrency,
            resources: config.resources.clone(),
        };
        if let Some(image) = get(PROXY_IMAGE) {
            if image.is_empty() || image.chars().any(char::is_whitespace) {
                invalid(PROXY_IMAGE, image, "is not an image reference");
            } else {
                s.image = image.to_string();
            }
        }
        if let Some(level) = get(PROXY_LOG_LEVEL) {
            if config::LOG_LEVELS.contains(&level) {
                s.log_level = level.to_string();
            } else {
                invalid(
                    PROXY_LOG_LEVEL,
                    level,
                    "is not a log level (trace, debug, info, warning, error, critical, off)",
                );
            }
        }
        if let Some(n) = get(PROXY_CONCURRENCY) {
            match n.parse::<u32>() {
                Ok(n) if n >= 1 => s.concurrency = n,
                _ => invalid(PROXY_CONCURRENCY, n, "is not a positive integer"),
            }
        }
        let overrides = [
            (PROXY_CPU_REQUEST, true, "cpu"),
            (PROXY_MEMORY_REQUEST, true, "memory"),
            (PROXY_CPU_LIMIT, false, "cpu"),
            (PROXY_MEMORY_LIMIT, false, "memory"),
        ];
        for (key, request, resource) in overrides {
            let Some(q) = get(key) else { continue };
            match config::parse_quantity(q) {
                Some(v) if v >= 0.0 => {
                    let map = if request {
                        &mut s.resources.requests
                    } else {
                        &mut s.resources.limits
                    };
                    map.get_or_insert_with(BTreeMap::new)
                        .insert(resource.to_string(), Quantity(q.to_string()));
                }
                _ => invalid(key, q, "is not a non-negative Kubernetes quantity"),
            }
        }
        // A request above its limit would get the pod rejected: keep the configured pair.
        for (resource, request_key, limit_key) in [
            ("cpu", PROXY_CPU_REQUEST, PROXY_CPU_LIMIT),
            ("memory", PROXY_MEMORY_REQUEST, PROXY_MEMORY_LIMIT),
        ] {
            let value = |r: &ResourceRequirements, request: bool| {
                let map = if request { &r.requests } else { &r.limits };
                map.as_ref()
                    .and_then(|m| m.get(resource))
                    .and_then(|q| config::parse_quantity(&q.0))
            };
            if let (Some(req), Some(lim)) = (value(&s.resources, true), value(&s.resources, false))
                && req > lim
            {
                for (request, configured) in [
                    (true, &config.resources.requests),
                    (false, &config.resources.limits),
                ] {
                    let map = if request {
                        &mut s.resources.requests
                    } else {
                        &mut s.resources.limits
                    };
                    let original = configured.as_ref().and_then(|m| m.get(resource)).cloned();
                    if let Some(map) = map.as_mut() {
                        match original {
                            Some(q) => map.insert(resource.to_string(), q),
                            None => map.remove(resource),
                        };
                    }
                }
                warnings.push(format!(
                    "capstan: annotations {request_key} / {limit_key}: the {resource} request would be above the limit; using the defaults"
                ));
            }
        }
        s
    }
}

fn probe(config: &InjectorConfig, timings: ProbeTimings) -> Probe {
    Probe {
        http_get: Some(HTTPGetAction {
            path: Some("/ready".into()),
            port: IntOrString::Int(i32::from(config.ports.readiness)),
            scheme: Some("HTTP".into()),
            ..Default::default()
        }),
        period_seconds: Some(timings.period_seconds),
        failure_threshold: Some(timings.failure_threshold),
        timeout_seconds: Some(timings.timeout_seconds),
        ..Default::default()
    }
}

fn field_env(name: &str, path: &str) -> EnvVar {
    EnvVar {
        name: name.into(),
        value_from: Some(EnvVarSource {
            field_ref: Some(ObjectFieldSelector {
                api_version: Some("v1".into()),
                field_path: path.into(),
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn proxy_container(
    config: &InjectorConfig,
    s: &Settings,
    workload: &str,
    app_ports: &[u16],
) -> Container {
    let ports = app_ports
        .iter()
        .map(u16::to_string)
        .collect::<Vec<_>>()
        .join(",");
    let mut args: Vec<String> = [
        "--xds-address",
        &config.xds_url(),
        "--node-id",
        "$(POD_NAME).$(POD_NAMESPACE)",
        "--service-cluster",
        workload,
        "--concurrency",
        &s.concurrency.to_string(),
        "--log-level",
        &s.log_level,
        "--drain-time-s",
        &config.drain_time_seconds.to_string(),
    ]
    .into_iter()
    .map(String::from)
    .collect();
    if config.ports.readiness != DEFAULT_READINESS_PORT {
        args.push("--readiness-address".into());
        args.push(format!("0.0.0.0:{}", config.ports.readiness));
    }
    args.extend([
        "--node-metadata".into(),
        "NAMESPACE=$(POD_NAMESPACE)".into(),
        "--node-metadata".into(),
        format!("APP_PORTS={ports}"),
    ]);
    Container {
        name: CONTAINER_NAME.into(),
        image: Some(s.image.clone()),
        image_pull_policy: Some(config.image_pull_policy.clone()),
        restart_policy: Some("Always".into()),
        args: Some(args),
        env: Some(vec![
            field_env("POD_NAME", "metadata.name"),
            field_env("POD_NAMESPACE", "metadata.namespace"),
        ]),
        ports: Some(vec![ContainerPort {
            name: Some(READY_PORT_NAME.into()),
            container_port: i32::from(config.ports.readiness),
            protocol: Some("TCP".into()),
            ..Default::default()
        }]),
        startup_probe: Some(probe(config, config.startup_probe)),
        readiness_probe: Some(probe(config, config.readiness_probe)),
        resources: Some(s.resources.clone()),
        security_context: Some(SecurityContext {
            run_as_user: Some(config.run_as_user),
            run_as_group: Some(config.run_as_user),
            run_as_non_root: Some(true),
            read_only_root_filesystem: Some(true),
            allow_privilege_escalation: Some(false),
            privileged: Some(false),
            capabilities: Some(Capabilities {
                drop: Some(vec!["ALL".into()]),
                add: None,
            }),
            seccomp_profile: Some(SeccompProfile {
                type_: "RuntimeDefault".into(),
                localhost_profile: None,
            }),
            ..Default::default()
        }),
        termination_message_policy: Some("FallbackToLogsOnError".into()),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A pod as the ReplicaSet controller creates it for `Deployment reviews-v1` (what the API
    /// server sends at admission: `generateName`, no name, defaults applied, service-account
    /// volume projected), with an existing init container and two app containers.
    fn deployment_pod() -> Value {
        json!({
            "kind": "Pod",
            "apiVersion": "v1",
            "metadata": {
                "generateName": "reviews-v1-7d9f8c6b5d-",
                "namespace": "shop",
                "creationTimestamp": null,
                "labels": {"pod-template-hash": "7d9f8c6b5d", "version": "v1"},
                "ownerReferences": [{
                    "apiVersion": "apps/v1",
                    "kind": "ReplicaSet",
                    "name": "reviews-v1-7d9f8c6b5d",
                    "uid": "0d4c3a4e-1f0e-4c7e-9a51-6a1a2f0e5b11",
                    "controller": true,
                    "blockOwnerDeletion": true
                }]
            },
            "spec": {
                "volumes": [{
                    "name": "kube-api-access-x2x7q",
                    "projected": {
                        "sources": [
                            {"serviceAccountToken": {"expirationSeconds": 3607, "path": "token"}},
                            {"configMap": {"name": "kube-root-ca.crt", "items": [{"key": "ca.crt", "path": "ca.crt"}]}}
                        ],
                        "defaultMode": 420
                    }
                }],
                "initContainers": [{
                    "name": "migrate",
                    "image": "registry.example.com/reviews:1.2.0",
                    "command": ["/app/migrate", "--wait"],
                    "resources": {},
                    "terminationMessagePath": "/dev/termination-log",
                    "terminationMessagePolicy": "File",
                    "imagePullPolicy": "IfNotPresent"
                }],
                "containers": [
                    {
                        "name": "reviews",
                        "image": "registry.example.com/reviews:1.2.0",
                        "ports": [
                            {"name": "http", "containerPort": 9080, "protocol": "TCP"},
                            {"name": "statsd", "containerPort": 9125, "protocol": "UDP"}
                        ],
                        "env": [{"name": "UPSTREAM", "value": "http://127.0.0.1:15001"}],
                        "resources": {"requests": {"cpu": "100m", "memory": "128Mi"}},
                        "volumeMounts": [{"name": "kube-api-access-x2x7q", "readOnly": true, "mountPath": "/var/run/secrets/kubernetes.io/serviceaccount"}],
                        "terminationMessagePath": "/dev/termination-log",
                        "terminationMessagePolicy": "File",
                        "imagePullPolicy": "IfNotPresent"
                    },
                    {
                        "name": "metrics",
                        "image": "registry.example.com/exporter:0.3",
                        "ports": [{"containerPort": 9090}, {"containerPort": 9080, "protocol": "TCP"}],
                        "resources": {},
                        "terminationMessagePath": "/dev/termination-log",
                        "terminationMessagePolicy": "File",
                        "imagePullPolicy": "IfNotPresent"
                    }
                ],
                "restartPolicy": "Always",
                "terminationGracePeriodSeconds": 30,
                "dnsPolicy": "ClusterFirst",
                "serviceAccountName": "reviews",
                "serviceAccount": "reviews",
                "securityContext": {},
                "schedulerName": "default-scheduler",
                "tolerations": [
                    {"key": "node.kubernetes.io/not-ready", "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": 300}
                ],
                "priority": 0,
                "enableServiceLinks": true,
                "preemptionPolicy": "PreemptLowerPriority"
            },
            "status": {}
        })
    }

    /// The `AdmissionReview` the API server sends for `object`.
    fn admission(object: Value) -> Value {
        json!({
            "kind": "AdmissionReview",
            "apiVersion": "admission.k8s.io/v1",
            "request": {
                "uid": "705ab4f5-6393-11e8-b7cc-42010a800002",
                "kind": {"group": "", "version": "v1", "kind": "Pod"},
                "resource": {"group": "", "version": "v1", "resource": "pods"},
                "requestKind": {"group": "", "version": "v1", "kind": "Pod"},
                "requestResource": {"group": "", "version": "v1", "resource": "pods"},
                "namespace": "shop",
                "operation": "CREATE",
                "userInfo": {
                    "username": "system:serviceaccount:kube-system:replicaset-controller",
                    "uid": "6c1a4bd0-8b5e-4b55-8d0e-3b2c5e2a4f10",
                    "groups": ["system:serviceaccounts", "system:serviceaccounts:kube-system", "system:authenticated"]
                },
                "object": object,
                "oldObject": null,
                "dryRun": false,
                "options": {"kind": "CreateOptions", "apiVersion": "meta.k8s.io/v1"}
            }
        })
    }

    /// Reviews `request`; returns `response` and, when there is a patch, the pod it makes.
    fn run(request: &Value, config: &InjectorConfig) -> (Value, Option<Value>) {
        let body = serde_json::to_vec(request).expect("json");
        let answer: Value = serde_json::from_slice(&review(&body, config)).expect("answer is JSON");
        assert_eq!(answer["apiVersion"], "admission.k8s.io/v1");
        assert_eq!(answer["kind"], "AdmissionReview");
        let response = answer["response"].clone();
        assert_eq!(response["allowed"], true, "always allowed: {response}");
        let Some(patch) = response.get("patch").and_then(Value::as_str) else {
            assert!(response.get("patchType").is_none());
            return (response, None);
        };
        assert_eq!(response["patchType"], "JSONPatch");
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(patch)
            .expect("base64");
        let ops: json_patch::Patch = serde_json::from_slice(&bytes).expect("RFC 6902 patch");
        let mut pod = request["request"]["object"].clone();
        json_patch::patch(&mut pod, &ops).expect("patch applies to the pod");
        (response, Some(pod))
    }

    fn injected(pod: Value) -> (Value, Value) {
        let (response, patched) = run(&admission(pod), &InjectorConfig::default());
        (response, patched.expect("patched"))
    }

    fn warnings(response: &Value) -> Vec<String> {
        response["warnings"]
            .as_array()
            .map(|w| {
                w.iter()
                    .filter_map(|s| s.as_str().map(String::from))
                    .collect()
            })
            .unwrap_or_default()
    }

    fn args(pod: &Value) -> Vec<String> {
        serde_json::from_value(pod["spec"]["initContainers"][0]["args"].clone()).expect("args")
    }

    fn arg<'a>(args: &'a [String], flag: &str) -> Vec<&'a str> {
        args.windows(2)
            .filter(|w| w[0] == flag)
            .map(|w| w[1].as_str())
            .collect()
    }

    #[test]
    fn a_deployments_pod_gets_the_proxy_as_its_first_init_container() {
        let (response, pod) = injected(deployment_pod());
        assert_eq!(response["uid"], "705ab4f5-6393-11e8-b7cc-42010a800002");
        assert!(response.get("warnings").is_none(), "{response}");
        assert!(response.get("status").is_none(), "{response}");

        let init = pod["spec"]["initContainers"]
            .as_array()
            .expect("init containers");
        assert_eq!(init.len(), 2);
        assert_eq!(
            init[1]["name"], "migrate",
            "the existing init container runs after"
        );
        let proxy = &init[0];
        assert_eq!(proxy["name"], "capstan-proxy");
        assert_eq!(proxy["restartPolicy"], "Always");
        assert_eq!(proxy["image"], config::DEFAULT_IMAGE);
        assert_eq!(proxy["imagePullPolicy"], "IfNotPresent");
        assert_eq!(
            args(&pod),
            [
                "--xds-address",
                "http://capstan.capstan-system.svc:18000",
                "--node-id",
                "$(POD_NAME).$(POD_NAMESPACE)",
                "--service-cluster",
                "reviews-v1",
                "--concurrency",
                "2",
                "--log-level",
                "info",
                "--drain-time-s",
                "5",
                "--node-metadata",
                "NAMESPACE=$(POD_NAMESPACE)",
                "--node-metadata",
                "APP_PORTS=9080,9090",
            ]
        );
        assert_eq!(
            proxy["env"],
            json!([
                {"name": "POD_NAME", "valueFrom": {"fieldRef": {"apiVersion": "v1", "fieldPath": "metadata.name"}}},
                {"name": "POD_NAMESPACE", "valueFrom": {"fieldRef": {"apiVersion": "v1", "fieldPath": "metadata.namespace"}}}
            ])
        );
        assert_eq!(
            proxy["ports"],
            json!([{"name": "capstan-ready", "containerPort": 15021, "protocol": "TCP"}]),
            "only the readiness port is exposed"
        );
        assert_eq!(
            proxy["startupProbe"],
            json!({
                "httpGet": {"path": "/ready", "port": 15021, "scheme": "HTTP"},
                "periodSeconds": 1, "failureThreshold": 120, "timeoutSeconds": 1
            })
        );
        assert_eq!(
            proxy["readinessProbe"],
            json!({
                "httpGet": {"path": "/ready", "port": 15021, "scheme": "HTTP"},
                "periodSeconds": 2, "failureThreshold": 3, "timeoutSeconds": 1
            })
        );
        assert!(proxy.get("livenessProbe").is_none());
        assert_eq!(
            proxy["securityContext"],
            json!({
                "runAsUser": 1337,
                "runAsGroup": 1337,
                "runAsNonRoot": true,
                "readOnlyRootFilesystem": true,
                "allowPrivilegeEscalation": false,
                "privileged": false,
                "capabilities": {"drop": ["ALL"]},
                "seccompProfile": {"type": "RuntimeDefault"}
            })
        );
        assert_eq!(
            proxy["resources"],
            json!({"requests": {"cpu": "50m", "memory": "32Mi"}, "limits": {"memory": "256Mi"}})
        );
        assert_eq!(
            pod["metadata"]["annotations"],
            json!({"capstan.dev/status": "injected"}),
            "annotations created"
        );
        // Nothing else changed.
        let mut unpatched = pod.clone();
        if let Some(init) = unpatched["spec"]["initContainers"].as_array_mut() {
            init.remove(0);
        }
        if let Some(meta) = unpatched["metadata"].as_object_mut() {
            meta.remove("annotations");
        }
        assert_eq!(unpatched, deployment_pod());
        // The injected pod is still a valid Pod.
        let typed: Pod = serde_json::from_value(pod).expect("pod");
        let spec = typed.spec.expect("spec");
        assert_eq!(spec.containers.len(), 2);
    }

    #[test]
    fn injection_is_idempotent() {
        let (_, pod) = injected(deployment_pod());
        let (response, again) = run(&admission(pod), &InjectorConfig::default());
        assert!(again.is_none(), "a second review must not inject twice");
        assert!(response.get("warnings").is_none());

        // Either sign is enough on its own.
        let mut annotated = deployment_pod();
        annotated["metadata"]["annotations"] = json!({"capstan.dev/status": "injected"});
        assert!(
            run(&admission(annotated), &InjectorConfig::default())
                .1
                .is_none()
        );
        let mut with_container = deployment_pod();
        with_container["spec"]["initContainers"][0]["name"] = json!("capstan-proxy");
        assert!(
            run(&admission(with_container), &InjectorConfig::default())
                .1
                .is_none()
        );
    }

    #[test]
    fn existing_annotations_are_kept_and_pointers_escaped() {
        let mut pod = deployment_pod();
        pod["metadata"]["annotations"] = json!({
            "kubectl.kubernetes.io/restartedAt": "2026-11-28T19:00:00Z",
            "example.com/a~b": "tilde",
        });
        if let Some(spec) = pod["spec"].as_object_mut() {
            spec.remove("initContainers");
        }
        let body = serde_json::to_vec(&admission(pod.clone())).expect("json");
        let answer: Value =
            serde_json::from_slice(&review(&body, &InjectorConfig::default())).expect("json");
        let ops: Value = serde_json::from_slice(
            &base64::engine::general_purpose::STANDARD
                .decode(answer["response"]["patch"].as_str().expect("patch"))
                .expect("base64"),
        )
        .expect("json");
        let paths: Vec<&str> = ops
            .as_array()
            .expect("ops")
            .iter()
            .filter_map(|op| op["path"].as_str())
            .collect();
        assert_eq!(
            paths,
            [
                "/spec/initContainers",
                "/metadata/annotations/capstan.dev~1status"
            ]
        );
        assert_eq!(escape_pointer("a~b/c"), "a~0b~1c");

        let (_, patched) = injected(pod);
        assert_eq!(
            patched["metadata"]["annotations"],
            json!({
                "kubectl.kubernetes.io/restartedAt": "2026-11-28T19:00:00Z",
                "example.com/a~b": "tilde",
                "capstan.dev/status": "injected",
            })
        );
        let init = patched["spec"]["initContainers"]
            .as_array()
            .expect("created");
        assert_eq!(init.len(), 1);
        assert_eq!(init[0]["name"], "capstan-proxy");
    }

    #[test]
    fn a_pod_without_metadata_annotations_or_init_containers_is_patched() {
        let pod = json!({
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": "debug", "namespace": "shop", "annotations": null},
            "spec": {"containers": [{"name": "sh", "image": "busybox"}], "initContainers": null}
        });
        let (_, patched) = injected(pod);
        assert_eq!(
            patched["spec"]["initContainers"][0]["name"],
            "capstan-proxy"
        );
        assert_eq!(
            patched["metadata"]["annotations"]["capstan.dev/status"],
            "injected"
        );
        let a = args(&patched);
        assert_eq!(
            arg(&a, "--service-cluster"),
            ["debug"],
            "falls back to the name"
        );
        assert_eq!(arg(&a, "--node-metadata")[1], "APP_PORTS=", "no ports");
    }

    #[test]
    fn workload_comes_from_labels_then_generate_name_then_name() {
        let pod = |meta: Value| -> Pod {
            serde_json::from_value(json!({"metadata": meta, "spec": {"containers": []}}))
                .expect("pod")
        };
        let cases = [
            (
                json!({"labels": {"app.kubernetes.io/name": "reviews", "app": "other"}, "generateName": "x-"}),
                "reviews",
            ),
            (
                json!({"labels": {"app": "ratings"}, "generateName": "x-"}),
                "ratings",
            ),
            (
                json!({"generateName": "reviews-v1-7d9f8c6b5d-", "labels": {"pod-template-hash": "7d9f8c6b5d"}}),
                "reviews-v1",
            ),
            // Without the label: a hash-looking last segment.
            (
                json!({"generateName": "reviews-v1-5f4b9cd7x8-"}),
                "reviews-v1",
            ),
            // A DaemonSet's or Job's pods: the owner name is all there is.
            (json!({"generateName": "node-exporter-"}), "node-exporter"),
            (
                json!({"generateName": "backup-29384020-"}),
                "backup-29384020",
            ),
            (json!({"generateName": "fluentd-"}), "fluentd"),
            // A StatefulSet's pods have a name and no generateName.
            (json!({"name": "web-0"}), "web-0"),
            (json!({}), "unknown"),
        ];
        for (meta, expected) in cases {
            assert_eq!(workload(&pod(meta.clone())), expected, "{meta}");
        }
    }

    #[test]
    fn opting_out_by_label_or_annotation_leaves_the_pod_alone() {
        for (field, value) in [
            ("labels", "disabled"),
            ("labels", "false"),
            ("annotations", "disabled"),
            ("annotations", "False"),
        ] {
            let mut pod = deployment_pod();
            pod["metadata"][field]["capstan.dev/inject"] = json!(value);
            let (response, patched) = run(&admission(pod), &InjectorConfig::default());
            assert!(patched.is_none(), "{field} {value}");
            assert_eq!(response["uid"], "705ab4f5-6393-11e8-b7cc-42010a800002");
            assert!(response.get("warnings").is_none());
        }
        // `enabled` (the webhook selector's value) injects.
        let mut pod = deployment_pod();
        pod["metadata"]["labels"]["capstan.dev/inject"] = json!("enabled");
        assert!(run(&admission(pod), &InjectorConfig::default()).1.is_some());
    }

    #[test]
    fn host_network_pods_are_skipped_with_a_warning() {
        let mut pod = deployment_pod();
        pod["spec"]["hostNetwork"] = json!(true);
        let (response, patched) = run(&admission(pod), &InjectorConfig::default());
        assert!(patched.is_none());
        let w = warnings(&response);
        assert_eq!(w.len(), 1);
        assert!(w[0].contains("hostNetwork"), "{w:?}");
    }

    #[test]
    fn a_container_port_that_is_a_proxy_port_skips_injection_with_a_warning() {
        let mut pod = deployment_pod();
        pod["spec"]["containers"][1]["ports"][0]["containerPort"] = json!(15021);
        let (response, patched) = run(&admission(pod), &InjectorConfig::default());
        assert!(patched.is_none());
        assert!(warnings(&response)[0].contains("15021"), "{response}");
        // A UDP port of the same number does not clash.
        let mut pod = deployment_pod();
        pod["spec"]["containers"][0]["ports"][1]["containerPort"] = json!(15001);
        assert!(run(&admission(pod), &InjectorConfig::default()).1.is_some());
    }

    #[test]
    fn a_container_already_named_capstan_proxy_is_not_duplicated() {
        let mut pod = deployment_pod();
        pod["spec"]["containers"][1]["name"] = json!("capstan-proxy");
        let (response, patched) = run(&admission(pod), &InjectorConfig::default());
        assert!(patched.is_none());
        assert!(warnings(&response)[0].contains("capstan-proxy"));
    }

    #[test]
    fn only_pod_creates_are_patched() {
        let mut update = admission(deployment_pod());
        update["request"]["operation"] = json!("UPDATE");
        update["request"]["oldObject"] = deployment_pod();
        let mut deployment = admission(json!({
            "apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "reviews"},
            "spec": {"template": deployment_pod()}
        }));
        deployment["request"]["kind"] =
            json!({"group": "apps", "version": "v1", "kind": "Deployment"});
        let mut ephemeral = admission(deployment_pod());
        ephemeral["request"]["subResource"] = json!("ephemeralcontainers");
        ephemeral["request"]["operation"] = json!("UPDATE");
        let mut binding = admission(deployment_pod());
        binding["request"]["subResource"] = json!("binding");
        for request in [update, deployment, ephemeral, binding] {
            let (response, patched) = run(&request, &InjectorConfig::default());
            assert!(patched.is_none(), "{}", request["request"]["kind"]);
            assert_eq!(response["uid"], "705ab4f5-6393-11e8-b7cc-42010a800002");
            assert!(response.get("warnings").is_none());
        }
    }

    #[test]
    fn malformed_reviews_are_allowed_and_explained() {
        let config = InjectorConfig::default();
        for (body, why) in [
            (&b"not json"[..], "not JSON"),
            (br#"{"apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview"}"#, "no request"),
            (br#"{"apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview","request":{"kind":{"kind":"Pod"}}}"#, "no uid"),
            (br#"[1,2]"#, "no request"),
            (b"", "not JSON"),
        ] {
            let answer: Value = serde_json::from_slice(&review(body, &config)).expect("json");
            let r = &answer["response"];
            assert_eq!(r["allowed"], true);
            assert_eq!(r["uid"], "");
            assert_eq!(r["status"]["code"], 400);
            let message = r["status"]["message"].as_str().expect("message");
            assert!(message.contains(why), "{message}");
            assert!(r.get("patch").is_none());
        }

        // A uid but a pod that does not decode: answered to, with a warning naming the field.
        let mut bad = admission(deployment_pod());
        bad["request"]["object"]["spec"]["containers"][0]["ports"] = json!("9080");
        let (response, patched) = run(&bad, &config);
        assert!(patched.is_none());
        assert_eq!(response["uid"], "705ab4f5-6393-11e8-b7cc-42010a800002");
        let w = warnings(&response);
        assert!(
            w[0].contains("spec.containers[0].ports") || w[0].contains("spec.containers.0.ports"),
            "{w:?}"
        );

        // An old AdmissionReview version.
        let mut old = admission(deployment_pod());
        old["apiVersion"] = json!("admission.k8s.io/v1beta1");
        let (response, patched) = run(&old, &config);
        assert!(patched.is_none());
        assert!(warnings(&response)[0].contains("v1beta1"));

        // A pod CREATE without an object.
        let mut empty = admission(deployment_pod());
        empty["request"]["object"] = Value::Null;
        let (response, patched) = run(&empty, &config);
        assert!(patched.is_none());
        assert!(warnings(&response)[0].contains("no object"));
    }

    #[test]
    fn annotations_override_the_configuration() {
        let mut pod = deployment_pod();
        pod["metadata"]["labels"]["app.kubernetes.io/name"] = json!("reviews");
        pod["metadata"]["annotations"] = json!({
            "capstan.dev/proxy-image": "registry.example.com/capstan-proxy:dev",
            "capstan.dev/proxy-log-level": "debug",
            "capstan.dev/proxy-concurrency": "4",
            "capstan.dev/proxy-cpu-request": "200m",
            "capstan.dev/proxy-memory-request": "64Mi",
            "capstan.dev/proxy-cpu-limit": "1",
            "capstan.dev/proxy-memory-limit": "512Mi",
        });
        let (response, pod) = injected(pod);
        assert!(response.get("warnings").is_none(), "{response}");
        let proxy = &pod["spec"]["initContainers"][0];
        assert_eq!(proxy["image"], "registry.example.com/capstan-proxy:dev");
        assert_eq!(
            proxy["resources"],
            json!({"requests": {"cpu": "200m", "memory": "64Mi"}, "limits": {"cpu": "1", "memory": "512Mi"}})
        );
        let a = args(&pod);
        assert_eq!(arg(&a, "--log-level"), ["debug"]);
        assert_eq!(arg(&a, "--concurrency"), ["4"]);
        assert_eq!(arg(&a, "--service-cluster"), ["reviews"]);
    }

    #[test]
    fn invalid_overrides_inject_with_the_default_and_a_warning() {
        let mut pod = deployment_pod();
        pod["metadata"]["annotations"] = json!({
            "capstan.dev/proxy-concurrency": "abc",
            "capstan.dev/proxy-memory-request": "12XB",
            "capstan.dev/proxy-log-level": "loud",
            "capstan.dev/proxy-image": "",
            "capstan.dev/proxy-cpu-limit": "-1",
        });
        let (response, pod) = injected(pod);
        let w = warnings(&response);
        for annotation in [
            PROXY_CONCURRENCY,
            PROXY_MEMORY_REQUEST,
            PROXY_LOG_LEVEL,
            PROXY_IMAGE,
            PROXY_CPU_LIMIT,
        ] {
            assert!(
                w.iter()
                    .any(|w| w.contains(annotation) && w.contains("using the default")),
                "no warning for {annotation}: {w:?}"
            );
        }
        let proxy = &pod["spec"]["initContainers"][0];
        assert_eq!(proxy["image"], config::DEFAULT_IMAGE);
        assert_eq!(
            proxy["resources"],
            json!({"requests": {"cpu": "50m", "memory": "32Mi"}, "limits": {"memory": "256Mi"}})
        );
        let a = args(&pod);
        assert_eq!(arg(&a, "--concurrency"), ["2"]);
        assert_eq!(arg(&a, "--log-level"), ["info"]);
        assert_eq!(
            pod["metadata"]["annotations"]["capstan.dev/status"],
            "injected"
        );
    }

    #[test]
    fn a_request_above_the_limit_falls_back_to_the_configured_pair() {
        let mut pod = deployment_pod();
        pod["metadata"]["annotations"] = json!({
            "capstan.dev/proxy-memory-request": "1Gi",
            "capstan.dev/proxy-cpu-request": "2",
            "capstan.dev/proxy-cpu-limit": "500m",
        });
        let (response, pod) = injected(pod);
        let w = warnings(&response);
        assert_eq!(w.len(), 2, "{w:?}");
        assert!(w.iter().any(|w| w.contains(PROXY_MEMORY_REQUEST)), "{w:?}");
        assert!(w.iter().any(|w| w.contains(PROXY_CPU_REQUEST)), "{w:?}");
        assert_eq!(
            pod["spec"]["initContainers"][0]["resources"],
            json!({"requests": {"cpu": "50m", "memory": "32Mi"}, "limits": {"memory": "256Mi"}})
        );
    }

    #[test]
    fn the_configuration_shapes_the_container() {
        let config = InjectorConfig {
            image: "ghcr.io/capstan/capstan-proxy@sha256:0123".into(),
            image_pull_policy: "Always".into(),
            xds_address: "cp.mesh.svc:18000".into(),
            concurrency: 1,
            log_level: "warning".into(),
            drain_time_seconds: 20,
            run_as_user: 2000,
            ports: config::Ports {
                readiness: 15099,
                ..Default::default()
            },
            resources: ResourceRequirements::default(),
            startup_probe: ProbeTimings {
                period_seconds: 3,
                failure_threshold: 10,
                timeout_seconds: 2,
            },
            ..InjectorConfig::default()
        };
        assert!(config.validate().is_empty());
        let (_, pod) = run(&admission(deployment_pod()), &config);
        let pod = pod.expect("patched");
        let proxy = &pod["spec"]["initContainers"][0];
        assert_eq!(proxy["image"], "ghcr.io/capstan/capstan-proxy@sha256:0123");
        assert_eq!(proxy["imagePullPolicy"], "Always");
        assert_eq!(proxy["securityContext"]["runAsUser"], 2000);
        assert_eq!(proxy["securityContext"]["runAsGroup"], 2000);
        assert_eq!(proxy["ports"][0]["containerPort"], 15099);
        assert_eq!(proxy["startupProbe"]["httpGet"]["port"], 15099);
        assert_eq!(proxy["startupProbe"]["periodSeconds"], 3);
        assert_eq!(proxy["readinessProbe"]["httpGet"]["port"], 15099);
        assert_eq!(proxy["resources"], json!({}));
        let a = args(&pod);
        assert_eq!(arg(&a, "--xds-address"), ["http://cp.mesh.svc:18000"]);
        assert_eq!(arg(&a, "--readiness-address"), ["0.0.0.0:15099"]);
        assert_eq!(arg(&a, "--drain-time-s"), ["20"]);
        assert_eq!(arg(&a, "--log-level"), ["warning"]);
    }
}
