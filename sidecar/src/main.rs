#![forbid(unsafe_code)]

use clap::Parser;
use skein_proxy::{run, Args};
use tokio_util::sync::CancellationToken;

fn main() -> anyhow::Result<()> {
    // Bad flags exit with 64 (EX_USAGE); --help and --version with 0.
    let args = Args::try_parse().unwrap_or_else(|e| {
        let _ = e.print();
        std::process::exit(if e.use_stderr() { 64 } else { 0 });
    });
    match &args.command {
        Some(skein_proxy::Subcommand::Init(init)) => match skein_proxy::capture::install(init) {
            Ok(()) => std::process::exit(0),
            Err(e) => {
                eprintln!("skein-proxy init: {e}");
                std::process::exit(1);
            }
        },
        Some(skein_proxy::Subcommand::WaitReady { admin_port, timeout_secs }) => {
            let ready =
                skein_proxy::capture::wait_ready(*admin_port, std::time::Duration::from_secs(*timeout_secs));
            std::process::exit(if ready { 0 } else { 1 });
        }
        None => {}
    }
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into());
    let subscriber = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    if args.log_json {
        subscriber.json().init();
    } else {
        subscriber.init();
    }

    // A sidecar is small: one thread by default, and then a current-thread runtime, which
    // avoids the work-stealing scheduler's cross-thread wake-ups; more workers if asked.
    let runtime = if args.workers <= 1 {
        tokio::runtime::Builder::new_current_thread().max_blocking_threads(2).enable_all().build()?
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(args.workers)
            .max_blocking_threads(4)
            .enable_all()
            .build()?
    };
    runtime.block_on(async {
        let shutdown = CancellationToken::new();
        tokio::spawn(stop_on_signal(shutdown.clone()));
        if let Err(e) = run(args, shutdown).await {
            eprintln!(
                "skein-proxy: {}",
                anyhow::Error::from(e).chain().map(|c| c.to_string()).collect::<Vec<_>>().join(": ")
            );
            std::process::exit(64);
        }
        Ok(())
    })
}

/// SIGINT or SIGTERM starts a graceful shutdown.
async fn stop_on_signal(shutdown: CancellationToken) {
    let mut term =
        tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).expect("signal handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    shutdown.cancel();
}
