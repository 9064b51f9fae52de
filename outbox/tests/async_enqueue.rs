//! The same write path on diesel-async's `AsyncPgConnection`.

mod common;

use common::{OrderSubmitted, count, outbox_in_own_schema, rows};
use diesel_async::{AsyncConnection, AsyncPgConnection};
use outbox::{Error, Message};

async fn connect() -> AsyncPgConnection {
    AsyncPgConnection::establish(&testkit::database_url())
        .await
        .unwrap()
}

#[tokio::test]
async fn async_enqueue_commits_with_the_transaction_and_not_without_it() {
    let (schema, outbox) = outbox_in_own_schema("async");
    let mut conn = connect().await;
    let event = OrderSubmitted {
        order_id: "order-1".into(),
        total_cents: 10,
    };

    let rolled_back: Result<(), Error> = conn
        .transaction(async |conn| {
            outbox.enqueue_async(conn, &event).await?;
            Err(Error::NotInTransaction)
        })
        .await;
    assert!(rolled_back.is_err());

    let (one, batch) = conn
        .transaction(async |conn| {
            let one = outbox.enqueue_async(conn, &event).await?;
            let batch = outbox
                .enqueue_batch_async(
                    conn,
                    &[Message::from_event(&event)?, Message::from_event(&event)?],
                )
                .await?;
            Ok::<_, Error>((one, batch))
        })
        .await
        .unwrap();
    assert_eq!(one.key_seq, Some(1), "the rolled-back event left no gap");
    assert_eq!(batch[0].key_seq, Some(2));
    assert_eq!(batch[1].key_seq, Some(3));

    let err = outbox.enqueue_async(&mut conn, &event).await.unwrap_err();
    assert!(matches!(err, Error::NotInTransaction), "{err}");

    let mut sync = schema.connect();
    assert_eq!(count(&mut sync, "outbox_messages"), 3);
    assert_eq!(rows(&mut sync)[0].id, one.id);
}
