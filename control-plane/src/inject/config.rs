//! What the injector adds to a pod: `/etc/capstan/injector.yaml`, the `injector.yaml` key of the
//! Helm chart's ConfigMap (`charts/capstan/templates/injector-configmap.yaml`, from the chart's
//! `proxy:` values):
//!
//! ```yaml
//! image: "ghcr.io/capstan/capstan-proxy:0.1.0"
//! imagePullPolicy: "IfNotPresent"
//! xdsAddress: "capstan.capstan-system.svc:18000"   # HOST:PORT; the proxy gets http://HOST:PORT
//! concurrency: 2
//! logLevel: "info"
//! drainTimeSeconds: 5
//! runAsUser: 1337                                  # also the GID; never 0
//! ports: { outbound: 15001, inbound: 15006, admin: 15000, readiness: 15021 }
//! resources: { requests: { cpu: 50m, memory: 32Mi }, limits: { memory: 256Mi } }
//! startupProbe: { periodSeconds: 1, failureThreshold: 120, timeoutSeconds: 1 }
//! readinessProbe: { periodSeconds: 2, failureThreshold: 3, timeoutSeconds: 1 }
//! ```
//!
//! Every field has a default (the chart's defaults), so an empty file is a valid
//! configuration; an unknown field is an error, as is anything that would make every injected
//! pod fail ([`InjectorConfig::validate`]). Errors name the file and the field. Per-pod
//! overrides (annotations) are applied by [`super::review`].

use std::collections::BTreeMap;
use std::path::Path;

use k8s_openapi::api::core::v1::ResourceRequirements;
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use serde::{Deserialize, Serialize};

/// The injector's configuration (camelCase in YAML).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct InjectorConfig {
    /// The proxy image (`repository:tag` or `repository@digest`).
    pub image: String,
    /// `Always`, `IfNotPresent` or `Never`.
    pub image_pull_policy: String,
    /// The control plane's xDS Service as `HOST:PORT` (no scheme).
    pub xds_address: String,
    /// `--concurrency`: worker threads.
    pub concurrency: u32,
    /// `--log-level`: trace, debug, info, warning (warn), error, critical, off.
    pub log_level: String,
    /// `--drain-time-s`.
    pub drain_time_seconds: u32,
    /// UID and GID of the proxy container; never 0.
    pub run_as_user: i64,
    pub ports: Ports,
    /// The proxy container's requests and limits.
    pub resources: ResourceRequirements,
    pub startup_probe: ProbeTimings,
    pub readiness_probe: ProbeTimings,
}

/// The proxy's ports (DESIGN.md, "Kubernetes shape").
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct Ports {
    /// Outbound listener, `127.0.0.1` only (the control plane's listener configuration).
    pub outbound: u16,
    /// Inbound listener, `0.0.0.0`.
    pub inbound: u16,
    /// Admin interface, `127.0.0.1` only; never exposed as a container port.
    pub admin: u16,
    /// Serves `/ready` only; the probes' target, exposed as `capstan-ready`.
    pub readiness: u16,
}

/// Timings of an HTTP probe on the readiness port's `/ready`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ProbeTimings {
    pub period_seconds: i32,
    pub failure_threshold: i32,
    pub timeout_seconds: i32,
}

/// The default image: the chart's repository with this build's version (the chart's
/// `appVersion`).
pub const DEFAULT_IMAGE: &str =
    concat!("ghcr.io/capstan/capstan-proxy:", env!("CARGO_PKG_VERSION"));

/// The log levels `capstan-proxy --log-level` accepts.
pub const LOG_LEVELS: &[&str] = &[
    "trace", "debug", "info", "warning", "warn", "error", "critical", "off",
];

impl Default for InjectorConfig {
    fn default() -> Self {
        let quantities = |pairs: &[(&str, &str)]| {
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), Quantity(v.to_string())))
                .collect::<BTreeMap<_, _>>()
        };
        InjectorConfig {
            image: DEFAULT_IMAGE.to_string(),
            image_pull_policy: "IfNotPresent".to_string(),
            xds_address: "capstan.capstan-system.svc:18000".to_string(),
            concurrency: 2,
            log_level: "info".to_string(),
            drain_time_seconds: 5,
            run_as_user: 1337,
            ports: Ports::default(),
            resources: ResourceRequirements {
                requests: Some(quantities(&[("cpu", "50m"), ("memory", "32Mi")])),
                limits: Some(quantities(&[("memory", "256Mi")])),
                claims: None,
            },
            startup_probe: ProbeTimings::STARTUP,
            readiness_probe: ProbeTimings::READINESS,
        }
    }
}

