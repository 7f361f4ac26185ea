//! `mmsync check` on real servers: a good topology passes; every broken one
//! fails with a message that names the problem and the fix.

use std::path::Path;

use mmsync::testbed::{free_port, Bed, BedKafka, KafkaCluster, KafkaOptions, PgCluster, PgOptions, BED_DATABASE};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::ClientConfig;

/// Runs the mmsync binary; returns its exit code and everything it printed.
async fn mmsync(topology: &Path, args: &[&str], env: &[(&str, &str)]) -> (i32, String) {
    mmsync::testbed::run_mmsync(Path::new(env!("CARGO_BIN_EXE_mmsync")), topology, args, env).await
}

fn write(dir: &Path, name: &str, text: &str) -> std::path::PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

#[tokio::test]
async fn check_passes_on_a_good_topology_and_explains_every_broken_one() {
    let bed = Bed::start(&["seoul", "busan"], BedKafka::Shared).await.expect("bed starts");
    bed.sql_everywhere("CREATE TABLE users (id bigserial PRIMARY KEY, name text); CREATE TABLE notes (body text)")
        .await
        .unwrap();
    let good = bed.write_topology(&["public.users"], "");
    let (code, out) = mmsync(&good, &["check"], &[]).await;
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("master \"seoul\": ok") && out.contains("check passed"), "{out}");

    let text = std::fs::read_to_string(&good).unwrap();
    let dir = bed.dir.path();

    // Bad files: exit 2, with the line and the key.
    let unknown = write(dir, "unknown.toml", &text.replace("partitions = 3", "partitions = 3\nbrokerz = 1"));
    let (code, out) = mmsync(&unknown, &["check"], &[]).await;
    assert_eq!(code, 2, "{out}");
    assert!(out.contains("unknown.toml:5:1: unknown field `brokerz`"), "{out}");

    let busan = format!("[[masters]]\nname = \"busan\"\nurl = \"{}\"\n", bed.master("busan").url(BED_DATABASE));
    let one = write(dir, "one.toml", &text.replace(&busan, ""));
    let (code, out) = mmsync(&one, &["check"], &[]).await;
    assert_eq!(code, 2, "{out}");
    assert!(out.contains("masters: 1 master(s) declared; declare at least two"), "{out}");

    let dup = write(dir, "dup.toml", &text.replace("name = \"busan\"", "name = \"seoul\""));
    let (code, out) = mmsync(&dup, &["check"], &[]).await;
    assert_eq!(code, 2, "{out}");
    assert!(out.contains("masters[1].name: \"seoul\" is declared twice"), "{out}");

    let busan_url = format!("url = \"{}\"", bed.master("busan").url(BED_DATABASE));
    let env = write(dir, "env.toml", &text.replace(&busan_url, "url_env = \"BUSAN_URL_FOR_TEST\""));
    let (code, out) = mmsync(&env, &["check"], &[]).await;
    assert_eq!(code, 2, "{out}");
    assert!(out.contains("masters[1].url_env: environment variable \"BUSAN_URL_FOR_TEST\" is not set"), "{out}");
    // ... and with the variable set, it passes, and the password never shows.
    let with_password = bed.master("busan").url(BED_DATABASE).replace("postgres@", "postgres:hunter2@");
    let (code, out) = mmsync(&env, &["check"], &[("BUSAN_URL_FOR_TEST", &with_password)]).await;
    assert_eq!(code, 0, "{out}");
    assert!(!out.contains("hunter2"), "{out}");

    // Bad servers: exit 1, every problem listed with its fix.
    let unreachable = write(
        dir,
        "unreachable.toml",
        &text.replace(&busan_url, &format!("url = \"postgres://postgres:hunter2@127.0.0.1:{}/app\"", free_port())),
    );
    let (code, out) = mmsync(&unreachable, &["check"], &[]).await;
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("master \"busan\": cannot connect to postgres://postgres:***@127.0.0.1:"), "{out}");
    assert!(out.contains("check that the server is running"), "{out}");
    assert!(!out.contains("hunter2"), "{out}");

    let replica = PgCluster::start(PgOptions { wal_level: "replica".into(), ..PgOptions::default() }).await.unwrap();
    replica.create_database(BED_DATABASE).await.unwrap();
    let mut conn = replica.connect(BED_DATABASE).await.unwrap();
    sqlx::raw_sql("CREATE TABLE users (id bigserial PRIMARY KEY, name text)").execute(&mut conn).await.unwrap();
    let replica_toml =
        write(dir, "replica.toml", &text.replace(&busan_url, &format!("url = \"{}\"", replica.url(BED_DATABASE))));
    let (code, out) = mmsync(&replica_toml, &["check"], &[]).await;
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains(
            "master \"busan\": wal_level is \"replica\"; set wal_level = logical in postgresql.conf and restart"
        ),
        "{out}"
    );

    // A role that may not stream changes.
    let mut busan = bed.master("busan").connect(BED_DATABASE).await.unwrap();
    sqlx::raw_sql("CREATE ROLE app_user LOGIN").execute(&mut busan).await.unwrap();
    let no_replication = write(
        dir,
        "noreplication.toml",
        &text.replace(
            &busan_url,
            &format!("url = \"{}\"", bed.master("busan").url(BED_DATABASE).replace("postgres@", "app_user@")),
        ),
    );
    let (code, out) = mmsync(&no_replication, &["check"], &[]).await;
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("master \"busan\": role \"app_user\" may not stream from a replication slot; run ALTER ROLE \"app_user\" REPLICATION"),
        "{out}"
    );

    // A role that may stream but may not write as the applier does.
    sqlx::raw_sql("CREATE ROLE streamer LOGIN REPLICATION").execute(&mut busan).await.unwrap();
    let no_replica_role = write(
        dir,
        "noreplicarole.toml",
        &text.replace(
            &busan_url,
            &format!("url = \"{}\"", bed.master("busan").url(BED_DATABASE).replace("postgres@", "streamer@")),
        ),
    );
    let (code, out) = mmsync(&no_replica_role, &["check"], &[]).await;
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("master \"busan\": role \"streamer\" may not set session_replication_role"), "{out}");
    assert!(out.contains("run GRANT SET ON PARAMETER session_replication_role TO \"streamer\""), "{out}");
    assert!(!out.contains("may not stream from a replication slot"), "{out}");

    let no_pk = write(
        dir,
        "nopk.toml",
        &text.replace("\"public.users\"", "\"public.users\", \"public.notes\", \"public.missing\""),
    );
    let (code, out) = mmsync(&no_pk, &["check"], &[]).await;
    assert_eq!(code, 1, "{out}");
    for master in ["seoul", "busan"] {
        assert!(out.contains(&format!("master \"{master}\": table public.notes has no primary key; add one")), "{out}");
        assert!(out.contains(&format!("master \"{master}\": table public.missing does not exist")), "{out}");
    }
}

