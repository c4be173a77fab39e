#![forbid(unsafe_code)]

use skein_api::process;
use skein_operator::{run, Args};
use tokio_util::sync::CancellationToken;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Args = process::parse_args();
    let _ = rustls::crypto::ring::default_provider().install_default();
    process::init_logging(args.log_format, "info,kube=warn");

    let shutdown = CancellationToken::new();
    tokio::spawn(process::cancel_on_signal(shutdown.clone()));
    if let Err(e) = run(args, shutdown).await {
        process::exit_with_error("skein-operator", &e);
    }
    Ok(())
}
