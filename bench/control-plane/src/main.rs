//! `control-plane-bench` (`make bench-control-plane`): one skein-operator (a process of its own,
//! pinned to its own core) fed a synthetic cluster from manifest files (`--local`) or, with
//! `--cluster`, from the API server KUBECONFIG names (its watch path), and N simulated proxies in this process, each with its own client certificate over real TLS on
//! loopback. For each N: the time for all N to connect and be served from a cold start, then,
//! for each kind of change (a TrafficRoute weight, an endpoint added, a pod deleted), the time
//! from the change to each proxy's acknowledgement, the bytes the operator sent for it, and the
//! operator's RSS and CPU. Prints a Markdown table. Method and figures: bench/RESULTS.md.

mod api;
mod client;
mod cluster;

use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use clap::Parser;
use skein_api::WorkloadIdentity;

use crate::client::Record;
use crate::cluster::{Edits, Shape};

#[derive(Parser, Debug)]
#[command(about = "Skein control-plane benchmark: N simulated proxies on one operator")]
struct Args {
    /// Numbers of simulated proxies, one run each.
    #[arg(long, value_delimiter = ',', default_value = "100,1000,5000")]
    proxies: Vec<usize>,
    /// The skein-operator binary.
    #[arg(long, env = "SKEIN_OPERATOR_BIN")]
    operator: Option<PathBuf>,
    /// Run the operator on this CPU (`taskset`), and this process on the others.
    #[arg(long)]
    operator_cpu: Option<usize>,
    #[arg(long, default_value_t = 20)]
    namespaces: usize,
    #[arg(long, default_value_t = 50)]
    services_per_namespace: usize,
    #[arg(long, default_value_t = 10)]
    endpoints_per_service: usize,
    #[arg(long, default_value_t = 100)]
    routes: usize,
    /// Changes of each kind per N.
    #[arg(long, default_value_t = 5)]
    changes: usize,
    /// Only time the computation of the synthetic cluster (in this process, no proxies).
    #[arg(long)]
    compute_only: bool,
    /// Only measure skein-proxy's memory (this binary) holding the config of a workload that may
    /// call 10 of the Services, then of one that may call all of them.
    #[arg(long)]
    proxy_rss: Option<PathBuf>,
    /// Feed the operator from the API server KUBECONFIG names (its watchers) instead of files:
    /// the synthetic cluster is written there object by object, and each change is the API
    /// writes a user or a controller would make.
    #[arg(long)]
    cluster: bool,
    /// Working directory (manifests, the operator's state); a temporary one by default.
    #[arg(long)]
    workdir: Option<PathBuf>,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    let shape = Shape {
        namespaces: args.namespaces,
        services_per_namespace: args.services_per_namespace,
        endpoints_per_service: args.endpoints_per_service,
        routes: args.routes,
    };
    if args.compute_only {
        return time_compute(&args, shape);
    }
    if let Some(proxy) = &args.proxy_rss {
        return runtime.block_on(proxy_rss(&args, shape, proxy));
    }
    if args.operator.is_none() {
        bail!("--operator names the skein-operator binary (or SKEIN_OPERATOR_BIN)");
    }
    println!(
        "synthetic cluster: {} Services, {} endpoints, {} TrafficRoutes, {} identities; the operator {}",
        shape.services(),
        shape.services() * shape.endpoints_per_service,
        shape.routed().len(),
        shape.services(),
        if args.cluster { "watching the API server" } else { "from --local files" }
    );
    println!();
    println!("| proxies | all served from cold | first config p50 / p90 | change | acknowledged p50 / p90 / max | sent per change | operator RSS (peak) | operator CPU |");
    println!("| ---: | ---: | ---: | --- | ---: | ---: | ---: | ---: |");
    for &n in &args.proxies {
        runtime.block_on(run_one(&args, shape, n))?;
    }
    Ok(())
}

