//! Transparent capture (`skein-proxy init`, run once as a pod's init step with `NET_ADMIN`):
//! iptables `nat` rules that send the pod's inbound TCP to 15006 and its outbound TCP to 15001,
//! except the proxy's own traffic (by UID), loopback traffic, the proxy's own ports and the
//! excluded ports.
//!
//! The rules are one `iptables-restore --noflush` batch per address family, built by
//! [`capture_batch`]: the kernel takes the whole batch or none of it. Declaring a chain in the
//! batch creates it or empties it, so a re-run replaces Skein's rules instead of failing on
//! `-N` or adding them twice; the jumps into Skein's chains are added only when
//! `iptables-save` does not already show them. IPv6 gets the same rules through
//! `ip6tables-restore` whenever the kernel has IPv6, so no IPv6 connection slips past the mesh.
//!
//! Inbound, the proxy's ports are not redirected: 15006 and 15020 are served on the pod IP, and
//! 15001 and 15000 listen on loopback only, so a connection from another pod to them is refused.

use std::io::Write as _;
use std::process::{Command, Stdio};

use skein_api::constants::{PROXY_ADMIN_PORT, PROXY_INBOUND_PORT, PROXY_OUTBOUND_PORT, PROXY_STATS_PORT};

/// Chain for traffic coming into the pod.
pub const INBOUND_CHAIN: &str = "SKEIN_INBOUND";
/// Chain for traffic the pod's apps send.
pub const OUTPUT_CHAIN: &str = "SKEIN_OUTPUT";

/// `skein-proxy init` flags.
#[derive(clap::Args, Debug, Clone)]
pub struct InitArgs {
    /// UID the sidecar runs as: its own connections are never captured.
    #[arg(long, default_value_t = 1337)]
    pub proxy_uid: u32,
    /// Ports (comma-separated) never captured, in either direction.
    #[arg(long, value_delimiter = ',')]
    pub exclude_ports: Vec<u16>,
    /// IPv6 capture: `auto` whenever the kernel has IPv6 (a failure is then an error), `on`
    /// always, `off` never.
    #[arg(long, value_enum, default_value = "auto")]
    pub ipv6: Ipv6Mode,
    /// Print the batches instead of applying them.
    #[arg(long)]
    pub dry_run: bool,
}

/// Whether IPv6 traffic is captured too.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ipv6Mode {
    Auto,
    On,
    Off,
}

/// An address family's tools and loopback.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Family {
    V4,
    V6,
}

impl Family {
    fn restore(self) -> &'static str {
        match self {
            Self::V4 => "iptables-restore",
            Self::V6 => "ip6tables-restore",
        }
    }

    fn save(self) -> &'static str {
        match self {
            Self::V4 => "iptables-save",
            Self::V6 => "ip6tables-save",
        }
    }

    fn loopback(self) -> &'static str {
        match self {
            Self::V4 => "127.0.0.1/32",
            Self::V6 => "::1/128",
        }
    }
}

/// The jumps from the built-in chains into Skein's, as `iptables-save` prints them.
fn jumps() -> [String; 2] {
    [format!("-A PREROUTING -p tcp -j {INBOUND_CHAIN}"), format!("-A OUTPUT -p tcp -j {OUTPUT_CHAIN}")]
}

/// The `iptables-restore --noflush` input for one family. `existing` is what `iptables-save -t
/// nat` printed: jumps already there are not added again.
pub fn capture_batch(family: Family, proxy_uid: u32, excluded: &[u16], existing: &str) -> String {
    let mut b = String::from("*nat\n");
    b += &format!(":{INBOUND_CHAIN} - [0:0]\n:{OUTPUT_CHAIN} - [0:0]\n");
    // The proxy's listeners are reached directly (peers' sidecars, probes) or not at all
    // (loopback-only ones): never redirected into the inbound listener.
    for port in [PROXY_INBOUND_PORT, PROXY_STATS_PORT, PROXY_ADMIN_PORT, PROXY_OUTBOUND_PORT]
        .into_iter()
        .chain(excluded.iter().copied())
    {
        b += &format!("-A {INBOUND_CHAIN} -p tcp --dport {port} -j RETURN\n");
    }
    b += &format!("-A {INBOUND_CHAIN} -p tcp -j REDIRECT --to-ports {PROXY_INBOUND_PORT}\n");
    b += &format!("-A {OUTPUT_CHAIN} -m owner --uid-owner {proxy_uid} -j RETURN\n");
    b += &format!("-A {OUTPUT_CHAIN} -d {} -j RETURN\n", family.loopback());
    for port in excluded {
        b += &format!("-A {OUTPUT_CHAIN} -p tcp --dport {port} -j RETURN\n");
    }
    b += &format!("-A {OUTPUT_CHAIN} -p tcp -j REDIRECT --to-ports {PROXY_OUTBOUND_PORT}\n");
    let present: Vec<&str> = existing.lines().map(str::trim).collect();
    for jump in jumps() {
        if !present.contains(&jump.as_str()) {
            b += &jump;
            b.push('\n');
        }
    }
    b += "COMMIT\n";
    b
}

