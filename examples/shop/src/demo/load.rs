//! The demo's load: users registered, then orders placed over HTTP at a
//! steady rate, some cancelled, some paid with the declining card, and
//! users renamed as it goes.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::bail;
use diesel::{Connection, PgConnection};
use uuid::Uuid;

use super::checks::count;
use super::{DemoConfig, SKUS, sku};
use crate::events::Line;
use crate::order::NewOrder;
use crate::{http, payment};

/// What the load did, counted as it goes (the progress line reads it).
#[derive(Debug, Default)]
pub(super) struct Load {
    /// Users registered.
    pub(super) registered: AtomicU64,
    /// Renames made.
    pub(super) renamed: AtomicU64,
    /// Orders accepted.
    pub(super) placed: AtomicU64,
    /// Cancellations asked for.
    pub(super) cancel_requests: AtomicU64,
    /// Cancellations accepted (the others found the saga had cancelled first).
    pub(super) cancelled: AtomicU64,
}

/// Where the load goes: the two services, and the order service's replica
/// of the users (the load waits for it to know every user before ordering).
pub(super) struct Targets {
    /// The order service.
    pub(super) order: SocketAddr,
    /// The users service.
    pub(super) users: SocketAddr,
    /// The database, to watch the order service's replica.
    pub(super) database_url: String,
    /// The order service's schema, where its replica is.
    pub(super) order_schema: String,
}

/// Whether order `i` pays with the declining card: `percent` of the orders,
/// spread evenly (and, at 10%, never on an order the load cancels).
fn declines(i: usize, percent: u32) -> bool {
    let p = percent.min(100) as usize;
    (i + 3) * p / 100 > (i + 2) * p / 100
}

/// Registers the users, waits until the order service knows them all, then
/// places the orders over HTTP at the configured rate, cancelling some and
/// renaming users as it goes.
pub(super) async fn drive_load(
    config: DemoConfig,
    to: Targets,
    counts: Arc<Load>,
) -> anyhow::Result<()> {
    let users = register_users(&config, &to, &counts).await?;
    wait_for_customers(&to, users.len(), config.settle_timeout).await?;

    let pace = (config.rate > 0).then(|| Duration::from_secs_f64(1.0 / f64::from(config.rate)));
    let mut next = tokio::time::Instant::now();
    let mut inflight = tokio::task::JoinSet::new();
    for i in 1..=config.orders {
        if let Some(pace) = pace {
            next += pace;
            tokio::time::sleep_until(next).await;
        }
        while inflight.len() >= 8 {
            if let Some(r) = inflight.join_next().await {
                r??;
            }
        }
        let order = NewOrder {
            customer_id: Some(users[i % users.len()]),
            lines: (0..1 + i % 3)
                .map(|l| Line {
                    sku: sku((i + l) % SKUS),
                    qty: 1 + i32::try_from((i + l) % 4).unwrap_or(0),
                    price_cents: 250 + i64::try_from(((i * 7) + l) % 900).unwrap_or(0),
                })
                .collect(),
            currency: (config.v2_every > 0 && i % config.v2_every == 0).then(|| "EUR".to_owned()),
            payment_method: declines(i, config.fail_payments)
                .then(|| payment::DECLINING_METHOD.to_owned()),
            ..NewOrder::default()
        };
        let cancel = config.cancel_every > 0 && i % config.cancel_every == 0;
        let (addr, tally) = (to.order, Arc::clone(&counts));
        inflight.spawn(async move {
            let body = serde_json::to_vec(&order)?;
            let created = http::request(addr, "POST", "/orders", Some(&body)).await?;
            if created.status != 201 {
                bail!("POST /orders answered {}: {}", created.status, created.body);
            }
            tally.placed.fetch_add(1, Ordering::Relaxed);
            if cancel {
                tally.cancel_requests.fetch_add(1, Ordering::Relaxed);
                let id = created.body["id"].as_str().unwrap_or_default().to_owned();
                let r = http::request(addr, "POST", &format!("/orders/{id}/cancel"), None).await?;
                match r.status {
                    200 => {
                        tally.cancelled.fetch_add(1, Ordering::Relaxed);
                    }
                    // The saga cancelled it first (out of stock, or the
                    // payment declined): the customer's wish is met.
                    409 => {}
                    _ => bail!("cancel answered {}: {}", r.status, r.body),
                }
            }
            Ok(())
        });
        if config.rename_every > 0 && i % config.rename_every == 0 {
            let k = (i / config.rename_every) % users.len();
            let (addr, id, counts) = (to.users, users[k], Arc::clone(&counts));
            inflight.spawn(async move {
                let body = serde_json::to_vec(&serde_json::json!({
                    "name": format!("customer-{k} (renamed at order {i})")
                }))?;
                let r = http::request(addr, "POST", &format!("/users/{id}/rename"), Some(&body))
                    .await?;
                if r.status != 200 {
                    bail!("rename answered {}: {}", r.status, r.body);
                }
                counts.renamed.fetch_add(1, Ordering::Relaxed);
                Ok(())
            });
        }
    }
    while let Some(r) = inflight.join_next().await {
        r??;
    }
    Ok(())
}

/// Registers `config.users` users (8 requests at a time); their ids in order.
async fn register_users(
    config: &DemoConfig,
    to: &Targets,
    counts: &Arc<Load>,
) -> anyhow::Result<Vec<Uuid>> {
    let mut ids = vec![Uuid::nil(); config.users.max(1)];
    let mut inflight = tokio::task::JoinSet::new();
    for k in 0..ids.len() {
        while inflight.len() >= 8 {
            if let Some(r) = inflight.join_next().await {
                let (k, id) = r??;
                ids[k] = id;
            }
        }
        let (addr, counts) = (to.users, Arc::clone(counts));
        inflight.spawn(async move {
            let body = serde_json::to_vec(&serde_json::json!({ "name": format!("customer-{k}") }))?;
            let r = http::request(addr, "POST", "/users", Some(&body)).await?;
            let id = r.body["id"].as_str().and_then(|s| Uuid::parse_str(s).ok());
            match (r.status, id) {
                (201, Some(id)) => {
                    counts.registered.fetch_add(1, Ordering::Relaxed);
                    Ok((k, id))
                }
                _ => bail!("POST /users answered {}: {}", r.status, r.body),
            }
        });
    }
    while let Some(r) = inflight.join_next().await {
        let (k, id) = r??;
        ids[k] = id;
    }
    Ok(ids)
}

/// Waits until the order service's replica knows `users` customers: until
/// then an order for the newest would be refused as an unknown customer.
async fn wait_for_customers(to: &Targets, users: usize, timeout: Duration) -> anyhow::Result<()> {
    let sql = format!(
        r#"SELECT count(*) AS n FROM "{}".customers"#,
        to.order_schema
    );
    let url = to.database_url.clone();
    tokio::task::spawn_blocking(move || {
        let mut conn = PgConnection::establish(&url)?;
        let deadline = Instant::now() + timeout;
        loop {
            let known = count(&mut conn, &sql)?;
            if known >= i64::try_from(users)? {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("the order service knows {known} of {users} users after {timeout:?}");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    })
    .await?
}
