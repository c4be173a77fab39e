//! Mutual TLS between sidecars, with SPIFFE identities.
//!
//! Every sidecar holds a workload certificate whose URI SAN is
//! `spiffe://<trust-domain>/ns/<ns>/sa/<sa>`. A peer's chain is verified against the trust
//! bundle (which may hold several roots during a rotation), and then its SPIFFE ID: the
//! inbound side accepts any identity of its own trust domain; the outbound side accepts only
//! the identity the endpoint is supposed to run as. TLS 1.3 only. A sidecar calls its peers
//! with ALPN `skein-h2` (the multiplexed hop, `wire::mux`) for requests whose body is whole and
//! `http/1.1` for the rest; its inbound side accepts `h2` too (sidecars of an older release).
//!
//! The material is read from the mounted Secret and trust-bundle directories and reloaded when
//! their content changes (Kubernetes swaps a `..data` symlink, so the files are re-read by path,
//! never watched by inode). A new set that does not load is refused and the last good one stays;
//! connections already open keep the configuration they were made with.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwapOption;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{
    verify_tls12_signature, verify_tls13_signature, CryptoProvider, WebPkiSupportedAlgorithms,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ParsedCertificate, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls::{
    ClientConfig, DigitallySignedStruct, DistinguishedName, Error as TlsError, RootCertStore, ServerConfig,
    SignatureScheme,
};
use tokio_util::sync::CancellationToken;

/// ALPN protocols accepted by the inbound side, in preference order.
pub const ALPN: [&[u8]; 3] = [crate::wire::mux::ALPN, b"h2", b"http/1.1"];

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn algorithms() -> WebPkiSupportedAlgorithms {
    rustls::crypto::ring::default_provider().signature_verification_algorithms
}

/// The SPIFFE IDs in a certificate's URI SANs.
pub fn spiffe_ids(cert: &CertificateDer<'_>) -> Vec<String> {
    let Ok((_, parsed)) = x509_parser::parse_x509_certificate(cert.as_ref()) else { return Vec::new() };
    let Ok(Some(san)) = parsed.subject_alternative_name() else { return Vec::new() };
    san.value
        .general_names
        .iter()
        .filter_map(|n| match n {
            x509_parser::extensions::GeneralName::URI(u) if u.starts_with("spiffe://") => Some(u.to_string()),
            _ => None,
        })
        .collect()
}

/// The trust domain of a SPIFFE ID.
pub fn trust_domain_of(id: &str) -> Option<&str> {
    id.strip_prefix("spiffe://")?.split('/').next().filter(|d| !d.is_empty())
}

/// A caller's certificate must carry exactly one SPIFFE ID (an X509-SVID has one URI SAN), of
/// our trust domain and of the mesh's shape `ns/<ns>/sa/<sa>`: a certificate the CA signed for
/// anything else is no workload, and is refused rather than taken for an unauthenticated caller.
fn check_client_identity(ids: &[String], trust_domain: &str) -> Result<(), String> {
    match ids {
        [id] if trust_domain_of(id) != Some(trust_domain) => {
            Err(format!("peer identity {id} is not in trust domain {trust_domain}"))
        }
        [id] if skein_api::config::spiffe_parts(id).is_none() => Err(format!(
            "peer identity {id} is not spiffe://{trust_domain}/ns/<namespace>/sa/<service-account>"
        )),
        [_] => Ok(()),
        _ => Err(format!("a peer certificate must carry exactly one SPIFFE ID, not {ids:?}")),
    }
}

/// Checks a peer certificate presented as a server: chain to the bundle, then the expected ID.
#[derive(Debug)]
struct SpiffeServerVerifier {
    roots: Arc<RootCertStore>,
    expected: String,
}

impl ServerCertVerifier for SpiffeServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, TlsError> {
        let cert = ParsedCertificate::try_from(end_entity)?;
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &cert,
            &self.roots,
            intermediates,
            now,
            algorithms().all,
        )?;
        let ids = spiffe_ids(end_entity);
        if ids.contains(&self.expected) {
            Ok(ServerCertVerified::assertion())
        } else {
            Err(TlsError::General(format!("peer identity {ids:?} is not the expected {}", self.expected)))
        }
    }

    fn verify_tls12_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, TlsError> {
        verify_tls12_signature(m, c, d, &algorithms())
    }

    fn verify_tls13_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, TlsError> {
        verify_tls13_signature(m, c, d, &algorithms())
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        algorithms().supported_schemes()
    }
}

