//! No secret in any output. The `outbox-relay` binary is given database and
//! broker URLs whose password has a bad percent-escape (`%zz`: libpq then
//! quotes the URL back), both quotes and spaces, through the environment
//! variables and through `--database-url-file`/`DATABASE_URL_FILE` and
//! `--amqp-url-file`/`AMQP_URL_FILE`. Every line it logs (at trace level,
//! human and JSON), what `migrate`, `status` and `parked list` print, and
//! what `/metrics`, `/readyz` and `/healthz` serve hold neither the password
//! nor any piece of it, raw, percent-encoded or JSON-escaped; its argv (what
//! `ps` shows every local user) never holds it either. The errors still say
//! what failed and where: the database or broker, and the URL with `***`
//! for the password.
//!
//! The test database trusts TCP connections from 127.0.0.1, so any password
//! logs in there; the database roles made here have the password all the
//! same, and the broker user really checks it. Roles, users and secret files
//! are removed at the end, also when a test fails.

mod common;

use std::io::{BufRead, BufReader, Read};
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use common::{free_port, wait_for_response};
use diesel::Connection;
use diesel::connection::SimpleConnection;
use outbox::{Message, Outbox};
use relay::redact_url;
use testkit::TestSchema;
use testkit::amqp::TestTopology;

/// The password: a bad percent-escape, both quotes, spaces.
const PASSWORD: &str = "Tr0ub%zz d'or\"Sekr1t";
/// The password percent-encoded as a URL's user-info needs it.
const PASSWORD_ENCODED: &str = "Tr0ub%25zz%20d'or%22Sekr1t";

/// How long anything a test waits for may take.
const WAIT: Duration = Duration::from_secs(30);

/// Every form the password could take in output: raw (= the encoded form
/// decoded), percent-encoded, as the url crate re-serialises the raw form
/// (bad escape kept, the rest encoded), fully encoded, JSON-escaped.
fn secret_forms() -> Vec<String> {
    vec![
        PASSWORD.to_owned(),
        PASSWORD_ENCODED.to_owned(),
        "Tr0ub%zz%20d'or%22Sekr1t".to_owned(),
        "Tr0ub%25zz%20d%27or%22Sekr1t".to_owned(),
        PASSWORD.replace('"', "\\\""),
        PASSWORD_ENCODED.replace('\'', "%27"),
    ]
}

/// Every 5-character piece of every form (`Tr0ub`, `%zz d`, `d'or"`,
/// `ekr1t`, `%25zz`, ...): none of them is ordinary output, and a parser
/// that stops at the bad escape quotes the password from there on.
fn secret_pieces() -> Vec<String> {
    let mut pieces: Vec<String> = Vec::new();
    for form in secret_forms() {
        let chars: Vec<char> = form.chars().collect();
        for window in chars.windows(5) {
            let piece: String = window.iter().collect();
            if !pieces.contains(&piece) {
                pieces.push(piece);
            }
        }
    }
    pieces
}

/// The first piece of the password in `text` (as it is, or with colour
/// codes taken out), and the line that holds it.
fn find_secret(text: &str) -> Option<(String, String)> {
    let plain = strip_ansi(text);
    secret_pieces().into_iter().find_map(|piece| {
        [text, plain.as_str()]
            .iter()
            .find_map(|text| text.lines().find(|line| line.contains(&piece)))
            .map(|line| (piece.clone(), line.to_owned()))
    })
}

/// Panics, naming the line, if `text` holds any piece of the password, or
/// reports a panic (whose message might).
#[track_caller]
fn assert_no_secret(what: &str, text: &str) {
    if let Some((piece, line)) = find_secret(text) {
        panic!("{what} shows a piece of the password ({piece:?}): {line}");
    }
    let plain = strip_ansi(text);
    assert!(
        !plain.contains("panicked"),
        "{what} reports a panic: {plain}"
    );
}

/// `text` without ANSI colour sequences (the human log format is coloured).
fn strip_ansi(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c != '\u{1b}' {
            out.push(c);
        } else if chars.next() == Some('[') {
            for c in chars.by_ref() {
                if ('@'..='~').contains(&c) {
                    break;
                }
            }
        }
    }
    out
}