/// `mmsync <args> --help`, which must succeed.
fn help(args: &[&str]) -> String {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_mmsync")).args(args).arg("--help").output().unwrap();
    assert!(out.status.success(), "{args:?}");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The subcommands a help lists under "Commands:" (but `help`), each with its summary.
fn commands(args: &[&str]) -> Vec<(String, String)> {
    help(args)
        .lines()
        .skip_while(|l| *l != "Commands:")
        .skip(1)
        .take_while(|l| !l.trim().is_empty())
        .map(|l| l.trim().split_once(' ').map_or((l.trim(), ""), |(n, a)| (n, a.trim())))
        .filter(|(name, _)| *name != "help")
        .map(|(name, about)| (name.to_string(), about.to_string()))
        .collect()
}

#[tokio::test]
async fn help_explains_every_subcommand() {
    // Every subcommand the binary has, nested ones too, not a list kept here.
    let mut subs: Vec<Vec<String>> = Vec::new();
    let top = commands(&[]);
    let names: Vec<&str> = top.iter().map(|(n, _)| n.as_str()).collect();
    for expected in ["check", "init", "run", "status", "dead-letters", "verify"] {
        assert!(names.contains(&expected), "`mmsync --help` lists no {expected}: {names:?}");
    }
    for (name, about) in &top {
        assert!(!about.is_empty(), "`mmsync --help` says nothing of {name}");
        subs.push(vec![name.clone()]);
        for (nested, about) in commands(&[name]) {
            assert!(!about.is_empty(), "`mmsync {name} --help` says nothing of {nested}");
            subs.push(vec![name.clone(), nested]);
        }
    }
    for sub in subs {
        let args: Vec<&str> = sub.iter().map(String::as_str).collect();
        let text = help(&args);
        // A description comes first; only an undocumented command starts with its usage.
        assert!(!text.starts_with("Usage:"), "{sub:?} --help explains nothing: {text}");
        assert!(text.contains("--topology"), "{sub:?}: {text}");
        assert!(text.lines().count() > 4, "{sub:?} --help says too little: {text}");
    }
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_mmsync")).arg("nonsense").output().unwrap();
    assert_eq!(out.status.code(), Some(2));
}

#[tokio::test]
async fn check_reports_what_a_misconfigured_kafka_lacks_with_the_fix() {
    let opts = KafkaOptions {
        scram_users: vec![("admin".into(), "admin-secret".into()), ("alice".into(), "alice-secret".into())],
        extra: vec!["message.max.bytes=4000".into(), "min.insync.replicas=2".into()],
        ..KafkaOptions::default()
    };
    let bed = Bed::start(&["seoul", "busan"], BedKafka::Own(opts)).await.expect("bed starts");
    bed.sql_everywhere("CREATE TABLE docs (id int PRIMARY KEY, body text)").await.unwrap();
    let mut seoul = bed.master("seoul").connect(BED_DATABASE).await.unwrap();
    sqlx::raw_sql("INSERT INTO docs VALUES (1, repeat('x', 10000))").execute(&mut seoul).await.unwrap();
    // A topic someone made by hand, with another partition count.
    let busan_topic = bed.topic("busan", "public.docs");
    let admin: AdminClient<DefaultClientContext> =
        ClientConfig::new().set("bootstrap.servers", bed.broker.address()).create().unwrap();
    let made = admin
        .create_topics([&NewTopic::new(&busan_topic, 1, TopicReplication::Fixed(1))], &AdminOptions::new())
        .await
        .unwrap();
    assert!(made[0].is_ok(), "{made:?}");
    let topology = bed.write_topology(&["public.docs"], "");

    let (code, out) = mmsync(&topology, &["check"], &[]).await;
    assert_eq!(code, 1, "{out}");
    let seoul_topic = bed.topic("seoul", "public.docs");
    for expected in [
        format!("kafka topic {busan_topic} has 1 partition(s), but [kafka] partitions is 3; set partitions = 1"),
        format!("kafka topic {seoul_topic}: the largest row of public.docs on seoul is a record of about"),
        "but the brokers' message.max.bytes is 4000: such rows would become dead letters; raise message.max.bytes"
            .to_string(),
        format!("kafka topic {busan_topic}: the topic's min.insync.replicas is 2 but the topic has 1 replica(s)"),
        format!("kafka topic {seoul_topic}: the brokers' min.insync.replicas is 2 but the topic has 1 replica(s)"),
    ] {
        assert!(out.contains(&expected), "missing {expected:?} in:\n{out}");
    }

    // SCRAM: a user without ACLs may not create topics; a wrong password is
    // named as such, with the brokers, and never printed.
    let sasl = |user: &str| {
        format!(
            "\"security.protocol\" = \"sasl_plaintext\"\n\"sasl.mechanism\" = \"SCRAM-SHA-512\"\n\
             \"sasl.username\" = \"{user}\"\n\"sasl.password\" = {{ env = \"MMSYNC_TEST_KAFKA_PASSWORD\" }}"
        )
    };
    let alice = bed.write_topology_as("alice.toml", &["public.docs"], "", &bed.broker.sasl_address(), &sasl("alice"));
    let (code, out) = mmsync(&alice, &["check"], &[("MMSYNC_TEST_KAFKA_PASSWORD", "alice-secret")]).await;
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("mmsync's user may not create its topics"), "{out}");
    assert!(out.contains("grant it CREATE on the cluster or on topics with the prefix"), "{out}");
    let (code, out) = mmsync(&alice, &["check"], &[("MMSYNC_TEST_KAFKA_PASSWORD", "wrong-secret-123")]).await;
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains(&format!(
            "kafka {}: the brokers refused mmsync's credentials (user \"alice\")",
            bed.broker.sasl_address()
        )),
        "{out}"
    );
    assert!(!out.contains("wrong-secret-123"), "the password was printed:\n{out}");

    // A broker that advertises an address nobody can reach.
    let dead_end = format!("127.0.0.1:{}", free_port());
    let lost = KafkaCluster::start(KafkaOptions { advertise: Some(dead_end.clone()), ..KafkaOptions::default() })
        .await
        .unwrap();
    let lost_toml = bed.write_topology_as("lost.toml", &["public.docs"], "", &lost.address(), "");
    let (code, out) = mmsync(&lost_toml, &["check"], &[]).await;
    assert_eq!(code, 1, "{out}");
    assert!(out.contains(&format!("kafka broker 1 advertises {dead_end}, which mmsync cannot reach")), "{out}");
    assert!(out.contains("set advertised.listeners on that broker"), "{out}");
}
