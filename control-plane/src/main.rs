//! `capstan-control-plane`: runs the control plane, or prints its CRDs or a node's xDS.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use capstan_control_plane::{api, provider, runtime, translate};
use clap::{Parser, Subcommand, ValueEnum};

/// Capstan's control plane: ServiceRoute/ServicePolicy → Envoy xDS v3 over gRPC.
#[derive(Parser)]
#[command(version, args_conflicts_with_subcommands = true)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    run: RunArgs,
}

#[derive(Subcommand)]
enum Command {
    /// Print the CustomResourceDefinitions (what `crds/` holds).
    Crds {
        /// Write one file per CRD into this directory instead of printing.
        #[arg(long)]
        out_dir: Option<PathBuf>,
    },
    /// Print the xDS resources a node would receive for a configuration directory.
    Translate {
        #[arg(long)]
        config_dir: PathBuf,
        /// The node's id, `<pod>.<namespace>`.
        #[arg(long)]
        node_id: String,
        /// The node's namespace (default: from the node id).
        #[arg(long)]
        namespace: Option<String>,
        /// The node's workload (xDS `Node.cluster`).
        #[arg(long, default_value = "")]
        workload: String,
        /// The workload's own ports (enables the inbound listener).
        #[arg(long, value_delimiter = ',')]
        app_ports: Vec<u16>,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum ProviderKind {
    File,
    Kubernetes,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(clap::Args)]
struct RunArgs {
    /// Where configuration comes from.
    #[arg(long, value_enum, default_value = "file", env = "CAPSTAN_PROVIDER")]
    provider: ProviderKind,
    /// The directory of YAML the file provider reads and watches.
    #[arg(long, env = "CAPSTAN_CONFIG_DIR")]
    config_dir: Option<PathBuf>,
    /// gRPC xDS address.
    #[arg(long, default_value = "0.0.0.0:18000", env = "CAPSTAN_XDS_ADDR")]
    xds_addr: SocketAddr,
    /// /healthz, /readyz, /metrics address.
    #[arg(long, default_value = "127.0.0.1:18001", env = "CAPSTAN_ADMIN_ADDR")]
    admin_addr: SocketAddr,
    /// Log format.
    #[arg(long, value_enum, default_value = "text", env = "CAPSTAN_LOG_FORMAT")]
    log_format: LogFormat,
    /// Quiet time after a file change before the directory is re-read.
    #[arg(long, default_value_t = 100, env = "CAPSTAN_DEBOUNCE_MS")]
    debounce_ms: u64,
    /// Kubernetes provider: namespaces to watch (comma-separated); empty: all namespaces.
    #[arg(long, value_delimiter = ',', env = "CAPSTAN_WATCH_NAMESPACES")]
    watch_namespaces: Vec<String>,
    /// Kubernetes provider: also watch Secrets, so ServicePolicies can take TLS certificates
    /// from them (`spec.tls.caCertificateSecret`, `clientCertificateSecret`). Needs RBAC to
    /// get, list and watch secrets in the watched namespaces.
    #[arg(long, env = "CAPSTAN_WATCH_SECRETS")]
    watch_secrets: bool,
    /// Kubernetes provider: the namespace of this control plane (its Lease lives there).
    #[arg(long, default_value = "capstan-system", env = "CAPSTAN_NAMESPACE")]
    namespace: String,
    /// Kubernetes provider: this replica's identity in leader election (its pod name).
    #[arg(long, env = "CAPSTAN_POD_NAME")]
    pod_name: Option<String>,
    /// Kubernetes provider: the Lease that elects the replica writing status.
    #[arg(
        long,
        default_value = "capstan-control-plane",
        env = "CAPSTAN_LEASE_NAME"
    )]
    lease_name: String,
    /// Seconds a leader holds the Lease without renewing it before another replica may take it.
    #[arg(long, default_value_t = 15, env = "CAPSTAN_LEASE_DURATION_S")]
    lease_duration_s: u64,
    /// Seconds between the leader's renewals (and the others' attempts).
    #[arg(long, default_value_t = 2, env = "CAPSTAN_LEASE_RENEW_S")]
    lease_renew_s: u64,
    /// Kubernetes provider: the injector webhook's HTTPS address (needs --injector-config).
    #[arg(long, default_value = "0.0.0.0:8443", env = "CAPSTAN_WEBHOOK_ADDR")]
    webhook_addr: SocketAddr,
    /// The injector webhook's Service (its certificate's DNS names).
    #[arg(
        long,
        default_value = "capstan-webhook",
        env = "CAPSTAN_WEBHOOK_SERVICE"
    )]
    webhook_service: String,
    /// The MutatingWebhookConfiguration whose caBundle the control plane maintains.
    #[arg(
        long,
        default_value = "capstan-sidecar-injector",
        env = "CAPSTAN_WEBHOOK_CONFIG"
    )]
    webhook_config: String,
    /// The Secret holding the webhook's CA and serving certificate.
    #[arg(
        long,
        default_value = "capstan-webhook-tls",
        env = "CAPSTAN_WEBHOOK_SECRET"
    )]
    webhook_secret: String,
    /// What the injector adds to pods (the Helm chart's ConfigMap); without it the webhook is
    /// off.
    #[arg(long, env = "CAPSTAN_INJECTOR_CONFIG")]
    injector_config: Option<PathBuf>,
}

