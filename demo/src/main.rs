#![forbid(unsafe_code)]

use std::io::IsTerminal;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use clap::Parser;
use skein_demo::load::{self, LoadSpec, Tally};
use skein_demo::mesh::{Mesh, Options, Topology, SERVICE_HOST};
use tokio_util::sync::CancellationToken;

/// The Skein mesh on one machine: a live canary of `reviews` with mTLS between the sidecars.
#[derive(Parser, Debug)]
#[command(name = "skein-demo", version)]
struct Args {
    /// The manifests the control plane reads (and re-reads when you edit them).
    #[arg(long, env = "SKEIN_DEMO_MANIFESTS", default_value = "examples/canary")]
    manifests: PathBuf,
    /// The access policies the control plane reads too (edit them while it runs).
    #[arg(long, env = "SKEIN_DEMO_POLICIES", default_value = "examples/access-policy")]
    policies: PathBuf,
    /// The demo's own files: CA, certificates, generated manifests, fault files, logs.
    #[arg(long, env = "SKEIN_DEMO_WORK", default_value = ".skein-demo")]
    work: PathBuf,
    /// First three octets of the loopback addresses the mesh uses.
    #[arg(long, env = "SKEIN_DEMO_IP_PREFIX", default_value = "127.0.10", value_parser = parse_prefix)]
    ip_prefix: [u8; 3],
    /// Where skein-operator, skein-proxy and examples/demo-app are (by default, beside this binary).
    #[arg(long, env = "SKEIN_DEMO_BIN_DIR")]
    bin_dir: Option<PathBuf>,
    /// Requests per second from everyone.
    #[arg(long, default_value_t = 90.0)]
    rate: f64,
    /// Requests per second from beta users (`x-user-group: beta`).
    #[arg(long, default_value_t = 10.0)]
    beta_rate: f64,
    /// Requests per second from the intruder, a caller the access policy does not allow.
    #[arg(long, default_value_t = 2.0)]
    intruder_rate: f64,
    /// Stop after this many seconds (by default, at Ctrl-C or `quit`).
    #[arg(long)]
    duration: Option<u64>,
}

fn parse_prefix(s: &str) -> Result<[u8; 3], String> {
    let octets: Vec<u8> =
        s.split('.').map(|o| o.parse::<u8>().map_err(|e| format!("{s}: {e}"))).collect::<Result<_, _>>()?;
    match octets[..] {
        [127, b, c] => Ok([127, b, c]),
        _ => Err(format!("{s}: give three octets of 127.0.0.0/8, such as 127.0.10")),
    }
}

/// The last seconds of one load generator, one tally per second.
struct Window {
    sink: Arc<Mutex<Tally>>,
    seconds: std::collections::VecDeque<Tally>,
}

impl Window {
    fn new() -> Self {
        Self { sink: Arc::default(), seconds: Default::default() }
    }

