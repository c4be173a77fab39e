//! Mutual TLS between sidecars on loopback, with certificates minted here: a valid peer is
//! accepted; a wrong trust domain, an unexpected identity, an expired certificate, a foreign CA
//! and a plaintext client are each refused with a reason.

use std::sync::Arc;

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};
use skein_proxy::tls::TlsMaterial;
use time::{Duration, OffsetDateTime};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

struct Ca {
    issuer: Issuer<'static, KeyPair>,
    pem: String,
}

fn ca(name: &str) -> Ca {
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut params = CertificateParams::default();
    params.distinguished_name.push(DnType::CommonName, name);
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::DigitalSignature];
    let cert = params.self_signed(&key).unwrap();
    Ca { pem: cert.pem(), issuer: Issuer::new(params, key) }
}

/// A workload certificate for `uri`, valid from `from` to `until`; returns (chain, key).
fn leaf(ca: &Ca, uri: &str, from: OffsetDateTime, until: OffsetDateTime) -> (String, String) {
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut params = CertificateParams::default();
    params.subject_alt_names = vec![SanType::URI(uri.try_into().unwrap())];
    params.extended_key_usages =
        vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.not_before = from;
    params.not_after = until;
    let cert = params.signed_by(&key, &ca.issuer).unwrap();
    (cert.pem(), key.serialize_pem())
}

fn material(ca: &Ca, bundle: &str, uri: &str, from: OffsetDateTime, until: OffsetDateTime) -> TlsMaterial {
    let (chain, key) = leaf(ca, uri, from, until);
    TlsMaterial::from_pem(chain.as_bytes(), key.as_bytes(), bundle.as_bytes()).unwrap()
}

fn now() -> OffsetDateTime {
    OffsetDateTime::now_utc()
}

const SERVER: &str = "spiffe://cluster.local/ns/shop/sa/reviews";
const CLIENT: &str = "spiffe://cluster.local/ns/shop/sa/productpage";

/// Runs one handshake: the server (inbound side) with `server`, the client with `client`
/// expecting `expected`. Returns the negotiated ALPN or the error each side saw.
async fn handshake(server: TlsMaterial, client: TlsMaterial, expected: &str) -> Result<String, String> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(server.server.clone());
    let server_side = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        match acceptor.accept(tcp).await {
            Ok(mut tls) => {
                let mut buf = [0u8; 4];
                tls.read_exact(&mut buf).await.map_err(|e| format!("server read: {e}"))?;
                tls.write_all(&buf).await.map_err(|e| e.to_string())?;
                Ok(())
            }
            Err(e) => Err(format!("server refused: {e}")),
        }
    });
    let connector = tokio_rustls::TlsConnector::from(client.client_for(expected));
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("peer.skein.invalid").unwrap();
    let client_result = async {
        let mut tls = connector.connect(name, tcp).await.map_err(|e| format!("client refused: {e}"))?;
        tls.write_all(b"ping").await.map_err(|e| format!("client write: {e}"))?;
        let mut buf = [0u8; 4];
        tls.read_exact(&mut buf).await.map_err(|e| format!("client read: {e}"))?;
        let alpn = tls
            .get_ref()
            .1
            .alpn_protocol()
            .map(|p| String::from_utf8_lossy(p).into_owned())
            .unwrap_or_default();
        Ok::<_, String>(alpn)
    }
    .await;
    let server_result = server_side.await.unwrap();
    match (client_result, server_result) {
        (Ok(alpn), Ok(())) => Ok(alpn),
        (Err(c), Err(s)) => Err(format!("{c}; {s}")),
        (Err(c), Ok(())) => Err(c),
        (Ok(_), Err(s)) => Err(s),
    }
}

#[tokio::test]
async fn a_mesh_peer_is_accepted_both_ways_and_h2_is_negotiated() {
    let root = ca("root");
    let s = material(&root, &root.pem, SERVER, now() - Duration::minutes(5), now() + Duration::hours(24));
    let c = material(&root, &root.pem, CLIENT, now() - Duration::minutes(5), now() + Duration::hours(24));
    assert_eq!(s.identity, SERVER);
    assert_eq!(handshake(s, c, SERVER).await, Ok("h2".to_string()));
}

