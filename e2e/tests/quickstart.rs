//! The quickstart configuration (`examples/quickstart`, what `scripts/quickstart.sh` serves)
//! is accepted whole by capstan-proxy: it reaches LIVE with every cluster, listener and route,
//! and nothing is NACKed.

use capstan_e2e::client::get;
use capstan_e2e::process::{self, AdsMode};

fn stat(stats: &str, name: &str) -> Option<u64> {
    stats.lines().find_map(|l| {
        let (n, v) = l.split_once(": ")?;
        (n == name).then(|| v.trim().parse().ok()).flatten()
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn capstan_proxy_accepts_the_whole_quickstart() {
    let _port = process::OutboundPortLock::acquire();
    let work = process::temp_dir("quickstart");
    let config = concat!(env!("CARGO_MANIFEST_DIR"), "/../examples/quickstart");
    let cp = process::start_control_plane(std::path::Path::new(config), &work);
    let proxy = process::start_capstan_proxy(
        "quickstart-0.default",
        "quickstart",
        cp.xds,
        AdsMode::StateOfTheWorld,
        &work,
    );
    assert!(
        process::wait_live(proxy.admin).await,
        "capstan-proxy never became LIVE\n{}\n{}",
        cp.proc.logs(),
        proxy.proc.logs()
    );
    let stats = get(proxy.admin, "admin", "/stats")
        .await
        .expect("stats")
        .body;
    for rejected in [
        "cluster_manager.cds.update_rejected",
        "cluster_manager.eds.update_rejected",
        "listener_manager.lds.update_rejected",
        "listener_manager.rds.update_rejected",
    ] {
        assert_eq!(
            stat(&stats, rejected),
            Some(0),
            "{rejected}\n{}",
            cp.proc.logs()
        );
    }
    // Three Services from CDS plus the bootstrap's static `xds` cluster.
    assert_eq!(
        stat(&stats, "cluster_manager.active_clusters"),
        Some(4),
        "{stats}"
    );
    let metrics = get(cp.admin, "admin", "/metrics")
        .await
        .expect("metrics")
        .body;
    assert!(metrics.contains("capstan_xds_nacks_total 0"), "{metrics}");
}
