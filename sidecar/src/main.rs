#![forbid(unsafe_code)]

use skein_api::process;
use skein_proxy::{run, Args, Subcommand};
use tokio_util::sync::CancellationToken;

fn main() -> anyhow::Result<()> {
    let args: Args = process::parse_args();
    match &args.command {
        Some(Subcommand::Init(init)) => match skein_proxy::install_capture(init) {
            Ok(()) => std::process::exit(0),
            Err(e) => {
                eprintln!("skein-proxy init: {e}");
                std::process::exit(1);
            }
        },
        Some(Subcommand::WaitReady { admin_port, timeout_secs }) => {
            let ready = skein_proxy::wait_ready(*admin_port, std::time::Duration::from_secs(*timeout_secs));
            std::process::exit(if ready { 0 } else { 1 });
        }
        None => {}
    }
    process::init_logging(args.log_format, "info");

    // A sidecar is small: one thread by default, and then a current-thread runtime, which
    // avoids the work-stealing scheduler's cross-thread wake-ups; more workers if asked.
    let runtime = if args.proxy.workers <= 1 {
        tokio::runtime::Builder::new_current_thread().max_blocking_threads(2).enable_all().build()?
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(args.proxy.workers)
            .max_blocking_threads(4)
            .enable_all()
            .build()?
    };
    runtime.block_on(async {
        let shutdown = CancellationToken::new();
        tokio::spawn(process::cancel_on_signal(shutdown.clone()));
        if let Err(e) = run(args, shutdown).await {
            process::exit_with_error("skein-proxy", &e);
        }
        Ok(())
    })
}