impl Default for Ports {
    fn default() -> Self {
        Ports {
            outbound: 15001,
            inbound: 15006,
            admin: 15000,
            readiness: 15021,
        }
    }
}

impl ProbeTimings {
    /// Up to two minutes for the first configuration to arrive and warm.
    pub const STARTUP: ProbeTimings = ProbeTimings {
        period_seconds: 1,
        failure_threshold: 120,
        timeout_seconds: 1,
    };
    pub const READINESS: ProbeTimings = ProbeTimings {
        period_seconds: 2,
        failure_threshold: 3,
        timeout_seconds: 1,
    };
}

/// Reads and validates the injector configuration. The error names the file and, for each
/// problem, the field (`ports.readiness: …`).
pub fn load(path: impl AsRef<Path>) -> Result<InjectorConfig, String> {
    let path = path.as_ref();
    let shown = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|e| format!("cannot read {shown}: {e}"))?;
    from_yaml(&text, &shown)
}

/// Parses and validates configuration text; `shown` names its source in errors.
pub fn from_yaml(text: &str, shown: &str) -> Result<InjectorConfig, String> {
    let invalid = |problems: Vec<String>| {
        format!(
            "invalid injector configuration {shown}:\n  {}",
            problems.join("\n  ")
        )
    };
    let mut doc: serde_json::Value = serde_saphyr::from_str(text)
        .map_err(|e| format!("invalid injector configuration {shown}: not YAML: {e}"))?;
    if doc.is_null() {
        // An empty file: every default.
        doc = serde_json::Value::Object(serde_json::Map::new());
    }
    if !doc.is_object() {
        // serde would read a sequence as the struct's fields in order.
        return Err(invalid(vec![
            "expected a mapping (image: …, ports: …)".to_string(),
        ]));
    }
    let sequences: Vec<String> = ["ports", "resources", "startupProbe", "readinessProbe"]
        .iter()
        .filter(|k| doc.get(**k).is_some_and(serde_json::Value::is_array))
        .map(|k| format!("{k}: expected a mapping, got a sequence"))
        .collect();
    if !sequences.is_empty() {
        return Err(invalid(sequences));
    }
    quantities_as_strings(&mut doc);
    let mut unknown = Vec::new();
    let mut on_unknown = |path: serde_ignored::Path<'_>| {
        unknown.push(format!("{path}: unknown field"));
    };
    let ignored = serde_ignored::Deserializer::new(doc, &mut on_unknown);
    let config: InjectorConfig = serde_path_to_error::deserialize(ignored).map_err(|e| {
        let path = e.path().to_string();
        let message = e.into_inner().to_string();
        if path == "." || path.is_empty() {
            invalid(vec![message])
        } else {
            invalid(vec![format!("{path}: {message}")])
        }
    })?;
    // `deny_unknown_fields` catches ours; `serde_ignored` the ones inside `resources`.
    if !unknown.is_empty() {
        return Err(invalid(unknown));
    }
    let problems = config.validate();
    if problems.is_empty() {
        Ok(config)
    } else {
        Err(invalid(problems))
    }
}

/// `cpu: 1` is a YAML number, but a Kubernetes quantity is a string: accept both, as the API
/// server does.
fn quantities_as_strings(doc: &mut serde_json::Value) {
    let Some(resources) = doc.get_mut("resources").and_then(|r| r.as_object_mut()) else {
        return;
    };
    for key in ["requests", "limits"] {
        if let Some(map) = resources.get_mut(key).and_then(|m| m.as_object_mut()) {
            for value in map.values_mut() {
                if let serde_json::Value::Number(n) = value {
                    *value = serde_json::Value::String(n.to_string());
                }
            }
        }
    }
}

