//! What both binaries do around their `run`: parse the command line (bad flags exit with 64,
//! EX_USAGE), print an error with every cause in its chain, and turn SIGINT or SIGTERM into a
//! graceful shutdown. The one module of this crate that does I/O, behind the `process` feature,
//! so the operator and the proxy share it without the API types pulling in a runtime.

use tokio_util::sync::CancellationToken;

/// How a binary writes its log lines.
#[derive(clap::ValueEnum, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum LogFormat {
    /// Text, with colours only when stderr is a terminal (never in a container's log).
    #[default]
    Plain,
    /// One JSON object per line, for log collectors.
    Json,
}

/// Sets up logging on stderr: the filter from `RUST_LOG`, else `default_filter`; `format` as
/// asked. ANSI colour escapes are written only to a terminal, and never when `NO_COLOR` is set.
pub fn init_logging(format: LogFormat, default_filter: &str) {
    use std::io::IsTerminal as _;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_filter));
    let colour = std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none();
    let subscriber = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    match format {
        LogFormat::Json => subscriber.json().init(),
        LogFormat::Plain => subscriber.with_ansi(colour).init(),
    }
}

/// Exit code for bad configuration (EX_USAGE).
pub const EXIT_USAGE: i32 = 64;

/// Parses the command line; on bad flags prints clap's message and exits with 64, on
/// `--help` or `--version` prints them and exits with 0.
pub fn parse_args<A: clap::Parser>() -> A {
    A::try_parse().unwrap_or_else(|e| {
        let _ = e.print();
        std::process::exit(if e.use_stderr() { EXIT_USAGE } else { 0 });
    })
}

/// `error: cause: cause of the cause`, the way the binaries report what stopped them.
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}

/// Prints `binary: <error chain>` on stderr and exits with 64.
pub fn exit_with_error(binary: &str, e: &(dyn std::error::Error + 'static)) -> ! {
    eprintln!("{binary}: {}", error_chain(e));
    std::process::exit(EXIT_USAGE);
}

/// Cancels `shutdown` at the first SIGINT or SIGTERM.
pub async fn cancel_on_signal(shutdown: CancellationToken) {
    use tokio::signal::unix::{signal, SignalKind};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
        }
        // Without a SIGTERM handler, Ctrl-C still stops the process gracefully.
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
    tracing::info!("shutting down");
    shutdown.cancel();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("outer")]
    struct Outer(#[source] std::io::Error);

    #[test]
    fn the_chain_names_every_cause() {
        let e = Outer(std::io::Error::other("inner"));
        assert_eq!(error_chain(&e), "outer: inner");
    }
}
