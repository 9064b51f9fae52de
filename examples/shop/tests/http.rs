//! The order and users services' HTTP endpoints, with real requests over
//! TCP: a change and its event commit together, and every refusal is a 4xx
//! with a JSON error and writes nothing. Each service runs alone: the order
//! service takes a registered customer's order from its replica with no
//! users service running, and the users service shows a user's orders from
//! its replica with no order service running.

use std::net::SocketAddr;
use std::sync::Arc;

use diesel::connection::SimpleConnection;
use diesel::sql_types::BigInt;
use diesel::{Connection, QueryableByName, RunQueryDsl};
use shop::events::{Line, OrderCancelled, OrderConfirmed, OrderSubmitted, UserRegistered};
use shop::http::request;
use shop::order::{OrderService, SCHEMA_SQL, router};
use shop::users::{self, UsersService};
use shop::{customers, service_url};
use testkit::TestSchema;
use uuid::Uuid;

#[derive(QueryableByName)]
struct Count {
    #[diesel(sql_type = BigInt)]
    n: i64,
}

struct Service {
    schema: TestSchema,
    addr: SocketAddr,
}

impl Service {
    /// The order service, with its replica of the users.
    async fn start(prefix: &str) -> Self {
        let schema = install(prefix, &[SCHEMA_SQL, customers::SCHEMA_SQL]);
        let url = service_url(&testkit::database_url(), schema.name());
        let service = Arc::new(OrderService::new(&url, schema.name()).unwrap());
        Service {
            addr: serve(router(service)).await,
            schema,
        }
    }

    /// The users service, with its replica of the orders.
    async fn start_users(prefix: &str) -> Self {
        let schema = install(prefix, &[users::SCHEMA_SQL]);
        let url = service_url(&testkit::database_url(), schema.name());
        let service = Arc::new(UsersService::new(&url, schema.name()).unwrap());
        Service {
            addr: serve(users::router(service)).await,
            schema,
        }
    }

    fn count(&self, table: &str) -> i64 {
        diesel::sql_query(format!("SELECT count(*) AS n FROM {table}"))
            .get_result::<Count>(&mut self.schema.connect())
            .unwrap()
            .n
    }

    async fn post(&self, path: &str, body: &str) -> shop::http::Response {
        request(self.addr, "POST", path, Some(body.as_bytes()))
            .await
            .unwrap()
    }

    async fn get(&self, path: &str) -> shop::http::Response {
        request(self.addr, "GET", path, None).await.unwrap()
    }

    /// A field of the payload of the one event with `routing_key`.
    fn event_field(&self, routing_key: &str, field: &str) -> String {
        #[derive(QueryableByName)]
        struct Field {
            #[diesel(sql_type = diesel::sql_types::Text)]
            v: String,
        }
        diesel::sql_query(format!(
            "SELECT convert_from(payload, 'UTF8')::jsonb ->> '{field}' AS v FROM outbox_messages
             WHERE routing_key = '{routing_key}'"
        ))
        .get_result::<Field>(&mut self.schema.connect())
        .unwrap()
        .v
    }
}

/// A schema with the outbox tables and `tables`.
fn install(prefix: &str, tables: &[&str]) -> TestSchema {
    let schema = TestSchema::new(prefix);
    let mut conn = schema.connect();
    outbox::Outbox::new(outbox::Config {
        schema: schema.name().to_owned(),
        ..outbox::Config::default()
    })
    .unwrap()
    .migrate(&mut conn)
    .unwrap();
    for sql in tables {
        conn.batch_execute(sql).unwrap();
    }
    schema
}

async fn serve(app: axum::Router) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    addr
}

