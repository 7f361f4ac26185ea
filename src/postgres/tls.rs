//! TLS to masters, for both kinds of connection mmsync opens: the replication
//! connection ([`crate::postgres::replication`]), and the sqlx connections
//! ([`crate::postgres::db`]) with `sslmode=verify-ca` or `verify-full`.
//!
//! A master's URL is a libpq URL, so its TLS settings mean what they mean to
//! libpq. `require` (and `prefer`, `allow`) encrypts and checks nothing;
//! `verify-ca` checks that a trusted CA signed the server's certificate;
//! `verify-full` checks its host name too. Trusted is:
//! - with `sslrootcert=<file>`, the certificates in that file, and nothing else;
//! - with `sslrootcert=system`, the machine's CA store (OpenSSL's files, as
//!   libpq reads them), with `verify-full` only: the store holds every public
//!   CA, and below verify-full any certificate one of them issued, for any
//!   name, would pass ([`crate::postgres::db::options`] refuses the URL);
//! - without `sslrootcert`, `~/.postgresql/root.crt`; when that file is
//!   missing, verify-ca and verify-full are refused with an error naming it.
//!
//! Why sqlx does not do TLS itself in the verifying modes: sqlx 0.8
//! (`sqlx-core`'s `net/tls/tls_rustls.rs`) always starts its root store from
//! the public web roots (webpki-roots) and adds `sslrootcert` to them. With
//! verify-ca, which ignores the name, any certificate from any public CA for
//! any name passes; with verify-full, one from any public CA for the master's
//! name. sqlx takes no root store or verifier from its caller. (Its verify-ca
//! also refuses the name mismatch it means to allow, under the rustls we
//! build with.) A preliminary check, one connection checked by mmsync before
//! sqlx opens its own, would not hold: an attacker on the path lets the first
//! through to the real server and answers the second. So mmsync opens the
//! TLS connection itself, checks the certificate with [`verifier`], and sqlx
//! speaks the PostgreSQL protocol through that connection (see
//! [`crate::postgres::db`]): the connection sqlx authenticates on is the very one whose
//! certificate was checked.

use std::path::PathBuf;
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{CertificateError, DigitallySignedStruct, RootCertStore, SignatureScheme};
use sqlx::postgres::{PgConnectOptions, PgSslMode};
use sqlx::ConnectOptions as _;
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

/// `sslmode` as a url writes it.
pub fn sslmode_name(mode: PgSslMode) -> &'static str {
    match mode {
        PgSslMode::Disable => "disable",
        PgSslMode::Allow => "allow",
        PgSslMode::Prefer => "prefer",
        PgSslMode::Require => "require",
        PgSslMode::VerifyCa => "verify-ca",
        PgSslMode::VerifyFull => "verify-full",
    }
}

/// Whether `host`, as a url writes it, is this machine's loopback interface:
/// `localhost`, 127.0.0.0/8 or ::1. Names are not resolved (a resolver can be
/// lied to): a name that happens to resolve to loopback counts as a network host.
pub fn is_loopback(host: &str) -> bool {
    let host = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')).unwrap_or(host);
    host.eq_ignore_ascii_case("localhost")
        || host.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.to_canonical().is_loopback())
}