/// Which families to capture.
fn families(mode: Ipv6Mode) -> Vec<Family> {
    let has_ipv6 = std::path::Path::new("/proc/net/if_inet6").exists();
    match mode {
        Ipv6Mode::On => vec![Family::V4, Family::V6],
        Ipv6Mode::Auto if has_ipv6 => vec![Family::V4, Family::V6],
        Ipv6Mode::Auto | Ipv6Mode::Off => vec![Family::V4],
    }
}

/// Applies the rules, one atomic batch per family; says which family and tool failed.
pub fn install(args: &InitArgs) -> Result<(), String> {
    for family in families(args.ipv6) {
        let existing = if args.dry_run { String::new() } else { save(family)? };
        let batch = capture_batch(family, args.proxy_uid, &args.exclude_ports, &existing);
        if args.dry_run {
            println!("# {}\n{batch}", family.restore());
            continue;
        }
        restore(family, &batch)?;
    }
    Ok(())
}

fn save(family: Family) -> Result<String, String> {
    let out = Command::new(family.save())
        .args(["-t", "nat"])
        .output()
        .map_err(|e| format!("running {}: {e}", family.save()))?;
    if !out.status.success() {
        return Err(format!("{} -t nat: {}", family.save(), String::from_utf8_lossy(&out.stderr).trim()));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn restore(family: Family, batch: &str) -> Result<(), String> {
    let tool = family.restore();
    let mut child = Command::new(tool)
        .args(["--noflush", "--wait", "10"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("running {tool}: {e}"))?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin.write_all(batch.as_bytes()).map_err(|e| format!("writing to {tool}: {e}"))?;
    }
    let out = child.wait_with_output().map_err(|e| format!("running {tool}: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "{tool} refused the batch (nothing was changed): {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(())
}

/// `skein-proxy wait-ready`: polls the admin `/ready` until it answers 200 (for the postStart
/// hook that holds app containers on Kubernetes without native sidecars).
pub fn wait_ready(admin_port: u16, timeout: std::time::Duration) -> bool {
    use std::io::{Read, Write};
    let deadline = std::time::Instant::now() + timeout;
    while std::time::Instant::now() < deadline {
        if let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", admin_port)) {
            let _ = s.set_read_timeout(Some(std::time::Duration::from_secs(1)));
            let _ = s.write_all(b"GET /ready HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
            let mut head = [0u8; 12];
            if s.read_exact(&mut head).is_ok() && &head[9..12] == b"200" {
                return true;
            }
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_batch_exempts_the_proxy_loopback_and_excluded_ports_before_redirecting() {
        let batch = capture_batch(Family::V4, 1337, &[3306], "");
        let lines: Vec<&str> = batch.lines().collect();
        assert_eq!(lines[0], "*nat");
        assert_eq!(*lines.last().unwrap(), "COMMIT");
        let at = |l: &str| lines.iter().position(|x| *x == l).unwrap_or_else(|| panic!("{l} in {batch}"));
        let redirect_out = at("-A SKEIN_OUTPUT -p tcp -j REDIRECT --to-ports 15001");
        assert!(at("-A SKEIN_OUTPUT -m owner --uid-owner 1337 -j RETURN") < redirect_out);
        assert!(at("-A SKEIN_OUTPUT -d 127.0.0.1/32 -j RETURN") < redirect_out);
        assert!(at("-A SKEIN_OUTPUT -p tcp --dport 3306 -j RETURN") < redirect_out);
        let redirect_in = at("-A SKEIN_INBOUND -p tcp -j REDIRECT --to-ports 15006");
        for port in [15006, 15020, 15000, 15001, 3306] {
            assert!(at(&format!("-A SKEIN_INBOUND -p tcp --dport {port} -j RETURN")) < redirect_in);
        }
        at("-A PREROUTING -p tcp -j SKEIN_INBOUND");
        at("-A OUTPUT -p tcp -j SKEIN_OUTPUT");
    }

    #[test]
    fn a_rerun_does_not_add_the_jumps_twice_and_ipv6_uses_its_loopback() {
        let saved = "*nat\n:PREROUTING ACCEPT [0:0]\n-A PREROUTING -p tcp -j SKEIN_INBOUND\n\
                     -A OUTPUT -p tcp -j SKEIN_OUTPUT\nCOMMIT\n";
        let batch = capture_batch(Family::V6, 1337, &[], saved);
        assert!(!batch.contains("-A PREROUTING"), "{batch}");
        assert!(!batch.contains("-A OUTPUT "), "{batch}");
        assert!(batch.contains("-A SKEIN_OUTPUT -d ::1/128 -j RETURN"), "{batch}");
        // The chains are declared, which empties them: a re-run replaces the rules.
        assert!(batch.contains(":SKEIN_INBOUND - [0:0]\n:SKEIN_OUTPUT - [0:0]\n"), "{batch}");
    }
}