/// The computation alone: the cluster read once, then computed whole ten times, then ten times
/// after an endpoint is added (from the mesh before and the change); prints the times.
fn time_compute(args: &Args, shape: Shape) -> anyhow::Result<()> {
    use skein_operator::SnapshotObject as _;
    let work = args
        .workdir
        .clone()
        .unwrap_or_else(std::env::temp_dir)
        .join(format!("skein-cp-compute-{}", std::process::id()));
    cluster::write_all(&shape, &work, &Edits::default(), None)?;
    let mut snapshot = skein_operator::load_dir(&work).map_err(|e| anyhow::anyhow!("{e:?}"))?;
    let _ = std::fs::remove_dir_all(&work);
    let mut ms = Vec::new();
    for _ in 0..10 {
        let t = Instant::now();
        let mesh = skein_operator::compute(&snapshot);
        ms.push(t.elapsed().as_secs_f64() * 1000.0);
        drop(mesh);
    }
    let (p50, _, max) = percentiles(ms);
    println!("computation of {} Services: p50 {p50:.1} ms, max {max:.1} ms", shape.services());

    snapshot.take_changes();
    let mut previous = skein_operator::compute(&snapshot);
    let (mut edits, mut ms) = (Edits::default(), Vec::new());
    for k in 0..10 {
        let i = (k * 37 + 11) % shape.services();
        *edits.extra_endpoints.entry(i).or_insert(0) += 1;
        let (_, name) = shape.service(i);
        let files = cluster::namespace_files(&shape, i / shape.services_per_namespace, &edits, None);
        let slices = files.iter().find(|(f, _)| f.ends_with("-slices.yaml")).context("a slices file")?;
        let docs: Vec<k8s_openapi::api::discovery::v1::EndpointSlice> =
            serde_saphyr::from_multiple(&slices.1).map_err(|e| anyhow::anyhow!("{e}"))?;
        let slice = docs.into_iter().find(|s| s.metadata.name.as_deref() == Some(&format!("{name}-1")));
        slice.context("the changed slice")?.apply(&mut snapshot);
        let t = Instant::now();
        let changes = snapshot.take_changes();
        let mesh = skein_operator::compute_incremental(&snapshot, &previous, &changes);
        ms.push(t.elapsed().as_secs_f64() * 1000.0);
        previous = mesh;
    }
    let (p50, _, max) = percentiles(ms);
    println!("after an endpoint added, from the mesh before: p50 {p50:.1} ms, max {max:.1} ms");
    Ok(())
}

