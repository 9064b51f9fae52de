//! A bare AMQP 0-9-1 connection that moves messages without parsing their
//! properties, for the one message the client library cannot read.
//!
//! The client library validates the short strings of a delivery's
//! properties (`message_id`, `type`, header names) as UTF-8; a message
//! whose producer wrote other bytes there makes it close the connection,
//! the broker puts the message back at the head of its queue, and every
//! reconnect meets it again: the queue stalls. RabbitMQ itself does not
//! check those bytes. So when a session ends that way, the consumer opens
//! this connection, takes the head message of each of its queues with
//! `basic.get`, gives back (requeues) the ones the library can read, and
//! moves the unreadable one, header and body byte for byte, to the
//! dead-letter queue (with a confirm) before acking it.
//!
//! Plain TCP only: over `amqps://` this path is not taken (the consumer
//! logs the stall instead). Public but hidden, for the tests that publish
//! such a message.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const FRAME_METHOD: u8 = 1;
const FRAME_HEADER: u8 = 2;
const FRAME_BODY: u8 = 3;
const FRAME_HEARTBEAT: u8 = 8;
const FRAME_END: u8 = 0xCE;
/// How long any one step may take.
const STEP_TIMEOUT: Duration = Duration::from_secs(10);

/// A message as the broker stored it: the content header's property bytes
/// (flags and list) and the body, unparsed.
#[derive(Debug, Clone)]
pub struct RawMessage {
    /// The delivery tag of the `basic.get`.
    pub delivery_tag: u64,
    /// The exchange it was published to.
    pub exchange: Vec<u8>,
    /// The routing key it was published with.
    pub routing_key: Vec<u8>,
    /// The property flags and list, as on the wire.
    pub properties: Vec<u8>,
    /// The body.
    pub body: Vec<u8>,
}

/// One connection with one confirm-mode channel.
pub struct RawConnection {
    stream: TcpStream,
    frame_max: u32,
}

/// What can fail: I/O, or the broker answering something unexpected.
pub type RawResult<T> = Result<T, String>;

impl RawConnection {
    /// Connects to `url` (`amqp://` only), opens channel 1 and puts it in
    /// confirm mode.
    ///
    /// # Errors
    ///
    /// The URL is not plain `amqp://`, the broker cannot be reached or
    /// refuses the credentials.
    pub async fn open(url: &str) -> RawResult<Self> {
        let uri: lapin::uri::AMQPUri = url.parse().map_err(|e| format!("bad AMQP URL: {e}"))?;
        if uri.scheme != lapin::uri::AMQPScheme::AMQP {
            return Err("only plain amqp:// connections can move unreadable messages".into());
        }
        let address = (uri.authority.host.as_str(), uri.authority.port);
        let stream = step(TcpStream::connect(address))
            .await?
            .map_err(|e| format!("connecting: {e}"))?;
        let mut conn = RawConnection {
            stream,
            frame_max: 131_072,
        };
        conn.write_all(b"AMQP\x00\x00\x09\x01").await?;
        conn.expect_method(0, 10, 10).await?; // connection.start
        let userinfo = &uri.authority.userinfo;
        let mut response = vec![0u8];
        response.extend(userinfo.username.as_bytes());
        response.push(0);
        response.extend(userinfo.password.as_bytes());
        let mut args = Vec::new();
        args.extend(0u32.to_be_bytes()); // client properties: empty table
        short(&mut args, b"PLAIN");
        long(&mut args, &response);
        short(&mut args, b"en_US");
        conn.method(0, 10, 11, &args).await?; // start-ok
        let tune = conn.expect_method(0, 10, 30).await?;
        if tune.len() >= 6 {
            let frame_max = u32::from_be_bytes([tune[2], tune[3], tune[4], tune[5]]);
            if frame_max != 0 {
                conn.frame_max = frame_max;
            }
        }
        let mut args = Vec::new();
        args.extend(tune.get(..2).unwrap_or(&[0, 0])); // channel max, as offered
        args.extend(conn.frame_max.to_be_bytes());
        args.extend(0u16.to_be_bytes()); // no heartbeats
        conn.method(0, 10, 31, &args).await?; // tune-ok
        let mut args = Vec::new();
        short(&mut args, uri.vhost.as_bytes());
        short(&mut args, b"");
        args.push(0);
        conn.method(0, 10, 40, &args).await?; // connection.open
        conn.expect_method(0, 10, 41).await?;
        let mut args = Vec::new();
        short(&mut args, b"");
        conn.method(1, 20, 10, &args).await?; // channel.open
        conn.expect_method(1, 20, 11).await?;
        conn.method(1, 85, 10, &[0]).await?; // confirm.select
        conn.expect_method(1, 85, 11).await?;
        Ok(conn)
    }

