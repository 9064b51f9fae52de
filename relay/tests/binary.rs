//! The `outbox-relay` sidecar as an operator runs it: config errors, health
//! endpoints, and a graceful stop on SIGTERM.

mod common;

use std::io::Read;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{free_port, get, outbox_schema, wait_for_response};
use testkit::TestSchema;

fn relay_command(schema: &TestSchema) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_outbox-relay"));
    command
        .env_remove("DATABASE_URL")
        .env_remove("AMQP_URL")
        .args([
            "--database-url",
            &testkit::database_url(),
            "--schema",
            schema.name(),
        ]);
    command
}

struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn terminate_and_wait(child: &mut Child) -> std::process::ExitStatus {
    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        assert!(
            Instant::now() < deadline,
            "relay did not exit within 20 s of SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn config_errors_name_the_flag_and_variable_and_hide_secrets() {
    let (schema, _) = outbox_schema("bin_config");
    let missing = relay_command(&schema).arg("run").output().unwrap();
    assert_eq!(missing.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&missing.stderr);
    assert!(
        stderr
            .contains("`--amqp-url`, `AMQP_URL`, `--amqp-url-file` or `AMQP_URL_FILE` must be set"),
        "{stderr}"
    );

    let bad = relay_command(&schema)
        .args([
            "run",
            "--amqp-url",
            "amqp://guest:hunter2@127.0.0.1:5672/%2f",
            "--workers",
            "0",
        ])
        .output()
        .unwrap();
    assert_eq!(bad.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&bad.stderr);
    assert!(
        stderr.contains("invalid `--workers` or `OUTBOX_RELAY_WORKERS`"),
        "{stderr}"
    );
    assert!(!stderr.contains("hunter2"), "a secret leaked: {stderr}");

    let no_database = Command::new(env!("CARGO_BIN_EXE_outbox-relay"))
        .env_remove("DATABASE_URL")
        .arg("status")
        .output()
        .unwrap();
    assert_eq!(no_database.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&no_database.stderr).contains(
        "`--database-url`, `DATABASE_URL`, `--database-url-file` or `DATABASE_URL_FILE` must be set"
    ));

    let bad_duration = relay_command(&schema)
        .args(["run", "--amqp-url", "amqp://x", "--poll-interval", "often"])
        .output()
        .unwrap();
    assert_eq!(bad_duration.status.code(), Some(2), "clap's usage error");
    assert!(String::from_utf8_lossy(&bad_duration.stderr).contains("--poll-interval"));
}

#[test]
fn readyz_says_the_broker_is_down_while_it_is_unreachable() {
    let (schema, _) = outbox_schema("bin_broker_down");
    let port = free_port();
    let child = relay_command(&schema)
        .args(["run", "--amqp-url", "amqp://guest:secret@127.0.0.1:1/%2f"])
        .args([
            "--http-addr",
            &format!("127.0.0.1:{port}"),
            "--retry-max-delay",
            "1s",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut child = Killed(child);

    let (status, body) =
        wait_for_response(port, "/readyz", |_, body| body.contains("database\":\"up"));
    assert_eq!(status, 503, "{body}");
    assert!(body.contains(r#""broker":"down""#), "{body}");
    assert_eq!(
        get(port, "/healthz").unwrap().0,
        200,
        "alive even when not ready"
    );

    let exit = terminate_and_wait(&mut child.0);
    assert!(exit.success(), "{exit:?}");
    let mut stderr = String::new();
    child
        .0
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    assert!(stderr.contains("broker unavailable"), "{stderr}");
    assert!(!stderr.contains("secret"), "a secret leaked: {stderr}");
}

#[test]
fn ready_with_both_up_serves_metrics_and_stops_cleanly_on_sigterm() {
    let (schema, _) = outbox_schema("bin_ready");
    let port = free_port();
    let child = relay_command(&schema)
        .args(["run", "--amqp-url", &testkit::amqp::amqp_url()])
        .args(["--http-addr", &format!("127.0.0.1:{port}")])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut child = Killed(child);

    let (_, body) = wait_for_response(port, "/readyz", |status, _| status == 200);
    assert!(body.contains(r#""ready":true"#), "{body}");
    let (status, metrics) = wait_for_response(port, "/metrics", |_, body| {
        body.contains("outbox_relay_backlog")
    });
    assert_eq!(status, 200);
    assert!(metrics.contains("outbox_relay_parked"), "{metrics}");

    let exit = terminate_and_wait(&mut child.0);
    assert!(exit.success(), "{exit:?}");
}
