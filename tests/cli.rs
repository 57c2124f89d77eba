//! The `reaper-operator` binary as a script would use it: exit codes, JSON output, and
//! bad input refused before anything changes.

mod support;

use std::process::Output;

use serde_json::Value;
use support::db::{self, Via};

const BIN: &str = env!("CARGO_BIN_EXE_reaper-operator");

fn run(url: &str, schema: &str, args: &[&str]) -> Output {
    std::process::Command::new(BIN)
        .args(args)
        .env("DATABASE_URL", url)
        .env("REAPER_DB_SCHEMA", schema)
        .env_remove("RUST_LOG")
        .output()
        .expect("run reaper-operator")
}

/// The arguments of a command line: its words, `''` standing for an empty one.
fn words(line: &str) -> Vec<&str> {
    line.split_whitespace()
        .map(|w| if w == "''" { "" } else { w })
        .collect()
}

fn code(out: &Output) -> i32 {
    out.status.code().expect("exited by signal")
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn json(out: &Output) -> Value {
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "stdout is not JSON ({e}): {}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

/// A migrated schema, created through the CLI itself.
fn migrated_schema() -> String {
    let schema = db::unique_schema("cli").to_string();
    let first = run(&db::direct_url(), &schema, &["migrate"]);
    assert_eq!(code(&first), 0, "{}", stderr(&first));
    let again = run(&db::direct_url(), &schema, &["migrate"]);
    assert_eq!(
        code(&again),
        0,
        "second migrate is not a no-op: {}",
        stderr(&again)
    );
    schema
}

both_paths!(
    thirty_concurrent_processes_give_exactly_one_winner,
    exit_codes_and_json_follow_the_contract
);

async fn thirty_concurrent_processes_give_exactly_one_winner(via: Via) {
    let schema = migrated_schema();
    let url = db::url(via);
    let children: Vec<_> = (0..30)
        .map(|i| {
            std::process::Command::new(BIN)
                .args(["lease", "acquire", "--name", "race", "--holder"])
                .arg(format!("proc-{i}"))
                .args(["--ttl-seconds", "60", "-o", "json"])
                .env("DATABASE_URL", &url)
                .env("REAPER_DB_SCHEMA", &schema)
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let outputs: Vec<Output> = children
        .into_iter()
        .map(|c| c.wait_with_output().unwrap())
        .collect();
    let codes: Vec<i32> = outputs.iter().map(code).collect();
    assert_eq!(
        codes.iter().filter(|&&c| c == 0).count(),
        1,
        "codes {codes:?}"
    );
    assert_eq!(
        codes.iter().filter(|&&c| c == 1).count(),
        29,
        "codes {codes:?}"
    );
    let winner = outputs.iter().find(|o| code(o) == 0).unwrap();
    let lease = json(winner);
    assert_eq!(lease["epoch"], 1);
    let losers_saw: Vec<Value> = outputs
        .iter()
        .filter(|o| code(o) == 1)
        .map(|o| json(o)["holder"].clone())
        .collect();
    assert!(
        losers_saw.iter().all(|h| *h == lease["holder"]),
        "losers saw {losers_saw:?}"
    );
}

async fn exit_codes_and_json_follow_the_contract(via: Via) {
    let schema = migrated_schema();
    let url = db::url(via);
    let lease = acquire_prints_the_lease_as_json(&url, &schema);
    not_the_holder_is_exit_1(&url, &schema, &lease);
    bad_input_is_exit_2_and_changes_nothing(&url, &schema);

    // A schema that was never migrated: exit 2 with the fix in the message.
    let out = run(&url, "never_migrated_schema", &["lease", "status"]);
    assert_eq!(code(&out), 2);
    assert!(
        stderr(&out).contains("reaper-operator migrate"),
        "{}",
        stderr(&out)
    );
}

/// `lease acquire -o json` prints the whole lease.
fn acquire_prints_the_lease_as_json(url: &str, schema: &str) -> Value {
    let cli = |line: &str| run(url, schema, &words(line));

    let out = cli("lease acquire --name n --holder c/a --ttl-seconds 30 -o json");
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let lease = json(&out);
    for field in [
        "name",
        "holder",
        "epoch",
        "ttlSeconds",
        "acquiredAt",
        "renewedAt",
        "expiresAt",
    ] {
        assert!(!lease[field].is_null(), "missing {field} in {lease}");
    }
    assert_eq!(
        (lease["name"].as_str(), lease["holder"].as_str()),
        (Some("n"), Some("c/a"))
    );
    assert_eq!(
        (lease["epoch"].as_i64(), lease["ttlSeconds"].as_f64()),
        (Some(1), Some(30.0))
    );
    lease
}

/// Someone else holds it / you do not: exit 1 and a reason.
fn not_the_holder_is_exit_1(url: &str, schema: &str, lease: &Value) {
    let cli = |line: &str| run(url, schema, &words(line));
    let out = cli("lease acquire --name n --holder c/b");
    assert_eq!(code(&out), 1);
    assert!(stderr(&out).contains("held by \"c/a\""), "{}", stderr(&out));
    assert_eq!(code(&cli("lease renew --name n --holder c/b --epoch 1")), 1);
    assert_eq!(
        code(&cli("lease release --name n --holder c/a --epoch 2")),
        1
    );
    assert_eq!(code(&cli("lease status --name absent")), 1);

    let out = cli("lease renew --name n --holder c/a --epoch 1 -o json");
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert!(json(&out)["renewedAt"].as_str() >= lease["renewedAt"].as_str());

    cli("lease acquire --name m --holder c/a");
    let out = cli("lease status -o json");
    assert_eq!(code(&out), 0);
    let list = json(&out);
    let names: Vec<&str> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["m", "n"]);
    let out = cli("lease status");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.starts_with("NAME") && text.contains("c/a") && text.contains("held"),
        "{text}"
    );
}

/// Bad input: exit 2, one line on stderr, nothing changed.
fn bad_input_is_exit_2_and_changes_nothing(url: &str, schema: &str) {
    let cli = |line: &str| run(url, schema, &words(line));
    let before = json(&cli("lease status --name n -o json"));
    for (line, expect) in [
        (
            "lease acquire --name n --holder ''",
            "holder must not be empty",
        ),
        (
            "lease acquire --name n --holder x --ttl-seconds 0",
            "--ttl-seconds",
        ),
        (
            "lease acquire --name n --holder x --ttl-seconds -5",
            "--ttl-seconds",
        ),
        ("lease release --name n --holder c/a --epoch 0", "--epoch"),
        (
            "lease acquire --name '' --holder x",
            "lease name must not be empty",
        ),
    ] {
        let out = cli(line);
        assert_eq!(code(&out), 2, "{line}: {}", stderr(&out));
        assert!(stderr(&out).contains(expect), "{line}: {}", stderr(&out));
        assert_eq!(
            stderr(&out).trim_end().lines().count(),
            1,
            "{line}: {}",
            stderr(&out)
        );
    }
    let out = run(
        url,
        "Not-An-Identifier",
        &words("lease release --name n --holder c/a --epoch 1"),
    );
    assert_eq!(code(&out), 2);
    assert!(
        stderr(&out).contains("not a plain identifier"),
        "{}",
        stderr(&out)
    );
    let after = json(&cli("lease status --name n -o json"));
    assert_eq!(
        (&before["holder"], &before["epoch"]),
        (&after["holder"], &after["epoch"])
    );
}

#[test]
fn unreachable_database_is_exit_2_with_a_reason() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let url = format!("postgres://u:p@127.0.0.1:{port}/db");
    let out = run(
        &url,
        "public",
        &["lease", "acquire", "--name", "n", "--holder", "h"],
    );
    assert_eq!(code(&out), 2);
    assert!(stderr(&out).starts_with("error: "), "{}", stderr(&out));
    let out = std::process::Command::new(BIN)
        .args(["lease", "status"])
        .env_remove("DATABASE_URL")
        .output()
        .unwrap();
    assert_eq!(code(&out), 2);
    assert!(stderr(&out).contains("DATABASE_URL"), "{}", stderr(&out));
}

/// `run` without `--cluster-name` warns (two clusters left at "default" look like one),
/// and logs written to a pipe, as in every pod, carry no colour escapes.
#[test]
fn run_without_a_cluster_name_warns_in_plain_text() {
    let started = std::time::Instant::now();
    let out = std::process::Command::new(BIN)
        .args(["run", "--no-migrate", "--http-addr", "127.0.0.1:0"])
        .env("DATABASE_URL", "postgres://reaper@127.0.0.1:1/reaper")
        .env("KUBECONFIG", "/nonexistent/kubeconfig")
        .env_remove("REAPER_CLUSTER_NAME")
        .env_remove("KUBERNETES_SERVICE_HOST")
        .env_remove("RUST_LOG")
        .output()
        .expect("run reaper-operator");
    let err = stderr(&out);
    // A configuration that can never work stops the process at once, with the reason,
    // although the probes were already being served.
    assert_eq!(code(&out), 2, "started without a Kubernetes client: {err}");
    assert!(
        err.contains("cannot configure the Kubernetes client"),
        "{err}"
    );
    assert!(
        started.elapsed() < std::time::Duration::from_secs(20),
        "took {:?} to exit",
        started.elapsed()
    );
    assert!(err.contains("no --cluster-name"), "{err}");
    assert!(
        !err.contains('\u{1b}'),
        "ANSI escapes in piped logs: {err:?}"
    );
}