/// EX_USAGE: the command line or configuration is wrong.
const EX_USAGE: u8 = 64;

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Some(Command::Crds { out_dir }) => crds(out_dir),
        Some(Command::Translate {
            config_dir,
            node_id,
            namespace,
            workload,
            app_ports,
        }) => {
            if !config_dir.is_dir() {
                eprintln!(
                    "error: --config-dir {}: not a directory",
                    config_dir.display()
                );
                return ExitCode::from(EX_USAGE);
            }
            let snapshot = provider::file::load_snapshot(&config_dir);
            for d in &snapshot.diagnostics {
                eprintln!("warning: {d}");
            }
            let namespace =
                namespace.or_else(|| node_id.split_once('.').map(|(_, ns)| ns.to_string()));
            let node = translate::NodeInfo {
                id: node_id,
                workload,
                namespace,
                app_ports,
            };
            print!(
                "{}",
                translate::render_yaml(&translate::translate(&snapshot, &node))
            );
            ExitCode::SUCCESS
        }
        None => run(cli.run),
    }
}

fn crds(out_dir: Option<PathBuf>) -> ExitCode {
    for (file, yaml) in api::crd::manifests() {
        match &out_dir {
            Some(dir) => {
                if let Err(e) = std::fs::write(dir.join(file), yaml) {
                    eprintln!("error: writing {}: {e}", dir.join(file).display());
                    return ExitCode::FAILURE;
                }
            }
            None => print!("{yaml}"),
        }
    }
    ExitCode::SUCCESS
}

fn run(args: RunArgs) -> ExitCode {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter);
    match args.log_format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
    }
    let rt = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let provider = match args.provider {
        ProviderKind::File => {
            let Some(dir) = args.config_dir else {
                eprintln!("error: --provider file needs --config-dir DIR");
                return ExitCode::from(EX_USAGE);
            };
            if !dir.is_dir() {
                eprintln!("error: --config-dir {}: not a directory", dir.display());
                return ExitCode::from(EX_USAGE);
            }
            runtime::Provider::File {
                dir,
                debounce: Duration::from_millis(args.debounce_ms),
            }
        }
        ProviderKind::Kubernetes => {
            // In-cluster service account, else KUBECONFIG / ~/.kube/config.
            let client = match rt.block_on(kube::Client::try_default()) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!(
                        "error: --provider kubernetes: no usable Kubernetes configuration (in-cluster service account or KUBECONFIG): {e}"
                    );
                    return ExitCode::from(EX_USAGE);
                }
            };
            let namespaces = args
                .watch_namespaces
                .into_iter()
                .map(|n| n.trim().to_string())
                .filter(|n| !n.is_empty())
                .collect();
            if args.lease_renew_s == 0 || args.lease_renew_s >= args.lease_duration_s {
                eprintln!(
                    "error: --lease-renew-s ({}) must be positive and shorter than --lease-duration-s ({})",
                    args.lease_renew_s, args.lease_duration_s
                );
                return ExitCode::from(EX_USAGE);
            }
            let identity = args
                .pod_name
                .filter(|p| !p.is_empty())
                .or_else(|| std::env::var("HOSTNAME").ok().filter(|h| !h.is_empty()))
                .unwrap_or_else(|| format!("capstan-{}", std::process::id()));
            let injector = match args.injector_config.filter(|p| !p.as_os_str().is_empty()) {
                None => None,
                Some(path) => match capstan_control_plane::inject::config::load(&path) {
                    Ok(config) => Some(Box::new((
                        capstan_control_plane::inject::server::Settings {
                            addr: args.webhook_addr,
                            namespace: args.namespace.clone(),
                            service: args.webhook_service,
                            secret: args.webhook_secret,
                            webhook_config: args.webhook_config,
                            config_path: path,
                        },
                        config,
                    ))),
                    Err(e) => {
                        eprintln!("error: --injector-config: {e}");
                        return ExitCode::from(EX_USAGE);
                    }
                },
            };
            runtime::Provider::Kubernetes {
                client,
                injector,
                options: provider::kube::Options {
                    namespaces,
                    secrets: args.watch_secrets,
                },
                election: capstan_control_plane::leader::Config {
                    namespace: args.namespace,
                    name: args.lease_name,
                    identity,
                    lease_duration: Duration::from_secs(args.lease_duration_s),
                    renew_every: Duration::from_secs(args.lease_renew_s),
                },
            }
        }
    };
    let config = runtime::Config {
        provider,
        xds_addr: args.xds_addr,
        admin_addr: args.admin_addr,
    };
    match rt.block_on(runtime::run(config, shutdown_signal())) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Resolves on SIGTERM or Ctrl-C.
async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
}
