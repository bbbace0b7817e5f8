//! TLS for QUIC: mutual TLS 1.3 with raw Ed25519 public keys (RFC 7250) instead of X.509
//! certificates. The key *is* the identity: the client pins the server to the NodeId it dialed
//! (carried in the SNI as `<nodeid>.tandem`), and the server learns the client's NodeId from its
//! key and checks membership before serving it. ring is the only crypto provider.

use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{WebPkiSupportedAlgorithms, verify_tls13_signature_with_raw_key};
use rustls::pki_types::{
    CertificateDer, PrivatePkcs8KeyDer, ServerName, SubjectPublicKeyInfoDer, UnixTime,
};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{DigitallySignedStruct, DistinguishedName, SignatureScheme};
use tandem_crdt::NodeId;

use crate::Identity;

/// ALPN for members: the sync protocol.
pub const ALPN_SYNC: &[u8] = b"tandem/5";
/// ALPN for the join handshake: the only thing a non-member may speak.
pub const ALPN_JOIN: &[u8] = b"tandem-join/5";

/// DER prefix of an Ed25519 SubjectPublicKeyInfo; the 32-byte key follows.
const ED25519_SPKI_PREFIX: [u8; 12] = [
    0x30, 0x2a, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x03, 0x21, 0x00,
];

/// Errors building TLS configuration.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("tls: {0}")]
    Rustls(#[from] rustls::Error),
    #[error("quic crypto: {0}")]
    Quic(String),
}

/// The NodeId in an Ed25519 SPKI, or `None` if it is anything else.
pub fn node_id_from_spki(spki: &[u8]) -> Option<NodeId> {
    let key = spki.strip_prefix(&ED25519_SPKI_PREFIX[..])?;
    let key: [u8; 32] = key.try_into().ok()?;
    Some(NodeId::from_bytes(key))
}

fn spki_of(id: &NodeId) -> Vec<u8> {
    let mut v = ED25519_SPKI_PREFIX.to_vec();
    v.extend_from_slice(id.as_bytes());
    v
}

/// The server name a client uses to dial `id`.
pub fn server_name(id: &NodeId) -> String {
    format!("{id}.tandem")
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn algorithms() -> WebPkiSupportedAlgorithms {
    rustls::crypto::ring::default_provider().signature_verification_algorithms
}

fn certified_key(identity: &Identity) -> Result<Arc<rustls::sign::CertifiedKey>, TlsError> {
    let der = PrivatePkcs8KeyDer::from(identity.pkcs8().to_vec());
    let key = rustls::crypto::ring::sign::any_eddsa_type(&der)?;
    let spki = CertificateDer::from(spki_of(&identity.id()));
    Ok(Arc::new(rustls::sign::CertifiedKey::new(vec![spki], key)))
}

fn verify_signature(
    message: &[u8],
    cert: &CertificateDer<'_>,
    dss: &DigitallySignedStruct,
    algs: &WebPkiSupportedAlgorithms,
) -> Result<HandshakeSignatureValid, rustls::Error> {
    if node_id_from_spki(cert.as_ref()).is_none() {
        return Err(rustls::Error::InvalidCertificate(
            rustls::CertificateError::BadEncoding,
        ));
    }
    verify_tls13_signature_with_raw_key(
        message,
        &SubjectPublicKeyInfoDer::from(cert.as_ref()),
        dss,
        algs,
    )
}

/// Client side: the server must present exactly the key named in the SNI.
#[derive(Debug)]
struct PinnedServer {
    algs: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for PinnedServer {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let presented = node_id_from_spki(end_entity.as_ref()).ok_or(
            rustls::Error::InvalidCertificate(rustls::CertificateError::BadEncoding),
        )?;
        let ServerName::DnsName(name) = server_name else {
            return Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::NotValidForName,
            ));
        };
        let expected = name
            .as_ref()
            .strip_suffix(".tandem")
            .and_then(|s| s.parse::<NodeId>().ok())
            .ok_or(rustls::Error::InvalidCertificate(
                rustls::CertificateError::NotValidForName,
            ))?;
        if presented != expected {
            return Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::NotValidForName,
            ));
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::PeerIncompatible(
            rustls::PeerIncompatible::Tls12NotOffered,
        ))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_signature(message, cert, dss, &self.algs)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        vec![SignatureScheme::ED25519]
    }

    fn requires_raw_public_keys(&self) -> bool {
        true
    }
}

/// Server side: any Ed25519 key proves an identity; whether that identity may do anything is
/// decided by membership once the handshake names it.
#[derive(Debug)]
struct AnyEd25519Client {
    algs: WebPkiSupportedAlgorithms,
}

impl ClientCertVerifier for AnyEd25519Client {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        node_id_from_spki(end_entity.as_ref())
            .map(|_| ClientCertVerified::assertion())
            .ok_or(rustls::Error::InvalidCertificate(
                rustls::CertificateError::BadEncoding,
            ))
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::PeerIncompatible(
            rustls::PeerIncompatible::Tls12NotOffered,
        ))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_signature(message, cert, dss, &self.algs)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        vec![SignatureScheme::ED25519]
    }

    fn requires_raw_public_keys(&self) -> bool {
        true
    }
}

/// The QUIC server config: both ALPNs, client keys required.
pub fn server_config(identity: &Identity) -> Result<quinn::ServerConfig, TlsError> {
    let mut tls = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(Arc::new(AnyEd25519Client { algs: algorithms() }))
        .with_cert_resolver(Arc::new(
            rustls::server::AlwaysResolvesServerRawPublicKeys::new(certified_key(identity)?),
        ));
    tls.alpn_protocols = vec![ALPN_SYNC.to_vec(), ALPN_JOIN.to_vec()];
    let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(tls)
        .map_err(|e| TlsError::Quic(e.to_string()))?;
    Ok(quinn::ServerConfig::with_crypto(Arc::new(crypto)))
}

/// A QUIC client config speaking `alpn`, presenting our key, pinning the server's.
pub fn client_config(identity: &Identity, alpn: &[u8]) -> Result<quinn::ClientConfig, TlsError> {
    let mut tls = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(PinnedServer { algs: algorithms() }))
        .with_client_cert_resolver(Arc::new(
            rustls::client::AlwaysResolvesClientRawPublicKeys::new(certified_key(identity)?),
        ));
    tls.alpn_protocols = vec![alpn.to_vec()];
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls)
        .map_err(|e| TlsError::Quic(e.to_string()))?;
    Ok(quinn::ClientConfig::new(Arc::new(crypto)))
}

/// The NodeId a connection's peer proved in the handshake.
pub fn peer_id(conn: &quinn::Connection) -> Option<NodeId> {
    let certs = conn
        .peer_identity()?
        .downcast::<Vec<CertificateDer<'static>>>()
        .ok()?;
    node_id_from_spki(certs.first()?.as_ref())
}

/// The ALPN a connection negotiated.
pub fn alpn(conn: &quinn::Connection) -> Option<Vec<u8>> {
    conn.handshake_data()?
        .downcast::<quinn::crypto::rustls::HandshakeData>()
        .ok()?
        .protocol
}

#[cfg(test)]
mod alpn_tests {
    /// The ALPNs name the wire protocol this build speaks, so an older peer is refused at the
    /// handshake instead of at its first message.
    #[test]
    fn alpn_names_the_protocol_version() {
        let v = tandem_crdt::proto::PROTOCOL_VERSION;
        assert_eq!(super::ALPN_SYNC, format!("tandem/{v}").as_bytes());
        assert_eq!(super::ALPN_JOIN, format!("tandem-join/{v}").as_bytes());
    }
}
