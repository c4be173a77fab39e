//! The mesh certificate authority as plain functions: create a root, load a CA (ours or one a
//! user provides, e.g. from cert-manager), sign SPIFFE workload certificates, and judge when a
//! certificate needs renewing. Kubernetes Secrets and ConfigMaps are the caller's business.
//!
//! Keys are ECDSA P-256. The root lives ten years; workload certificates a day by default and
//! are renewed at half-life. A trust bundle may hold several roots, so a root can be rotated
//! (add the new root, let every proxy trust both, switch the signer, remove the old) without
//! restarting anything.

use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer,
    KeyPair, KeyUsagePurpose, SanType, SerialNumber, PKCS_ECDSA_P256_SHA256,
};
use skein_api::WorkloadIdentity;
use time::OffsetDateTime;

/// Lifetime of a root the operator creates.
pub const ROOT_LIFETIME: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
/// Default lifetime of a workload certificate.
pub const WORKLOAD_LIFETIME: Duration = Duration::from_secs(24 * 3600);
/// Certificates are backdated this much, for clocks that run a little behind.
const BACKDATE: Duration = Duration::from_secs(5 * 60);

/// Why a CA could not be made or used.
#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error("CA certificate or key: {0}")]
    Pem(String),
    #[error("the CA key does not match its certificate")]
    KeyMismatch,
    #[error("the CA certificate is not a CA (basicConstraints CA:FALSE or missing)")]
    NotACa,
    #[error("signing: {0}")]
    Sign(#[from] rcgen::Error),
}

/// The CA in force, swapped when its Secret changes (root rotation needs no restart).
pub type SharedCa = std::sync::Arc<arc_swap::ArcSwap<MeshCa>>;

/// A signing CA: its key, its certificate and the chain up to a root, and the roots to trust.
pub struct MeshCa {
    issuer: Issuer<'static, KeyPair>,
    /// The signing certificate followed by any intermediates above it (PEM).
    chain_pem: String,
    /// Every root proxies trust (PEM, one or more).
    bundle_pem: String,
    /// The signing certificate itself (PEM).
    signer_pem: String,
    /// Expiry of the signing certificate.
    pub not_after: OffsetDateTime,
}

/// A CA as stored: `tls.crt` (signer, then intermediates), `tls.key`, and `ca.crt` (roots).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CaFiles {
    pub tls_crt: String,
    pub tls_key: String,
    pub ca_crt: String,
}

impl CaFiles {
    /// The CA from its stored keys (`tls.crt`, `tls.key`, and `ca.crt` if there is one), as
    /// `get` reads them from files or a Secret; `None` while the certificate or key is missing.
    pub fn read(get: impl Fn(&str) -> Option<String>) -> Option<Self> {
        Some(Self {
            tls_crt: get("tls.crt")?,
            tls_key: get("tls.key")?,
            ca_crt: get("ca.crt").unwrap_or_default(),
        })
    }
}

/// A signed workload certificate.
#[derive(Clone, Debug)]
pub struct WorkloadCert {
    /// Leaf, then intermediates (the Secret's `tls.crt`).
    pub chain_pem: String,
    pub key_pem: String,
    /// The trust bundle (the Secret's `ca.crt`).
    pub bundle_pem: String,
    pub not_before: OffsetDateTime,
    pub not_after: OffsetDateTime,
}

fn serial() -> SerialNumber {
    let mut bytes = fastrand::u128(..).to_be_bytes();
    bytes[0] &= 0x7f; // positive
    bytes[0] |= 0x01; // and never zero-length after DER trimming
    SerialNumber::from_slice(&bytes)
}

fn at(now: OffsetDateTime, plus: Duration) -> OffsetDateTime {
    now + time::Duration::try_from(plus).unwrap_or(time::Duration::MAX)
}

fn before(now: OffsetDateTime, minus: Duration) -> OffsetDateTime {
    now - time::Duration::try_from(minus).unwrap_or(time::Duration::ZERO)
}

/// Splits a PEM bundle into its certificates.
pub fn certificates(pem_text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut current = String::new();
    for line in pem_text.lines() {
        if line.starts_with("-----BEGIN CERTIFICATE-----") {
            current.clear();
        }
        current.push_str(line.trim_end());
        current.push('\n');
        if line.starts_with("-----END CERTIFICATE-----") {
            out.push(std::mem::take(&mut current));
        }
    }
    out
}

