//! The replication connection of a source (src/postgres/replication.rs) on real
//! servers: it honours `sslmode` like mmsync's other connections, and it
//! authenticates with SCRAM-SHA-256, md5 and cleartext passwords.

use std::time::Duration;

use mmsync::postgres::replication::{ReplicationError, WalMessage, WalStream};
use mmsync::testbed::{make_ca, wait_for, PgCluster, PgOptions};
use mmsync::topology::{DbUrl, Master};

/// A table, a publication and a slot, and one committed row for the slot to send.
async fn publish_a_row(cluster: &PgCluster) {
    let mut conn = cluster.connect("postgres").await.unwrap();
    for sql in [
        "CREATE TABLE t (id int PRIMARY KEY)",
        "CREATE PUBLICATION p FOR TABLE t",
        "SELECT pg_create_logical_replication_slot('s', 'pgoutput')",
        "INSERT INTO t VALUES (1)",
    ] {
        sqlx::query(sql).execute(&mut conn).await.unwrap();
    }
}

/// Starts streaming slot `s` with `url` and reads until the row's Begin arrives.
async fn stream(url: String) -> Result<WalStream, ReplicationError> {
    let master = Master { name: "m".into(), url: DbUrl::new(url) };
    let options = mmsync::postgres::db::options(&master).unwrap().application_name("replication-test");
    let mut stream = WalStream::start(&options, "s", "p", 0, 16 << 20).await?;
    let first = tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            if let WalMessage::Data(d) = stream.recv().await? {
                return Ok::<_, ReplicationError>(d);
            }
        }
    })
    .await
    .expect("the slot sends the committed row")?;
    assert_eq!(first.first(), Some(&b'B'), "a transaction starts with Begin");
    Ok(stream)
}

/// Waits until the server has seen a stream's connection go and the slot is free again.
async fn slot_released(cluster: &PgCluster) {
    wait_for("the slot to be released", Duration::from_secs(30), || async {
        let mut conn = cluster.connect("postgres").await.ok()?;
        let active: bool = sqlx::query_scalar("SELECT active FROM pg_replication_slots WHERE slot_name = 's'")
            .fetch_one(&mut conn)
            .await
            .ok()?;
        (!active).then_some(())
    })
    .await;
}

#[tokio::test]
async fn the_replication_connection_honours_sslmode() {
    let cluster = PgCluster::start(PgOptions { ssl: true, ..PgOptions::default() }).await.unwrap();
    publish_a_row(&cluster).await;
    let url = |mode: &str| format!("{}?sslmode={mode}", cluster.url("postgres"));
    let walsender_ssl = || async {
        let mut conn = cluster.connect("postgres").await.unwrap();
        sqlx::query_scalar::<_, bool>(
            "SELECT s.ssl FROM pg_stat_ssl s JOIN pg_stat_replication r USING (pid)
             WHERE r.application_name = 'replication-test'",
        )
        .fetch_one(&mut conn)
        .await
        .unwrap()
    };

    let s = stream(url("require")).await.expect("TLS with sslmode=require");
    assert!(walsender_ssl().await, "the walsender's connection is not encrypted");
    drop(s);
    slot_released(&cluster).await;

    let s = stream(url("disable")).await.expect("plain with sslmode=disable");
    assert!(!walsender_ssl().await);
    drop(s);

    let err = stream(url("verify-full")).await.err().expect("a certificate of an unknown CA is not trusted");
    assert!(matches!(err, ReplicationError::Tls(_)) && err.is_fatal(), "{err:?}");
    assert!(err.to_string().to_lowercase().contains("certificate"), "{err}");
    let err = stream(url("verify-ca")).await.err().expect("verify-ca checks the chain");
    assert!(matches!(err, ReplicationError::Tls(_)), "{err:?}");
    // Without sslrootcert, libpq's default file is the root; when it is
    // missing the error names it.
    let default_root = std::env::home_dir().unwrap_or_default().join(".postgresql/root.crt");
    if !default_root.exists() {
        assert!(err.to_string().contains(&default_root.display().to_string()), "{err}");
    }
    // A CA that did not sign the server's certificate is refused, whatever
    // else is trusted elsewhere.
    let dir = tempfile::tempdir().unwrap();
    let other_ca = make_ca(dir.path(), "other-ca").await.unwrap();
    for mode in ["verify-ca", "verify-full"] {
        let err = stream(format!("{}&sslrootcert={}", url(mode), other_ca.display())).await.err().expect("other CA");
        assert!(matches!(err, ReplicationError::Tls(_)) && err.is_fatal(), "{mode}: {err:?}");
        assert!(err.to_string().contains("UnknownIssuer"), "{mode}: {err}");
    }

    // With the bed's CA as the root: verify-ca trusts the chain and skips the
    // name; verify-full still wants the name (the certificate is for
    // "mmsync-test", not 127.0.0.1).
    let root = |mode: &str| format!("{}&sslrootcert={}", url(mode), cluster.tls_root_certificate().display());
    let s = stream(root("verify-ca")).await.expect("verify-ca with the bed's CA as root");
    assert!(walsender_ssl().await);
    drop(s);
    slot_released(&cluster).await;
    let err = stream(root("verify-full")).await.err().expect("the name does not match");
    assert!(err.to_string().to_lowercase().contains("name"), "{err}");
}

#[tokio::test]
async fn the_replication_connection_authenticates_with_scram_md5_and_password() {
    let cluster = PgCluster::start(PgOptions::default()).await.unwrap();
    publish_a_row(&cluster).await;
    let mut conn = cluster.connect("postgres").await.unwrap();
    sqlx::raw_sql(
        "CREATE ROLE scram_user LOGIN REPLICATION PASSWORD 'sc r@m';
         SET password_encryption = 'md5'; CREATE ROLE md5_user LOGIN REPLICATION PASSWORD 'md5 pw';
         CREATE ROLE plain_user LOGIN REPLICATION PASSWORD 'plain pw';
         GRANT SELECT ON t TO scram_user, md5_user, plain_user;",
    )
    .execute(&mut conn)
    .await
    .unwrap();
    cluster
        .prepend_hba(&[
            "host all scram_user 127.0.0.1/32 scram-sha-256",
            "host all md5_user 127.0.0.1/32 md5",
            "host all plain_user 127.0.0.1/32 password",
        ])
        .await
        .unwrap();
    let url = |user: &str, password: Option<&str>| {
        let auth =
            password.map_or(user.to_string(), |p| format!("{user}:{}", p.replace(' ', "%20").replace('@', "%40")));
        format!("postgres://{auth}@127.0.0.1:{}/postgres", cluster.port())
    };

    // Without a password the server asks for one (once the reload is in force).
    let err = wait_for("pg_hba.conf to be in force", Duration::from_secs(30), || async {
        stream(url("scram_user", None)).await.err()
    })
    .await;
    assert!(matches!(err, ReplicationError::Auth(_)) && err.is_fatal(), "{err:?}");
    assert!(err.to_string().contains("password"), "{err}");

    for (user, password) in [("scram_user", "sc r@m"), ("md5_user", "md5 pw"), ("plain_user", "plain pw")] {
        let s = stream(url(user, Some(password))).await.unwrap_or_else(|e| panic!("{user}: {e}"));
        drop(s);
        slot_released(&cluster).await;
    }

    let err = stream(url("scram_user", Some("wrong"))).await.err().expect("a wrong password is refused");
    assert!(matches!(&err, ReplicationError::Server { code, .. } if code == "28P01"), "{err:?}");
    assert!(err.is_fatal());
}