/// Panics if what `ps` shows of `command` (its argv), or with `env` its
/// environment too, holds a piece of the password.
#[track_caller]
fn assert_argv_clean(command: &Command, env: bool) {
    let mut shown: Vec<String> = vec![command.get_program().to_string_lossy().into_owned()];
    shown.extend(command.get_args().map(|a| a.to_string_lossy().into_owned()));
    assert_no_secret("the command line", &shown.join(" "));
    if env {
        let vars: Vec<String> = command
            .get_envs()
            .map(|(k, v)| {
                format!(
                    "{}={}",
                    k.to_string_lossy(),
                    v.map(|v| v.to_string_lossy().into_owned())
                        .unwrap_or_default()
                )
            })
            .collect();
        assert_no_secret("the environment", &vars.join("\n"));
    }
}

/// `user-info@` stripped from the test server's URL: `host:port/db?...`.
fn address_of(url: &str) -> String {
    let rest = url.split_once("://").map_or(url, |(_, rest)| rest);
    rest.rsplit_once('@')
        .map_or(rest, |(_, rest)| rest)
        .to_owned()
}

/// `host:port/database` of the test database.
fn database_address() -> String {
    address_of(&testkit::database_url())
}

/// `host:port/vhost` of the test broker.
fn amqp_address() -> String {
    address_of(&testkit::amqp::amqp_url())
}

/// What every database connection error starts with.
fn database_error(url: &str) -> String {
    format!("cannot connect to the database at {}", redact_url(url))
}

/// What every broker connection error starts with.
fn broker_error(url: &str) -> String {
    format!("cannot connect to the broker at {}", redact_url(url))
}

/// The binary for `schema`, with nothing from the test's environment.
fn relay_command(schema: &TestSchema) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_outbox-relay"));
    for var in [
        "DATABASE_URL",
        "DATABASE_URL_FILE",
        "AMQP_URL",
        "AMQP_URL_FILE",
        "RUST_LOG",
        "OUTBOX_RELAY_LOG_FORMAT",
        "OUTBOX_RELAY_HTTP_ADDR",
    ] {
        command.env_remove(var);
    }
    command.args(["--schema", schema.name()]);
    command
}

/// A file holding one URL (and a newline, as `echo` writes it), readable by
/// its owner alone, deleted at the end.
struct SecretFile(PathBuf);

impl SecretFile {
    fn new(contents: &str) -> Self {
        use std::os::unix::fs::PermissionsExt;
        let path = std::env::temp_dir().join(testkit::unique_name("outbox_relay_secret"));
        let file = SecretFile(path);
        std::fs::write(&file.0, format!("{contents}\n")).unwrap();
        std::fs::set_permissions(&file.0, std::fs::Permissions::from_mode(0o600)).unwrap();
        file
    }

    fn path(&self) -> &str {
        self.0.to_str().unwrap()
    }
}

impl Drop for SecretFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// How a URL reaches the binary.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Given {
    /// `DATABASE_URL`, `AMQP_URL`.
    Variable,
    /// `DATABASE_URL_FILE`, `AMQP_URL_FILE`.
    FileVariable,
    /// `--database-url-file`, `--amqp-url-file`.
    FileFlag,
}

const EVERY_WAY: [Given; 3] = [Given::Variable, Given::FileVariable, Given::FileFlag];

/// Gives `command` the database URL `url` the `given` way; a file lives as
/// long as the returned guard. (`--database-url-file` is a global flag, so
/// it may come before the subcommand.)
fn give_database_url(command: &mut Command, given: Given, url: &str) -> Option<SecretFile> {
    match given {
        Given::Variable => {
            command.env("DATABASE_URL", url);
            None
        }
        Given::FileVariable => {
            let file = SecretFile::new(url);
            command.env("DATABASE_URL_FILE", file.path());
            Some(file)
        }
        Given::FileFlag => {
            let file = SecretFile::new(url);
            command.args(["--database-url-file", file.path()]);
            Some(file)
        }
    }
}

