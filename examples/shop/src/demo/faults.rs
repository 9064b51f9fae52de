//! The demo's faults: relays and consumers killed the way a crashed process
//! dies, and broker connections cut, in turn while the load runs.

use std::process::Command;
use std::time::Duration;

use anyhow::{Context, bail};
use consumer::Consumer;
use diesel::{Connection, PgConnection, RunQueryDsl};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::checks::Count;

/// A task that can be killed (aborted, as a crash would) and started again.
pub(super) struct Restartable {
    start: Box<dyn Fn(CancellationToken) -> JoinHandle<()> + Send>,
    token: CancellationToken,
    task: JoinHandle<()>,
}

impl Restartable {
    /// Starts the task `start` makes, and keeps `start` to make it again.
    pub(super) fn new(start: Box<dyn Fn(CancellationToken) -> JoinHandle<()> + Send>) -> Self {
        let token = CancellationToken::new();
        let task = start(token.clone());
        Restartable { start, token, task }
    }

    /// Kills the task hard (no graceful shutdown) and starts a new one.
    fn crash_and_restart(&mut self) {
        self.abort();
        self.restart();
    }

    /// Stops the task where it is.
    fn abort(&mut self) {
        self.task.abort();
    }

    /// Starts a new task.
    fn restart(&mut self) {
        self.token = CancellationToken::new();
        self.task = (self.start)(self.token.clone());
    }

    /// Stops the task gracefully, waiting at most 30 s.
    pub(super) async fn stop(self) {
        self.token.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(30), self.task).await;
    }
}

