//! Capstan on a real Kubernetes cluster (issue 4, item 7). `e2e/kubernetes/run.sh` builds the
//! images, installs the chart and runs this test; `e2e/kubernetes/README.md` explains both.
//!
//! With `KUBECONFIG` unset the cluster test prints `NOT RUN: KUBECONFIG is not set` and passes
//! (the one documented exception to "a missing tool fails under CI": the project's machines
//! have no cluster). The other tests here need no cluster and always run: the manifests the
//! cluster test applies are valid YAML and match the CRD's schema, the parsers it relies on
//! (RFC 3339 timestamps, curl output) are right, and `run.sh` parses its arguments.
//!
//! With `KUBECONFIG` set, against a cluster where the chart is installed (release `capstan` in
//! `capstan-system`, or `CAPSTAN_E2E_RELEASE` / `CAPSTAN_E2E_RELEASE_NAMESPACE`), it drives
//! `kubectl` (`KUBECTL`, else `kubectl` on PATH, else `.tools/bin/kubectl`):
//!
//! 1. waits for the control plane's rollout and for the webhook's `caBundle`;
//! 2. creates a namespace labelled `capstan.dev/inject=enabled` (deleted at the end, also on
//!    failure, unless `CAPSTAN_E2E_KEEP=1`), with `echo-v1` (2 replicas) and `echo-v2`
//!    (1 replica) — agnhost `netexec`, answering `/hostname` with the pod name — behind the
//!    Services `echo` (both), `echo-v1` and `echo-v2`, and a curl `client` pod;
//! 3. checks every pod got `capstan-proxy` as a native sidecar (init container with
//!    `restartPolicy: Always`, startup and readiness probes on `/ready`);
//! 4. applies a `ServiceRoute` for `echo` splitting 80/20 between `echo-v1` and `echo-v2` (and
//!    setting a response header, so the test knows when the route is in force) and waits for
//!    `Accepted=True` and `ResolvedRefs=True` at the current generation;
//! 5. sends 200 requests from the client through its sidecar (`127.0.0.1:15001`,
//!    `Host: echo`): none may fail, and `echo-v1`'s share must be 80 % ± 10 points;
//! 6. restarts `echo-v1` (`kubectl rollout restart`, maxSurge 1, maxUnavailable 0) while the
//!    client sends requests in a loop, and **holds xDS back** for the first new pod: the
//!    control plane's xDS Service port is pointed at a closed port for `XDS_HOLD` (the webhook
//!    Service is untouched, so the pod is still injected; proxies already connected keep their
//!    stream — the client's `control_plane.connected_state` is read to confirm it). During the
//!    hold the new pod must not turn Ready, its app container must not start and its proxy
//!    must not go LIVE; afterwards the rollout completes and no request of the loop may have
//!    failed;
//! 7. checks, for every pod, that it was not Ready before its proxy was LIVE: the kubelet's
//!    timestamp of the proxy's `server LIVE` log line (`kubectl logs --timestamps`) against the
//!    pod's `Ready` `lastTransitionTime` and the app container's `startedAt`. The API server
//!    keeps those two in whole seconds, so the check is `ready >= floor(live)`: a pod Ready
//!    less than a second before its proxy went LIVE goes unnoticed — which is why step 6 makes
//!    LIVE come `XDS_HOLD` seconds late for one pod, where a missing gate could not hide.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

/// Label that selects a namespace (or pod) for injection.
const INJECT_LABEL: &str = "capstan.dev/inject";
/// The injected container.
const PROXY_CONTAINER: &str = "capstan-proxy";
/// The line the proxy logs once it is LIVE (proxy/src/server/mod.rs).
const LIVE_LOG_LINE: &str = "server LIVE";
/// The demo app container's name in echo-v1/echo-v2.
const APP_CONTAINER: &str = "echo";
/// The response header the ServiceRoute sets, and its value.
const ROUTED_HEADER: &str = "x-routed-by";
const ROUTED_VALUE: &str = "capstan-e2e";
/// Requests of the split check, expected share of echo-v1 and the tolerance, in points.
const SPLIT_REQUESTS: usize = 200;
const SPLIT_V1_PERCENT: u32 = 80;
const SPLIT_TOLERANCE_POINTS: u32 = 10;
/// How long xDS is held back from the first new pod of the rollout.
const XDS_HOLD: Duration = Duration::from_secs(12);
/// The preStop sleep of the echo pods: the time between an endpoint leaving the EndpointSlice
/// and the app receiving SIGTERM.
const PRESTOP_SLEEP_S: u32 = 8;
/// Where the traffic loop of the rollout writes its results, and the file that stops it.
const LOOP_LOG: &str = "/tmp/capstan-e2e-loop.log";
const LOOP_STOP: &str = "/tmp/capstan-e2e-loop.stop";

const DEFAULT_ECHO_IMAGE: &str = "registry.k8s.io/e2e-test-images/agnhost:2.47";
const DEFAULT_CURL_IMAGE: &str = "curlimages/curl:8.10.1";

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf()
}

fn env_or(name: &str, default: &str) -> String {
    std::env::var(name)
        .ok()
        .filter(|v| !v.is_empty())
        .unwrap_or_else(|| default.to_string())
}

// ---------------------------------------------------------------------------------------------
// Manifests

/// The images the demo workloads run.
struct Images {
    echo: String,
    curl: String,
}

impl Images {
    fn from_env() -> Images {
        Images {
            echo: env_or("CAPSTAN_E2E_ECHO_IMAGE", DEFAULT_ECHO_IMAGE),
            curl: env_or("CAPSTAN_E2E_CURL_IMAGE", DEFAULT_CURL_IMAGE),
        }
    }
}

fn namespace_manifest(ns: &str) -> String {
    format!(
        "apiVersion: v1
kind: Namespace
metadata:
  name: {ns}
  labels:
    {INJECT_LABEL}: enabled
    app.kubernetes.io/part-of: capstan-e2e
"
    )
}

