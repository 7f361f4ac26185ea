//! TLS and passwords on mmsync's connections to masters. `sslmode` in a
//! master's URL is honoured: mmsync talks TLS to a server that offers it, and
//! refuses a certificate it cannot verify when told to verify, trusting
//! `sslrootcert` alone as libpq does. A password never crosses a network in
//! clear unless the URL says `sslmode=disable`.

use std::sync::Arc;
use std::time::Duration;

use mmsync::postgres::replication::{ReplicationError, WalStream};
use mmsync::testbed::{make_ca, non_loopback_ipv4, wait_for, BedError, PgCluster, PgOptions};
use mmsync::topology::{DbUrl, Master, Topology};
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

    let mut conn = mmsync::postgres::db::connect(&master("require")).await.expect("TLS with sslmode=require");
    assert!(is_encrypted(&mut conn).await, "the connection is not encrypted");

    let mut conn = mmsync::postgres::db::connect(&master("disable")).await.expect("plain with sslmode=disable");
    assert!(!is_encrypted(&mut conn).await);

    let err = mmsync::postgres::db::connect(&master("verify-full"))
        .await
        .expect_err("a certificate of an unknown CA is not trusted");
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
        let verifier = mmsync::postgres::tls::verifier(mode, Some(&root)).unwrap();
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
    let mut conn = mmsync::postgres::db::connect(&with_root("verify-ca", &cluster.tls_root_certificate()))
        .await
        .expect("verify-ca with the server's CA as sslrootcert");
    assert!(is_encrypted(&mut conn).await);
    let err = mmsync::postgres::db::connect(&with_root("verify-full", &cluster.tls_root_certificate()))
        .await
        .expect_err("verify-full checks the name");
    assert!(err.to_string().contains("name"), "{err}");

    // Another CA: refused, whatever else the machine or sqlx would trust.
    for mode in ["verify-ca", "verify-full"] {
        let err =
            mmsync::postgres::db::connect(&with_root(mode, &other_ca)).await.expect_err("a CA that did not sign it");
        assert!(err.to_string().contains("UnknownIssuer"), "{mode}: {err}");
    }

    // No sslrootcert: libpq's default file, and an error naming it when it is missing.
    let default_root = std::env::home_dir().unwrap_or_default().join(".postgresql/root.crt");
    if !default_root.exists() {
        let err =
            mmsync::postgres::db::connect(&master("tls", format!("{}?sslmode=verify-ca", cluster.url("postgres"))))
                .await
                .expect_err("nothing to verify with");
        assert!(err.to_string().contains(&default_root.display().to_string()), "{err}");
        assert!(err.to_string().contains("sslrootcert=system"), "{err}");
    }

    // sslrootcert=system is the public CAs' store: libpq allows it with verify-full only.
    let err = mmsync::postgres::db::options(&master(
        "tls",
        format!("{}?sslmode=verify-ca&sslrootcert=system", cluster.url("postgres")),
    ))
    .expect_err("verify-ca with every public CA is refused");
    assert!(err.to_string().contains("verify-full"), "{err}");
    Ok(())
}

