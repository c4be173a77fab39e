//! The serving certificate of the webhook and the config stream: signed by the mesh CA for the
//! operator Service's DNS names and the `--webhook-san` values, and swapped in without a
//! restart when renewed (rustls asks [`ServingCert`] for the certificate on every handshake).

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use time::OffsetDateTime;

use super::ca::{self, MeshCa};

/// Lifetime of the serving certificate (renewed at half-life, without a restart).
pub const SERVING_LIFETIME: Duration = Duration::from_secs(7 * 24 * 3600);

/// The serving certificate in force, swappable.
#[derive(Debug)]
pub struct ServingCert {
    current: ArcSwap<CertifiedKey>,
}

impl ResolvesServerCert for ServingCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.load_full())
    }
}

fn certified_key(cert: &ca::WorkloadCert) -> Result<CertifiedKey, String> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(cert.chain_pem.as_bytes())
        .collect::<Result<_, _>>()
        .map_err(|e| e.to_string())?;
    let key = PrivateKeyDer::from_pem_slice(cert.key_pem.as_bytes()).map_err(|e| e.to_string())?;
    let signer = rustls::crypto::ring::sign::any_supported_type(&key).map_err(|e| e.to_string())?;
    Ok(CertifiedKey::new(chain, signer))
}

impl ServingCert {
    /// Signs a first serving certificate.
    pub fn issue(ca: &MeshCa, dns: &[String], ips: &[IpAddr]) -> Result<(Self, OffsetDateTime), String> {
        let cert = ca
            .sign_serving(dns, ips, SERVING_LIFETIME, OffsetDateTime::now_utc())
            .map_err(|e| e.to_string())?;
        let key = certified_key(&cert)?;
        Ok((Self { current: ArcSwap::from_pointee(key) }, cert.not_after))
    }

    /// Signs a new certificate and swaps it in; connections already open keep theirs.
    pub fn renew(&self, ca: &MeshCa, dns: &[String], ips: &[IpAddr]) -> Result<OffsetDateTime, String> {
        let cert = ca
            .sign_serving(dns, ips, SERVING_LIFETIME, OffsetDateTime::now_utc())
            .map_err(|e| e.to_string())?;
        self.current.store(Arc::new(certified_key(&cert)?));
        Ok(cert.not_after)
    }
}

/// The names the serving certificate covers: the Service's DNS names and the extra names.
pub fn serving_names(service: &str, namespace: &str, extra: &[String]) -> (Vec<String>, Vec<IpAddr>) {
    let mut dns = vec![
        format!("{service}.{namespace}.svc"),
        format!("{service}.{namespace}.svc.cluster.local"),
        format!("{service}.{namespace}"),
    ];
    let mut ips = Vec::new();
    for e in extra {
        match e.parse::<IpAddr>() {
            Ok(ip) => ips.push(ip),
            Err(_) => dns.push(e.clone()),
        }
    }
    (dns, ips)
}