/// Validity of the first certificate in `pem_text`.
pub fn validity(pem_text: &str) -> Option<(OffsetDateTime, OffsetDateTime)> {
    let first = certificates(pem_text).into_iter().next()?;
    let (_, pem) = x509_parser::pem::parse_x509_pem(first.as_bytes()).ok()?;
    let cert = pem.parse_x509().ok()?;
    let v = cert.validity();
    Some((v.not_before.to_datetime(), v.not_after.to_datetime()))
}

/// Whether a certificate should be renewed at `now`: past half its lifetime, expired, or
/// unreadable. The lifetime runs from when it was signed: `notBefore` is [`BACKDATE`] earlier
/// (for clocks behind ours), which would otherwise put a short-lived certificate past its
/// half-life the moment it is signed, and have it signed again at every look.
pub fn needs_renewal(pem_text: &str, now: OffsetDateTime) -> bool {
    match validity(pem_text) {
        Some((from, until)) => {
            let signed = (from + BACKDATE).min(until);
            now >= signed + (until - signed) / 2
        }
        None => true,
    }
}

impl MeshCa {
    /// Creates a new self-signed root for `trust_domain`.
    pub fn generate(trust_domain: &str, now: OffsetDateTime) -> Result<(Self, CaFiles), CaError> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params.distinguished_name.push(DnType::OrganizationName, "skein");
        params.distinguished_name.push(DnType::CommonName, format!("skein mesh root ({trust_domain})"));
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(1));
        params.key_usages =
            vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
        params.not_before = before(now, BACKDATE);
        params.not_after = at(now, ROOT_LIFETIME);
        params.serial_number = Some(serial());
        let cert = params.self_signed(&key)?;
        let files = CaFiles { tls_crt: cert.pem(), tls_key: key.serialize_pem(), ca_crt: cert.pem() };
        let ca = Self::load(&files)?;
        Ok((ca, files))
    }

    /// Loads a CA from its stored form. `ca_crt` may hold several roots (during a rotation);
    /// when it is empty the last certificate of `tls_crt` is taken as the root.
    pub fn load(files: &CaFiles) -> Result<Self, CaError> {
        let chain = certificates(&files.tls_crt);
        let signer = chain.first().ok_or_else(|| CaError::Pem("tls.crt holds no certificate".into()))?;
        let key = KeyPair::from_pem(&files.tls_key).map_err(|e| CaError::Pem(format!("tls.key: {e}")))?;
        let (_, pem) = x509_parser::pem::parse_x509_pem(signer.as_bytes())
            .map_err(|e| CaError::Pem(format!("tls.crt: {e}")))?;
        let parsed = pem.parse_x509().map_err(|e| CaError::Pem(format!("tls.crt: {e}")))?;
        if !parsed.is_ca() {
            return Err(CaError::NotACa);
        }
        if parsed.public_key().subject_public_key.data.as_ref() != key.public_key_raw() {
            return Err(CaError::KeyMismatch);
        }
        let not_after = parsed.validity().not_after.to_datetime();
        let issuer =
            Issuer::from_ca_cert_pem(signer, key).map_err(|e| CaError::Pem(format!("tls.crt: {e}")))?;
        let bundle = if certificates(&files.ca_crt).is_empty() {
            chain.last().cloned().unwrap_or_default()
        } else {
            files.ca_crt.clone()
        };
        // The chain a leaf carries: the signer and any intermediates, never a self-signed root
        // (clients have the roots already).
        let chain_pem: String = chain.iter().filter(|c| !is_self_signed(c)).cloned().collect();
        Ok(Self { issuer, chain_pem, bundle_pem: bundle, signer_pem: signer.clone(), not_after })
    }

    /// The signing certificate (changes when the signer is switched).
    pub fn signer(&self) -> &str {
        &self.signer_pem
    }

    /// The roots proxies trust.
    pub fn trust_bundle(&self) -> &str {
        &self.bundle_pem
    }

    /// Adds roots to the trust bundle (a root rotation's first step) without changing the signer.
    pub fn trust_also(&mut self, roots_pem: &str) {
        for root in certificates(roots_pem) {
            if !certificates(&self.bundle_pem).contains(&root) {
                self.bundle_pem.push_str(&root);
            }
        }
    }

    /// Signs a workload certificate for `identity`: URI SAN `spiffe://<trust-domain>/ns/<ns>/sa/<sa>`,
    /// usable as TLS client and server.
    pub fn sign_workload(
        &self,
        identity: &WorkloadIdentity,
        trust_domain: &str,
        lifetime: Duration,
        now: OffsetDateTime,
    ) -> Result<WorkloadCert, CaError> {
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, trust_domain);
        let uri = identity.spiffe_id(trust_domain);
        let sans = vec![SanType::URI(uri.as_str().try_into()?)];
        let usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
        self.sign_leaf(dn, sans, usages, lifetime, now)
    }

    /// Signs a fresh P-256 leaf: never a CA, backdated a little, never outliving its signer,
    /// with the signer's chain attached.
    fn sign_leaf(
        &self,
        dn: DistinguishedName,
        sans: Vec<SanType>,
        usages: Vec<ExtendedKeyUsagePurpose>,
        lifetime: Duration,
        now: OffsetDateTime,
    ) -> Result<WorkloadCert, CaError> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let mut params = CertificateParams::default();
        params.distinguished_name = dn;
        params.subject_alt_names = sans;
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
        params.extended_key_usages = usages;
        params.use_authority_key_identifier_extension = true;
        params.not_before = before(now, BACKDATE);
        params.not_after = at(now, lifetime).min(self.not_after);
        params.serial_number = Some(serial());
        let (not_before, not_after) = (params.not_before, params.not_after);
        let leaf = params.signed_by(&key, &self.issuer)?;
        let mut chain_pem = leaf.pem();
        chain_pem.push_str(&self.chain_pem);
        Ok(WorkloadCert {
            chain_pem,
            key_pem: key.serialize_pem(),
            bundle_pem: self.bundle_pem.clone(),
            not_before,
            not_after,
        })
    }
}