/// Checks a peer certificate presented as a client: chain to the bundle, then an ID in our
/// trust domain.
#[derive(Debug)]
struct SpiffeClientVerifier {
    inner: Arc<dyn ClientCertVerifier>,
    trust_domain: String,
}

impl ClientCertVerifier for SpiffeClientVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, TlsError> {
        self.inner.verify_client_cert(end_entity, intermediates, now)?;
        check_client_identity(&spiffe_ids(end_entity), &self.trust_domain).map_err(TlsError::General)?;
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, TlsError> {
        self.inner.verify_tls12_signature(m, c, d)
    }

    fn verify_tls13_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, TlsError> {
        self.inner.verify_tls13_signature(m, c, d)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// One loaded set of identity material.
#[derive(Debug)]
pub struct TlsMaterial {
    /// Our own SPIFFE ID.
    pub identity: String,
    pub trust_domain: String,
    /// Expiry of our certificate (Unix seconds).
    pub not_after: i64,
    /// For the inbound listener: client certificates of our trust domain required.
    pub server: Arc<ServerConfig>,
    roots: Arc<RootCertStore>,
    certified: Arc<CertifiedKey>,
    /// Client configurations by expected SPIFFE ID and whether they offer the multiplexed hop.
    clients: Mutex<HashMap<(String, bool), Arc<ClientConfig>>>,
}

impl TlsMaterial {
    /// Loads a certificate chain, its key and the trust bundle (all PEM).
    pub fn from_pem(chain_pem: &[u8], key_pem: &[u8], roots_pem: &[u8]) -> Result<Self, String> {
        let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(chain_pem)
            .collect::<Result<_, _>>()
            .map_err(|e| format!("certificate: {e}"))?;
        let leaf = chain.first().ok_or("the certificate file holds no certificate")?;
        let identity = spiffe_ids(leaf).into_iter().next().ok_or("the certificate has no SPIFFE URI SAN")?;
        let trust_domain = trust_domain_of(&identity).ok_or("the SPIFFE ID has no trust domain")?.to_string();
        let not_after = x509_parser::parse_x509_certificate(leaf.as_ref())
            .map(|(_, c)| c.validity().not_after.timestamp())
            .map_err(|e| format!("certificate: {e}"))?;
        let key = PrivateKeyDer::from_pem_slice(key_pem).map_err(|e| format!("key: {e}"))?;
        let mut roots = RootCertStore::empty();
        for root in CertificateDer::pem_slice_iter(roots_pem) {
            roots
                .add(root.map_err(|e| format!("trust bundle: {e}"))?)
                .map_err(|e| format!("trust bundle: {e}"))?;
        }
        if roots.is_empty() {
            return Err("the trust bundle holds no certificate".into());
        }
        let roots = Arc::new(roots);
        let certified = Arc::new(
            CertifiedKey::from_der(chain, key, &provider())
                .map_err(|e| format!("certificate and key: {e}"))?,
        );

        let inner = WebPkiClientVerifier::builder_with_provider(roots.clone(), provider())
            .build()
            .map_err(|e| e.to_string())?;
        let verifier = Arc::new(SpiffeClientVerifier { inner, trust_domain: trust_domain.clone() });
        let mut server = ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| e.to_string())?
            .with_client_cert_verifier(verifier)
            .with_cert_resolver(Arc::new(Fixed(certified.clone())));
        server.alpn_protocols = ALPN.iter().map(|p| p.to_vec()).collect();
        Ok(Self {
            identity,
            trust_domain,
            not_after,
            server: Arc::new(server),
            roots,
            certified,
            clients: Mutex::default(),
        })
    }

    /// Loads from a mounted identity Secret (`tls.crt`, `tls.key`, and `ca.crt` unless the trust
    /// directory has `roots.pem`).
    pub fn from_dirs(cert_dir: &Path, trust_dir: Option<&Path>) -> Result<Self, String> {
        let read = |p: PathBuf| std::fs::read(&p).map_err(|e| format!("{}: {e}", p.display()));
        let chain = read(cert_dir.join("tls.crt"))?;
        let key = read(cert_dir.join("tls.key"))?;
        let roots = match trust_dir.map(|d| d.join("roots.pem")).filter(|p| p.exists()) {
            Some(p) => read(p)?,
            None => read(cert_dir.join("ca.crt"))?,
        };
        Self::from_pem(&chain, &key, &roots)
    }

    /// The client configuration for calling a peer that must present `expected` (a SPIFFE ID),
    /// offering ALPN `http/1.1`: the fast path's hop.
    pub fn client_for(&self, expected: &str) -> Arc<ClientConfig> {
        self.client_offering(expected, false)
    }

    /// As [`Self::client_for`], offering the multiplexed hop first when `mux` (a peer of an
    /// older release picks `http/1.1`).
    pub fn client_offering(&self, expected: &str, mux: bool) -> Arc<ClientConfig> {
        let mut clients = self.clients.lock().unwrap_or_else(|e| e.into_inner());
        clients
            .entry((expected.to_string(), mux))
            .or_insert_with(|| {
                let verifier = Arc::new(SpiffeServerVerifier {
                    roots: self.roots.clone(),
                    expected: expected.to_string(),
                });
                let mut config = ClientConfig::builder_with_provider(provider())
                    .with_protocol_versions(&[&rustls::version::TLS13])
                    .expect("TLS 1.3 is supported")
                    .dangerous()
                    .with_custom_certificate_verifier(verifier)
                    .with_client_cert_resolver(Arc::new(Fixed(self.certified.clone())));
                config.alpn_protocols = match mux {
                    true => vec![crate::wire::mux::ALPN.to_vec(), b"http/1.1".to_vec()],
                    false => vec![b"http/1.1".to_vec()],
                };
                Arc::new(config)
            })
            .clone()
    }
}

impl TlsMaterial {
    /// The client configuration for the operator's config stream: its serving certificate is
    /// verified against the mesh bundle for the URL's host name, and ours is presented.
    pub fn control_plane_client(&self) -> Arc<ClientConfig> {
        let mut config = ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .expect("default versions are supported")
            .with_root_certificates(self.roots.clone())
            .with_client_cert_resolver(Arc::new(Fixed(self.certified.clone())));
        config.alpn_protocols = vec![b"h2".to_vec()];
        Arc::new(config)
    }
}

/// Always presents the same certificate.
#[derive(Debug)]
struct Fixed(Arc<CertifiedKey>);

impl rustls::server::ResolvesServerCert for Fixed {
    fn resolve(&self, _: rustls::server::ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.clone())
    }
}