    /// Takes the last second's tally; returns the sum of the last five.
    fn tick(&mut self) -> Tally {
        let last = std::mem::take(&mut *self.sink.lock().unwrap_or_else(|e| e.into_inner()));
        self.seconds.push_back(last);
        if self.seconds.len() > 5 {
            self.seconds.pop_front();
        }
        let mut sum = Tally::default();
        for t in &self.seconds {
            sum.merge(t);
        }
        sum
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Args = skein_api::process::parse_args();
    let bin_dir = match args.bin_dir.clone() {
        Some(d) => d,
        None => std::env::current_exe()?.parent().map(PathBuf::from).unwrap_or_default(),
    };
    for dir in [&args.manifests, &args.policies] {
        if !dir.is_dir() {
            eprintln!("skein-demo: {} is not a directory of manifests", dir.display());
            std::process::exit(64);
        }
    }
    let options = Options {
        bin_dir,
        manifests: args.manifests.clone(),
        policies: Some(args.policies.clone()),
        work: args.work.clone(),
        ip_prefix: args.ip_prefix,
    };
    let shutdown = CancellationToken::new();
    tokio::spawn(stop_on_signal(shutdown.clone()));

    println!("starting the local mesh (logs in {})…", args.work.join("logs").display());
    let mut mesh = tokio::select! {
        mesh = Mesh::start(options) => match mesh {
            Ok(m) => m,
            Err(e) => {
                eprintln!("skein-demo: {e}");
                std::process::exit(1);
            }
        },
        _ = shutdown.cancelled() => {
            println!("stopped before the mesh was up");
            return Ok(());
        }
    };
    let topology_url = format!("http://{}/topology", mesh.topology_addr());
    println!("ready: {} processes up; topology at {topology_url}", mesh.running().len());

    let mut everyone = Window::new();
    let mut beta = Window::new();
    let mut intruder = Window::new();
    let proxy = mesh.client_proxy();
    let load_stop = shutdown.child_token();
    let generators = [
        tokio::spawn(load::run(
            LoadSpec::new(proxy, SERVICE_HOST, args.rate),
            everyone.sink.clone(),
            load_stop.clone(),
        )),
        tokio::spawn(load::run(
            LoadSpec::new(proxy, SERVICE_HOST, args.beta_rate).header("x-user-group", "beta"),
            beta.sink.clone(),
            load_stop.clone(),
        )),
        tokio::spawn(load::run(
            LoadSpec::new(mesh.intruder_proxy(), SERVICE_HOST, args.intruder_rate),
            intruder.sink.clone(),
            load_stop.clone(),
        )),
    ];
    let mut commands = read_commands();
    let mut said = String::from("(none yet)");

    let tty = std::io::stdout().is_terminal();
    let started = tokio::time::Instant::now();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut seconds = 0u64;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = tick.tick() => {}
            Some(line) = commands.recv() => {
                match parse_command(&line) {
                    Ok(Command::Quit) => break,
                    Ok(Command::Fault(replicas, share)) => {
                        said = format!("{line} → {}", fault_text(replicas, share));
                        for r in replicas {
                            if let Err(e) = mesh.set_fault(r, share) {
                                said = format!("{line} → {e}");
                            }
                        }
                    }
                    Ok(Command::Nothing) => {}
                    Err(e) => said = format!("{line} → {e}"),
                }
                if !tty {
                    println!("command: {said}");
                }
                continue;
            }
        }
        if args.duration.is_some_and(|d| started.elapsed() >= Duration::from_secs(d)) {
            break;
        }
        seconds += 1;
        let rows =
            [("everyone", everyone.tick()), ("beta users", beta.tick()), ("intruder", intruder.tick())];
        let topology = mesh.topology().await.ok();
        let text = summary(&rows, topology.as_ref(), &topology_url, &args, &mesh, &said);
        if tty {
            print!("\x1b[H\x1b[2J{text}");
        } else if seconds.is_multiple_of(5) {
            // Not a terminal: one line every 5 s (everyone, beta users, the intruder, the mesh).
            let lines: Vec<&str> = text.lines().collect();
            let pick = [3, 4, 5, 7].map(|i| lines.get(i).map_or("", |l| l.trim()));
            println!("{}", pick.join(" | "));
        }
    }

    load_stop.cancel();
    for g in generators {
        let _ = g.await;
    }
    println!("\nstopping…");
    let ended = mesh.stop().await;
    let still = mesh.running();
    println!(
        "stopped {} processes{}",
        ended.len(),
        if still.is_empty() {
            "; nothing left running".to_string()
        } else {
            format!("; still running: {still:?}")
        }
    );
    Ok(())
}

fn percent(part: u64, whole: u64) -> f64 {
    if whole == 0 {
        0.0
    } else {
        100.0 * part as f64 / whole as f64
    }
}

fn row(label: &str, t: &Tally) -> String {
    let n = t.requests();
    format!(
        "{label:<12} {:>7.1} {:>7.1}% {:>7.1}% {:>7.1}% {:>7.2}% {:>8.1} {:>8.1}\n",
        n as f64 / 5.0,
        percent(t.version("v1"), n),
        percent(t.version("v2"), n),
        percent(t.denied(), n),
        percent(t.errors(), n),
        t.quantile(0.5).as_secs_f64() * 1000.0,
        t.quantile(0.99).as_secs_f64() * 1000.0,
    )
}

fn summary(
    rows: &[(&str, Tally)],
    topology: Option<&Topology>,
    url: &str,
    args: &Args,
    mesh: &Mesh,
    said: &str,
) -> String {
    let mut out = String::from("Skein local mesh: canary of reviews (last 5 s)\n\n");
    out.push_str(&format!(
        "{:<12} {:>7} {:>8} {:>8} {:>8} {:>8} {:>8} {:>8}\n",
        "", "req/s", "v1", "v2", "denied", "errors", "p50 ms", "p99 ms"
    ));
    for (label, tally) in rows {
        out.push_str(&row(label, tally));
    }
    out.push('\n');
    match topology {
        Some(t) => {
            let to_reviews = t.edge("workload:default/client", "service:reviews.default");
            let (retries, ejections, mtls) =
                to_reviews.map_or((0.0, 0, false), |e| (e.retries_per_second, e.ejections, e.mtls));
            let denied = |from: &str| {
                t.edge(&format!("workload:default/{from}"), "service:reviews.default")
                    .map_or(0.0, |e| e.denied_per_second)
            };
            let synced = t.proxies.iter().filter(|p| p.in_sync).count();
            out.push_str(&format!(
                "mesh         retries {retries:.1}/s · ejections {ejections} (last 10 s) · client→reviews {} · denied client→reviews {:.1}/s, intruder→reviews {:.1}/s · config acknowledged by {synced}/{} proxies\n",
                if mtls { "mTLS" } else { "plaintext" },
                denied("client"),
                denied("intruder"),
                t.proxies.len()
            ));
        }
        None => out.push_str(
            "mesh         the control plane is not answering; the sidecars keep their last good config\n",
        ),
    }
    out.push_str(&format!("topology     {url}\n\n"));
    out.push_str(&format!(
        "Try: edit {}/trafficroute.yaml (e.g. weights 50/50) and save;\n\
         \x20    add `{{namespace: default, name: intruder}}` to the serviceAccounts of\n\
         \x20    {}/reviews-callers.yaml to let the intruder in;\n\
         \x20    type `fail v2-a` to make one v2 replica fail (retries and ejection keep answers good),\n\
         \x20    `fail v2` for both, `heal` to recover, `quit` or Ctrl-C to stop.\n\
         \x20    (fault files: {})\n\n\
         last command: {said}\n",
        args.manifests.display(),
        args.policies.display(),
        mesh.fault_file("").display()
    ));
    out
}