#[tokio::test]
async fn passwords_never_cross_a_network_in_clear_unless_the_url_says_sslmode_disable() {
    let ip = non_loopback_ipv4().expect("this machine has an IPv4 address other than loopback");
    let cluster = PgCluster::start(PgOptions {
        extra_conf: vec![format!("listen_addresses = '127.0.0.1, {ip}'")],
        ..PgOptions::default()
    })
    .await
    .unwrap();
    let mut conn = cluster.connect("postgres").await.unwrap();
    sqlx::raw_sql(
        "CREATE ROLE scram_user LOGIN REPLICATION PASSWORD 'scram pw';
         SET password_encryption = 'md5'; CREATE ROLE md5_user LOGIN REPLICATION PASSWORD 'md5 pw';
         CREATE ROLE plain_user LOGIN REPLICATION PASSWORD 'plain pw';",
    )
    .execute(&mut conn)
    .await
    .unwrap();
    cluster
        .prepend_hba(&[
            &format!("host all scram_user {ip}/32 scram-sha-256"),
            &format!("host all md5_user {ip}/32 md5"),
            &format!("host all plain_user {ip}/32 password"),
            "host all md5_user 127.0.0.1/32 md5",
        ])
        .await
        .unwrap();
    let url = |host: &str, user: &str, query: &str| {
        let password = user.replace("_user", "%20pw");
        format!("postgres://{user}:{password}@{host}:{}/postgres{query}", cluster.port())
    };
    let far = |user: &str, query: &str| master("far", url(&ip.to_string(), user, query));
    wait_for("pg_hba.conf to be in force", Duration::from_secs(30), || async {
        mmsync::postgres::db::connect(&far("md5_user", "?sslmode=disable")).await.ok()
    })
    .await;

    // sqlx connections: the server has no TLS, and without sslmode=disable
    // mmsync does not go on in plain to a host that is not loopback.
    for query in ["", "?sslmode=prefer", "?sslmode=allow"] {
        let err = mmsync::postgres::db::connect(&far("md5_user", query)).await.expect_err("no password in clear");
        let text = err.to_string();
        assert!(text.contains("master \"far\"") && text.contains("TLS"), "{query}: {text}");
        assert!(text.contains("sslmode=require") && text.contains("sslmode=disable"), "{query}: {text}");
    }
    let mut conn = mmsync::postgres::db::connect(&far("md5_user", "?sslmode=disable")).await.expect("the url says so");
    assert!(!is_encrypted(&mut conn).await);
    let local = master("near", url("127.0.0.1", "md5_user", ""));
    mmsync::postgres::db::connect(&local).await.expect("loopback does not leave the machine");

    // The replication connection authenticates itself, and refuses to send
    // the password in clear or as md5 over plain TCP; SCRAM never sends it.
    // (Past authentication, it stops at the slot this cluster does not have.)
    let start = |master: Master| async move {
        let options = mmsync::postgres::db::options(&master).unwrap();
        WalStream::start(&options, "no_slot", "no_publication", 0, 16 << 20).await.err().expect("there is no slot")
    };
    for user in ["md5_user", "plain_user"] {
        let err = start(far(user, "")).await;
        assert!(matches!(err, ReplicationError::Auth(_)) && err.is_fatal(), "{user}: {err:?}");
        let text = err.to_string();
        assert!(text.contains("sslmode=require") && text.contains("sslmode=disable"), "{user}: {text}");
        let err = start(far(user, "?sslmode=disable")).await;
        assert!(matches!(&err, ReplicationError::Server { code, .. } if code == "42704"), "{user}: {err:?}");
    }
    let err = start(far("scram_user", "")).await;
    assert!(matches!(&err, ReplicationError::Server { code, .. } if code == "42704"), "{err:?}");

    // `mmsync check` says so too, with the fix.
    let text = format!(
        "[kafka]\nbrokers = \"127.0.0.1:{}\"\n\n[[masters]]\nname = \"far\"\nurl = \"{}\"\n\n\
         [[masters]]\nname = \"near\"\nurl = \"{}\"\n\n[sync]\ntables = [\"public.t\"]\n",
        mmsync::testbed::free_port(),
        url(&ip.to_string(), "md5_user", ""),
        url("127.0.0.1", "md5_user", ""),
    );
    let topology = Topology::parse(&text, std::path::Path::new("topology.toml"), |_| None).unwrap();
    let mut ok = Vec::new();
    let problems = mmsync::postgres::schema::check(&topology, &mut ok).await;
    let far_problem = problems.iter().find(|p| p.starts_with("master \"far\"")).expect("a problem with far");
    assert!(far_problem.contains("sslmode=require") && far_problem.contains("sslmode=disable"), "{far_problem}");
    assert!(!problems.iter().any(|p| p.starts_with("master \"near\": cannot connect")), "{problems:?}");
}
