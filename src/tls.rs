//! TLS to masters as `sslmode` and `sslrootcert` say: rustls, set up the way
//! sqlx sets it up, for the connections mmsync opens itself (the replication
//! connection, [`crate::replication`]).

use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{CertificateError, DigitallySignedStruct, RootCertStore, SignatureScheme};
use sqlx::postgres::PgSslMode;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// A byte stream to the server: TCP, TLS over TCP, or a Unix socket.
pub(crate) trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// The connection failed: worth trying again.
    #[error("{0}")]
    Io(#[from] std::io::Error),
    /// TLS could not be set up as the url asks, or the server's certificate
    /// is not trusted; the message says what to change.
    #[error("{0}")]
    Refused(String),
}

/// Asks the server for TLS and sets it up as `sslmode` says. `root` is
/// `sslrootcert` as sqlx writes it back: `file: <path>`, or the PEM itself.
pub(crate) async fn start(
    mut tcp: tokio::net::TcpStream,
    mode: PgSslMode,
    host: &str,
    root: Option<&str>,
) -> Result<Box<dyn Io>, TlsError> {
    // SSLRequest: length 8, code 80877103.
    tcp.write_all(&[0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f]).await?;
    let mut answer = [0u8; 1];
    tcp.read_exact(&mut answer).await?;
    if answer[0] != b'S' {
        return match mode {
            PgSslMode::Allow | PgSslMode::Prefer => Ok(Box::new(tcp)),
            _ => Err(TlsError::Refused(format!(
                "the server does not accept TLS connections, and sslmode is {mode:?}; enable ssl on the server or \
                 set sslmode=prefer"
            ))),
        };
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Refused(e.to_string()))?
        .dangerous()
        .with_custom_certificate_verifier(verifier(mode, root)?)
        .with_no_client_auth();
    let name = ServerName::try_from(host.to_string()).map_err(|e| TlsError::Refused(e.to_string()))?;
    let stream = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await
        .map_err(|e| TlsError::Refused(e.to_string()))?;
    Ok(Box::new(stream))
}

/// What checks the server's certificate under `mode`, with `root` the
/// `sslrootcert` setting (see [`start`]).
pub fn verifier(mode: PgSslMode, root: Option<&str>) -> Result<Arc<dyn ServerCertVerifier>, TlsError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    // As libpq and sqlx: require (and prefer, allow) encrypts without checking
    // the certificate; verify-ca checks its chain; verify-full its name too.
    let verify = matches!(mode, PgSslMode::VerifyCa | PgSslMode::VerifyFull);
    let mut roots = RootCertStore::from_iter(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    if let (true, Some(root)) = (verify, root) {
        // sqlx writes sslrootcert back as "file: <path>", or as the PEM itself.
        let (what, pem) = match root.strip_prefix("file: ") {
            Some(path) => (
                path.to_string(),
                std::fs::read(path).map_err(|e| TlsError::Refused(format!("reading sslrootcert {path}: {e}")))?,
            ),
            None => ("sslrootcert".to_string(), root.as_bytes().to_vec()),
        };
        for cert in CertificateDer::pem_slice_iter(&pem) {
            let cert = cert.map_err(|e| TlsError::Refused(format!("sslrootcert {what}: {e}")))?;
            roots.add(cert).map_err(|e| TlsError::Refused(format!("sslrootcert {what}: {e}")))?;
        }
    }
    let webpki = rustls::client::WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider)
        .build()
        .map_err(|e| TlsError::Refused(e.to_string()))?;
    Ok(Arc::new(Relaxed { webpki, check_chain: verify, check_name: matches!(mode, PgSslMode::VerifyFull) }))
}

/// The certificate checks of each sslmode: none (require), the chain without
/// the host name (verify-ca), or both (verify-full). Signatures are always checked.
#[derive(Debug)]
struct Relaxed {
    webpki: Arc<rustls::client::WebPkiServerVerifier>,
    check_chain: bool,
    check_name: bool,
}

impl ServerCertVerifier for Relaxed {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        if !self.check_chain {
            return Ok(ServerCertVerified::assertion());
        }
        match self.webpki.verify_server_cert(end_entity, intermediates, name, ocsp, now) {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) if !self.check_name => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.webpki.verify_tls12_signature(message, cert, dss)
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.webpki.verify_tls13_signature(message, cert, dss)
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.webpki.supported_verify_schemes()
    }
}