/// A command typed while the demo runs.
#[derive(Debug, PartialEq)]
enum Command {
    /// Make these replicas fail this share of their requests (0 heals).
    Fault(&'static [&'static str], f64),
    Quit,
    Nothing,
}

const ALL_REPLICAS: &[&str] = &["reviews-v1", "reviews-v2-a", "reviews-v2-b"];

/// `fail <v1|v2|v2-a|v2-b|all> [share: 0 to 1, or N%]`, `heal [which]`, `quit`.
fn parse_command(line: &str) -> Result<Command, String> {
    let words: Vec<&str> = line.split_whitespace().collect();
    let which = |w: Option<&&str>| -> Result<&'static [&'static str], String> {
        match w.copied() {
            None | Some("all") => Ok(ALL_REPLICAS),
            Some("v1" | "reviews-v1") => Ok(&ALL_REPLICAS[..1]),
            Some("v2") => Ok(&ALL_REPLICAS[1..]),
            Some("v2-a" | "reviews-v2-a") => Ok(&ALL_REPLICAS[1..2]),
            Some("v2-b" | "reviews-v2-b") => Ok(&ALL_REPLICAS[2..]),
            Some(other) => Err(format!("no replica {other:?}: use v1, v2, v2-a, v2-b or all")),
        }
    };
    match words.first().copied() {
        None => Ok(Command::Nothing),
        Some("quit" | "q" | "exit") => Ok(Command::Quit),
        Some("heal") => Ok(Command::Fault(which(words.get(1))?, 0.0)),
        Some("fail") if words.len() >= 2 => {
            let share = match words.get(2) {
                None => 1.0,
                Some(s) => {
                    let (number, scale) = match s.strip_suffix('%') {
                        Some(n) => (n, 100.0),
                        None => (*s, 1.0),
                    };
                    match number.parse::<f64>().map(|v| v / scale) {
                        Ok(v) if (0.0..=1.0).contains(&v) => v,
                        _ => return Err(format!("{s:?} is not a share: give 0 to 1, or a percentage")),
                    }
                }
            };
            Ok(Command::Fault(which(words.get(1))?, share))
        }
        Some(other) => Err(format!("unknown command {other:?}: fail <which> [share], heal, quit")),
    }
}

fn fault_text(replicas: &[&str], share: f64) -> String {
    if share == 0.0 {
        format!("{} healthy", replicas.join(", "))
    } else {
        format!("{} failing {:.0}% of requests", replicas.join(", "), share * 100.0)
    }
}

/// Lines typed on stdin, read on a thread of its own: a blocking read that Ctrl-C cannot
/// interrupt must not hold up the runtime's shutdown.
fn read_commands() -> tokio::sync::mpsc::UnboundedReceiver<String> {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    std::thread::spawn(move || {
        for line in std::io::stdin().lines() {
            let Ok(line) = line else { return };
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    rx
}

/// SIGINT or SIGTERM stops the demo.
async fn stop_on_signal(shutdown: CancellationToken) {
    let Ok(mut term) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) else {
        return;
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    shutdown.cancel();
    // A second one does not wait for the clean stop.
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    eprintln!("skein-demo: stopping at once");
    std::process::exit(130);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_name_replicas_and_shares_or_say_what_is_wrong() {
        assert_eq!(parse_command("fail v2-a"), Ok(Command::Fault(&["reviews-v2-a"], 1.0)));
        assert_eq!(parse_command("fail v2 30%"), Ok(Command::Fault(&["reviews-v2-a", "reviews-v2-b"], 0.3)));
        assert_eq!(parse_command(" fail v1 0.5 "), Ok(Command::Fault(&["reviews-v1"], 0.5)));
        assert_eq!(parse_command("heal"), Ok(Command::Fault(ALL_REPLICAS, 0.0)));
        assert_eq!(parse_command("quit"), Ok(Command::Quit));
        assert_eq!(parse_command(""), Ok(Command::Nothing));
        assert!(parse_command("fail v2 3x").unwrap_err().contains("not a share"));
        assert!(parse_command("fail v2 150%").unwrap_err().contains("not a share"));
        assert!(parse_command("fail v3").unwrap_err().contains("no replica"));
        assert!(parse_command("fail").unwrap_err().contains("unknown command"));
        assert!(parse_command("split 50").unwrap_err().contains("unknown command"));
    }
}
