//! `sslmode` in a master's URL is honoured: mmsync talks TLS to a server that
//! offers it, and refuses a certificate it cannot verify when told to verify.

use mmsync::testbed::{BedError, PgCluster, PgOptions};
use mmsync::topology::{DbUrl, Master};

#[tokio::test]
async fn sslmode_in_the_url_is_honoured() -> Result<(), BedError> {
    let cluster = PgCluster::start(PgOptions { ssl: true, ..PgOptions::default() }).await?;
    let master = |mode: &str| Master {
        name: "tls".into(),
        url: DbUrl::new(format!("{}?sslmode={mode}", cluster.url("postgres"))),
    };

    let mut conn = mmsync::db::connect(&master("require")).await.expect("TLS with sslmode=require");
    let ssl: bool =
        sqlx::query_scalar("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()").fetch_one(&mut conn).await?;
    assert!(ssl, "the connection is not encrypted");

    let mut conn = mmsync::db::connect(&master("disable")).await.expect("plain with sslmode=disable");
    let ssl: bool =
        sqlx::query_scalar("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()").fetch_one(&mut conn).await?;
    assert!(!ssl);

    let err =
        mmsync::db::connect(&master("verify-full")).await.expect_err("a certificate of an unknown CA is not trusted");
    assert!(err.to_string().to_lowercase().contains("certificate"), "{err}");
    Ok(())
}
