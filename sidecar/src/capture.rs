//! Transparent capture (`skein-proxy init`, run once as a pod's init step with `NET_ADMIN`):
//! iptables `nat` rules that send the pod's inbound TCP to 15006 and its outbound TCP to 15001,
//! except the proxy's own traffic (by UID), loopback traffic, the proxy's own ports and the
//! excluded ports. The rules are a plain list built by [`capture_rules`]; [`install`] runs them.

use std::process::Command;

use skein_api::constants::{PROXY_ADMIN_PORT, PROXY_INBOUND_PORT, PROXY_OUTBOUND_PORT};

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
    /// Print the iptables commands instead of running them.
    #[arg(long)]
    pub dry_run: bool,
}

/// The iptables invocations (arguments after `iptables`), in order.
pub fn capture_rules(proxy_uid: u32, excluded: &[u16]) -> Vec<Vec<String>> {
    let mut rules: Vec<Vec<String>> = Vec::new();
    let mut add = |args: &[&str]| rules.push(args.iter().map(|s| s.to_string()).collect());
    let (inbound, outbound) = (PROXY_INBOUND_PORT.to_string(), PROXY_OUTBOUND_PORT.to_string());
    add(&["-t", "nat", "-N", INBOUND_CHAIN]);
    // The proxy's own listeners are reached directly (probes, peers' sidecars).
    for port in [PROXY_ADMIN_PORT, PROXY_INBOUND_PORT, PROXY_OUTBOUND_PORT] {
        add(&["-t", "nat", "-A", INBOUND_CHAIN, "-p", "tcp", "--dport", &port.to_string(), "-j", "RETURN"]);
    }
    for port in excluded {
        add(&["-t", "nat", "-A", INBOUND_CHAIN, "-p", "tcp", "--dport", &port.to_string(), "-j", "RETURN"]);
    }
    add(&["-t", "nat", "-A", INBOUND_CHAIN, "-p", "tcp", "-j", "REDIRECT", "--to-ports", &inbound]);
    add(&["-t", "nat", "-A", "PREROUTING", "-p", "tcp", "-j", INBOUND_CHAIN]);

    add(&["-t", "nat", "-N", OUTPUT_CHAIN]);
    add(&[
        "-t",
        "nat",
        "-A",
        OUTPUT_CHAIN,
        "-m",
        "owner",
        "--uid-owner",
        &proxy_uid.to_string(),
        "-j",
        "RETURN",
    ]);
    add(&["-t", "nat", "-A", OUTPUT_CHAIN, "-d", "127.0.0.1/32", "-j", "RETURN"]);
    for port in excluded {
        add(&["-t", "nat", "-A", OUTPUT_CHAIN, "-p", "tcp", "--dport", &port.to_string(), "-j", "RETURN"]);
    }
    add(&["-t", "nat", "-A", OUTPUT_CHAIN, "-p", "tcp", "-j", "REDIRECT", "--to-ports", &outbound]);
    add(&["-t", "nat", "-A", "OUTPUT", "-p", "tcp", "-j", OUTPUT_CHAIN]);
    rules
}

/// Runs the rules with `iptables`; stops at the first failure and says which rule failed.
pub fn install(args: &InitArgs) -> Result<(), String> {
    for rule in capture_rules(args.proxy_uid, &args.exclude_ports) {
        if args.dry_run {
            println!("iptables {}", rule.join(" "));
            continue;
        }
        let out =
            Command::new("iptables").args(&rule).output().map_err(|e| format!("running iptables: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "iptables {}: {}",
                rule.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
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
    fn rules_exclude_the_proxy_loopback_and_excluded_ports() {
        let rules: Vec<String> = capture_rules(1337, &[3306]).iter().map(|r| r.join(" ")).collect();
        assert!(rules.contains(&"-t nat -A SKEIN_OUTPUT -m owner --uid-owner 1337 -j RETURN".to_string()));
        assert!(rules.contains(&"-t nat -A SKEIN_OUTPUT -p tcp --dport 3306 -j RETURN".to_string()));
        assert!(rules.contains(&"-t nat -A SKEIN_INBOUND -p tcp --dport 15000 -j RETURN".to_string()));
        // Exclusions come before the redirects they exempt from.
        let redirect = rules
            .iter()
            .position(|r| r.contains("SKEIN_OUTPUT -p tcp -j REDIRECT --to-ports 15001"))
            .unwrap();
        let owner = rules.iter().position(|r| r.contains("--uid-owner")).unwrap();
        assert!(owner < redirect);
        assert_eq!(rules.last().unwrap(), "-t nat -A OUTPUT -p tcp -j SKEIN_OUTPUT");
    }
}
