//! Events and row readers shared by the outbox integration tests.
#![allow(dead_code, unreachable_pub)]

use diesel::sql_types::{BigInt, Bytea, Integer, Jsonb, Nullable, SmallInt, Text};
use diesel::{PgConnection, QueryableByName, RunQueryDsl};
use serde::Serialize;
use testkit::TestSchema;
use uuid::Uuid;

/// An event with an ordering key (the order id).
#[derive(Debug, Serialize)]
pub struct OrderSubmitted {
    pub order_id: String,
    pub total_cents: i64,
}

impl outbox::Event for OrderSubmitted {
    const EXCHANGE: &'static str = "order";
    const ROUTING_KEY: &'static str = "order.v1.submitted";
    const EVENT_TYPE: &'static str = "order.submitted";

    fn ordering_key(&self) -> Option<String> {
        Some(self.order_id.clone())
    }
}

/// An event without an ordering key.
#[derive(Debug, Serialize)]
pub struct NewsletterSent {
    pub issue: u32,
}

impl outbox::Event for NewsletterSent {
    const EXCHANGE: &'static str = "marketing";
    const ROUTING_KEY: &'static str = "marketing.v3.newsletter_sent";
    const EVENT_TYPE: &'static str = "marketing.newsletter_sent";
    const VERSION: u32 = 3;

    fn ordering_key(&self) -> Option<String> {
        None
    }
}

/// A migrated schema of its own and an `Outbox` pointed at it.
pub fn outbox_in_own_schema(prefix: &str) -> (TestSchema, outbox::Outbox) {
    let schema = TestSchema::new(prefix);
    let outbox = outbox::Outbox::new(outbox::Config {
        schema: schema.name().to_owned(),
        ..outbox::Config::default()
    })
    .unwrap();
    outbox.migrate(&mut schema.connect()).unwrap();
    (schema, outbox)
}

/// Every column of an outbox row.
#[derive(Debug, Clone, PartialEq, QueryableByName)]
pub struct Row {
    #[diesel(sql_type = BigInt)]
    pub seq: i64,
    #[diesel(sql_type = diesel::sql_types::Uuid)]
    pub id: Uuid,
    #[diesel(sql_type = Nullable<Text>)]
    pub ordering_key: Option<String>,
    #[diesel(sql_type = Nullable<BigInt>)]
    pub key_seq: Option<i64>,
    #[diesel(sql_type = SmallInt)]
    pub partition: i16,
    #[diesel(sql_type = Text)]
    pub exchange: String,
    #[diesel(sql_type = Text)]
    pub routing_key: String,
    #[diesel(sql_type = Text)]
    pub event_type: String,
    #[diesel(sql_type = Integer)]
    pub event_version: i32,
    #[diesel(sql_type = Bytea)]
    pub payload: Vec<u8>,
    #[diesel(sql_type = Jsonb)]
    pub headers: serde_json::Value,
    #[diesel(sql_type = Integer)]
    pub attempts: i32,
    #[diesel(sql_type = Nullable<Text>)]
    pub last_error: Option<String>,
    #[diesel(sql_type = diesel::sql_types::Bool)]
    pub pending: bool,
}

/// All outbox rows of the connection's schema (search_path), in seq order.
pub fn rows(conn: &mut PgConnection) -> Vec<Row> {
    diesel::sql_query(
        r#"SELECT seq, id, ordering_key, key_seq, "partition", exchange, routing_key, event_type,
                  event_version, payload, headers, attempts, last_error,
                  (published_at IS NULL AND parked_at IS NULL) AS pending
           FROM outbox_messages ORDER BY seq"#,
    )
    .load(conn)
    .unwrap()
}

#[derive(QueryableByName)]
struct Count {
    #[diesel(sql_type = BigInt)]
    n: i64,
}

/// Rows in `table` of the connection's schema.
pub fn count(conn: &mut PgConnection, table: &str) -> i64 {
    diesel::sql_query(format!("SELECT count(*) AS n FROM {table}"))
        .get_result::<Count>(conn)
        .unwrap()
        .n
}