/// skein-proxy's resident memory with the config the operator computes for the first Service,
/// scoped to 10 Services of its namespace (`skein.dev/destinations` on the Namespace), then
/// with every Service. Each proxy runs from a config file, one worker, until `/ready`, then 1 s.
async fn proxy_rss(args: &Args, shape: Shape, proxy: &Path) -> anyhow::Result<()> {
    let work = args
        .workdir
        .clone()
        .unwrap_or_else(std::env::temp_dir)
        .join(format!("skein-cp-proxy-rss-{}", std::process::id()));
    let ten: Vec<String> =
        (0..10.min(shape.services_per_namespace)).map(|i| format!("./{}", shape.service(i).1)).collect();
    for scope in [Some(ten.join(", ")), None] {
        let _ = std::fs::remove_dir_all(&work);
        let mut edits = Edits::default();
        if let Some(scope) = &scope {
            edits.scopes.insert(0, scope.clone());
        }
        cluster::write_all(&shape, &work.join("manifests"), &edits, None)?;
        let snapshot =
            skein_operator::load_dir(&work.join("manifests")).map_err(|e| anyhow::anyhow!("{e:?}"))?;
        let mesh = skein_operator::compute(&snapshot);
        let (ns, sa) = shape.service(0);
        let identity = WorkloadIdentity::new(ns, sa);
        let config: skein_api::ProxyConfig = serde_json::from_slice(&mesh.proxy_line(&identity).1)?;
        let endpoints: usize = config.destinations.iter().map(|d| d.endpoints.len()).sum();
        let file = work.join("config.json");
        std::fs::write(&file, serde_json::to_vec(&config)?)?;
        let stats: SocketAddr = format!("127.0.0.1:{}", free_port()?).parse()?;
        let mut child = Command::new(proxy)
            .arg("--config")
            .arg(&file)
            .args(["--outbound-addr", &format!("127.0.0.1:{}", free_port()?)])
            .args(["--inbound-addr", &format!("127.0.0.1:{}", free_port()?)])
            .args(["--admin-addr", &format!("127.0.0.1:{}", free_port()?)])
            .args(["--stats-addr", &stats.to_string()])
            .args(["--access-log", "off", "--workers", "1"])
            .arg("--state-dir")
            .arg(work.join("state"))
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .spawn()
            .with_context(|| format!("starting {}", proxy.display()))?;
        let deadline = Instant::now() + Duration::from_secs(30);
        let ready = loop {
            if get(stats, "/ready")
                .await
                .is_ok_and(|r| r.starts_with("HTTP/1.0 200") || r.starts_with("HTTP/1.1 200"))
            {
                break true;
            }
            if Instant::now() > deadline || child.try_wait()?.is_some() {
                break false;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        tokio::time::sleep(Duration::from_secs(1)).await;
        let status = std::fs::read_to_string(format!("/proc/{}/status", child.id())).unwrap_or_default();
        let _ = child.kill();
        let _ = child.wait();
        if !ready {
            bail!("skein-proxy did not become ready with {}", file.display());
        }
        let rss = status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
            .unwrap_or(0.0)
            / 1024.0;
        println!(
            "skein-proxy holding {} Services ({endpoints} endpoints{}): RSS {rss:.1} MiB",
            config.destinations.len(),
            scope.as_ref().map(|s| format!(", scope \"{s}\"")).unwrap_or_default()
        );
    }
    let _ = std::fs::remove_dir_all(&work);
    Ok(())
}

/// Looks every `every` until `look` gives a value; fails after `limit`, saying it waited for `what`.
pub async fn until<T, F, Fut>(what: &str, limit: Duration, every: Duration, mut look: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<Option<T>>>,
{
    let deadline = Instant::now() + limit;
    loop {
        if let Some(value) = look().await? {
            return Ok(value);
        }
        if Instant::now() > deadline {
            bail!("waited {} s for {what}", limit.as_secs());
        }
        tokio::time::sleep(every).await;
    }
}

fn free_port() -> anyhow::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// The operator process, stopped when dropped.
struct Operator {
    child: Child,
    metrics: SocketAddr,
    stream: SocketAddr,
}

impl Drop for Operator {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Where the operator reads the synthetic cluster from.
enum Feed {
    /// Manifest files (`--local`), the operator's CA and certificates kept in `state`.
    Files { manifests: PathBuf, state: PathBuf },
    /// The API server (`--cluster`).
    Api(api::ApiFeed),
}

impl Feed {
    /// The mesh CA, once the operator has made it.
    async fn ca(&self) -> anyhow::Result<skein_operator::CaFiles> {
        let ca_dir = match self {
            Feed::Api(api) => return api.ca(Duration::from_secs(60)).await,
            Feed::Files { state, .. } => state.join("ca"),
        };
        let dir = &ca_dir;
        let what = format!("the operator to write its CA in {}", dir.display());
        until(&what, Duration::from_secs(60), Duration::from_millis(50), move || async move {
            Ok(skein_operator::CaFiles::read(|name| std::fs::read_to_string(dir.join(name)).ok()))
        })
        .await
    }

    /// Waits until the operator has issued the workload certificate of Service `i`.
    async fn wait_certificate(&self, shape: &Shape, i: usize, limit: Duration) -> anyhow::Result<()> {
        let state = match self {
            Feed::Api(api) => return api.wait_certificate(i, limit).await,
            Feed::Files { state, .. } => state,
        };
        let (ns, sa) = shape.service(i);
        let file = &state.join("identities").join(ns).join(sa).join("tls.crt");
        let what = format!("the operator to issue {}", file.display());
        until(&what, limit, Duration::from_millis(50), move || async move { Ok(file.exists().then_some(())) })
            .await
    }

    /// Makes the change `edits` holds to the namespace of Service `i`; returns when its first
    /// write started.
    async fn change(&mut self, shape: &Shape, i: usize, edits: &Edits) -> anyhow::Result<Instant> {
        let first = match self {
            Feed::Files { manifests, .. } => {
                cluster::rewrite_namespace_of(shape, manifests, i, edits, None)?.1
            }
            Feed::Api(api) => api.change(i, edits).await?,
        };
        first.context("the change wrote nothing")
    }
}

impl Operator {
    fn start(args: &Args, feed: &Feed) -> anyhow::Result<Self> {
        let (stream, metrics): (SocketAddr, SocketAddr) =
            (format!("127.0.0.1:{}", free_port()?).parse()?, format!("127.0.0.1:{}", free_port()?).parse()?);
        let operator = args.operator.as_ref().context("--operator names the skein-operator binary")?;
        let mut command = match args.operator_cpu {
            Some(cpu) => {
                let mut c = Command::new("taskset");
                c.args(["-c", &cpu.to_string()]).arg(operator);
                c
            }
            None => Command::new(operator),
        };
        match feed {
            Feed::Files { manifests, state } => {
                command.arg("--local").arg(manifests).arg("--local-state").arg(state);
            }
            // Watching every namespace, its own in the benchmark's; no webhook configuration
            // by that name exists, so the synthetic pods are not injected.
            Feed::Api(_) => {
                command
                    .args(["--namespace", api::OPERATOR_NAMESPACE, "--instance", "control-plane-bench"])
                    .args(["--webhook-addr", &format!("127.0.0.1:{}", free_port()?)])
                    .args(["--webhook-configuration", "skein-cpb-no-such-webhook"]);
            }
        }
        command
            .arg("--stream-addr")
            .arg(stream.to_string())
            .arg("--metrics-addr")
            .arg(metrics.to_string())
            // As the chart runs it (charts/skein/templates/deployment.yaml).
            .env("MALLOC_ARENA_MAX", "2")
            .env("RUST_LOG", std::env::var("SKEIN_OPERATOR_LOG").unwrap_or_else(|_| "warn".into()))
            .stdout(Stdio::null())
            .stderr(Stdio::inherit());
        let child = command.spawn().with_context(|| format!("starting {}", operator.display()))?;
        Ok(Self { child, metrics, stream })
    }

    /// Resident memory now and at its peak, in MiB; CPU time so far, in seconds.
    fn usage(&self) -> anyhow::Result<(f64, f64, f64)> {
        // Through taskset the operator is taskset's exec'd self: the same pid.
        let pid = self.child.id();
        let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
        let kib = |key: &str| -> f64 {
            status
                .lines()
                .find_map(|l| l.strip_prefix(key))
                .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
                .unwrap_or(0.0)
        };
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
        // Fields after the command name (which may hold spaces): utime is the 12th, stime the 13th.
        let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or_default();
        let fields: Vec<&str> = rest.split_whitespace().collect();
        let ticks = |i: usize| fields.get(i).and_then(|f| f.parse::<f64>().ok()).unwrap_or(0.0);
        // USER_HZ is 100 on every Linux this runs on.
        let cpu = (ticks(11) + ticks(12)) / 100.0;
        Ok((kib("VmRSS:") / 1024.0, kib("VmHWM:") / 1024.0, cpu))
    }

    /// The operator's `config_sent_bytes` so far (full, delta).
    async fn bytes_sent(&self) -> anyhow::Result<(u64, u64)> {
        let text = scrape(self.metrics).await?;
        let read = |kind: &str| {
            let needle = format!("skein_operator_config_sent_bytes_total{{kind=\"{kind}\"}} ");
            text.lines()
                .find_map(|l| l.strip_prefix(needle.as_str())?.trim().parse::<u64>().ok())
                .unwrap_or(0)
        };
        Ok((read("full"), read("delta")))
    }
}

async fn scrape(addr: SocketAddr) -> anyhow::Result<String> {
    get(addr, "/metrics").await
}

/// One plain HTTP/1.0 GET; the whole answer, status line included.
async fn get(addr: SocketAddr, path: &str) -> anyhow::Result<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut tcp = tokio::net::TcpStream::connect(addr).await?;
    tcp.write_all(format!("GET {path} HTTP/1.0\r\nHost: skein\r\n\r\n").as_bytes()).await?;
    let mut text = String::new();
    tcp.read_to_string(&mut text).await?;
    Ok(text)
}

fn percentiles(mut ms: Vec<f64>) -> (f64, f64, f64) {
    ms.sort_by(f64::total_cmp);
    let at = |q: f64| {
        ms.get(((ms.len() as f64 * q).ceil() as usize).saturating_sub(1)).copied().unwrap_or(f64::NAN)
    };
    (at(0.5), at(0.9), ms.last().copied().unwrap_or(f64::NAN))
}

fn mib(bytes: u64) -> String {
    if bytes >= 10 << 20 {
        format!("{:.0} MiB", bytes as f64 / (1 << 20) as f64)
    } else if bytes >= 1 << 20 {
        format!("{:.1} MiB", bytes as f64 / (1 << 20) as f64)
    } else {
        format!("{:.0} KiB", bytes as f64 / 1024.0)
    }
}

async fn run_one(args: &Args, shape: Shape, n: usize) -> anyhow::Result<()> {
    let work = match &args.workdir {
        Some(w) => w.join(format!("n{n}")),
        None => std::env::temp_dir().join(format!("skein-cp-bench-{}-n{n}", std::process::id())),
    };
    let _ = std::fs::remove_dir_all(&work);
    let mut edits = Edits::default();
    let mut feed = if args.cluster {
        let mut api = api::ApiFeed::connect(shape).await?;
        let t = Instant::now();
        api.write_all(&edits).await?;
        eprintln!("wrote the synthetic cluster to the API server in {:.1} s", t.elapsed().as_secs_f64());
        Feed::Api(api)
    } else {
        let (manifests, state) = (work.join("manifests"), work.join("state"));
        cluster::write_all(&shape, &manifests, &edits, None)?;
        Feed::Files { manifests, state }
    };
    let operator = Operator::start(args, &feed)?;

    // The operator's CA, once it has made it; each proxy gets a certificate of its own.
    let ca = skein_operator::MeshCa::load(&feed.ca().await?)?;
    let now = time::OffsetDateTime::now_utc();
    let mut configs = Vec::with_capacity(n);
    for j in 0..n {
        let (ns, sa) = shape.service(j % shape.services());
        let cert = ca.sign_workload(
            &WorkloadIdentity::new(ns, sa),
            skein_api::constants::DEFAULT_TRUST_DOMAIN,
            Duration::from_secs(3600),
            now,
        )?;
        configs.push(client::tls_config(&cert.chain_pem, &cert.key_pem, &cert.bundle_pem)?);
    }
    // Served means: holding the config of the whole cluster. Wait for the operator to have read
    // it, so the cold start measures serving, not reading: it issues the workloads' certificates
    // once it has (wait for the last, so the cold start does not share the core with that), and
    // then one probe proxy's config stays as it is (no new line for a second).
    let deadline = Instant::now() + Duration::from_secs(120);
    feed.wait_certificate(&shape, shape.services() - 1, deadline.saturating_duration_since(Instant::now()))
        .await?;
    let probe = Arc::new(Record::default());
    tokio::spawn(client::run(operator.stream, "probe".into(), configs[0].clone(), probe.clone()));
    loop {
        let last = probe.lines.lock().unwrap_or_else(|e| e.into_inner()).last().map(|l| l.at);
        if last.is_some_and(|at| at.elapsed() > Duration::from_secs(1)) {
            break;
        }
        if let Some(e) = probe.error.lock().unwrap_or_else(|e| e.into_inner()).as_ref() {
            bail!("probe proxy: {e}");
        }
        if Instant::now() > deadline {
            bail!("the operator did not serve the cluster within 120 s");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (full_before, _) = operator.bytes_sent().await?;

    // Cold start: every proxy connects at once, with the 0–200 ms jitter skein-proxy
    // reconnects with.
    let records: Vec<Arc<Record>> = (0..n).map(|_| Arc::new(Record::default())).collect();
    let started = Instant::now();
    for (j, (record, tls)) in records.iter().zip(configs).enumerate() {
        let (record, stream) = (record.clone(), operator.stream);
        let delay = Duration::from_millis(fastrand::u64(0..200));
        tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            client::run(stream, format!("proxy-{j}"), tls, record).await;
        });
    }
    let firsts = wait_all(&records, 0, started, Duration::from_secs(120)).await?;
    let full_size = (operator.bytes_sent().await?.0 - full_before) / n as u64;
    let served = firsts.iter().copied().fold(0.0, f64::max);
    let (f50, f90, _) = percentiles(firsts);
    let (rss, peak, cpu) = operator.usage()?;
    println!(
        "| {n} | {:.2} s | {f50:.0} / {f90:.0} ms | cold start ({} per proxy) | | {} in all | {rss:.0} MiB ({peak:.0}) | {cpu:.1} s |",
        served / 1000.0,
        mib(full_size),
        mib(full_size * n as u64),
    );

    // Changes, each to one Service every proxy holds.
    let routed = shape.routed();
    let kinds: [(&str, Change<'_>); 3] = [
        ("TrafficRoute weight", &|e: &mut Edits, k| {
            let i = routed[k % routed.len()];
            let w = e.weights.entry(i).or_insert(90);
            *w = if *w <= 10 { 90 } else { *w - 10 };
            i
        }),
        ("endpoint added", &|e: &mut Edits, k| {
            let i = (k * 37 + 11) % shape.services();
            *e.extra_endpoints.entry(i).or_insert(0) += 1;
            i
        }),
        ("pod deleted", &|e: &mut Edits, k| {
            let i = (k * 53 + 7) % shape.services();
            let pod = (0..shape.endpoints_per_service)
                .rev()
                .find(|p| !e.deleted_pods.contains(&(i, *p)))
                .unwrap_or(0);
            e.deleted_pods.insert((i, pod));
            i
        }),
    ];
    for (kind, change) in kinds {
        let mut latencies = Vec::new();
        let mut sent = Vec::new();
        let mut whole = 0;
        for k in 0..args.changes {
            tokio::time::sleep(Duration::from_millis(300)).await;
            let before: Vec<usize> = records.iter().map(|r| r.count()).collect();
            let (full0, delta0) = operator.bytes_sent().await?;
            let i = change(&mut edits, k);
            let t0 = feed.change(&shape, i, &edits).await?;
            for (record, &b) in records.iter().zip(&before) {
                let got = wait_line(record, b, Duration::from_secs(60)).await?;
                let held = record.line(b.wrapping_sub(1)).map(|l| l.version).unwrap_or_default();
                if got.version == held {
                    bail!("a proxy was sent its version {held} again");
                }
                whole += usize::from(!got.delta);
                latencies.push(got.at.saturating_duration_since(t0).as_secs_f64() * 1000.0);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
            let (full1, delta1) = operator.bytes_sent().await?;
            sent.push((full1 - full0) + (delta1 - delta0));
        }
        let (p50, p90, max) = percentiles(latencies);
        let per_change = sent.iter().sum::<u64>() / sent.len().max(1) as u64;
        let (rss, peak, cpu) = operator.usage()?;
        let how = if whole == 0 { "deltas".to_string() } else { format!("{whole} whole configs") };
        println!(
            "| {n} | | | {kind} | {p50:.0} / {p90:.0} / {max:.0} ms | {} ({how}) | {rss:.0} MiB ({peak:.0}) | {cpu:.1} s |",
            mib(per_change)
        );
    }
    let errors: Vec<String> =
        records.iter().filter_map(|r| r.error.lock().unwrap_or_else(|e| e.into_inner()).clone()).collect();
    if !errors.is_empty() {
        bail!("{} simulated proxies failed, first: {}", errors.len(), errors[0]);
    }
    drop(operator);
    if let Feed::Api(api) = &feed {
        api.clean().await?;
    }
    let _ = std::fs::remove_dir_all(&work);
    Ok(())
}

/// A change to the cluster: edits for the k-th change of its kind; the Service it touches.
type Change<'a> = &'a dyn Fn(&mut Edits, usize) -> usize;

/// Waits until every record holds line `index`; the times (ms after `since`) they got it.
async fn wait_all(
    records: &[Arc<Record>],
    index: usize,
    since: Instant,
    limit: Duration,
) -> anyhow::Result<Vec<f64>> {
    let mut times = Vec::with_capacity(records.len());
    for record in records {
        let got = wait_line(record, index, limit.saturating_sub(since.elapsed())).await?;
        times.push(got.at.saturating_duration_since(since).as_secs_f64() * 1000.0);
    }
    Ok(times)
}

async fn wait_line(record: &Record, index: usize, limit: Duration) -> anyhow::Result<client::Received> {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(line) = record.line(index) {
            return Ok(line);
        }
        if let Some(e) = record.error.lock().unwrap_or_else(|e| e.into_inner()).as_ref() {
            bail!("a simulated proxy failed: {e}");
        }
        if Instant::now() > deadline {
            bail!("a simulated proxy got no line {index} in time");
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}