impl InjectorConfig {
    /// Every problem that would make injected pods fail, each naming its field.
    pub fn validate(&self) -> Vec<String> {
        let mut problems = Vec::new();
        if self.image.trim().is_empty() {
            problems.push("image: must not be empty".to_string());
        } else if self.image.chars().any(char::is_whitespace) {
            problems.push(format!("image: {:?} contains whitespace", self.image));
        }
        if !matches!(
            self.image_pull_policy.as_str(),
            "Always" | "IfNotPresent" | "Never"
        ) {
            problems.push(format!(
                "imagePullPolicy: {:?} is not Always, IfNotPresent or Never",
                self.image_pull_policy
            ));
        }
        if let Err(e) = check_xds_address(&self.xds_address) {
            problems.push(format!("xdsAddress: {e}"));
        }
        if self.concurrency == 0 {
            problems.push("concurrency: must be at least 1".to_string());
        }
        if !LOG_LEVELS.contains(&self.log_level.as_str()) {
            problems.push(format!(
                "logLevel: unknown level {:?} (trace, debug, info, warning, error, critical, off)",
                self.log_level
            ));
        }
        if self.run_as_user == 0 {
            problems.push("runAsUser: must not be 0 (the proxy never runs as root)".to_string());
        } else if self.run_as_user < 0 {
            problems.push(format!(
                "runAsUser: {} is not a valid UID",
                self.run_as_user
            ));
        }
        let ports = [
            ("outbound", self.ports.outbound),
            ("inbound", self.ports.inbound),
            ("admin", self.ports.admin),
            ("readiness", self.ports.readiness),
        ];
        for (i, (name, port)) in ports.iter().enumerate() {
            if *port == 0 {
                problems.push(format!("ports.{name}: must not be 0"));
            } else if let Some((other, _)) = ports[..i].iter().find(|(_, p)| p == port) {
                problems.push(format!(
                    "ports.{name}: {port} is also ports.{other} (every port must be distinct)"
                ));
            }
        }
        problems.extend(check_resources(&self.resources, "resources"));
        for (name, probe) in [
            ("startupProbe", &self.startup_probe),
            ("readinessProbe", &self.readiness_probe),
        ] {
            for (field, value) in [
                ("periodSeconds", probe.period_seconds),
                ("failureThreshold", probe.failure_threshold),
                ("timeoutSeconds", probe.timeout_seconds),
            ] {
                if value < 1 {
                    problems.push(format!("{name}.{field}: must be at least 1, got {value}"));
                }
            }
        }
        problems
    }

    /// `http://<xdsAddress>`, the proxy's `--xds-address`.
    pub fn xds_url(&self) -> String {
        format!("http://{}", self.xds_address)
    }
}

/// `HOST:PORT` with a non-empty host and a non-zero port.
fn check_xds_address(address: &str) -> Result<(), String> {
    if address.contains("://") {
        return Err(format!(
            "{address:?}: expected HOST:PORT without a scheme (the proxy is given http://HOST:PORT)"
        ));
    }
    let parsed = format!("http://{address}")
        .parse::<http::Uri>()
        .ok()
        .filter(|u| u.path() == "/" && u.query().is_none());
    match parsed.as_ref().and_then(|u| u.authority()) {
        Some(a) if !a.host().is_empty() && a.port_u16().is_some_and(|p| p != 0) => Ok(()),
        _ => Err(format!("{address:?}: expected HOST:PORT")),
    }
}

/// Problems with resource requests and limits: quantities that do not parse, negative ones,
/// and requests above their limit (the API server would reject the pod).
pub(crate) fn check_resources(resources: &ResourceRequirements, field: &str) -> Vec<String> {
    let mut problems = Vec::new();
    for (kind, map) in [
        ("requests", &resources.requests),
        ("limits", &resources.limits),
    ] {
        for (name, q) in map.iter().flatten() {
            match parse_quantity(&q.0) {
                Some(v) if v < 0.0 => {
                    problems.push(format!("{field}.{kind}.{name}: {:?} is negative", q.0))
                }
                Some(_) => {}
                None => problems.push(format!(
                    "{field}.{kind}.{name}: {:?} is not a Kubernetes quantity",
                    q.0
                )),
            }
        }
    }
    for (name, request) in resources.requests.iter().flatten() {
        let limit = resources.limits.as_ref().and_then(|l| l.get(name));
        if let (Some(r), Some(l)) = (
            parse_quantity(&request.0),
            limit.and_then(|l| parse_quantity(&l.0)),
        ) && r > l
        {
            problems.push(format!(
                "{field}.requests.{name}: {:?} is above the limit {:?}",
                request.0,
                limit.map(|l| l.0.as_str()).unwrap_or_default()
            ));
        }
    }
    problems
}

