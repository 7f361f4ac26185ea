//! TLS and passwords on mmsync's connections to masters. `sslmode` in a
//! master's URL is honoured: mmsync talks TLS to a server that offers it, and
//! refuses a certificate it cannot verify when told to verify, trusting
//! `sslrootcert` alone as libpq does.

use std::sync::Arc;
use std::time::Duration;

use mmsync::testbed::{make_ca, BedError, PgCluster, PgOptions};
use mmsync::topology::{DbUrl, Master};
use rustls::client::danger::ServerCertVerifier as _;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use sqlx::postgres::PgSslMode;
use sqlx::PgConnection;

fn master(name: &str, url: String) -> Master {
    Master { name: name.into(), url: DbUrl::new(url) }
}

async fn is_encrypted(conn: &mut PgConnection) -> bool {
    sqlx::query_scalar("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()").fetch_one(conn).await.unwrap()
}

#[tokio::test]
async fn sslmode_in_the_url_is_honoured() -> Result<(), BedError> {
    let cluster = PgCluster::start(PgOptions { ssl: true, ..PgOptions::default() }).await?;
    let master = |mode: &str| master("tls", format!("{}?sslmode={mode}", cluster.url("postgres")));

    let mut conn = mmsync::db::connect(&master("require")).await.expect("TLS with sslmode=require");
    assert!(is_encrypted(&mut conn).await, "the connection is not encrypted");

    let mut conn = mmsync::db::connect(&master("disable")).await.expect("plain with sslmode=disable");
    assert!(!is_encrypted(&mut conn).await);

    let err =
        mmsync::db::connect(&master("verify-full")).await.expect_err("a certificate of an unknown CA is not trusted");
    assert!(err.to_string().to_lowercase().contains("certificate"), "{err}");
    Ok(())
}

/// The chain letsencrypt.org served in March 2026 (kept by
/// rustls-platform-verifier's real-world tests): its certificate, and Let's
/// Encrypt's E8, which ISRG Root X1, one of the public web roots, signed.
/// Checking a chain needs no private key, so this is as close as a test can
/// get to a server holding a certificate from a public CA.
const PUBLIC_CHAIN: [&[u8]; 2] =
    [include_bytes!("data/letsencrypt_org_1.der"), include_bytes!("data/letsencrypt_org_2.der")];

/// 2026-03-31, within the chain's validity.
const PUBLIC_CHAIN_VALID_AT_SECS: u64 = 1_775_000_000;

#[tokio::test]
async fn with_sslrootcert_a_certificate_from_a_public_ca_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let own_ca = make_ca(dir.path(), "own-ca").await.unwrap();
    let (leaf, intermediate) = (CertificateDer::from(PUBLIC_CHAIN[0]), CertificateDer::from(PUBLIC_CHAIN[1]));
    let name = ServerName::try_from("letsencrypt.org").unwrap();
    let at = UnixTime::since_unix_epoch(Duration::from_secs(PUBLIC_CHAIN_VALID_AT_SECS));

    // The chain is good: whoever trusts the public web roots takes it.
    let public_roots = rustls::RootCertStore::from_iter(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    let public = rustls::client::WebPkiServerVerifier::builder_with_provider(
        Arc::new(public_roots),
        Arc::new(rustls::crypto::ring::default_provider()),
    )
    .build()
    .unwrap();
    public.verify_server_cert(&leaf, std::slice::from_ref(&intermediate), &name, &[], at).expect("a valid chain");

    // Told to trust one CA of its own, mmsync takes nothing else, with either
    // mode (verify-ca would take it for any host name). Both kinds of
    // connection check certificates with this verifier.
    let root = format!("file: {}", own_ca.display());
    for mode in [PgSslMode::VerifyCa, PgSslMode::VerifyFull] {
        let verifier = mmsync::tls::verifier(mode, Some(&root)).unwrap();
        let err = verifier
            .verify_server_cert(&leaf, std::slice::from_ref(&intermediate), &name, &[], at)
            .expect_err("only sslrootcert is trusted");
        assert!(
            matches!(err, rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer)),
            "{mode:?}: {err:?}"
        );
    }
}

#[tokio::test]
async fn verify_ca_and_verify_full_trust_sslrootcert_alone_on_sqlx_connections() -> Result<(), BedError> {
    let cluster = PgCluster::start(PgOptions { ssl: true, ..PgOptions::default() }).await?;
    let dir = tempfile::tempdir().unwrap();
    let other_ca = make_ca(dir.path(), "other-ca").await?;
    let with_root = |mode: &str, root: &std::path::Path| {
        master("tls", format!("{}?sslmode={mode}&sslrootcert={}", cluster.url("postgres"), root.display()))
    };

    // The CA that signed the server's certificate: verify-ca trusts it, and
    // ignores the name (the certificate is for "mmsync-test", not 127.0.0.1).
    let mut conn = mmsync::db::connect(&with_root("verify-ca", &cluster.tls_root_certificate()))
        .await
        .expect("verify-ca with the server's CA as sslrootcert");
    assert!(is_encrypted(&mut conn).await);
    let err = mmsync::db::connect(&with_root("verify-full", &cluster.tls_root_certificate()))
        .await
        .expect_err("verify-full checks the name");
    assert!(err.to_string().contains("name"), "{err}");

    // Another CA: refused, whatever else the machine or sqlx would trust.
    for mode in ["verify-ca", "verify-full"] {
        let err = mmsync::db::connect(&with_root(mode, &other_ca)).await.expect_err("a CA that did not sign it");
        assert!(err.to_string().contains("UnknownIssuer"), "{mode}: {err}");
    }

    // No sslrootcert: libpq's default file, and an error naming it when it is missing.
    let default_root = std::env::home_dir().unwrap_or_default().join(".postgresql/root.crt");
    if !default_root.exists() {
        let err = mmsync::db::connect(&master("tls", format!("{}?sslmode=verify-ca", cluster.url("postgres"))))
            .await
            .expect_err("nothing to verify with");
        assert!(err.to_string().contains(&default_root.display().to_string()), "{err}");
        assert!(err.to_string().contains("sslrootcert=system"), "{err}");
    }

    // sslrootcert=system is the public CAs' store: libpq allows it with verify-full only.
    let err = mmsync::db::options(&master(
        "tls",
        format!("{}?sslmode=verify-ca&sslrootcert=system", cluster.url("postgres")),
    ))
    .expect_err("verify-ca with every public CA is refused");
    assert!(err.to_string().contains("verify-full"), "{err}");
    Ok(())
}
