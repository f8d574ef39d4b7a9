//! `capstan-proxy`: parse the command line, load the bootstrap (exit 64 on any problem, before
//! anything binds), then run the server until it has drained.
#![forbid(unsafe_code)]
#![deny(rust_2018_idioms)]

use std::process::ExitCode;

use capstan_proxy::bootstrap::{self, Args, EX_USAGE};
use capstan_proxy::memory;
use capstan_proxy::server::Server;
use clap::Parser;

fn main() -> ExitCode {
    let args = match Args::try_parse() {
        Ok(a) => a,
        Err(e) if !e.use_stderr() => {
            // --help and --version.
            let _ = e.print();
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            let _ = e.print();
            return ExitCode::from(EX_USAGE);
        }
    };
    let level = match args.tracing_level() {
        Ok(l) => l,
        Err(e) => {
            eprintln!("capstan-proxy: {e}");
            return ExitCode::from(EX_USAGE);
        }
    };
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(level))
        .with_writer(std::io::stderr)
        .init();

    let config = match bootstrap::load(&args) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("capstan-proxy: {e}");
            return ExitCode::from(EX_USAGE);
        }
    };
    // The descriptor pool was needed only to read the bootstrap's proto3 JSON; xDS updates are
    // checked without it (`config::supported`). Freed before the runtime allocates anything.
    let _ = capstan_proto::release_pool();
    let options = args.options();
    memory::limit_arenas(options.concurrency);
    memory::release_free_heap();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(options.concurrency)
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("capstan-proxy: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async move { Server::new(config, options)?.run().await });
    // Do not wait on a DNS lookup still running on the blocking pool.
    runtime.shutdown_timeout(std::time::Duration::from_secs(1));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("capstan-proxy: {e:#}");
            ExitCode::FAILURE
        }
    }
}