/// Gives `command` (whose subcommand `run` is already on it) the AMQP URL
/// `url` the `given` way.
fn give_amqp_url(command: &mut Command, given: Given, url: &str) -> Option<SecretFile> {
    match given {
        Given::Variable => {
            command.env("AMQP_URL", url);
            None
        }
        Given::FileVariable => {
            let file = SecretFile::new(url);
            command.env("AMQP_URL_FILE", file.path());
            Some(file)
        }
        Given::FileFlag => {
            let file = SecretFile::new(url);
            command.args(["--amqp-url-file", file.path()]);
            Some(file)
        }
    }
}

/// Runs `command` to its end; checks that neither its argv nor (unless a
/// URL is in a variable) its environment nor anything it printed holds the
/// password. Returns the output and stdout + stderr, colour codes removed.
#[track_caller]
fn run_to_end(what: &str, command: &mut Command, secret_in_env: bool) -> (Output, String) {
    assert_argv_clean(command, !secret_in_env);
    let output = command.output().unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_no_secret(&format!("{what}: stdout"), &stdout);
    assert_no_secret(&format!("{what}: stderr"), &stderr);
    let text = strip_ansi(&format!("{stdout}{stderr}"));
    (output, text)
}

/// A PostgreSQL login role whose password is [`PASSWORD`], allowed to make
/// the outbox in one schema; dropped at the end with what it owns.
struct PgRole {
    name: String,
}

impl PgRole {
    fn new(schema: &TestSchema) -> Self {
        // The guard first: a failed grant still drops the role.
        let role = PgRole {
            name: testkit::unique_name("secret_role"),
        };
        testkit::connect(&testkit::database_url())
            .batch_execute(&format!(
                r#"CREATE ROLE "{role}" LOGIN PASSWORD '{password}';
                   GRANT USAGE, CREATE ON SCHEMA "{schema}" TO "{role}";"#,
                role = role.name,
                password = PASSWORD.replace('\'', "''"),
                schema = schema.name(),
            ))
            .expect("create the role");
        role
    }

    /// The role's URL at `address` with the password as `password` (raw or
    /// encoded) spells it.
    fn url(&self, password: &str, address: &str) -> String {
        format!("postgres://{}:{password}@{address}", self.name)
    }
}