    /// Takes the head message of `queue` (unacked), if any.
    ///
    /// # Errors
    ///
    /// The queue does not exist, or the connection failed.
    pub async fn get(&mut self, queue: &str) -> RawResult<Option<RawMessage>> {
        let mut args = 0u16.to_be_bytes().to_vec();
        short(&mut args, queue.as_bytes());
        args.push(0); // ack needed
        self.method(1, 60, 70, &args).await?;
        let (class, method, args) = self.read_method(1).await?;
        match (class, method) {
            (60, 72) => return Ok(None), // get-empty
            (60, 71) => {}
            other => return Err(format!("unexpected answer to basic.get: {other:?}")),
        }
        let mut at = Cursor(&args);
        let delivery_tag = at.u64()?;
        at.skip(1)?; // redelivered
        let exchange = at.short()?.to_vec();
        let routing_key = at.short()?.to_vec();
        let (kind, _, header) = self.read_frame().await?;
        if kind != FRAME_HEADER || header.len() < 12 {
            return Err("no content header after get-ok".into());
        }
        let size = u64::from_be_bytes(header[4..12].try_into().map_err(|_| "short header")?);
        let properties = header[12..].to_vec();
        let mut body = Vec::with_capacity(usize::try_from(size).unwrap_or(0));
        while (body.len() as u64) < size {
            let (kind, _, part) = self.read_frame().await?;
            if kind != FRAME_BODY {
                return Err("content body expected".into());
            }
            body.extend(part);
        }
        Ok(Some(RawMessage {
            delivery_tag,
            exchange,
            routing_key,
            properties,
            body,
        }))
    }

    /// Publishes `properties` (flags and list, as on the wire) and `body`
    /// to `exchange` with `routing_key`, mandatory, and waits for the
    /// broker's confirm.
    ///
    /// # Errors
    ///
    /// Not confirmed (nacked, returned as unroutable), or the connection
    /// failed.
    pub async fn publish(
        &mut self,
        exchange: &[u8],
        routing_key: &[u8],
        properties: &[u8],
        body: &[u8],
    ) -> RawResult<()> {
        let mut args = 0u16.to_be_bytes().to_vec();
        short(&mut args, exchange);
        short(&mut args, routing_key);
        args.push(1); // mandatory
        self.method(1, 60, 40, &args).await?;
        let mut header = 60u16.to_be_bytes().to_vec();
        header.extend(0u16.to_be_bytes());
        header.extend((body.len() as u64).to_be_bytes());
        header.extend(properties);
        self.frame(FRAME_HEADER, 1, &header).await?;
        let chunk = usize::try_from(self.frame_max.saturating_sub(8).max(4096)).unwrap_or(4096);
        for part in body.chunks(chunk) {
            self.frame(FRAME_BODY, 1, part).await?;
        }
        let (class, method, _) = self.read_method(1).await?;
        match (class, method) {
            (60, 80) => Ok(()), // basic.ack
            (60, 120) => Err("nacked by the broker".into()),
            // basic.return (unroutable); the connection is closed after.
            (60, 50) => Err("returned by the broker: no queue for it".into()),
            other => Err(format!("unexpected answer to basic.publish: {other:?}")),
        }
    }

    /// Acknowledges a message taken with [`RawConnection::get`].
    ///
    /// # Errors
    ///
    /// The connection failed.
    pub async fn ack(&mut self, delivery_tag: u64) -> RawResult<()> {
        let mut args = delivery_tag.to_be_bytes().to_vec();
        args.push(0);
        self.method(1, 60, 80, &args).await
    }

    /// Closes the connection; unacked messages go back to their queues.
    pub async fn close(mut self) {
        let mut args = 200u16.to_be_bytes().to_vec();
        short(&mut args, b"done");
        args.extend(0u32.to_be_bytes());
        if self.method(0, 10, 50, &args).await.is_ok() {
            let _ = self.expect_method(0, 10, 51).await;
        }
    }

    async fn write_all(&mut self, bytes: &[u8]) -> RawResult<()> {
        step(self.stream.write_all(bytes))
            .await?
            .map_err(|e| format!("writing: {e}"))
    }