impl MeshCa {
    /// Signs a TLS server certificate (the webhook's) for DNS names and IP addresses.
    pub fn sign_serving(
        &self,
        dns: &[String],
        ips: &[std::net::IpAddr],
        lifetime: Duration,
        now: OffsetDateTime,
    ) -> Result<WorkloadCert, CaError> {
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, dns.first().cloned().unwrap_or_else(|| "skein-webhook".into()));
        let sans = dns
            .iter()
            .map(|d| Ok(SanType::DnsName(d.as_str().try_into()?)))
            .chain(ips.iter().map(|ip| Ok(SanType::IpAddress(*ip))))
            .collect::<Result<_, rcgen::Error>>()?;
        self.sign_leaf(dn, sans, vec![ExtendedKeyUsagePurpose::ServerAuth], lifetime, now)
    }
}

fn is_self_signed(pem_text: &str) -> bool {
    x509_parser::pem::parse_x509_pem(pem_text.as_bytes())
        .ok()
        .and_then(|(_, p)| p.parse_x509().ok().map(|c| c.subject() == c.issuer()))
        .unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    fn now() -> OffsetDateTime {
        OffsetDateTime::now_utc()
    }

    fn openssl(args: &[&str]) -> (bool, String) {
        let out = Command::new("openssl").args(args).output().expect("openssl is installed");
        (
            out.status.success(),
            format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)),
        )
    }

    fn write(dir: &std::path::Path, name: &str, text: &str) -> String {
        let p = dir.join(name);
        std::fs::write(&p, text).unwrap();
        p.display().to_string()
    }

    fn temp() -> std::path::PathBuf {
        let d =
            std::env::temp_dir().join(format!("skein-ca-{}-{:08x}", std::process::id(), fastrand::u32(..)));
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn openssl_verifies_a_workload_chain_and_shows_the_spiffe_id() {
        let (ca, files) = MeshCa::generate("cluster.local", now()).unwrap();
        let cert = ca
            .sign_workload(
                &WorkloadIdentity::new("shop", "reviews"),
                "cluster.local",
                WORKLOAD_LIFETIME,
                now(),
            )
            .unwrap();
        let dir = temp();
        let root = write(&dir, "root.pem", &files.ca_crt);
        let leaf = write(&dir, "leaf.pem", &cert.chain_pem);
        let (ok, text) = openssl(&["verify", "-CAfile", &root, "-purpose", "sslclient", &leaf]);
        assert!(ok && text.contains("OK"), "{text}");
        let (_, text) = openssl(&["x509", "-in", &leaf, "-noout", "-text"]);
        assert!(text.contains("URI:spiffe://cluster.local/ns/shop/sa/reviews"), "{text}");
        assert!(text.contains("ASN1 OID: prime256v1"), "{text}");
        assert!(
            text.contains("TLS Web Client Authentication") && text.contains("TLS Web Server Authentication")
        );
        let lifetime = cert.not_after - cert.not_before;
        assert!(lifetime >= time::Duration::hours(24) && lifetime <= time::Duration::hours(25), "{lifetime}");
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn a_user_provided_intermediate_signs_with_the_chain_attached() {
        // A root and an intermediate made elsewhere (as cert-manager would hand them over).
        let (root, root_files) = MeshCa::generate("cluster.local", now()).unwrap();
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        let mut params = CertificateParams::default();
        params.distinguished_name.push(DnType::CommonName, "intermediate");
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let inter = params.signed_by(&key, &root.issuer).unwrap();
        let files = CaFiles {
            tls_crt: format!("{}{}", inter.pem(), root_files.tls_crt),
            tls_key: key.serialize_pem(),
            ca_crt: root_files.ca_crt.clone(),
        };
        let ca = MeshCa::load(&files).unwrap();
        let cert = ca
            .sign_workload(&WorkloadIdentity::new("a", "b"), "cluster.local", WORKLOAD_LIFETIME, now())
            .unwrap();
        assert_eq!(certificates(&cert.chain_pem).len(), 2, "leaf and intermediate, not the root");
        let dir = temp();
        let rootf = write(&dir, "root.pem", &root_files.ca_crt);
        let chain = certificates(&cert.chain_pem);
        let untrusted = write(&dir, "inter.pem", &chain[1]);
        let leaf = write(&dir, "leaf.pem", &chain[0]);
        let (ok, text) = openssl(&["verify", "-CAfile", &rootf, "-untrusted", &untrusted, &leaf]);
        assert!(ok, "{text}");
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn bad_ca_material_is_refused_with_a_reason() {
        let (_, files) = MeshCa::generate("cluster.local", now()).unwrap();
        let (_, other) = MeshCa::generate("cluster.local", now()).unwrap();
        let mismatched = CaFiles { tls_key: other.tls_key.clone(), ..files.clone() };
        assert!(matches!(MeshCa::load(&mismatched), Err(CaError::KeyMismatch)));
        let garbage = CaFiles { tls_crt: "not pem".into(), ..files.clone() };
        assert!(matches!(MeshCa::load(&garbage), Err(CaError::Pem(_))));
        // A leaf is not a CA.
        let ca = MeshCa::load(&files).unwrap();
        let leaf = ca
            .sign_workload(&WorkloadIdentity::new("a", "b"), "cluster.local", WORKLOAD_LIFETIME, now())
            .unwrap();
        let not_ca = CaFiles { tls_crt: leaf.chain_pem, tls_key: leaf.key_pem, ca_crt: files.ca_crt };
        assert!(matches!(MeshCa::load(&not_ca), Err(CaError::NotACa)));
    }

    #[test]
    fn renewal_starts_at_half_life() {
        let (ca, _) = MeshCa::generate("cluster.local", now()).unwrap();
        let cert = ca
            .sign_workload(
                &WorkloadIdentity::new("a", "b"),
                "cluster.local",
                Duration::from_secs(3600),
                now(),
            )
            .unwrap();
        assert!(!needs_renewal(&cert.chain_pem, now()));
        assert!(!needs_renewal(&cert.chain_pem, now() + time::Duration::minutes(20)));
        assert!(needs_renewal(&cert.chain_pem, now() + time::Duration::minutes(40)));
        assert!(needs_renewal("garbage", now()));
        // A lifetime shorter than the backdating still renews at its own half-life.
        let short = ca
            .sign_workload(&WorkloadIdentity::new("a", "b"), "cluster.local", Duration::from_secs(120), now())
            .unwrap();
        assert!(!needs_renewal(&short.chain_pem, now()));
        assert!(!needs_renewal(&short.chain_pem, now() + time::Duration::seconds(59)));
        assert!(needs_renewal(&short.chain_pem, now() + time::Duration::seconds(61)));
    }

    #[test]
    fn a_bundle_can_hold_two_roots_during_a_rotation() {
        let (mut old, old_files) = MeshCa::generate("cluster.local", now()).unwrap();
        let (new, new_files) = MeshCa::generate("cluster.local", now()).unwrap();
        old.trust_also(&new_files.ca_crt);
        assert_eq!(certificates(old.trust_bundle()).len(), 2);
        // Leaves of either signer verify against the combined bundle.
        let dir = temp();
        let bundle = write(&dir, "bundle.pem", old.trust_bundle());
        for (i, ca) in [&old, &new].into_iter().enumerate() {
            let leaf = ca
                .sign_workload(&WorkloadIdentity::new("a", "b"), "cluster.local", WORKLOAD_LIFETIME, now())
                .unwrap();
            let path = write(&dir, &format!("leaf{i}.pem"), &leaf.chain_pem);
            let (ok, text) = openssl(&["verify", "-CAfile", &bundle, &path]);
            assert!(ok, "{text}");
        }
        assert_ne!(old_files.ca_crt, new_files.ca_crt);
        let _ = std::fs::remove_dir_all(dir);
    }
}
