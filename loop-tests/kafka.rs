//! mmsync on a Kafka that asks for credentials and TLS, configured from
//! `[kafka.client]` with the password from the environment.

use std::path::Path;

use mmsync::testbed::{run_mmsync, wait_for, Bed, BedKafka, KafkaOptions, MmsyncProcess, BED_DATABASE};

use crate::common::DEADLINE;

const PASSWORD_VAR: &str = "MMSYNC_TEST_KAFKA_PASSWORD";

fn bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_mmsync"))
}

/// Writes a row on seoul under `mmsync run` with `topology` and waits for it on busan.
async fn crosses(bed: &Bed, topology: &Path, env: &[(&str, &str)], id: i32) {
    let log = bed.dir.path().join(format!("run-{id}.log"));
    let run = MmsyncProcess::spawn(bin(), topology, &["run"], env, log).expect("mmsync starts");
    let mut seoul = bed.master("seoul").connect(BED_DATABASE).await.unwrap();
    sqlx::query("INSERT INTO users VALUES ($1, 'over the wire')").bind(id).execute(&mut seoul).await.unwrap();
    let busan = bed.master("busan").url(BED_DATABASE);
    let found = tokio::time::timeout(DEADLINE, async {
        wait_for(&format!("row {id} on busan"), DEADLINE, || async {
            let mut c = <sqlx::PgConnection as sqlx::Connection>::connect(&busan).await.ok()?;
            sqlx::query_scalar::<_, i32>("SELECT id FROM users WHERE id = $1")
                .bind(id)
                .fetch_optional(&mut c)
                .await
                .ok()?
        })
        .await
    })
    .await;
    let text = run.log();
    assert!(found.is_ok(), "row {id} never reached busan; mmsync log:\n{text}");
    let status = run.terminate().await;
    assert!(status.success(), "mmsync run exited with {status}:\n{text}");
}

#[tokio::test]
async fn changes_cross_over_sasl_scram_and_over_tls_with_the_password_from_the_environment() {
    let opts = KafkaOptions {
        scram_users: vec![("admin".into(), "admin-secret-42".into())],
        tls: true,
        ..KafkaOptions::default()
    };
    let bed = Bed::start(&["seoul", "busan"], BedKafka::Own(opts)).await.expect("bed starts");
    bed.sql_everywhere("CREATE TABLE users (id int PRIMARY KEY, name text)").await.unwrap();

    // SASL/SCRAM-SHA-512, the password from the environment.
    let scram = format!(
        "\"security.protocol\" = \"sasl_plaintext\"\n\"sasl.mechanism\" = \"SCRAM-SHA-512\"\n\
         \"sasl.username\" = \"admin\"\n\"sasl.password\" = {{ env = \"{PASSWORD_VAR}\" }}"
    );
    let sasl = bed.write_topology_as("sasl.toml", &["public.users"], "", &bed.broker.sasl_address(), &scram);
    let good = [(PASSWORD_VAR, "admin-secret-42")];
    let (code, out) = run_mmsync(bin(), &sasl, &["init"], &good).await;
    assert_eq!(code, 0, "{out}");
    crosses(&bed, &sasl, &good, 1).await;

    // A wrong password: run stops at once with an error that names the
    // brokers and the user, and never prints the password.
    let wrong = [(PASSWORD_VAR, "not-the-password-77")];
    let log = bed.dir.path().join("run-wrong.log");
    let run = MmsyncProcess::spawn(bin(), &sasl, &["run"], &wrong, log).expect("mmsync starts");
    let status = tokio::time::timeout(DEADLINE, run.wait()).await.expect("run stops by itself");
    let text = std::fs::read_to_string(bed.dir.path().join("run-wrong.log")).unwrap();
    assert_eq!(status.code(), Some(1), "{text}");
    assert!(
        text.contains(&format!(
            "kafka {}: the brokers refused mmsync's credentials (user \"admin\")",
            bed.broker.sasl_address()
        )),
        "{text}"
    );
    assert!(!text.contains("not-the-password-77"), "the password was printed:\n{text}");

    // TLS, the broker's certificate checked against the bed's CA (and its name).
    let tls =
        format!("\"security.protocol\" = \"ssl\"\n\"ssl.ca.location\" = \"{}\"", bed.broker.ca_certificate().display());
    let over_tls = bed.write_topology_as("tls.toml", &["public.users"], "", &bed.broker.tls_address(), &tls);
    crosses(&bed, &over_tls, &[], 2).await;

    // Without the CA, the broker's certificate is refused, and check says so.
    let untrusted = bed.write_topology_as(
        "untrusted.toml",
        &["public.users"],
        "",
        &bed.broker.tls_address(),
        "\"security.protocol\" = \"ssl\"",
    );
    let (code, out) = run_mmsync(bin(), &untrusted, &["check"], &[]).await;
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("TLS failed") && out.contains("ssl.ca.location"), "{out}");
}
