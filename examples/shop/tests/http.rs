//! The order service's HTTP endpoints, with real requests over TCP: an
//! order and its event commit together, and every refusal is a 4xx with a
//! JSON error and writes nothing.

use std::net::SocketAddr;
use std::sync::Arc;

use diesel::connection::SimpleConnection;
use diesel::sql_types::BigInt;
use diesel::{QueryableByName, RunQueryDsl};
use shop::http::request;
use shop::order::{OrderService, SCHEMA_SQL, router};
use testkit::TestSchema;

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
    async fn start(prefix: &str) -> Self {
        let schema = TestSchema::new(prefix);
        let mut conn = schema.connect();
        outbox::Outbox::new(outbox::Config {
            schema: schema.name().to_owned(),
            ..outbox::Config::default()
        })
        .unwrap()
        .migrate(&mut conn)
        .unwrap();
        conn.batch_execute(SCHEMA_SQL).unwrap();
        let url = shop::service_url(&testkit::database_url(), schema.name());
        let service = Arc::new(OrderService::new(&url, schema.name()).unwrap());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, router(service)).await });
        Service { schema, addr }
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