/// The running relays and consumers, by service name, so a fault can pick
/// one.
pub(super) struct Fleet {
    /// A relay per producing service.
    pub(super) relays: Vec<(&'static str, Restartable)>,
    /// Each consumer (whose counters the report reads) and its task.
    pub(super) consumers: Vec<(&'static str, Consumer, Restartable)>,
}

impl Fleet {
    /// Stops everything gracefully, the consumers first.
    pub(super) async fn stop(self) {
        for (_, _, r) in self.consumers {
            r.stop().await;
        }
        for (_, r) in self.relays {
            r.stop().await;
        }
    }
}

/// The relays the faults kill, in turn: the busiest first.
const RELAY_VICTIMS: [&str; 5] = ["order", "payment", "inventory", "users", "logistics"];
/// The consumers the faults crash, in turn: billing first (its latency is
/// in the report), then the saga's steps.
const CONSUMER_VICTIMS: [&str; 4] = ["billing", "payment", "inventory", "order"];

/// The faults injected so far.
#[derive(Debug, Default)]
pub(super) struct Faults {
    /// Relays killed and restarted.
    pub(super) relay_kills: u32,
    /// Consumers crashed (tasks and connections) and restarted.
    pub(super) consumer_kills: u32,
    /// Times every broker connection of the vhost was closed.
    pub(super) cuts: u32,
    /// What each one hit, in order, for the report.
    pub(super) log: Vec<String>,
}

/// Where the faults strike: the run's database, vhost and name prefix.
pub(super) struct Scene<'a> {
    /// Where the consumers' sessions are ended.
    pub(super) database_url: &'a str,
    /// Whose broker connections are closed.
    pub(super) vhost: &'a str,
    /// Names the consumers' sessions (see [`crash_tag`]).
    pub(super) prefix: &'a str,
}

impl Faults {
    /// Injects the `round`-th fault: in turn a relay killed, a consumer
    /// crashed, and every broker connection of the vhost cut. The victims
    /// rotate, so a longer run hits every service.
    pub(super) async fn inject(
        &mut self,
        round: u32,
        fleet: &mut Fleet,
        scene: &Scene<'_>,
    ) -> anyhow::Result<()> {
        match round % 3 {
            0 => {
                let victim = RELAY_VICTIMS[self.relay_kills as usize % RELAY_VICTIMS.len()];
                if let Some((_, relay)) = fleet.relays.iter_mut().find(|(n, _)| *n == victim) {
                    relay.crash_and_restart();
                    self.relay_kills += 1;
                    self.log.push(format!("relay {victim}"));
                }
            }
            1 => {
                // A consumer crashes mid-work: as when its process dies,
                // its tasks stop and its database and broker connections
                // drop (open transactions roll back, unacked deliveries go
                // back to the queue).
                let victim =
                    CONSUMER_VICTIMS[self.consumer_kills as usize % CONSUMER_VICTIMS.len()];
                if let Some((_, _, running)) =
                    fleet.consumers.iter_mut().find(|(n, _, _)| *n == victim)
                {
                    let (url, vhost) = (scene.database_url.to_owned(), scene.vhost.to_owned());
                    let tag = crash_tag(scene.prefix, victim);
                    running.abort();
                    tokio::task::spawn_blocking(move || {
                        kill_connections(&url, &tag, &vhost, &format!("consumer {victim}"))
                    })
                    .await??;
                    running.restart();
                    self.consumer_kills += 1;
                    self.log.push(format!("consumer {victim}"));
                }
            }
            _ => {
                let vhost = scene.vhost.to_owned();
                let cut =
                    tokio::task::spawn_blocking(move || close_connections(&vhost, None)).await??;
                if cut > 0 {
                    self.cuts += 1;
                    self.log.push(format!("{cut} broker connections"));
                }
            }
        }
        Ok(())
    }
}

/// Makes a relay's task, for a [`Restartable`].
pub(super) fn relay_task(
    config: relay::RelayConfig,
) -> Box<dyn Fn(CancellationToken) -> JoinHandle<()> + Send> {
    Box::new(move |token: CancellationToken| {
        let config = config.clone();
        tokio::spawn(async move {
            match relay::Relay::new(config) {
                Ok(relay) => {
                    if let Err(e) = relay.run(async move { token.cancelled().await }).await {
                        tracing::error!(error = %e, "relay stopped");
                    }
                }
                Err(e) => tracing::error!(error = %e, "relay config"),
            }
        })
    })
}

/// Makes a consumer's task, for a [`Restartable`].
pub(super) fn consumer_task(
    consumer: Consumer,
) -> Box<dyn Fn(CancellationToken) -> JoinHandle<()> + Send> {
    Box::new(move |token: CancellationToken| {
        let consumer = consumer.clone();
        tokio::spawn(async move {
            if let Err(e) = consumer.run(token).await {
                tracing::error!(error = %e, "consumer stopped");
            }
        })
    })
}

/// Runs `rabbitmqctl` with `args`; its output.
pub(super) fn rabbitmqctl(args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new("rabbitmqctl")
        .args(args)
        .output()
        .context("running rabbitmqctl (the demo manages its own RabbitMQ vhost)")?;
    if !out.status.success() {
        bail!(
            "rabbitmqctl {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The `application_name` of a consumer's database sessions in this run.
pub(super) fn crash_tag(prefix: &str, consumer: &str) -> String {
    format!("{prefix}-{consumer}")
}

/// What a process death does to its connections: ends the database
/// sessions named `tag` and closes the broker connections to `vhost` named
/// `connection`. An aborted task alone would leave both running.
fn kill_connections(url: &str, tag: &str, vhost: &str, connection: &str) -> anyhow::Result<()> {
    let mut conn = PgConnection::establish(url)?;
    diesel::sql_query(
        "SELECT count(pg_terminate_backend(pid)) AS n FROM pg_stat_activity WHERE application_name = $1",
    )
    .bind::<diesel::sql_types::Text, _>(tag)
    .get_result::<Count>(&mut conn)?;
    close_connections(vhost, Some(connection))?;
    Ok(())
}

/// Closes, from the broker's side, the client connections to `vhost`
/// (only those whose client properties mention `named`, when given).
fn close_connections(vhost: &str, named: Option<&str>) -> anyhow::Result<usize> {
    let listing = rabbitmqctl(&[
        "list_connections",
        "-q",
        "--no-table-headers",
        "pid",
        "vhost",
        "client_properties",
    ])?;
    let matching: Vec<&str> = listing
        .lines()
        .filter_map(|line| {
            let mut fields = line.splitn(3, char::is_whitespace);
            let (Some(pid), Some(v), properties) = (fields.next(), fields.next(), fields.next())
            else {
                return None;
            };
            (v == vhost && named.is_none_or(|n| properties.is_some_and(|p| p.contains(n))))
                .then_some(pid)
        })
        .collect();
    if named.is_none() {
        // One command for them all: every rabbitmqctl run starts an Erlang
        // VM, about a second of CPU on this machine, and the shop has a
        // dozen connections.
        if !matching.is_empty() {
            rabbitmqctl(&["close_all_connections", "--vhost", vhost, "demo fault"])?;
        }
        return Ok(matching.len());
    }
    Ok(matching
        .into_iter()
        .filter(|pid| rabbitmqctl(&["close_connection", pid, "demo fault"]).is_ok())
        .count())
}