/// Opens a TCP connection to the master of `options` and sets TLS up on it
/// as its `sslmode` says. Returns the stream and whether it is encrypted
/// (`prefer` and `allow` go on in plain when the server has no TLS).
pub(crate) async fn connect(options: &PgConnectOptions) -> Result<(Box<dyn Io>, bool), TlsError> {
    let mode = options.get_ssl_mode();
    let url = options.to_url_lossy();
    let setting = |name: &str| url.query_pairs().find(|(k, _)| k == name).map(|(_, v)| v.into_owned());
    // Whom to trust and what to show are settled before anything goes on the network.
    let config = match mode {
        PgSslMode::Disable => None,
        _ => Some(client_config(mode, setting("sslrootcert"), setting("sslcert"), setting("sslkey"))?),
    };
    let mut tcp = tokio::net::TcpStream::connect((options.get_host(), options.get_port())).await?;
    tcp.set_nodelay(true)?;
    let Some(config) = config else { return Ok((Box::new(tcp), false)) };
    // SSLRequest: length 8, code 80877103.
    tcp.write_all(&[0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f]).await?;
    let mut answer = [0u8; 1];
    tcp.read_exact(&mut answer).await?;
    if answer[0] != b'S' {
        return match mode {
            PgSslMode::Allow | PgSslMode::Prefer => Ok((Box::new(tcp), false)),
            _ => Err(TlsError::Refused(format!(
                "the server does not accept TLS connections, and sslmode is {}; turn ssl on in the server, or \
                 write sslmode=disable in the url if the network to it is trusted",
                sslmode_name(mode)
            ))),
        };
    }
    let name = ServerName::try_from(options.get_host().to_string()).map_err(|e| TlsError::Refused(e.to_string()))?;
    let stream = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await
        .map_err(|e| TlsError::Refused(e.to_string()))?;
    Ok((Box::new(stream), true))
}

fn client_config(
    mode: PgSslMode,
    root: Option<String>,
    cert: Option<String>,
    key: Option<String>,
) -> Result<rustls::ClientConfig, TlsError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Refused(e.to_string()))?
        .dangerous()
        .with_custom_certificate_verifier(verifier(mode, root.as_deref())?);
    let refused = |what: &str, e: &dyn std::fmt::Display| TlsError::Refused(format!("{what}: {e}"));
    match (cert, key) {
        (None, None) => Ok(builder.with_no_client_auth()),
        (Some(cert), Some(key)) => {
            let (what, pem) = read_setting("sslcert", &cert)?;
            let chain =
                CertificateDer::pem_slice_iter(&pem).collect::<Result<Vec<_>, _>>().map_err(|e| refused(&what, &e))?;
            let (what, pem) = read_setting("sslkey", &key)?;
            let key = PrivateKeyDer::from_pem_slice(&pem).map_err(|e| refused(&what, &e))?;
            builder.with_client_auth_cert(chain, key).map_err(|e| refused("sslcert and sslkey", &e))
        }
        _ => Err(TlsError::Refused("sslcert and sslkey go together; give both or neither".into())),
    }
}

/// A certificate or key setting as sqlx writes it back into a url
/// (`file: <path>`, or the PEM itself), or as a url writes it (a path):
/// what to call it in a message, and its PEM.
fn read_setting(name: &str, value: &str) -> Result<(String, Vec<u8>), TlsError> {
    if value.starts_with("-----BEGIN") {
        return Ok((name.to_string(), value.as_bytes().to_vec()));
    }
    let path = value.strip_prefix("file: ").unwrap_or(value);
    let pem = std::fs::read(path).map_err(|e| TlsError::Refused(format!("reading {name} {path}: {e}")))?;
    Ok((format!("{name} {path}"), pem))
}

/// What checks the server's certificate under `mode`, with `root` the
/// `sslrootcert` setting (see [`read_setting`] for its forms; `system` is the
/// machine's store). The rules are in the module doc.
pub fn verifier(mode: PgSslMode, root: Option<&str>) -> Result<Arc<dyn ServerCertVerifier>, TlsError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let chain = match mode {
        PgSslMode::VerifyCa | PgSslMode::VerifyFull => Some(
            WebPkiServerVerifier::builder_with_provider(Arc::new(trusted(mode, root)?), provider.clone())
                .build()
                .map_err(|e| TlsError::Refused(e.to_string()))?,
        ),
        _ => None,
    };
    Ok(Arc::new(Verifier { chain, check_name: matches!(mode, PgSslMode::VerifyFull), provider }))
}