fn echo_deployment(ns: &str, version: &str, replicas: u32, image: &str) -> String {
    format!(
        "apiVersion: apps/v1
kind: Deployment
metadata:
  name: echo-{version}
  namespace: {ns}
  labels: {{ app: echo, version: {version} }}
spec:
  replicas: {replicas}
  strategy:
    type: RollingUpdate
    rollingUpdate: {{ maxSurge: 1, maxUnavailable: 0 }}
  selector:
    matchLabels: {{ app: echo, version: {version} }}
  template:
    metadata:
      labels: {{ app: echo, version: {version}, app.kubernetes.io/name: echo-{version} }}
    spec:
      # Above the proxy's drainTimeSeconds (45 by default), as values.yaml asks.
      terminationGracePeriodSeconds: 60
      containers:
      - name: {APP_CONTAINER}
        image: \"{image}\"
        args: [\"netexec\", \"--http-port=8080\"]
        ports: [{{ name: http, containerPort: 8080, protocol: TCP }}]
        readinessProbe:
          httpGet: {{ path: /hostname, port: http }}
          periodSeconds: 1
          failureThreshold: 2
        lifecycle:
          preStop:
            sleep: {{ seconds: {PRESTOP_SLEEP_S} }}
        resources:
          requests: {{ cpu: 10m, memory: 16Mi }}
"
    )
}

fn service(ns: &str, name: &str, selector: &str) -> String {
    format!(
        "apiVersion: v1
kind: Service
metadata:
  name: {name}
  namespace: {ns}
spec:
  selector: {{ {selector} }}
  ports: [{{ name: http, port: 80, targetPort: http, protocol: TCP }}]
"
    )
}

fn client_pod(ns: &str, image: &str) -> String {
    format!(
        "apiVersion: v1
kind: Pod
metadata:
  name: client
  namespace: {ns}
  labels: {{ app: client }}
spec:
  terminationGracePeriodSeconds: 1
  containers:
  - name: client
    image: \"{image}\"
    command: [\"sleep\", \"86400\"]
    resources:
      requests: {{ cpu: 10m, memory: 16Mi }}
"
    )
}

/// Everything but the namespace and the route: two versions of the echo workload, the three
/// Services and the client.
fn workload_manifests(ns: &str, images: &Images) -> String {
    [
        echo_deployment(ns, "v1", 2, &images.echo),
        echo_deployment(ns, "v2", 1, &images.echo),
        service(ns, "echo", "app: echo"),
        service(ns, "echo-v1", "app: echo, version: v1"),
        service(ns, "echo-v2", "app: echo, version: v2"),
        client_pod(ns, &images.curl),
    ]
    .join("---\n")
}

/// The ServiceRoute: traffic for `echo` goes 80/20 to echo-v1/echo-v2, and every answer
/// carries `x-routed-by: capstan-e2e` (so the test sees when the route is in force).
fn route_manifest(ns: &str) -> String {
    let v2 = 100 - SPLIT_V1_PERCENT;
    format!(
        "apiVersion: capstan.dev/v1alpha1
kind: ServiceRoute
metadata:
  name: echo
  namespace: {ns}
spec:
  parentRefs: [{{ name: echo, port: 80 }}]
  rules:
  - matches: [{{ path: {{ type: PathPrefix, value: / }} }}]
    filters:
    - type: ResponseHeaderModifier
      responseHeaderModifier:
        set: [{{ name: {ROUTED_HEADER}, value: {ROUTED_VALUE} }}]
    backendRefs:
    - {{ name: echo-v1, port: 80, weight: {SPLIT_V1_PERCENT} }}
    - {{ name: echo-v2, port: 80, weight: {v2} }}
"
    )
}

// ---------------------------------------------------------------------------------------------
// Shell snippets run in the client pod (busybox sh in the curl image)

/// One request through the client's sidecar; prints `<curl exit code> <body> <x-routed-by>`.
fn curl_once(host: &str) -> String {
    format!(
        "out=$(curl -sS --fail -m 5 -H 'Host: {host}' -w ' %header{{{ROUTED_HEADER}}}' http://127.0.0.1:15001/hostname 2>&1); echo \"$? $out\""
    )
}

/// `n` requests, one result line each.
fn curl_batch_script(host: &str, n: usize) -> String {
    format!(
        "i=0; while [ $i -lt {n} ]; do {}; i=$((i+1)); done",
        curl_once(host)
    )
}

/// Requests until the file `stop` exists, one result line each in the file `log`; in the
/// background with every standard stream redirected (no terminal, so no SIGHUP), so it
/// outlives the `kubectl exec` that starts it.
fn traffic_loop_script(host: &str, log: &str, stop: &str) -> String {
    let body = format!(
        "while [ ! -e {stop} ]; do {}; done > {log} 2>&1",
        curl_once(host)
    );
    format!(
        "rm -f {stop} {log}; sh -c '{}' </dev/null >/dev/null 2>&1 &",
        body.replace('\'', r"'\''")
    )
}

/// Stops the loop of [`traffic_loop_script`] and prints its results.
fn stop_loop_script(log: &str, stop: &str) -> String {
    format!("touch {stop}; sleep 6; cat {log}")
}

/// The tally of result lines from [`curl_once`].
#[derive(Debug, Default, PartialEq)]
struct Tally {
    v1: usize,
    v2: usize,
    /// Answered by some other pod, or without the route's header.
    unexpected: usize,
    /// Failed lines, kept for the message (at most 20).
    failures: Vec<String>,
    failed: usize,
}

impl Tally {
    fn parse(output: &str, require_header: bool) -> Tally {
        let mut t = Tally::default();
        for line in output.lines().map(str::trim).filter(|l| !l.is_empty()) {
            let mut parts = line.split_whitespace();
            let rc = parts.next();
            let body = parts.next().unwrap_or("");
            let header = parts.next().unwrap_or("");
            let ok = rc == Some("0") && parts.next().is_none();
            if !ok {
                t.failed += 1;
                if t.failures.len() < 20 {
                    t.failures.push(line.to_string());
                }
            } else if require_header && header != ROUTED_VALUE {
                t.unexpected += 1;
            } else if body.starts_with("echo-v1-") {
                t.v1 += 1;
            } else if body.starts_with("echo-v2-") {
                t.v2 += 1;
            } else {
                t.unexpected += 1;
            }
        }
        t
    }

    fn total(&self) -> usize {
        self.v1 + self.v2 + self.unexpected + self.failed
    }

    /// echo-v1's share of the answered requests, in percent.
    fn v1_percent(&self) -> f64 {
        let answered = self.v1 + self.v2;
        if answered == 0 {
            return 0.0;
        }
        100.0 * self.v1 as f64 / answered as f64
    }

    fn split_within_tolerance(&self) -> bool {
        let share = self.v1_percent();
        let (lo, hi) = (
            f64::from(SPLIT_V1_PERCENT - SPLIT_TOLERANCE_POINTS),
            f64::from(SPLIT_V1_PERCENT + SPLIT_TOLERANCE_POINTS),
        );
        (lo..=hi).contains(&share)
    }
}

// ---------------------------------------------------------------------------------------------
// Time stamps

/// A point in time from an RFC 3339 timestamp: seconds since the epoch and nanoseconds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Stamp {
    secs: i64,
    nanos: u32,
}

impl Stamp {
    /// The same instant truncated to whole seconds (how the API server stores condition and
    /// container times).
    fn floor(self) -> Stamp {
        Stamp {
            secs: self.secs,
            nanos: 0,
        }
    }
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's algorithm).
fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = if y >= 0 { y } else { y - 399 } / 400;
    let yoe = y - era * 400;
    let m = i64::from(m);
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// Parses `2026-11-28T19:52:47Z`, `2026-11-28T19:52:47.123456789Z` or with a `±hh:mm` offset.
fn parse_rfc3339(s: &str) -> Option<Stamp> {
    let s = s.trim();
    let num = |r: std::ops::Range<usize>| -> Option<u32> {
        let part = s.get(r)?;
        if part.bytes().all(|b| b.is_ascii_digit()) {
            part.parse().ok()
        } else {
            None
        }
    };
    let sep = |i: usize, c: u8| {
        s.as_bytes()
            .get(i)
            .is_some_and(|b| b.eq_ignore_ascii_case(&c))
    };
    if !(sep(4, b'-') && sep(7, b'-') && sep(10, b't') && sep(13, b':') && sep(16, b':')) {
        return None;
    }
    let (year, month, day) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (hour, minute, second) = (num(11..13)?, num(14..16)?, num(17..19)?);
    if !(1..=12).contains(&month) || !(1..=31).contains(&day) || hour > 23 || minute > 59 {
        return None;
    }
    if second > 60 {
        return None;
    }
    let mut rest = s.get(19..)?;
    let mut nanos = 0u32;
    if let Some(frac) = rest.strip_prefix('.') {
        let digits = frac.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 {
            return None;
        }
        let (frac_digits, after) = frac.split_at(digits);
        let mut padded: String = frac_digits.chars().take(9).collect();
        while padded.len() < 9 {
            padded.push('0');
        }
        nanos = padded.parse().ok()?;
        rest = after;
    }
    let offset_secs: i64 = match rest {
        "Z" | "z" => 0,
        _ => {
            let sign = match rest.as_bytes().first() {
                Some(b'+') => 1,
                Some(b'-') => -1,
                _ => return None,
            };
            let (h, m) = rest.get(1..)?.split_once(':')?;
            if h.len() != 2 || m.len() != 2 {
                return None;
            }
            let (h, m): (i64, i64) = (h.parse().ok()?, m.parse().ok()?);
            sign * (h * 3600 + m * 60)
        }
    };
    let days = days_from_civil(i64::from(year), month, day);
    let secs = days * 86_400 + i64::from(hour) * 3600 + i64::from(minute) * 60 + i64::from(second)
        - offset_secs;
    Some(Stamp { secs, nanos })
}

/// The kubelet's timestamp of the first log line containing `needle`, from
/// `kubectl logs --timestamps` output (`<RFC 3339 time> <line>`).
fn first_log_stamp(logs: &str, needle: &str) -> Option<Stamp> {
    logs.lines().find_map(|line| {
        let (stamp, text) = line.split_once(' ')?;
        if text.contains(needle) {
            parse_rfc3339(stamp)
        } else {
            None
        }
    })
}

// ---------------------------------------------------------------------------------------------
// Pod status

fn pod_name(pod: &Value) -> &str {
    pod["metadata"]["name"].as_str().unwrap_or("?")
}

/// When the pod's `Ready` condition last turned True, if it is True.
fn ready_since(pod: &Value) -> Option<Stamp> {
    let conditions = pod["status"]["conditions"].as_array()?;
    let ready = conditions
        .iter()
        .find(|c| c["type"] == "Ready" && c["status"] == "True")?;
    parse_rfc3339(ready["lastTransitionTime"].as_str()?)
}

fn container_status<'a>(pod: &'a Value, list: &str, name: &str) -> Option<&'a Value> {
    pod["status"][list]
        .as_array()?
        .iter()
        .find(|c| c["name"] == name)
}