impl rustls::client::ResolvesClientCert for Fixed {
    fn resolve(&self, _: &[&[u8]], _: &[SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        Some(self.0.clone())
    }
    fn has_certs(&self) -> bool {
        true
    }
}

/// The identity material in force, swapped on reload.
#[derive(Default, Debug)]
pub struct TlsStore {
    current: ArcSwapOption<TlsMaterial>,
    pub handshakes: AtomicU64,
    pub handshake_failures: AtomicU64,
    pub reloads: AtomicU64,
    pub reload_failures: AtomicU64,
}

impl TlsStore {
    pub fn current(&self) -> Option<Arc<TlsMaterial>> {
        self.current.load_full()
    }

    pub fn set(&self, material: TlsMaterial) {
        self.current.store(Some(Arc::new(material)));
        self.reloads.fetch_add(1, Ordering::Relaxed);
    }
}

/// Reloads the material whenever the files' content changes, until `shutdown`.
pub async fn watch(
    store: Arc<TlsStore>,
    cert_dir: PathBuf,
    trust_dir: Option<PathBuf>,
    shutdown: CancellationToken,
) {
    fn fingerprint(dir: &Path, trust: Option<&Path>) -> Vec<u8> {
        let mut bytes = Vec::new();
        for p in [dir.join("tls.crt"), dir.join("tls.key"), dir.join("ca.crt")]
            .into_iter()
            .chain(trust.map(|t| t.join("roots.pem")))
        {
            bytes.extend(std::fs::read(p).unwrap_or_default());
        }
        bytes
    }
    // Files are read and certificates parsed on the blocking pool, off the request path.
    let dirs = Arc::new((cert_dir, trust_dir));
    let mut last = {
        let dirs = dirs.clone();
        tokio::task::spawn_blocking(move || fingerprint(&dirs.0, dirs.1.as_deref())).await.unwrap_or_default()
    };
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
        let d = dirs.clone();
        let previous = std::mem::take(&mut last);
        let checked = tokio::task::spawn_blocking(move || {
            let now = fingerprint(&d.0, d.1.as_deref());
            let changed = (now != previous).then(|| TlsMaterial::from_dirs(&d.0, d.1.as_deref()));
            (now, changed)
        });
        let Ok((now, changed)) = checked.await else { continue };
        last = now;
        match changed {
            None => {}
            Some(Ok(m)) => {
                tracing::info!(identity = %m.identity, not_after = m.not_after, "reloaded the workload certificate");
                store.set(m);
            }
            Some(Err(e)) => {
                store.reload_failures.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(error = %e, "refusing the changed certificate files; the last good ones stay");
            }
        }
    }
}