#[tokio::test]
async fn a_client_from_another_trust_domain_is_refused() {
    let root = ca("root");
    let s = material(&root, &root.pem, SERVER, now() - Duration::minutes(5), now() + Duration::hours(24));
    let c = material(
        &root,
        &root.pem,
        "spiffe://evil.example/ns/x/sa/y",
        now() - Duration::minutes(5),
        now() + Duration::hours(24),
    );
    let err = handshake(s, c, SERVER).await.unwrap_err();
    assert!(err.contains("not in trust domain cluster.local"), "{err}");
}

#[tokio::test]
async fn a_server_with_the_wrong_identity_is_refused() {
    let root = ca("root");
    let s = material(
        &root,
        &root.pem,
        "spiffe://cluster.local/ns/shop/sa/impostor",
        now() - Duration::minutes(5),
        now() + Duration::hours(24),
    );
    let c = material(&root, &root.pem, CLIENT, now() - Duration::minutes(5), now() + Duration::hours(24));
    let err = handshake(s, c, SERVER).await.unwrap_err();
    assert!(err.contains("is not the expected spiffe://cluster.local/ns/shop/sa/reviews"), "{err}");
}

#[tokio::test]
async fn an_expired_certificate_is_refused() {
    let root = ca("root");
    let s = material(&root, &root.pem, SERVER, now() - Duration::minutes(5), now() + Duration::hours(24));
    let c = material(&root, &root.pem, CLIENT, now() - Duration::hours(48), now() - Duration::hours(24));
    let err = handshake(s, c, SERVER).await.unwrap_err();
    assert!(err.to_lowercase().contains("expired"), "{err}");
}

#[tokio::test]
async fn a_certificate_from_a_foreign_ca_is_refused() {
    let (root, foreign) = (ca("root"), ca("foreign"));
    let s = material(&root, &root.pem, SERVER, now() - Duration::minutes(5), now() + Duration::hours(24));
    let c = material(&foreign, &root.pem, CLIENT, now() - Duration::minutes(5), now() + Duration::hours(24));
    let err = handshake(s, c, SERVER).await.unwrap_err();
    assert!(err.to_lowercase().contains("unknown") || err.to_lowercase().contains("issuer"), "{err}");
}

#[tokio::test]
async fn a_bundle_with_two_roots_accepts_both_during_a_rotation() {
    let (old, new) = (ca("old"), ca("new"));
    let bundle = format!("{}{}", old.pem, new.pem);
    let s = material(&old, &bundle, SERVER, now() - Duration::minutes(5), now() + Duration::hours(24));
    let c = material(&new, &bundle, CLIENT, now() - Duration::minutes(5), now() + Duration::hours(24));
    assert_eq!(handshake(s, c, SERVER).await, Ok("h2".to_string()));
}

#[tokio::test]
async fn a_plaintext_client_is_refused() {
    let root = ca("root");
    let s = material(&root, &root.pem, SERVER, now() - Duration::minutes(5), now() + Duration::hours(24));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::clone(&s.server));
    let server = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        acceptor.accept(tcp).await.map(drop).map_err(|e| e.to_string())
    });
    let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    tcp.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
    let err = server.await.unwrap().unwrap_err();
    assert!(!err.is_empty(), "refused: {err}");
}

#[test]
fn bad_material_is_refused_with_a_reason() {
    let root = ca("root");
    let (chain, key) = leaf(&root, SERVER, now(), now() + Duration::hours(1));
    let (_, other_key) = leaf(&root, SERVER, now(), now() + Duration::hours(1));
    assert!(
        TlsMaterial::from_pem(chain.as_bytes(), other_key.as_bytes(), root.pem.as_bytes()).is_err(),
        "key mismatch"
    );
    assert!(TlsMaterial::from_pem(chain.as_bytes(), key.as_bytes(), b"")
        .unwrap_err()
        .contains("trust bundle"));
    assert!(TlsMaterial::from_pem(b"", key.as_bytes(), root.pem.as_bytes())
        .unwrap_err()
        .contains("no certificate"));
}