/// When a container's current run started, if it is running.
fn running_since(pod: &Value, list: &str, name: &str) -> Option<Stamp> {
    let status = container_status(pod, list, name)?;
    parse_rfc3339(status["state"]["running"]["startedAt"].as_str()?)
}

/// What is wrong with a pod's injected sidecar, if anything.
fn injection_problems(pod: &Value) -> Vec<String> {
    let name = pod_name(pod);
    let mut problems = Vec::new();
    let inits = pod["spec"]["initContainers"].as_array();
    let Some(proxy) = inits.and_then(|l| l.iter().find(|c| c["name"] == PROXY_CONTAINER)) else {
        problems.push(format!(
            "{name}: no init container {PROXY_CONTAINER} (was the webhook's caBundle patched before the pod was created? failurePolicy Ignore admits pods without a sidecar)"
        ));
        return problems;
    };
    if proxy["restartPolicy"] != "Always" {
        problems.push(format!(
            "{name}: {PROXY_CONTAINER} has restartPolicy {} (a native sidecar needs Always)",
            proxy["restartPolicy"]
        ));
    }
    for probe in ["startupProbe", "readinessProbe"] {
        if proxy[probe]["httpGet"]["path"] != "/ready" {
            problems.push(format!(
                "{name}: {PROXY_CONTAINER} {probe} is not an httpGet on /ready: {}",
                proxy[probe]
            ));
        }
    }
    let in_containers = pod["spec"]["containers"]
        .as_array()
        .is_some_and(|l| l.iter().any(|c| c["name"] == PROXY_CONTAINER));
    if in_containers {
        problems.push(format!(
            "{name}: {PROXY_CONTAINER} is also a regular container"
        ));
    }
    if pod["metadata"]["annotations"]["capstan.dev/status"] != "injected" {
        problems.push(format!(
            "{name}: annotation capstan.dev/status is {} (want injected)",
            pod["metadata"]["annotations"]["capstan.dev/status"]
        ));
    }
    problems
}

/// Checks a pod was not Ready, and its app containers did not start, before its proxy was
/// LIVE. `live` is the kubelet's timestamp of the proxy's `server LIVE` line; the API server
/// keeps the pod's times in whole seconds, so they are compared with `live` floored.
fn ready_after_live_problems(pod: &Value, live: Option<Stamp>) -> Vec<String> {
    let name = pod_name(pod);
    let mut problems = Vec::new();
    let Some(live) = live else {
        if ready_since(pod).is_some() {
            problems.push(format!(
                "{name}: Ready, but its {PROXY_CONTAINER} never logged '{LIVE_LOG_LINE}'"
            ));
        }
        return problems;
    };
    if let Some(ready) = ready_since(pod)
        && ready < live.floor()
    {
        problems.push(format!(
            "{name}: Ready at {} but its proxy was LIVE only at {}.{:09} (epoch seconds)",
            ready.secs, live.secs, live.nanos
        ));
    }
    let apps = pod["spec"]["containers"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    for app in apps {
        let Some(app_name) = app["name"].as_str() else {
            continue;
        };
        if let Some(started) = running_since(pod, "containerStatuses", app_name)
            && started < live.floor()
        {
            problems.push(format!(
                "{name}: app container {app_name} started at {} but the proxy was LIVE only at {}.{:09}",
                started.secs, live.secs, live.nanos
            ));
        }
    }
    problems
}

// ---------------------------------------------------------------------------------------------
// kubectl

struct Kubectl {
    binary: PathBuf,
}

impl Kubectl {
    /// `KUBECTL`, else `kubectl` on PATH, else `.tools/bin/kubectl` (scripts/install-kubectl.sh).
    fn find() -> Kubectl {
        if let Some(explicit) = std::env::var_os("KUBECTL").filter(|v| !v.is_empty()) {
            return Kubectl {
                binary: PathBuf::from(explicit),
            };
        }
        let on_path = std::env::var_os("PATH").and_then(|paths| {
            std::env::split_paths(&paths)
                .map(|p| p.join("kubectl"))
                .find(|p| p.is_file())
        });
        let local = root().join(".tools/bin/kubectl");
        let binary = on_path
            .or_else(|| local.is_file().then_some(local))
            .expect(
                "KUBECONFIG is set but kubectl is neither on PATH nor in .tools/bin: run scripts/install-kubectl.sh (or e2e/kubernetes/run.sh --install-kubectl)",
            );
        Kubectl { binary }
    }

    /// Runs kubectl; stdout on success, a message with stderr otherwise.
    fn run(&self, args: &[&str]) -> Result<String, String> {
        self.run_with_stdin(args, None)
    }

    fn run_with_stdin(&self, args: &[&str], stdin: Option<&str>) -> Result<String, String> {
        let mut cmd = Command::new(&self.binary);
        cmd.args(args)
            .stdin(if stdin.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd
            .spawn()
            .map_err(|e| format!("cannot run {}: {e}", self.binary.display()))?;
        if let (Some(input), Some(mut pipe)) = (stdin, child.stdin.take()) {
            use std::io::Write as _;
            pipe.write_all(input.as_bytes())
                .map_err(|e| format!("kubectl {}: writing stdin: {e}", args.join(" ")))?;
        }
        let out = child
            .wait_with_output()
            .map_err(|e| format!("kubectl {}: {e}", args.join(" ")))?;
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(format!(
                "kubectl {} failed ({}):\n{}{}",
                args.join(" "),
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ))
        }
    }

    /// Runs kubectl and panics with its output on failure.
    fn ok(&self, args: &[&str]) -> String {
        self.run(args).unwrap_or_else(|e| panic!("{e}"))
    }

    fn apply(&self, manifest: &str) {
        self.run_with_stdin(&["apply", "-f", "-"], Some(manifest))
            .unwrap_or_else(|e| panic!("{e}\nmanifest:\n{manifest}"));
    }

    fn json(&self, args: &[&str]) -> Result<Value, String> {
        let mut full: Vec<&str> = args.to_vec();
        full.extend(["-o", "json"]);
        let text = self.run(&full)?;
        serde_json::from_str(&text)
            .map_err(|e| format!("kubectl {}: output is not JSON: {e}", args.join(" ")))
    }

    fn pods(&self, ns: &str, selector: &str) -> Vec<Value> {
        let list = self
            .json(&["-n", ns, "get", "pods", "-l", selector])
            .unwrap_or_else(|e| panic!("{e}"));
        list["items"].as_array().cloned().unwrap_or_default()
    }

    fn exec_sh(&self, ns: &str, pod: &str, script: &str) -> Result<String, String> {
        self.run(&[
            "-n", ns, "exec", pod, "-c", "client", "--", "sh", "-c", script,
        ])
    }
}

/// Whether the client pod's sidecar has an ADS stream (`control_plane.connected_state` on its
/// admin interface, `127.0.0.1:15000`, reachable from the client container).
fn client_xds_connected(kubectl: &Kubectl, ns: &str) -> Result<bool, String> {
    let stats = kubectl.exec_sh(
        ns,
        "client",
        "curl -sS -m 5 'http://127.0.0.1:15000/stats?filter=connected_state'",
    )?;
    stat_value(&stats, "control_plane.connected_state")
        .map(|v| v == 1)
        .ok_or_else(|| format!("no control_plane.connected_state in:\n{stats}"))
}

/// A counter or gauge from the admin's text `/stats` (`name: value` lines).
fn stat_value(stats: &str, name: &str) -> Option<u64> {
    stats.lines().find_map(|l| {
        let (n, v) = l.split_once(": ")?;
        (n.trim() == name).then(|| v.trim().parse().ok()).flatten()
    })
}

/// Polls `f` until it returns `Ok`, or panics with the last error after `limit`.
fn eventually<T>(what: &str, limit: Duration, mut f: impl FnMut() -> Result<T, String>) -> T {
    let start = Instant::now();
    loop {
        match f() {
            Ok(v) => return v,
            Err(e) if start.elapsed() >= limit => {
                panic!("{what}: not after {limit:?}: {e}")
            }
            Err(_) => std::thread::sleep(Duration::from_millis(500)),
        }
    }
}

/// Deletes the test namespace when dropped (the test's end or a panic).
struct NamespaceGuard<'a> {
    kubectl: &'a Kubectl,
    name: String,
}