/// The roots verify-ca and verify-full trust: `sslrootcert`'s alone.
fn trusted(mode: PgSslMode, root: Option<&str>) -> Result<RootCertStore, TlsError> {
    let (what, pem) = match root {
        Some("system" | "file: system") => return system_roots(mode),
        Some(root) => read_setting("sslrootcert", root)?,
        None => {
            let path = default_root_file();
            match std::fs::read(&path) {
                Ok(pem) => (path.display().to_string(), pem),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    return Err(TlsError::Refused(format!(
                        "sslmode={} needs the certificate of the CA that signed the server's certificate, and \
                         there is none: the url has no sslrootcert and {} does not exist; set \
                         sslrootcert=/path/to/ca.crt in the url (or sslrootcert=system, with verify-full, to trust \
                         this machine's CA store), or use sslmode=require to encrypt without checking the server",
                        sslmode_name(mode),
                        path.display()
                    )))
                }
                Err(e) => return Err(TlsError::Refused(format!("reading {}: {e}", path.display()))),
            }
        }
    };
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(&pem) {
        let cert = cert.map_err(|e| TlsError::Refused(format!("{what}: {e}")))?;
        roots.add(cert).map_err(|e| TlsError::Refused(format!("{what}: {e}")))?;
    }
    if roots.is_empty() {
        return Err(TlsError::Refused(format!("{what} holds no certificate; it must hold the CA's, in PEM")));
    }
    Ok(roots)
}

/// libpq's root file when the url has no sslrootcert.
fn default_root_file() -> PathBuf {
    std::env::home_dir().unwrap_or_default().join(".postgresql/root.crt")
}

fn system_roots(mode: PgSslMode) -> Result<RootCertStore, TlsError> {
    if !matches!(mode, PgSslMode::VerifyFull) {
        return Err(TlsError::Refused(format!(
            "sslrootcert=system trusts every public CA, and sslmode={} does not check the name, so any certificate \
             one of them issued would pass; use sslmode=verify-full",
            sslmode_name(mode)
        )));
    }
    let found = rustls_native_certs::load_native_certs();
    let mut roots = RootCertStore::empty();
    let (_added, _unusable) = roots.add_parsable_certificates(found.certs);
    if roots.is_empty() {
        let errors: Vec<String> = found.errors.iter().map(|e| e.to_string()).collect();
        return Err(TlsError::Refused(format!(
            "sslrootcert=system, and this machine's CA store has no certificate ({}); install the ca-certificates \
             package, or set SSL_CERT_FILE, or give sslrootcert a file",
            errors.join("; ")
        )));
    }
    Ok(roots)
}

/// The certificate checks of each sslmode: none (require, prefer, allow),
/// the chain without the host name (verify-ca), or both (verify-full). The
/// handshake's signatures are always checked.
#[derive(Debug)]
struct Verifier {
    /// The chain to a trusted root; `None` when nothing is checked.
    chain: Option<Arc<WebPkiServerVerifier>>,
    check_name: bool,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for Verifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let Some(chain) = &self.chain else { return Ok(ServerCertVerified::assertion()) };
        match chain.verify_server_cert(end_entity, intermediates, name, ocsp, now) {
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
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider.signature_verification_algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_is_localhost_127_and_colon_colon_1_and_nothing_else() {
        for host in ["localhost", "LOCALHOST", "127.0.0.1", "127.1.2.3", "::1", "[::1]", "::ffff:127.0.0.1"] {
            assert!(is_loopback(host), "{host}");
        }
        for host in ["db.example.com", "10.0.0.5", "192.0.2.2", "[fd00::2]", "0.0.0.0", "localhost.evil.com", ""] {
            assert!(!is_loopback(host), "{host}");
        }
    }

    #[test]
    fn the_modes_that_verify_need_a_root_and_the_others_read_none() {
        let missing = "file: /nonexistent/ca.crt";
        for mode in [PgSslMode::Require, PgSslMode::Prefer, PgSslMode::Allow] {
            assert!(verifier(mode, Some(missing)).is_ok(), "{mode:?} reads no root");
        }
        for mode in [PgSslMode::VerifyCa, PgSslMode::VerifyFull] {
            let err = verifier(mode, Some(missing)).expect_err("the root is missing");
            assert!(err.to_string().contains("/nonexistent/ca.crt"), "{err}");
        }
        let err = verifier(PgSslMode::VerifyCa, Some("system")).expect_err("system is verify-full only");
        assert!(err.to_string().contains("verify-full"), "{err}");
    }
}