const ORDER: &str = r#"{"customer":"ada","lines":[{"sku":"tea","qty":2,"price_cents":350},{"sku":"cup","qty":1,"price_cents":900}]}"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_order_its_lines_and_its_event_are_written_together() {
    let s = Service::start("http_place").await;
    let created = s.post("/orders", ORDER).await;
    assert_eq!(created.status, 201, "{:?}", created.body);
    let id = created.body["id"].as_str().unwrap().to_owned();

    let got = request(s.addr, "GET", &format!("/orders/{id}"), None)
        .await
        .unwrap();
    assert_eq!(got.status, 200);
    assert_eq!(got.body["total_cents"], 1600);
    assert_eq!(got.body["status"], "placed");
    assert_eq!(got.body["lines"].as_array().unwrap().len(), 2);
    assert_eq!(s.count("order_lines"), 2);
    assert_eq!(
        s.count("outbox_messages WHERE routing_key = 'order.v1.submitted'"),
        1
    );

    // With a currency the event is version 2.
    let v2 = ORDER.replacen('{', r#"{"currency":"USD","#, 1);
    assert_eq!(s.post("/orders", &v2).await.status, 201);
    assert_eq!(
        s.count("outbox_messages WHERE routing_key = 'order.v2.submitted' AND event_version = 2"),
        1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelling_enqueues_the_event_once_and_refuses_a_second_time() {
    let s = Service::start("http_cancel").await;
    let id = s.post("/orders", ORDER).await.body["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let first = s
        .post(
            &format!("/orders/{id}/cancel"),
            r#"{"reason":"changed mind"}"#,
        )
        .await;
    assert_eq!(first.status, 200, "{:?}", first.body);
    let second = s.post(&format!("/orders/{id}/cancel"), "").await;
    assert_eq!(second.status, 409);
    assert!(
        second.body["error"]
            .as_str()
            .unwrap()
            .contains("already cancelled")
    );
    assert_eq!(
        s.count("outbox_messages WHERE routing_key = 'order.v1.cancelled'"),
        1
    );
    let missing = s
        .post(&format!("/orders/{}/cancel", uuid::Uuid::now_v7()), "")
        .await;
    assert_eq!(missing.status, 404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_requests_get_a_json_error_and_write_nothing() {
    let s = Service::start("http_bad").await;
    for (body, status, says) in [
        ("not json", 400, "invalid JSON"),
        (r#"{"customer":"ada","lines":[]}"#, 422, "1 to 50 lines"),
        (
            r#"{"customer":"","lines":[{"sku":"tea","qty":1,"price_cents":1}]}"#,
            422,
            "customer",
        ),
        (
            r#"{"customer":"ada","lines":[{"sku":"tea","qty":0,"price_cents":1}]}"#,
            422,
            "lines[0].qty",
        ),
        (
            r#"{"customer":"ada","lines":[{"sku":"tea","qty":1,"price_cents":-5}]}"#,
            422,
            "price_cents",
        ),
        (
            r#"{"customer":"ada","currency":"euro","lines":[{"sku":"tea","qty":1,"price_cents":1}]}"#,
            422,
            "currency",
        ),
    ] {
        let r = s.post("/orders", body).await;
        assert_eq!(r.status, status, "{body}: {:?}", r.body);
        let error = r.body["error"].as_str().unwrap_or_default();
        assert!(error.contains(says), "{body}: {error}");
    }
    let bad_id = request(s.addr, "GET", "/orders/17", None).await.unwrap();
    assert_eq!(bad_id.status, 400);
    let unknown = request(
        s.addr,
        "GET",
        &format!("/orders/{}", uuid::Uuid::now_v7()),
        None,
    )
    .await
    .unwrap();
    assert_eq!(unknown.status, 404);
    assert_eq!(s.count("orders"), 0, "no half-written order");
    assert_eq!(s.count("outbox_messages"), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_order_for_a_registered_customer_is_named_from_the_replica() {
    let s = Service::start("http_customer").await;
    // What the order consumer does on `user.v1.registered`; no users
    // service runs in this test.
    let user_id = Uuid::now_v7();
    let mut conn = s.schema.connect();
    conn.transaction::<_, diesel::result::Error, _>(|conn| {
        customers::on_registered(
            conn,
            &UserRegistered {
                user_id,
                name: "Ada L.".into(),
                version: 1,
            },
        )
        .unwrap();
        Ok(())
    })
    .unwrap();

    let body = format!(
        r#"{{"customer_id":"{user_id}","payment_method":"card-declined","lines":[{{"sku":"tea","qty":1,"price_cents":350}}]}}"#
    );
    let created = s.post("/orders", &body).await;
    assert_eq!(created.status, 201, "{:?}", created.body);
    let id = created.body["id"].as_str().unwrap().to_owned();
    let got = s.get(&format!("/orders/{id}")).await;
    assert_eq!(got.body["customer"], "Ada L.");
    assert_eq!(got.body["customer_id"], user_id.to_string());
    assert_eq!(got.body["payment_method"], "card-declined");
    assert_eq!(got.body["status"], "placed", "until the saga answers");
    assert_eq!(
        s.event_field("order.v1.submitted", "customer_id"),
        user_id.to_string()
    );
    assert_eq!(
        s.event_field("order.v1.submitted", "payment_method"),
        "card-declined"
    );

    // A customer the replica does not know (yet) is refused, and so is an
    // order naming both a customer and a guest.
    let unknown = Uuid::now_v7();
    for (body, says) in [
        (
            format!(
                r#"{{"customer_id":"{unknown}","lines":[{{"sku":"tea","qty":1,"price_cents":1}}]}}"#
            ),
            "unknown customer_id",
        ),
        (
            format!(
                r#"{{"customer_id":"{user_id}","customer":"eve","lines":[{{"sku":"tea","qty":1,"price_cents":1}}]}}"#
            ),
            "not both",
        ),
        (
            r#"{"customer":"ada","payment_method":"Visa!","lines":[{"sku":"tea","qty":1,"price_cents":1}]}"#.to_owned(),
            "payment_method",
        ),
    ] {
        let r = s.post("/orders", &body).await;
        assert_eq!(r.status, 422, "{body}: {:?}", r.body);
        let error = r.body["error"].as_str().unwrap_or_default();
        assert!(error.contains(says), "{body}: {error}");
    }
    assert_eq!(s.count("orders"), 1, "only the first order");
    assert_eq!(s.count("outbox_messages"), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registering_and_renaming_write_the_user_and_its_event_together() {
    let s = Service::start_users("http_users").await;
    let created = s.post("/users", r#"{"name":"Ada"}"#).await;
    assert_eq!(created.status, 201, "{:?}", created.body);
    assert_eq!(created.body["version"], 1);
    let id = created.body["id"].as_str().unwrap().to_owned();
    assert_eq!(s.event_field("user.v1.registered", "user_id"), id);
    assert_eq!(s.event_field("user.v1.registered", "name"), "Ada");

    let renamed = s
        .post(&format!("/users/{id}/rename"), r#"{"name":"Ada L."}"#)
        .await;
    assert_eq!(renamed.status, 200, "{:?}", renamed.body);
    assert_eq!(renamed.body["version"], 2);
    assert_eq!(s.event_field("user.v1.renamed", "version"), "2");
    // The same name again changes nothing and sends nothing.
    let again = s
        .post(&format!("/users/{id}/rename"), r#"{"name":"Ada L."}"#)
        .await;
    assert_eq!(again.status, 200);
    assert_eq!(again.body["version"], 2);
    assert_eq!(
        s.count("outbox_messages WHERE routing_key = 'user.v1.renamed'"),
        1
    );

    let got = s.get(&format!("/users/{id}")).await;
    assert_eq!(got.status, 200);
    assert_eq!(got.body["name"], "Ada L.");
    assert_eq!(got.body["version"], 2);
    assert_eq!(got.body["orders"]["count"], 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_user_requests_get_a_json_error_and_write_nothing() {
    let s = Service::start_users("http_users_bad").await;
    for (body, status, says) in [
        ("not json", 400, "invalid JSON"),
        (r#"{"name":"  "}"#, 422, "name must be"),
        (
            &format!(r#"{{"name":"{}"}}"#, "x".repeat(101)),
            422,
            "name must be",
        ),
    ] {
        let r = s.post("/users", body).await;
        assert_eq!(r.status, status, "{body}: {:?}", r.body);
        let error = r.body["error"].as_str().unwrap_or_default();
        assert!(error.contains(says), "{body}: {error}");
    }
    let missing = Uuid::now_v7();
    let r = s
        .post(&format!("/users/{missing}/rename"), r#"{"name":"Eve"}"#)
        .await;
    assert_eq!(r.status, 404, "{:?}", r.body);
    assert_eq!(s.get("/users/17").await.status, 400);
    assert_eq!(s.get(&format!("/users/{missing}")).await.status, 404);
    assert_eq!(s.get(&format!("/users/{missing}/orders")).await.status, 404);
    assert_eq!(s.count("users"), 0);
    assert_eq!(s.count("outbox_messages"), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_user_shows_their_orders_from_the_replica() {
    let s = Service::start_users("http_user_orders").await;
    let id = s.post("/users", r#"{"name":"Ada"}"#).await.body["id"]
        .as_str()
        .unwrap()
        .parse::<Uuid>()
        .unwrap();
    // What the users consumer does on the order events; no order service
    // runs in this test. Every event twice: the replica counts each once.
    let (paid, dropped) = (Uuid::now_v7(), Uuid::now_v7());
    let submitted = |order_id, customer_id, total_cents| OrderSubmitted {
        order_id,
        total_cents,
        currency: None,
        placed_at_us: 0,
        lines: vec![Line {
            sku: "tea".into(),
            qty: 1,
            price_cents: total_cents,
        }],
        customer_id,
        payment_method: "card".into(),
    };
    let mut conn = s.schema.connect();
    for _ in 0..2 {
        conn.transaction::<_, diesel::result::Error, _>(|conn| {
            users::on_order_submitted(conn, &submitted(paid, Some(id), 1200)).unwrap();
            users::on_order_submitted(conn, &submitted(dropped, Some(id), 300)).unwrap();
            // A guest's order is not the users service's business.
            users::on_order_submitted(conn, &submitted(Uuid::now_v7(), None, 99)).unwrap();
            let confirmed = OrderConfirmed {
                order_id: paid,
                payment_id: Uuid::now_v7(),
            };
            users::on_order_confirmed(conn, &confirmed).unwrap();
            let cancelled = OrderCancelled {
                order_id: dropped,
                reason: "out of stock".into(),
            };
            users::on_order_cancelled(conn, &cancelled).unwrap();
            Ok(())
        })
        .unwrap();
    }

    let got = s.get(&format!("/users/{id}")).await;
    assert_eq!(got.status, 200, "{:?}", got.body);
    let orders = &got.body["orders"];
    assert_eq!(
        (
            &orders["count"],
            &orders["placed"],
            &orders["confirmed"],
            &orders["cancelled"],
            &orders["confirmed_cents"]
        ),
        (
            &serde_json::json!(2),
            &serde_json::json!(0),
            &serde_json::json!(1),
            &serde_json::json!(1),
            &serde_json::json!(1200)
        )
    );
    let listed = s.get(&format!("/users/{id}/orders")).await;
    assert_eq!(listed.status, 200);
    let listed: Vec<(String, String)> = listed.body["orders"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| {
            let field = |name: &str| o[name].as_str().unwrap().to_owned();
            (field("order_id"), field("status"))
        })
        .collect();
    let mut want = vec![
        (paid.to_string(), "confirmed".to_owned()),
        (dropped.to_string(), "cancelled".to_owned()),
    ];
    want.sort(); // by id: UUID v7s sort by age, oldest first
    assert_eq!(listed, want);
}