impl Drop for PgRole {
    fn drop(&mut self) {
        if let Ok(mut conn) = diesel::PgConnection::establish(&testkit::database_url()) {
            let _ = conn.batch_execute(&format!(r#"DROP OWNED BY "{}""#, self.name));
            let _ = conn.batch_execute(&format!(r#"DROP ROLE IF EXISTS "{}""#, self.name));
        }
    }
}

fn rabbitmqctl(args: &[&str]) {
    let out = Command::new("rabbitmqctl")
        .args(args)
        .output()
        .expect("rabbitmqctl (the tests run beside the broker)");
    assert!(out.status.success(), "rabbitmqctl {}: {out:?}", args[0]);
}

/// The broker's virtual host of the test URL (`%2f` is `/`).
fn amqp_vhost() -> String {
    let address = amqp_address();
    let vhost = address
        .split_once('/')
        .map_or("", |(_, v)| v)
        .split('?')
        .next()
        .unwrap_or("");
    match vhost {
        "" | "%2f" | "%2F" => "/".to_owned(),
        other => other.to_owned(),
    }
}

/// A RabbitMQ user whose password is [`PASSWORD`], with the relay's
/// permissions of docs/PRIVILEGES.md (write on `exchange`, nothing else);
/// deleted at the end.
struct RabbitUser {
    name: String,
}

impl RabbitUser {
    fn new(exchange: &str) -> Self {
        let user = RabbitUser {
            name: testkit::unique_name("secret_user"),
        };
        rabbitmqctl(&["add_user", &user.name, PASSWORD]);
        rabbitmqctl(&[
            "set_permissions",
            "-p",
            &amqp_vhost(),
            &user.name,
            "^$",
            &format!("^({exchange})$"),
            "^$",
        ]);
        user
    }

    fn url(&self, password: &str) -> String {
        format!("amqp://{}:{password}@{}", self.name, amqp_address())
    }
}

impl Drop for RabbitUser {
    fn drop(&mut self) {
        let _ = Command::new("rabbitmqctl")
            .args(["delete_user", &self.name])
            .output();
    }
}

/// GETs `/healthz`, `/readyz` and `/metrics` (all served, whatever the
/// state) and checks that no answer holds the password. Returns the
/// metrics.
fn endpoints_show_no_secret(port: u16) -> String {
    let (status, body) = wait_for_response(port, "/healthz", |_, _| true);
    assert_eq!(status, 200, "{body}");
    assert_no_secret("/healthz", &body);
    let (_, body) = wait_for_response(port, "/readyz", |_, _| true);
    assert_no_secret("/readyz", &body);
    let (status, metrics) = wait_for_response(port, "/metrics", |_, _| true);
    assert_eq!(status, 200, "{metrics}");
    assert_no_secret("/metrics", &metrics);
    metrics
}

/// `outbox-relay run` in the background; stdout and stderr collected as
/// they come. Killed at the end if still running.
struct Running {
    child: Child,
    output: Arc<Mutex<Vec<u8>>>,
    readers: Vec<JoinHandle<()>>,
}

impl Running {
    #[track_caller]
    fn start(command: &mut Command, secret_in_env: bool) -> Self {
        assert_argv_clean(command, !secret_in_env);
        let mut child = command
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let output = Arc::new(Mutex::new(Vec::new()));
        let pipes: Vec<Box<dyn Read + Send>> = vec![
            Box::new(child.stdout.take().unwrap()),
            Box::new(child.stderr.take().unwrap()),
        ];
        let readers = pipes
            .into_iter()
            .map(|pipe| {
                let output = Arc::clone(&output);
                std::thread::spawn(move || {
                    let mut pipe = BufReader::new(pipe);
                    let mut line = Vec::new();
                    while matches!(pipe.read_until(b'\n', &mut line), Ok(n) if n > 0) {
                        output.lock().unwrap().extend_from_slice(&line);
                        line.clear();
                    }
                })
            })
            .collect();
        Running {
            child,
            output,
            readers,
        }
    }

    /// Everything logged so far, as written (colour codes and all).
    fn output(&self) -> String {
        String::from_utf8_lossy(&self.output.lock().unwrap()).into_owned()
    }

    /// Waits until the output, colour codes removed, holds `text`.
    fn wait_for_output(&self, text: &str) -> String {
        testkit::wait_for(&format!("the relay to log {text:?}"), WAIT, || {
            let plain = strip_ansi(&self.output());
            plain.contains(text).then_some(plain)
        })
    }

    /// What `ps` shows of the running process: its argv, and its
    /// environment (readable by the same user and root).
    fn proc_view(&self, what: &str) -> String {
        let bytes = std::fs::read(format!("/proc/{}/{what}", self.child.id())).unwrap();
        String::from_utf8_lossy(&bytes).replace('\0', " ")
    }

    /// SIGTERM, then waits (20 s at most) for the exit and the last output.
    fn stop(&mut self) -> (ExitStatus, String) {
        let status = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
        let deadline = Instant::now() + Duration::from_secs(20);
        let exit = loop {
            if let Some(exit) = self.child.try_wait().unwrap() {
                break exit;
            }
            assert!(
                Instant::now() < deadline,
                "relay did not exit within 20 s of SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(20));
        };
        for reader in self.readers.drain(..) {
            reader.join().unwrap();
        }
        (exit, self.output())
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `migrate`, `status` (table and JSON) and `parked list` (table and JSON)
/// work with the URL in a file named by the flag, in a file named by the
/// variable, and in the variable, percent-encoded or with the raw bad
/// escape (which tokio-postgres takes as it is); nothing they print holds
/// the password, and no argv does.
#[test]
fn admin_commands_take_the_url_from_a_file_or_variable_and_print_no_secret() {
    let schema = TestSchema::new("secret_admin");
    let role = PgRole::new(&schema);
    let encoded = role.url(PASSWORD_ENCODED, &database_address());
    let raw = role.url(PASSWORD, &database_address());

    // The role makes the outbox, reading its URL from the flag's file.
    let mut migrate = relay_command(&schema);
    let _file = give_database_url(&mut migrate, Given::FileFlag, &encoded);
    migrate.arg("migrate");
    let (output, text) = run_to_end("migrate --database-url-file", &mut migrate, false);
    assert!(output.status.success(), "{text}");
    assert!(text.contains("migrations applied"), "{text}");

    for given in EVERY_WAY {
        for url in [&encoded, &raw] {
            if given != Given::Variable && url == &raw {
                continue; // a file holds what the variable holds: once is enough
            }
            let runs: [(&[&str], &str); 5] = [
                (&["migrate"], "migrations already applied"),
                (&["status"], "pending 0  retrying 0  parked 0"),
                (&["status", "--json"], r#""totals":"#),
                (&["parked", "list"], "0 parked row(s) shown"),
                (&["parked", "list", "--json"], ""),
            ];
            for (args, expected) in runs {
                if url == &raw && args[0] == "migrate" {
                    continue; // libpq refuses the bad escape: see the next test
                }
                let what = format!("{args:?} with the URL given as {given:?}");
                let mut command = relay_command(&schema);
                let _file = give_database_url(&mut command, given, url);
                command.args(args);
                let (output, text) = run_to_end(&what, &mut command, given == Given::Variable);
                assert!(output.status.success(), "{what}: {text}");
                assert!(text.contains(expected), "{what}: {text}");
            }
        }
    }
}

/// Every way a database URL fails (libpq refusing the bad escape and
/// quoting the URL back, a closed port, the password as a query parameter,
/// a `postgres:/` typo libpq takes for a key=value string and quotes
/// whole), for `migrate`, `run --migrate`, `status` and `parked list`,
/// whichever way the URL is given: exit 1 with an error naming the database
/// and the URL with `***` for the password, and no piece of the password.
#[test]
fn database_errors_name_the_database_and_redacted_url_but_no_secret() {
    let schema = TestSchema::new("secret_db_errors");
    let role = PgRole::new(&schema);
    let closed = "127.0.0.1:1/test";
    let refused = "Connection refused";
    let not_migrated = format!("the outbox tables in schema {} are missing", schema.name());

    struct Case {
        url: String,
        /// Expected in the output of `migrate` and `run --migrate` (libpq).
        migrate: Vec<String>,
        /// Expected in the output of `status` and `parked list` (tokio-postgres).
        admin: Vec<String>,
    }
    let raw_live = role.url(PASSWORD, &database_address());
    let encoded_closed = role.url(PASSWORD_ENCODED, closed);
    let raw_closed = role.url(PASSWORD, closed);
    let query_closed = format!(
        "postgres://{}@{closed}?password={PASSWORD_ENCODED}",
        role.name
    );
    let typo = format!("postgres:/{}:{PASSWORD}@{}", role.name, database_address());
    let cases = [
        Case {
            migrate: vec![
                database_error(&raw_live),
                "invalid percent-encoded token".into(),
            ],
            // tokio-postgres keeps the bad escape as it is and logs in.
            admin: vec![not_migrated.clone()],
            url: raw_live,
        },
        Case {
            migrate: vec![database_error(&encoded_closed), refused.into()],
            admin: vec![database_error(&encoded_closed), refused.into()],
            url: encoded_closed,
        },
        Case {
            migrate: vec![
                database_error(&raw_closed),
                "invalid percent-encoded token".into(),
            ],
            admin: vec![database_error(&raw_closed), refused.into()],
            url: raw_closed,
        },
        Case {
            migrate: vec![database_error(&query_closed), refused.into()],
            admin: vec![database_error(&query_closed), refused.into()],
            url: query_closed,
        },
        Case {
            migrate: vec![database_error(&typo), "connection info string".into()],
            admin: vec![database_error(&typo)],
            url: typo,
        },
    ];
    for case in &cases {
        assert!(
            case.migrate[0].contains("***") || case.migrate[0].contains("without a scheme"),
            "the expected error shows the URL redacted: {}",
            case.migrate[0]
        );
        for given in EVERY_WAY {
            let runs: [(&[&str], &Vec<String>); 5] = [
                (&["migrate"], &case.migrate),
                (
                    &[
                        "run",
                        "--migrate",
                        "--amqp-url",
                        "amqp://guest@127.0.0.1:1/%2f",
                    ],
                    &case.migrate,
                ),
                (&["status"], &case.admin),
                (&["status", "--json"], &case.admin),
                (&["parked", "list"], &case.admin),
            ];
            for (args, expected) in runs {
                let what = format!("{args:?} with {} given as {given:?}", redact_url(&case.url));
                let mut command = relay_command(&schema);
                let _file = give_database_url(&mut command, given, &case.url);
                command.args(args);
                let (output, text) = run_to_end(&what, &mut command, given == Given::Variable);
                assert_eq!(output.status.code(), Some(1), "{what}: {text}");
                for expected in expected {
                    assert!(text.contains(expected.as_str()), "{what}: {text}");
                }
            }
        }
    }
}

/// End to end with both URLs in files: `run --migrate` reads the database
/// URL from `DATABASE_URL_FILE` (percent-encoded) and the AMQP URL from
/// `--amqp-url-file` (the raw bad escape, quotes and spaces, which lapin
/// takes as they are) and logs in to RabbitMQ as a user whose password that
/// is, with write permission on one exchange alone. It ships a routable
/// row and parks an unroutable one; at trace level, nothing it logs, no
/// endpoint, neither `status` nor `parked list` (whose `last_error` comes
/// from the broker), and neither its argv nor its environment as `ps` sees
/// them hold the password.
#[test]
fn run_with_both_urls_in_files_ships_parks_and_shows_no_secret() {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let schema = TestSchema::new("secret_run");
    let role = PgRole::new(&schema);
    let topology = runtime.block_on(TestTopology::new("secret_run", "ok.#"));
    let user = RabbitUser::new(&topology.exchange);
    let database_url = role.url(PASSWORD_ENCODED, &database_address());
    let database_file = SecretFile::new(&database_url);
    let amqp_file = SecretFile::new(&user.url(PASSWORD));
    let port = free_port();

    let mut command = relay_command(&schema);
    command
        .env("DATABASE_URL_FILE", database_file.path())
        .env("RUST_LOG", "trace")
        .args(["run", "--migrate", "--amqp-url-file", amqp_file.path()])
        .args(["--http-addr", &format!("127.0.0.1:{port}")])
        .args(["--poll-interval", "100ms", "--retry-max-attempts", "1"]);
    let mut relay = Running::start(&mut command, false);
    assert_no_secret("the relay's argv in /proc", &relay.proc_view("cmdline"));
    assert_no_secret(
        "the relay's environment in /proc",
        &relay.proc_view("environ"),
    );

    let (_, ready) = wait_for_response(port, "/readyz", |status, _| status == 200);
    assert!(ready.contains(r#""ready":true"#), "{ready}");

    // Written by the test server's superuser into the role's tables.
    let outbox = Outbox::new(outbox::Config {
        schema: schema.name().to_owned(),
        ..outbox::Config::default()
    })
    .unwrap();
    let mut conn = schema.connect();
    for routing_key in ["ok.shipped", "lost.parked"] {
        let message = Message::builder(&topology.exchange, routing_key, "secret.v1.test")
            .json(&serde_json::json!({ "routing_key": routing_key }))
            .build()
            .unwrap();
        conn.transaction(|conn| outbox.enqueue_message(conn, &message))
            .unwrap();
    }
    let received = runtime.block_on(topology.receive(1, WAIT));
    assert_eq!(received[0].routing_key, "ok.shipped");

    let parked = testkit::wait_for("the unroutable row to be parked", WAIT, || {
        let mut list = relay_command(&schema);
        list.env("DATABASE_URL_FILE", database_file.path())
            .args(["parked", "list", "--json"]);
        let (output, text) = run_to_end("parked list --json", &mut list, false);
        assert!(output.status.success(), "{text}");
        text.contains("lost.parked").then_some(text)
    });
    assert!(parked.contains("returned by the broker"), "{parked}");
    let mut list = relay_command(&schema);
    list.args([
        "--database-url-file",
        database_file.path(),
        "parked",
        "list",
    ]);
    let (output, text) = run_to_end("parked list", &mut list, false);
    assert!(output.status.success(), "{text}");
    assert!(text.contains("1 parked row(s) shown"), "{text}");
    let mut status = relay_command(&schema);
    status
        .env("DATABASE_URL_FILE", database_file.path())
        .arg("status");
    let (output, text) = run_to_end("status", &mut status, false);
    assert!(output.status.success(), "{text}");
    assert!(text.contains("parked 1"), "{text}");

    let metrics = endpoints_show_no_secret(port);
    assert!(metrics.contains("outbox_relay_parked"), "{metrics}");

    let (exit, output) = relay.stop();
    assert_no_secret("the relay's log", &output);
    assert!(exit.success(), "{exit:?}: {}", strip_ansi(&output));
    let plain = strip_ansi(&output);
    assert!(plain.contains("migrations applied"), "{plain}");
    assert!(plain.contains("relay started"), "{plain}");
    assert!(
        plain.contains(&redact_url(&database_url)),
        "the config is logged redacted"
    );
    assert!(plain.contains(&redact_url(&user.url(PASSWORD))), "{plain}");
}

/// `run` against a closed database port, the password raw in `DATABASE_URL`
/// and JSON logs: it keeps retrying, says so naming the database and the
/// redacted URL, and neither the log nor any endpoint holds the password.
#[test]
fn run_with_the_database_unreachable_logs_no_secret() {
    let schema = TestSchema::new("secret_db_down");
    let database_url = format!("postgres://app:{PASSWORD}@127.0.0.1:1/test");
    let port = free_port();
    let mut command = relay_command(&schema);
    command
        .env("DATABASE_URL", &database_url)
        .env("RUST_LOG", "debug")
        .args(["--log-format", "json", "run"])
        .args(["--http-addr", &format!("127.0.0.1:{port}")])
        .args(["--retry-max-delay", "1s"]);
    let _amqp = give_amqp_url(
        &mut command,
        Given::Variable,
        &format!("amqp://guest:{PASSWORD_ENCODED}@{}", amqp_address()),
    );
    let mut relay = Running::start(&mut command, true);
    assert_no_secret("the relay's argv in /proc", &relay.proc_view("cmdline"));

    let logged = relay.wait_for_output("cannot read the outbox settings");
    assert!(logged.contains(&database_error(&database_url)), "{logged}");
    assert!(logged.contains("Connection refused"), "{logged}");
    let (status, _) = wait_for_response(port, "/readyz", |_, _| true);
    assert_eq!(status, 503);
    endpoints_show_no_secret(port);

    let (exit, output) = relay.stop();
    assert_no_secret("the relay's log", &output);
    assert!(exit.success(), "{exit:?}: {output}");
    for line in output.lines() {
        assert!(line.starts_with('{'), "every line is JSON: {line}");
    }
}

/// `run` with the broker refusing the login (the password wrong for
/// `guest`) or not listening: it keeps retrying, says so naming the broker
/// and the redacted URL, and neither the log nor any endpoint holds the
/// password.
#[test]
fn run_with_the_broker_refusing_or_unreachable_logs_no_secret() {
    let (schema, _) = common::outbox_schema("secret_broker_down");
    let cases = [
        (
            Given::FileVariable,
            format!("amqp://guest:{PASSWORD}@{}", amqp_address()),
            "ACCESS_REFUSED",
        ),
        (
            Given::FileFlag,
            format!("amqp://guest:{PASSWORD_ENCODED}@{}", amqp_address()),
            "ACCESS_REFUSED",
        ),
        (
            Given::Variable,
            format!("amqp://guest:{PASSWORD_ENCODED}@127.0.0.1:1/%2f"),
            "Connection refused",
        ),
    ];
    for (given, amqp_url, cause) in cases {
        let port = free_port();
        let mut command = relay_command(&schema);
        command
            .env("DATABASE_URL", testkit::database_url())
            .arg("run")
            .args(["--http-addr", &format!("127.0.0.1:{port}")])
            .args(["--retry-max-delay", "1s", "--workers", "1"]);
        let _file = give_amqp_url(&mut command, given, &amqp_url);
        let mut relay = Running::start(&mut command, given == Given::Variable);
        assert_no_secret("the relay's argv in /proc", &relay.proc_view("cmdline"));
        if given != Given::Variable {
            assert_no_secret(
                "the relay's environment in /proc",
                &relay.proc_view("environ"),
            );
        }

        let logged = relay.wait_for_output("broker unavailable");
        assert!(logged.contains(&broker_error(&amqp_url)), "{logged}");
        assert!(logged.contains(cause), "{logged}");
        let (status, body) =
            wait_for_response(port, "/readyz", |_, body| body.contains("database\":\"up"));
        assert_eq!(status, 503, "{body}");
        assert!(body.contains(r#""broker":"down""#), "{body}");
        endpoints_show_no_secret(port);

        let (exit, output) = relay.stop();
        assert_no_secret(&format!("the relay's log ({given:?})"), &output);
        assert!(exit.success(), "{exit:?}: {}", strip_ansi(&output));
    }
}

/// A URL given where its file belongs (`DATABASE_URL_FILE=postgres://...`)
/// or a URL of the wrong scheme in the file: the error says what is wrong
/// and shows the URL redacted.
#[test]
fn a_url_where_its_file_belongs_or_of_the_wrong_scheme_is_not_echoed() {
    let schema = TestSchema::new("secret_misplaced");
    let database_url = format!("postgres://app:{PASSWORD}@{}", database_address());
    let mut status = relay_command(&schema);
    status.env("DATABASE_URL_FILE", &database_url).arg("status");
    let (output, text) = run_to_end("DATABASE_URL_FILE=<the URL>", &mut status, true);
    assert_eq!(output.status.code(), Some(1), "{text}");
    assert!(
        text.contains(&format!("reading {} (a URL?", redact_url(&database_url))),
        "{text}"
    );

    let amqp_url = format!("amqp://guest:{PASSWORD}@{}", amqp_address());
    let mut run = relay_command(&schema);
    run.env("DATABASE_URL", testkit::database_url())
        .env("AMQP_URL_FILE", &amqp_url)
        .args(["run", "--http-addr", "127.0.0.1:0"]);
    let (output, text) = run_to_end("AMQP_URL_FILE=<the URL>", &mut run, true);
    assert_eq!(output.status.code(), Some(1), "{text}");
    assert!(
        text.contains(&format!("reading {} (a URL?", redact_url(&amqp_url))),
        "{text}"
    );

    let http_url = format!("http://guest:{PASSWORD}@{}", amqp_address());
    let file = SecretFile::new(&http_url);
    let mut run = relay_command(&schema);
    run.env("DATABASE_URL", testkit::database_url())
        .args(["run", "--amqp-url-file", file.path()])
        .args(["--http-addr", "127.0.0.1:0"]);
    let (output, text) = run_to_end("an http:// URL in --amqp-url-file", &mut run, false);
    assert_eq!(output.status.code(), Some(1), "{text}");
    assert!(
        text.contains(&format!(
            "must start with amqp:// or amqps://, got {}",
            redact_url(&http_url)
        )),
        "{text}"
    );
}

/// The password is a test of something: every piece the tests look for is
/// in it, and the redacted URLs they expect hold none.
#[test]
fn the_password_has_what_makes_drivers_quote_it() {
    for needed in ["%zz", "'", "\"", " "] {
        assert!(PASSWORD.contains(needed), "{needed:?}");
    }
    let url = format!("postgres://app:{PASSWORD}@db/x");
    let redacted = redact_url(&url);
    assert_eq!(redacted, "postgres://app:***@db/x");
    assert_no_secret("a redacted URL", &redacted);
    for form in secret_forms() {
        assert!(
            find_secret(&format!("error: \"{form}\"")).is_some(),
            "{form}"
        );
    }
    // What libpq quotes after the bad escape, coloured as the human log is.
    assert!(find_secret("token: \u{1b}[3m\"%zz d'or\"S\u{1b}[0m").is_some());
    assert!(find_secret("...ekr1t").is_some(), "a tail of it");
}