    async fn frame(&mut self, kind: u8, channel: u16, payload: &[u8]) -> RawResult<()> {
        let mut frame = Vec::with_capacity(payload.len() + 8);
        frame.push(kind);
        frame.extend(channel.to_be_bytes());
        frame.extend(
            u32::try_from(payload.len())
                .map_err(|_| "frame too large")?
                .to_be_bytes(),
        );
        frame.extend(payload);
        frame.push(FRAME_END);
        self.write_all(&frame).await
    }

    async fn method(
        &mut self,
        channel: u16,
        class: u16,
        method: u16,
        args: &[u8],
    ) -> RawResult<()> {
        let mut payload = class.to_be_bytes().to_vec();
        payload.extend(method.to_be_bytes());
        payload.extend(args);
        self.frame(FRAME_METHOD, channel, &payload).await
    }

    async fn read_frame(&mut self) -> RawResult<(u8, u16, Vec<u8>)> {
        loop {
            let mut head = [0u8; 7];
            step(self.stream.read_exact(&mut head))
                .await?
                .map_err(|e| format!("reading: {e}"))?;
            let size = u32::from_be_bytes([head[3], head[4], head[5], head[6]]) as usize;
            let mut payload = vec![0u8; size + 1];
            step(self.stream.read_exact(&mut payload))
                .await?
                .map_err(|e| format!("reading: {e}"))?;
            if payload.pop() != Some(FRAME_END) {
                return Err("malformed frame".into());
            }
            if head[0] == FRAME_HEARTBEAT {
                continue;
            }
            return Ok((head[0], u16::from_be_bytes([head[1], head[2]]), payload));
        }
    }

    /// The next method on `channel`; a close from the broker is an error
    /// carrying its reply text.
    async fn read_method(&mut self, channel: u16) -> RawResult<(u16, u16, Vec<u8>)> {
        loop {
            let (kind, on, payload) = self.read_frame().await?;
            if kind != FRAME_METHOD || payload.len() < 4 {
                continue;
            }
            let class = u16::from_be_bytes([payload[0], payload[1]]);
            let method = u16::from_be_bytes([payload[2], payload[3]]);
            let args = payload[4..].to_vec();
            if (class, method) == (10, 50) || (class, method) == (20, 40) {
                let mut at = Cursor(&args);
                let code = at.u16().unwrap_or(0);
                let text = String::from_utf8_lossy(at.short().unwrap_or(b"")).into_owned();
                return Err(format!("closed by the broker: {code} {text}"));
            }
            if on == channel {
                return Ok((class, method, args));
            }
        }
    }

    async fn expect_method(&mut self, channel: u16, class: u16, method: u16) -> RawResult<Vec<u8>> {
        let (c, m, args) = self.read_method(channel).await?;
        if (c, m) != (class, method) {
            return Err(format!("expected method {class}.{method}, got {c}.{m}"));
        }
        Ok(args)
    }
}

/// A step of the conversation, bounded in time.
async fn step<T>(future: impl std::future::Future<Output = T>) -> RawResult<T> {
    tokio::time::timeout(STEP_TIMEOUT, future)
        .await
        .map_err(|_| format!("no answer within {STEP_TIMEOUT:?}"))
}

fn short(out: &mut Vec<u8>, s: &[u8]) {
    let len = s.len().min(255);
    out.push(len as u8);
    out.extend(&s[..len]);
}

fn long(out: &mut Vec<u8>, s: &[u8]) {
    out.extend((s.len() as u32).to_be_bytes());
    out.extend(s);
}

/// Reads method arguments.
struct Cursor<'a>(&'a [u8]);

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> RawResult<&'a [u8]> {
        if self.0.len() < n {
            return Err("truncated method".into());
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }

    fn skip(&mut self, n: usize) -> RawResult<()> {
        self.take(n).map(|_| ())
    }

    fn u16(&mut self) -> RawResult<u16> {
        Ok(u16::from_be_bytes(
            self.take(2)?.try_into().map_err(|_| "u16")?,
        ))
    }

    fn u64(&mut self) -> RawResult<u64> {
        Ok(u64::from_be_bytes(
            self.take(8)?.try_into().map_err(|_| "u64")?,
        ))
    }

    fn short(&mut self) -> RawResult<&'a [u8]> {
        let len = self.take(1)?[0] as usize;
        self.take(len)
    }
}
