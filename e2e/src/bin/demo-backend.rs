//! `demo-backend --name NAME --listen ADDR`: the quickstart's demo workload. Answers every
//! request with JSON naming itself and echoing what it received.

use clap::Parser;

#[derive(Parser)]
struct Args {
    /// The name this backend reports in every answer.
    #[arg(long)]
    name: String,
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:8080")]
    listen: std::net::SocketAddr,
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {}: {e}", args.listen))?;
    eprintln!("demo-backend {} listening on {}", args.name, args.listen);
    capstan_e2e::backend::serve(args.name, listener).await;
    Ok(())
}