impl Drop for NamespaceGuard<'_> {
    fn drop(&mut self) {
        if std::env::var("CAPSTAN_E2E_KEEP").is_ok_and(|v| v == "1") {
            eprintln!("CAPSTAN_E2E_KEEP=1: keeping namespace {}", self.name);
            return;
        }
        if let Err(e) = self
            .kubectl
            .run(&["delete", "namespace", &self.name, "--wait=false"])
        {
            eprintln!("cleanup: {e}");
        }
    }
}

/// Points the control plane's xDS Service port at a closed port while alive; restores the
/// original `targetPort` when dropped.
struct XdsHold<'a> {
    kubectl: &'a Kubectl,
    namespace: String,
    service: String,
    path: String,
    original: Value,
}

impl<'a> XdsHold<'a> {
    fn start(kubectl: &'a Kubectl, namespace: &str, service: &str) -> XdsHold<'a> {
        let svc = kubectl
            .json(&["-n", namespace, "get", "service", service])
            .unwrap_or_else(|e| panic!("{e}"));
        let ports = svc["spec"]["ports"].as_array().cloned().unwrap_or_default();
        let index = ports
            .iter()
            .position(|p| p["port"] == 18000)
            .unwrap_or_else(|| panic!("service {namespace}/{service} has no port 18000: {svc}"));
        let original = ports[index]["targetPort"].clone();
        let path = format!("/spec/ports/{index}/targetPort");
        let patch = json!([{"op": "replace", "path": path, "value": 1}]).to_string();
        kubectl.ok(&[
            "-n",
            namespace,
            "patch",
            "service",
            service,
            "--type=json",
            "-p",
            &patch,
        ]);
        XdsHold {
            kubectl,
            namespace: namespace.to_string(),
            service: service.to_string(),
            path,
            original,
        }
    }
}

impl Drop for XdsHold<'_> {
    fn drop(&mut self) {
        let patch =
            json!([{"op": "replace", "path": self.path, "value": self.original}]).to_string();
        if let Err(e) = self.kubectl.run(&[
            "-n",
            &self.namespace,
            "patch",
            "service",
            &self.service,
            "--type=json",
            "-p",
            &patch,
        ]) {
            eprintln!(
                "RESTORE FAILED: the xDS Service {}/{} still points at a closed port; run `helm upgrade` or patch targetPort back to {}: {e}",
                self.namespace, self.service, self.original
            );
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The cluster test

#[test]
fn kubernetes_cluster() {
    if std::env::var_os("KUBECONFIG").is_none_or(|v| v.is_empty()) {
        eprintln!("NOT RUN: KUBECONFIG is not set (see e2e/kubernetes/README.md)");
        return;
    }
    let kubectl = Kubectl::find();
    let release = env_or("CAPSTAN_E2E_RELEASE", "capstan");
    let release_ns = env_or("CAPSTAN_E2E_RELEASE_NAMESPACE", "capstan-system");
    let images = Images::from_env();

    eprintln!("== control plane {release_ns}/{release}");
    kubectl.ok(&[
        "-n",
        &release_ns,
        "rollout",
        "status",
        &format!("deployment/{release}"),
        "--timeout=300s",
    ]);
    let webhook_config = format!("{release}-injector");
    eventually(
        "the webhook's caBundle is patched by the control plane",
        Duration::from_secs(120),
        || {
            let cfg = kubectl.json(&["get", "mutatingwebhookconfiguration", &webhook_config])?;
            let hooks = cfg["webhooks"].as_array().cloned().unwrap_or_default();
            let patched = !hooks.is_empty()
                && hooks.iter().all(|h| {
                    h["clientConfig"]["caBundle"]
                        .as_str()
                        .is_some_and(|b| !b.is_empty())
                });
            if patched {
                Ok(())
            } else {
                Err(format!("caBundle still empty in {webhook_config}"))
            }
        },
    );

    let ns = format!(
        "capstan-e2e-{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs() % 100_000)
            .unwrap_or(0)
    );
    eprintln!("== namespace {ns}");
    kubectl.apply(&namespace_manifest(&ns));
    let _namespace = NamespaceGuard {
        kubectl: &kubectl,
        name: ns.clone(),
    };
    kubectl.apply(&workload_manifests(&ns, &images));
    for deploy in ["echo-v1", "echo-v2"] {
        kubectl.ok(&[
            "-n",
            &ns,
            "rollout",
            "status",
            &format!("deployment/{deploy}"),
            "--timeout=300s",
        ]);
    }
    kubectl.ok(&[
        "-n",
        &ns,
        "wait",
        "--for=condition=Ready",
        "pod/client",
        "--timeout=300s",
    ]);

    eprintln!("== every pod has capstan-proxy as a native sidecar");
    let initial_pods = kubectl.pods(&ns, "app in (echo, client)");
    assert_eq!(initial_pods.len(), 4, "echo-v1 ×2, echo-v2, client");
    let problems: Vec<String> = initial_pods.iter().flat_map(injection_problems).collect();
    assert!(problems.is_empty(), "injection:\n{}", problems.join("\n"));

    eprintln!("== ServiceRoute echo: 80/20 echo-v1/echo-v2, status Accepted");
    kubectl.apply(&route_manifest(&ns));
    eventually(
        "ServiceRoute echo has Accepted=True and ResolvedRefs=True at its generation",
        Duration::from_secs(60),
        || {
            let route = kubectl.json(&["-n", &ns, "get", "serviceroute", "echo"])?;
            let conditions = route["status"]["conditions"]
                .as_array()
                .cloned()
                .unwrap_or_default();
            let generation = &route["metadata"]["generation"];
            let is_true = |t: &str| {
                conditions.iter().any(|c| {
                    c["type"] == t
                        && c["status"] == "True"
                        && (c["observedGeneration"].is_null()
                            || &c["observedGeneration"] == generation)
                })
            };
            if is_true("Accepted") && is_true("ResolvedRefs") {
                Ok(())
            } else {
                Err(format!("status: {}", route["status"]))
            }
        },
    );

    eprintln!("== routing from the client's sidecar");
    eventually(
        "the client's proxy applies the route (answers carry x-routed-by)",
        Duration::from_secs(60),
        || {
            let out = kubectl.exec_sh(&ns, "client", &curl_batch_script("echo", 5))?;
            let t = Tally::parse(&out, true);
            if t.v1 + t.v2 == 5 {
                Ok(())
            } else {
                Err(format!("{t:?}\n{out}"))
            }
        },
    );
    let out = kubectl
        .exec_sh(&ns, "client", &curl_batch_script("echo", SPLIT_REQUESTS))
        .unwrap_or_else(|e| panic!("{e}"));
    let split = Tally::parse(&out, true);
    eprintln!(
        "   {} requests: echo-v1 {}, echo-v2 {}, unexpected {}, failed {} (echo-v1 {:.1} %)",
        split.total(),
        split.v1,
        split.v2,
        split.unexpected,
        split.failed,
        split.v1_percent()
    );
    assert_eq!(
        split.total(),
        SPLIT_REQUESTS,
        "one line per request:\n{out}"
    );
    assert_eq!(
        (split.failed, split.unexpected),
        (0, 0),
        "every request answered by echo-v1/echo-v2 through the route: {:?}",
        split.failures
    );
    assert!(
        split.split_within_tolerance(),
        "echo-v1 share {:.1} % is not {SPLIT_V1_PERCENT} ± {SPLIT_TOLERANCE_POINTS}: {split:?}",
        split.v1_percent()
    );

    eprintln!("== rolling update of echo-v1 under load, xDS held back from its first new pod");
    let old_v1: BTreeSet<String> = kubectl
        .pods(&ns, "app=echo,version=v1")
        .iter()
        .map(|p| pod_name(p).to_string())
        .collect();
    kubectl
        .exec_sh(
            &ns,
            "client",
            &traffic_loop_script("echo", LOOP_LOG, LOOP_STOP),
        )
        .unwrap_or_else(|e| panic!("starting the traffic loop: {e}"));
    std::thread::sleep(Duration::from_secs(2));
    let hold = XdsHold::start(&kubectl, &release_ns, &release);
    // Let kube-proxy (or its replacement) pick the change up before the new pod's proxy dials.
    std::thread::sleep(Duration::from_secs(3));
    kubectl.ok(&["-n", &ns, "rollout", "restart", "deployment/echo-v1"]);
    let held_pod = eventually(
        "the first new echo-v1 pod runs its proxy",
        Duration::from_secs(180),
        || {
            kubectl
                .pods(&ns, "app=echo,version=v1")
                .into_iter()
                .find(|p| {
                    !old_v1.contains(pod_name(p))
                        && running_since(p, "initContainerStatuses", PROXY_CONTAINER).is_some()
                })
                .map(|p| pod_name(&p).to_string())
                .ok_or_else(|| "no new pod with a running proxy yet".to_string())
        },
    );
    let mut hold_problems = Vec::new();
    let hold_end = Instant::now() + XDS_HOLD;
    while Instant::now() < hold_end {
        match kubectl.json(&["-n", &ns, "get", "pod", &held_pod]) {
            Ok(pod) => {
                if ready_since(&pod).is_some() {
                    hold_problems.push(format!("{held_pod} turned Ready while xDS was held back"));
                }
                if running_since(&pod, "containerStatuses", APP_CONTAINER).is_some() {
                    hold_problems.push(format!(
                        "{held_pod}: app container started while xDS was held back (the sidecar's startupProbe does not gate it)"
                    ));
                }
            }
            Err(e) => hold_problems.push(e),
        }
        if !hold_problems.is_empty() {
            break;
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    let held_logs = kubectl
        .run(&[
            "-n",
            &ns,
            "logs",
            &held_pod,
            "-c",
            PROXY_CONTAINER,
            "--timestamps",
        ])
        .unwrap_or_default();
    let live_during_hold = first_log_stamp(&held_logs, LIVE_LOG_LINE).is_some();
    // Connected sidecars are expected to keep their established xDS stream through the hold;
    // if this cluster's Service implementation cut the client's, say so with any failures.
    let client_connected_in_hold = client_xds_connected(&kubectl, &ns);
    drop(hold);
    eventually(
        "the client's proxy is connected to xDS after the hold",
        Duration::from_secs(60),
        || match client_xds_connected(&kubectl, &ns) {
            Ok(true) => Ok(()),
            Ok(false) => Err("control_plane.connected_state is 0".to_string()),
            Err(e) => Err(e),
        },
    );
    let stream_note = match &client_connected_in_hold {
        Ok(true) => String::new(),
        Ok(false) => "\nnote: the client's own xDS stream was cut during the hold (this cluster reset established connections when the Service changed), so its endpoints were stale for a while".to_string(),
        Err(e) => format!("\nnote: the client's xDS state during the hold is unknown: {e}"),
    };
    assert!(
        hold_problems.is_empty(),
        "with xDS held back:\n{}",
        hold_problems.join("\n")
    );
    assert!(
        !live_during_hold,
        "{held_pod}'s proxy went LIVE while xDS was held back, so the hold did not work on this cluster (the xDS Service's targetPort change did not reach it) and the Ready-before-LIVE check is not discriminating:\n{held_logs}"
    );
    kubectl.ok(&[
        "-n",
        &ns,
        "rollout",
        "status",
        "deployment/echo-v1",
        "--timeout=300s",
    ]);
    eventually(
        "the old echo-v1 pods are gone",
        Duration::from_secs(180),
        || {
            let left: Vec<String> = kubectl
                .pods(&ns, "app=echo,version=v1")
                .iter()
                .map(|p| pod_name(p).to_string())
                .filter(|n| old_v1.contains(n))
                .collect();
            if left.is_empty() {
                Ok(())
            } else {
                Err(format!("still there: {left:?}"))
            }
        },
    );
    // A little more traffic against the new pods only.
    std::thread::sleep(Duration::from_secs(3));
    kubectl
        .exec_sh(&ns, "client", &stop_loop_script(LOOP_LOG, LOOP_STOP))
        .map(|log| {
            let t = Tally::parse(&log, true);
            eprintln!(
                "   {} requests during the rollout: echo-v1 {}, echo-v2 {}, unexpected {}, failed {}",
                t.total(),
                t.v1,
                t.v2,
                t.unexpected,
                t.failed
            );
            assert!(
                t.total() >= 50,
                "the traffic loop sent only {} requests:\n{log}",
                t.total()
            );
            assert_eq!(
                (t.failed, t.unexpected),
                (0, 0),
                "requests failed during the rolling update: {:?}{stream_note}",
                t.failures
            );
        })
        .unwrap_or_else(|e| panic!("reading the traffic loop's results: {e}"));

    eprintln!("== no pod was Ready before its proxy was LIVE");
    let pods = kubectl.pods(&ns, "app in (echo, client)");
    let mut problems: Vec<String> = pods.iter().flat_map(injection_problems).collect();
    let mut live_by_pod = BTreeMap::new();
    for pod in &pods {
        let name = pod_name(pod).to_string();
        let logs = kubectl
            .run(&[
                "-n",
                &ns,
                "logs",
                &name,
                "-c",
                PROXY_CONTAINER,
                "--timestamps",
            ])
            .unwrap_or_else(|e| panic!("{e}"));
        let live = first_log_stamp(&logs, LIVE_LOG_LINE);
        problems.extend(ready_after_live_problems(pod, live));
        live_by_pod.insert(name, live);
    }
    eprintln!("   proxy LIVE at (epoch s): {live_by_pod:?}");
    assert!(
        live_by_pod.contains_key(&held_pod),
        "the held pod {held_pod} is not among the final pods"
    );
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

// ---------------------------------------------------------------------------------------------
// Tests without a cluster

fn yaml_docs(text: &str) -> Vec<Value> {
    serde_saphyr::from_multiple(text).unwrap_or_else(|e| panic!("invalid YAML ({e}):\n{text}"))
}

#[test]
fn manifests_are_valid_yaml_with_the_expected_objects() {
    let images = Images {
        echo: DEFAULT_ECHO_IMAGE.into(),
        curl: DEFAULT_CURL_IMAGE.into(),
    };
    let ns = "capstan-e2e-1-2";
    let ns_doc = yaml_docs(&namespace_manifest(ns));
    assert_eq!(ns_doc.len(), 1);
    assert_eq!(ns_doc[0]["metadata"]["labels"][INJECT_LABEL], "enabled");

    let docs = yaml_docs(&workload_manifests(ns, &images));
    let kinds: Vec<(String, String)> = docs
        .iter()
        .map(|d| {
            (
                d["kind"].as_str().expect("kind").to_string(),
                d["metadata"]["name"].as_str().expect("name").to_string(),
            )
        })
        .collect();
    let want = [
        ("Deployment", "echo-v1"),
        ("Deployment", "echo-v2"),
        ("Service", "echo"),
        ("Service", "echo-v1"),
        ("Service", "echo-v2"),
        ("Pod", "client"),
    ];
    assert_eq!(
        kinds,
        want.map(|(k, n)| (k.to_string(), n.to_string())).to_vec()
    );
    for doc in &docs {
        assert_eq!(doc["metadata"]["namespace"], ns, "{doc}");
    }
    for (doc, version, replicas) in [(&docs[0], "v1", 2), (&docs[1], "v2", 1)] {
        let spec = &doc["spec"];
        assert_eq!(spec["replicas"], replicas);
        assert_eq!(spec["strategy"]["rollingUpdate"]["maxUnavailable"], 0);
        let labels = &spec["template"]["metadata"]["labels"];
        assert_eq!(spec["selector"]["matchLabels"]["version"], version);
        assert_eq!(labels["version"], version);
        assert_eq!(labels["app"], "echo");
        let c = &spec["template"]["spec"]["containers"][0];
        assert_eq!(c["name"], APP_CONTAINER);
        assert_eq!(c["image"], DEFAULT_ECHO_IMAGE);
        assert_eq!(c["ports"][0]["containerPort"], 8080);
        assert_eq!(
            c["lifecycle"]["preStop"]["sleep"]["seconds"],
            PRESTOP_SLEEP_S
        );
        assert_eq!(c["readinessProbe"]["httpGet"]["path"], "/hostname");
    }
    // Each Service selects exactly the pods it is named after.
    assert_eq!(docs[2]["spec"]["selector"], json!({"app": "echo"}));
    assert_eq!(
        docs[3]["spec"]["selector"],
        json!({"app": "echo", "version": "v1"})
    );
    assert_eq!(
        docs[4]["spec"]["selector"],
        json!({"app": "echo", "version": "v2"})
    );
    for svc in &docs[2..5] {
        assert_eq!(svc["spec"]["ports"][0]["port"], 80);
        assert_eq!(svc["spec"]["ports"][0]["targetPort"], "http");
    }
    assert_eq!(
        docs[5]["spec"]["containers"][0]["image"],
        DEFAULT_CURL_IMAGE
    );
}

/// Checks `value` against an OpenAPI v3 structural schema: every field is declared, required
/// fields are present, scalar types and enums match.
fn schema_problems(schema: &Value, value: &Value, path: &str, out: &mut Vec<String>) {
    if let Some(allowed) = schema["enum"].as_array()
        && !allowed.contains(value)
    {
        out.push(format!("{path}: {value} not in {allowed:?}"));
    }
    match schema["type"].as_str() {
        Some("object") | None if value.is_object() => {
            let map = value.as_object().expect("object");
            let props = schema["properties"].as_object();
            for (k, v) in map {
                match props.and_then(|p| p.get(k)) {
                    Some(sub) => schema_problems(sub, v, &format!("{path}.{k}"), out),
                    None if schema["x-kubernetes-preserve-unknown-fields"] == true
                        || schema["additionalProperties"].is_object() => {}
                    None => out.push(format!("{path}.{k}: not in the schema")),
                }
            }
            for req in schema["required"].as_array().into_iter().flatten() {
                if let Some(req) = req.as_str()
                    && !map.contains_key(req)
                {
                    out.push(format!("{path}.{req}: required"));
                }
            }
        }
        Some("array") => match value.as_array() {
            Some(items) => {
                for (i, item) in items.iter().enumerate() {
                    schema_problems(&schema["items"], item, &format!("{path}[{i}]"), out);
                }
            }
            None => out.push(format!("{path}: {value} is not an array")),
        },
        Some("string") if !value.is_string() => {
            out.push(format!("{path}: {value} is not a string"))
        }
        Some("integer") if !(value.is_i64() || value.is_u64()) => {
            out.push(format!("{path}: {value} is not an integer"))
        }
        Some("boolean") if !value.is_boolean() => {
            out.push(format!("{path}: {value} is not a boolean"))
        }
        Some("object") => out.push(format!("{path}: {value} is not an object")),
        _ => {}
    }
}

#[test]
fn route_manifest_matches_the_crd_schema() {
    let docs = yaml_docs(&route_manifest("capstan-e2e-1-2"));
    assert_eq!(docs.len(), 1);
    let route = &docs[0];
    assert_eq!(route["apiVersion"], "capstan.dev/v1alpha1");
    assert_eq!(route["kind"], "ServiceRoute");
    let backends = &route["spec"]["rules"][0]["backendRefs"];
    assert_eq!(backends[0]["name"], "echo-v1");
    assert_eq!(backends[0]["weight"], SPLIT_V1_PERCENT);
    assert_eq!(backends[1]["name"], "echo-v2");
    assert_eq!(backends[1]["weight"], 100 - SPLIT_V1_PERCENT);
    assert_eq!(route["spec"]["parentRefs"][0]["name"], "echo");

    let crd_text = std::fs::read_to_string(root().join("crds/capstan.dev_serviceroutes.yaml"))
        .expect("read crds/capstan.dev_serviceroutes.yaml");
    let crd: Value = serde_saphyr::from_str(&crd_text).expect("CRD parses");
    let version = crd["spec"]["versions"]
        .as_array()
        .and_then(|v| v.iter().find(|v| v["name"] == "v1alpha1"))
        .expect("CRD version v1alpha1");
    let schema = &version["schema"]["openAPIV3Schema"]["properties"]["spec"];
    let mut problems = Vec::new();
    schema_problems(schema, &route["spec"], "spec", &mut problems);
    assert!(problems.is_empty(), "{}", problems.join("\n"));

    // The checker itself catches what it should.
    let bad = json!({"parentRefs": [{"name": "echo", "prot": 80}], "rules": "x"});
    let mut problems = Vec::new();
    schema_problems(schema, &bad, "spec", &mut problems);
    assert!(
        problems.iter().any(|p| p.contains("parentRefs[0].prot")),
        "{problems:?}"
    );
    assert!(
        problems.iter().any(|p| p.contains("spec.rules")),
        "{problems:?}"
    );
}

#[test]
fn rfc3339_timestamps_parse_to_epoch_seconds() {
    let s = |secs, nanos| Some(Stamp { secs, nanos });
    assert_eq!(parse_rfc3339("1970-01-01T00:00:00Z"), s(0, 0));
    assert_eq!(parse_rfc3339("2000-03-01T00:00:00Z"), s(951_868_800, 0));
    assert_eq!(parse_rfc3339("2026-11-28T19:52:47Z"), s(1_795_895_567, 0));
    assert_eq!(
        parse_rfc3339("2026-11-28T19:52:47.123456789Z"),
        s(1_795_895_567, 123_456_789)
    );
    assert_eq!(
        parse_rfc3339("2026-11-28T19:52:47.5Z"),
        s(1_795_895_567, 500_000_000)
    );
    assert_eq!(
        parse_rfc3339("2026-11-28T20:52:47.000000001+01:00"),
        s(1_795_895_567, 1)
    );
    assert_eq!(
        parse_rfc3339("2026-11-28T17:22:47-02:30"),
        s(1_795_895_567, 0)
    );
    for bad in [
        "",
        "2026-11-28",
        "2026-11-28T19:52:47",
        "2026-13-28T19:52:47Z",
        "2026-11-28T19:52:47.Z",
        "2026-11-28 19:52:47Z",
        "2026-11-28T19:5x:47Z",
        "2026-11-28T19:52:47+0100",
    ] {
        assert_eq!(parse_rfc3339(bad), None, "{bad}");
    }
    let live = parse_rfc3339("2026-11-28T19:52:47.9Z").expect("stamp");
    assert_eq!(
        live.floor(),
        Stamp {
            secs: 1_795_895_567,
            nanos: 0
        }
    );
}

#[test]
fn the_live_line_is_found_in_kubectl_logs_output() {
    let logs = "2026-11-28T19:52:46.100000000Z 2026-11-28T19:52:46.099Z  INFO capstan_proxy::server: admin listening address=127.0.0.1:15000
2026-11-28T19:52:47.250000000Z 2026-11-28T19:52:47.249Z  INFO capstan_proxy::server: server LIVE
2026-11-28T19:53:47.250000000Z 2026-11-28T19:53:47.249Z  INFO capstan_proxy::server: server LIVE
";
    assert_eq!(
        first_log_stamp(logs, LIVE_LOG_LINE),
        Some(Stamp {
            secs: 1_795_895_567,
            nanos: 250_000_000
        })
    );
    assert_eq!(first_log_stamp("", LIVE_LOG_LINE), None);
    assert_eq!(
        first_log_stamp("garbage server LIVE\n", LIVE_LOG_LINE),
        None
    );
}

fn pod_fixture(ready_at: Option<&str>, app_started: Option<&str>, injected: bool) -> Value {
    let mut conditions = vec![
        json!({"type": "PodScheduled", "status": "True", "lastTransitionTime": "2026-11-28T19:52:40Z"}),
    ];
    if let Some(t) = ready_at {
        conditions.push(json!({"type": "Ready", "status": "True", "lastTransitionTime": t}));
    }
    let app_state = match app_started {
        Some(t) => json!({"running": {"startedAt": t}}),
        None => json!({"waiting": {"reason": "PodInitializing"}}),
    };
    let init = if injected {
        json!([{
            "name": PROXY_CONTAINER,
            "restartPolicy": "Always",
            "startupProbe": {"httpGet": {"path": "/ready", "port": 15021}},
            "readinessProbe": {"httpGet": {"path": "/ready", "port": 15021}},
        }])
    } else {
        json!([])
    };
    json!({
        "metadata": {"name": "echo-v1-abc-xyz", "annotations": if injected { json!({"capstan.dev/status": "injected"}) } else { json!({}) }},
        "spec": {"initContainers": init, "containers": [{"name": APP_CONTAINER}]},
        "status": {
            "conditions": conditions,
            "containerStatuses": [{"name": APP_CONTAINER, "state": app_state}],
        },
    })
}

#[test]
fn ready_before_live_is_reported() {
    let live = parse_rfc3339("2026-11-28T19:52:47.250Z");
    // Ready and started in the same second as LIVE (the API server's resolution): fine.
    let pod = pod_fixture(
        Some("2026-11-28T19:52:47Z"),
        Some("2026-11-28T19:52:47Z"),
        true,
    );
    assert!(ready_after_live_problems(&pod, live).is_empty());
    // Ready a second before LIVE: reported, and so is the app that started before it.
    let pod = pod_fixture(
        Some("2026-11-28T19:52:46Z"),
        Some("2026-11-28T19:52:45Z"),
        true,
    );
    let problems = ready_after_live_problems(&pod, live);
    assert_eq!(problems.len(), 2, "{problems:?}");
    assert!(problems[0].contains("Ready at"), "{problems:?}");
    assert!(
        problems[1].contains("app container echo started"),
        "{problems:?}"
    );
    // Ready without any LIVE line.
    let problems = ready_after_live_problems(&pod, None);
    assert_eq!(problems.len(), 1, "{problems:?}");
    // Not Ready yet, no LIVE yet: nothing to say.
    let pod = pod_fixture(None, None, true);
    assert!(ready_after_live_problems(&pod, None).is_empty());
}

#[test]
fn injection_is_checked_on_the_pod_spec() {
    assert!(injection_problems(&pod_fixture(None, None, true)).is_empty());
    let problems = injection_problems(&pod_fixture(None, None, false));
    assert_eq!(problems.len(), 1);
    assert!(problems[0].contains("no init container capstan-proxy"));
    let mut pod = pod_fixture(None, None, true);
    pod["spec"]["initContainers"][0]["restartPolicy"] = json!(null);
    pod["spec"]["initContainers"][0]["readinessProbe"] = json!({"tcpSocket": {"port": 15021}});
    let problems = injection_problems(&pod);
    assert_eq!(problems.len(), 2, "{problems:?}");
}

#[test]
fn stats_lines_are_read() {
    let stats = "cluster_manager.cds.update_success: 3\ncontrol_plane.connected_state: 1\n";
    assert_eq!(stat_value(stats, "control_plane.connected_state"), Some(1));
    assert_eq!(stat_value(stats, "control_plane.connected"), None);
    assert_eq!(stat_value("", "control_plane.connected_state"), None);
}

#[test]
fn curl_output_is_tallied() {
    let out = "0 echo-v1-7d9f-abcde capstan-e2e
0 echo-v2-5c4b-fghij capstan-e2e
0 echo-v1-7d9f-klmno capstan-e2e

22 curl: (22) The requested URL returned error: 503
0 echo-v1-7d9f-abcde
7 curl: (7) Failed to connect to 127.0.0.1 port 15001 after 0 ms: Connection refused
0 something-else capstan-e2e
";
    let t = Tally::parse(out, true);
    assert_eq!((t.v1, t.v2, t.unexpected, t.failed), (2, 1, 2, 2), "{t:?}");
    assert_eq!(t.total(), 7);
    assert_eq!(t.failures.len(), 2);
    // Without the header requirement the header-less answer counts for its version.
    let t = Tally::parse(out, false);
    assert_eq!((t.v1, t.v2, t.unexpected, t.failed), (3, 1, 1, 2), "{t:?}");

    let split = |v1, v2| Tally {
        v1,
        v2,
        ..Tally::default()
    };
    assert!(split(160, 40).split_within_tolerance());
    assert!(split(140, 60).split_within_tolerance());
    assert!(split(180, 20).split_within_tolerance());
    assert!(!split(139, 61).split_within_tolerance());
    assert!(!split(181, 19).split_within_tolerance());
    assert!(!split(0, 0).split_within_tolerance());
}

#[test]
fn client_scripts_are_valid_sh() {
    // The scripts run under busybox sh in the client pod; here `sh -n` checks their syntax,
    // and the batch script runs for real against a stub `curl` to check the output format.
    let dir = std::env::temp_dir().join(format!("capstan-kube-scripts-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("mkdir");
    for script in [
        curl_batch_script("echo", 3),
        traffic_loop_script("echo", LOOP_LOG, LOOP_STOP),
        stop_loop_script(LOOP_LOG, LOOP_STOP),
    ] {
        let status = Command::new("sh")
            .args(["-n", "-c", &script])
            .status()
            .expect("run sh");
        assert!(status.success(), "sh -n rejects:\n{script}");
    }
    let stub = dir.join("curl");
    std::fs::write(
        &stub,
        "#!/bin/sh\n# stub: prints what the real curl would for an echo-v1 answer\nprintf 'echo-v1-abc-xyz capstan-e2e'\n",
    )
    .expect("write stub");
    let status = Command::new("chmod")
        .args(["+x", stub.to_str().expect("utf-8 path")])
        .status()
        .expect("chmod");
    assert!(status.success());
    let path = format!(
        "{}:{}",
        dir.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let out = Command::new("sh")
        .args(["-c", &curl_batch_script("echo", 3)])
        .env("PATH", &path)
        .output()
        .expect("run the batch script");
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(text, "0 echo-v1-abc-xyz capstan-e2e\n".repeat(3));
    assert_eq!(Tally::parse(&text, true).v1, 3);

    // The detached loop: runs after its starter exits, stops when told, results in the log.
    let log = dir.join("loop.log");
    let stop = dir.join("loop.stop");
    let (log, stop) = (log.to_str().expect("utf-8"), stop.to_str().expect("utf-8"));
    let status = Command::new("sh")
        .args(["-c", &traffic_loop_script("echo", log, stop)])
        .env("PATH", &path)
        .status()
        .expect("start the loop");
    assert!(status.success());
    std::thread::sleep(Duration::from_millis(300));
    let out = Command::new("sh")
        .args(["-c", &stop_loop_script(log, stop)])
        .output()
        .expect("stop the loop");
    let text = String::from_utf8_lossy(&out.stdout);
    let t = Tally::parse(&text, true);
    assert!(t.v1 > 0, "{text}");
    assert_eq!((t.failed, t.unexpected), (0, 0), "{text}");
    let _ = std::fs::remove_dir_all(&dir);
}

// ---------------------------------------------------------------------------------------------
// run.sh and install-kubectl.sh, without a cluster

fn run_sh(args: &[&str], envs: &[(&str, &str)]) -> (bool, String, String) {
    let mut cmd = Command::new("bash");
    cmd.arg(root().join("e2e/kubernetes/run.sh")).args(args);
    cmd.env_remove("KUBECONFIG");
    for (k, v) in envs {
        cmd.env(k, v);
    }
    let out = cmd.output().expect("run bash");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn scripts_pass_bash_n_and_shellcheck() {
    let scripts = [
        root().join("e2e/kubernetes/run.sh"),
        root().join("scripts/install-kubectl.sh"),
        root().join("scripts/install-helm.sh"),
        root().join("scripts/lib/kubectl-layer.sh"),
    ];
    for script in &scripts {
        let status = Command::new("bash")
            .arg("-n")
            .arg(script)
            .status()
            .expect("run bash -n");
        assert!(status.success(), "bash -n {}", script.display());
    }
    // -x: follow the `. scripts/lib/…` the install scripts source (run from the repository root).
    match Command::new("shellcheck")
        .arg("-x")
        .args(&scripts)
        .current_dir(root())
        .output()
    {
        Ok(out) => assert!(
            out.status.success(),
            "shellcheck:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
        Err(_) => eprintln!("NOT RUN: shellcheck part: shellcheck is not installed"),
    }
}

#[test]
fn run_sh_parses_its_arguments() {
    let (ok, stdout, _) = run_sh(&["--help"], &[]);
    assert!(ok);
    assert!(stdout.contains("--image-repo REPO"), "{stdout}");

    for (args, message) in [
        (&["--bogus"][..], "unknown argument: --bogus"),
        (&["--tag"][..], "--tag needs a value"),
        (&["--tag", "--kind"][..], "--tag needs a value"),
        (&["--push"][..], "--push needs --image-repo"),
        (&[][..], "say where the cluster gets the images"),
        (
            &["--skip-build", "--image-repo", "r"][..],
            "--skip-build only applies to --kind",
        ),
        (
            &["--kind", "--image-repo", "r"][..],
            "with --image-repo add --push",
        ),
    ] {
        let (ok, _, stderr) = run_sh(args, &[]);
        assert!(!ok, "{args:?} must fail");
        assert!(stderr.contains(message), "{args:?}: {stderr}");
    }
    // Images from a registry, not yet pushed: without KUBECONFIG it stops before anything.
    let (ok, _, stderr) = run_sh(
        &["--dry-run", "--image-repo", "r.example/me", "--tag", "t1"],
        &[],
    );
    assert!(!ok);
    assert!(stderr.contains("KUBECONFIG is not set"), "{stderr}");
}

#[test]
fn run_sh_dry_run_prints_the_install_and_test_commands() {
    let (ok, _, stderr) = run_sh(
        &[
            "--dry-run",
            "--image-repo",
            "r.example/me/",
            "--tag",
            "t1",
            "--push",
            "--set",
            "controlPlane.replicas=1",
        ],
        &[("KUBECONFIG", "/nonexistent/kubeconfig")],
    );
    assert!(ok, "{stderr}");
    let commands: Vec<&str> = stderr
        .lines()
        .filter_map(|l| l.strip_prefix("+ "))
        .collect();
    let find = |needle: &str| {
        commands
            .iter()
            .find(|c| c.contains(needle))
            .unwrap_or_else(|| panic!("no command with {needle:?} in:\n{stderr}"))
            .to_string()
    };
    assert!(
        find("docker build -f docker/control-plane.Dockerfile")
            .ends_with("-t r.example/me/capstan-control-plane:t1 .")
    );
    assert!(
        find("docker build -f docker/proxy.Dockerfile")
            .ends_with("-t r.example/me/capstan-proxy:t1 .")
    );
    find("docker push r.example/me/capstan-proxy:t1");
    find("apply --server-side --force-conflicts -f charts/capstan/crds/");
    let helm = find("upgrade --install capstan charts/capstan");
    for part in [
        "--namespace capstan-system --create-namespace",
        "--set controlPlane.image.repository=r.example/me/capstan-control-plane",
        "--set controlPlane.image.tag=t1",
        "--set proxy.image.repository=r.example/me/capstan-proxy",
        "--set proxy.image.tag=t1",
        "--set controlPlane.replicas=1",
    ] {
        assert!(helm.contains(part), "{part:?} missing from: {helm}");
    }
    find("rollout status deployment/capstan --timeout=300s");
    let test = commands.last().expect("a last command");
    assert_eq!(
        *test,
        "cargo test -p capstan-e2e --test kubernetes_cluster -- --test-threads=1 --nocapture"
    );
    // The order: images, CRDs, helm, rollout, tests.
    let pos = |needle: &str| {
        commands
            .iter()
            .position(|c| c.contains(needle))
            .expect(needle)
    };
    assert!(pos("docker push") < pos("--server-side"));
    assert!(pos("--server-side") < pos("upgrade --install"));
    assert!(pos("upgrade --install") < pos("rollout status"));

    // --kind builds local images and loads them.
    let (_, _, stderr) = run_sh(&["--dry-run", "--kind", "--tag", "t2"], &[]);
    assert!(
        stderr
            .contains("+ kind load docker-image capstan.local/capstan-proxy:t2 --name capstan-e2e"),
        "{stderr}"
    );
    assert!(
        stderr.contains("--set proxy.image.repository=capstan.local/capstan-proxy"),
        "{stderr}"
    );
    // The appVersion is the default tag of pushed images.
    let chart: Value = serde_saphyr::from_str(
        &std::fs::read_to_string(root().join("charts/capstan/Chart.yaml")).expect("Chart.yaml"),
    )
    .expect("Chart.yaml parses");
    let app_version = chart["appVersion"].as_str().expect("appVersion");
    let (ok, _, stderr) = run_sh(
        &["--dry-run", "--image-repo", "r.example/me"],
        &[("KUBECONFIG", "/nonexistent/kubeconfig")],
    );
    assert!(ok, "{stderr}");
    assert!(
        stderr
            .split_whitespace()
            .any(|w| w == format!("proxy.image.tag={app_version}")),
        "{stderr}"
    );
}