/// The value of a Kubernetes quantity (`50m`, `32Mi`, `1.5`, `2e3`, `1G`), or `None` when it is
/// not one. Precise enough to compare a request with a limit.
pub(crate) fn parse_quantity(text: &str) -> Option<f64> {
    let (sign, rest) = match text.as_bytes().first()? {
        b'-' => (-1.0, &text[1..]),
        b'+' => (1.0, &text[1..]),
        _ => (1.0, text),
    };
    let number_len = rest
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(rest.len());
    let (number, suffix) = rest.split_at(number_len);
    let digits = number.chars().filter(char::is_ascii_digit).count();
    if digits == 0 || number.matches('.').count() > 1 {
        return None;
    }
    let value: f64 = number.parse().ok()?;
    let scale = match suffix {
        "" => 1.0,
        "n" => 1e-9,
        "u" => 1e-6,
        "m" => 1e-3,
        "k" => 1e3,
        "M" => 1e6,
        "G" => 1e9,
        "T" => 1e12,
        "P" => 1e15,
        "E" => 1e18,
        "Ki" => 1024f64,
        "Mi" => 1024f64.powi(2),
        "Gi" => 1024f64.powi(3),
        "Ti" => 1024f64.powi(4),
        "Pi" => 1024f64.powi(5),
        "Ei" => 1024f64.powi(6),
        exp => {
            let e = exp.strip_prefix(['e', 'E'])?;
            let unsigned = e.strip_prefix(['+', '-']).unwrap_or(e);
            if unsigned.is_empty() || !unsigned.bytes().all(|b| b.is_ascii_digit()) {
                return None;
            }
            let e: i32 = e.parse().ok()?;
            10f64.powi(e)
        }
    };
    let v = sign * value * scale;
    v.is_finite().then_some(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `helm template capstan charts/capstan -n capstan-system`, the ConfigMap's
    /// `injector.yaml`, verbatim.
    const RENDERED_DEFAULTS: &str = r#"image: "ghcr.io/capstan/capstan-proxy:0.1.0"
imagePullPolicy: "IfNotPresent"
xdsAddress: "capstan.capstan-system.svc:18000"
concurrency: 2
logLevel: "info"
drainTimeSeconds: 5
runAsUser: 1337
ports:
  outbound: 15001
  inbound: 15006
  admin: 15000
  readiness: 15021
resources:
  limits:
    memory: 256Mi
  requests:
    cpu: 50m
    memory: 32Mi
startupProbe:
  failureThreshold: 120
  periodSeconds: 1
  timeoutSeconds: 1
readinessProbe:
  failureThreshold: 3
  periodSeconds: 2
  timeoutSeconds: 1
"#;

    #[test]
    fn the_charts_rendered_defaults_parse_and_equal_the_built_in_defaults() {
        let c = from_yaml(RENDERED_DEFAULTS, "injector.yaml").expect("valid");
        let expected = InjectorConfig {
            image: "ghcr.io/capstan/capstan-proxy:0.1.0".into(),
            ..InjectorConfig::default()
        };
        assert_eq!(c, expected);
        assert_eq!(c.xds_url(), "http://capstan.capstan-system.svc:18000");
        assert_eq!(
            c.resources.requests.as_ref().and_then(|r| r.get("cpu")),
            Some(&Quantity("50m".into()))
        );
        assert!(InjectorConfig::default().validate().is_empty());
    }

    #[test]
    fn an_empty_file_is_every_default() {
        assert_eq!(from_yaml("", "x"), Ok(InjectorConfig::default()));
        assert_eq!(
            from_yaml("ports: { readiness: 15099 }\n", "x")
                .expect("valid")
                .ports,
            Ports {
                readiness: 15099,
                ..Ports::default()
            }
        );
    }

    #[test]
    fn load_names_the_file() {
        let err = load("/nonexistent/injector.yaml").expect_err("missing");
        assert!(
            err.starts_with("cannot read /nonexistent/injector.yaml"),
            "{err}"
        );
        let dir = std::env::temp_dir().join(format!("capstan-injector-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let path = dir.join("injector.yaml");
        std::fs::write(&path, "concurrency: 4\nlogLevel: debug\n").expect("write");
        let c = load(&path).expect("valid");
        assert_eq!((c.concurrency, c.log_level.as_str()), (4, "debug"));
        std::fs::write(&path, "concurrency: 0\n").expect("write");
        let err = load(&path).expect_err("invalid");
        assert_eq!(
            err,
            format!(
                "invalid injector configuration {}:\n  concurrency: must be at least 1",
                path.display()
            )
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn unknown_fields_are_named() {
        let err = from_yaml("imagePullPolicy: Always\nlogLvel: debug\n", "injector.yaml")
            .expect_err("invalid");
        assert!(
            err.starts_with(
                "invalid injector configuration injector.yaml:\n  logLvel: unknown field `logLvel`"
            ),
            "{err}"
        );
        let err = from_yaml("ports: { readyness: 1 }\n", "i.yaml").expect_err("invalid");
        assert!(err.contains("ports.readyness: unknown field"), "{err}");
        let err = from_yaml("startupProbe: { periodSeconds: 1 }\n", "i.yaml").expect_err("invalid");
        assert!(
            err.contains("startupProbe: missing field `failureThreshold`"),
            "{err}"
        );
        // Inside k8s-openapi's ResourceRequirements too.
        let err = from_yaml("resources: { limts: { cpu: 1 } }\n", "i.yaml").expect_err("invalid");
        assert!(err.contains("resources.limts: unknown field"), "{err}");
    }

    #[test]
    fn wrong_types_name_the_field() {
        let err = from_yaml("ports: { inbound: 70000 }\n", "i.yaml").expect_err("invalid");
        assert!(
            err.contains("ports.inbound: invalid value: integer `70000`"),
            "{err}"
        );
        let err = from_yaml("concurrency: two\n", "i.yaml").expect_err("invalid");
        assert!(err.contains("concurrency: invalid type"), "{err}");
        let err = from_yaml("- a\n", "i.yaml").expect_err("invalid");
        assert!(err.contains("expected a mapping"), "{err}");
        let err = from_yaml("ports: [1, 2, 3, 4]\n", "i.yaml").expect_err("invalid");
        assert!(
            err.contains("ports: expected a mapping, got a sequence"),
            "{err}"
        );
    }

    #[test]
    fn numeric_quantities_are_accepted() {
        let c = from_yaml(
            "resources: { requests: { cpu: 1 }, limits: { cpu: 2.5 } }\n",
            "x",
        )
        .expect("valid");
        assert_eq!(
            c.resources.limits.as_ref().and_then(|r| r.get("cpu")),
            Some(&Quantity("2.5".into()))
        );
    }

    #[test]
    fn validation_names_every_problem() {
        let err = from_yaml(
            "image: \"\"\nimagePullPolicy: Sometimes\nxdsAddress: http://cp:18000\nconcurrency: 0\nlogLevel: loud\nrunAsUser: 0\nports: { outbound: 15001, inbound: 15001, admin: 0, readiness: 15021 }\nresources: { requests: { memory: 1Gi, cpu: 12XB }, limits: { memory: 256Mi } }\nreadinessProbe: { periodSeconds: 0, failureThreshold: 3, timeoutSeconds: 1 }\n",
            "i.yaml",
        )
        .expect_err("invalid");
        for expected in [
            "  image: must not be empty",
            "  imagePullPolicy: \"Sometimes\" is not Always, IfNotPresent or Never",
            "  xdsAddress: \"http://cp:18000\": expected HOST:PORT without a scheme",
            "  concurrency: must be at least 1",
            "  logLevel: unknown level \"loud\"",
            "  runAsUser: must not be 0",
            "  ports.inbound: 15001 is also ports.outbound",
            "  ports.admin: must not be 0",
            "  resources.requests.cpu: \"12XB\" is not a Kubernetes quantity",
            "  resources.requests.memory: \"1Gi\" is above the limit \"256Mi\"",
            "  readinessProbe.periodSeconds: must be at least 1, got 0",
        ] {
            assert!(err.contains(expected), "missing {expected:?} in\n{err}");
        }
        assert!(from_yaml("xdsAddress: cp\n", "i").is_err());
        assert!(from_yaml("xdsAddress: cp:0\n", "i").is_err());
        assert!(from_yaml("xdsAddress: \"[::1]:18000\"\n", "i").is_ok());
        assert!(from_yaml("runAsUser: -5\n", "i").is_err());
    }

    #[test]
    fn quantities_parse_as_kubernetes_does() {
        for (text, value) in [
            ("50m", 0.05),
            ("1", 1.0),
            ("1.5", 1.5),
            (".5", 0.5),
            ("32Mi", 32.0 * 1024.0 * 1024.0),
            ("1G", 1e9),
            ("2e3", 2000.0),
            ("1E", 1e18),
            ("+3k", 3000.0),
            ("-1", -1.0),
        ] {
            assert_eq!(parse_quantity(text), Some(value), "{text}");
        }
        for bad in [
            "", "12XB", "abc", "1.2.3", "Mi", "1e", "1mi", ".", "1 Mi", "1e1.5",
        ] {
            assert_eq!(parse_quantity(bad), None, "{bad:?}");
        }
    }
}
