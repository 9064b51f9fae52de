-- Transactional outbox (producer side) and inbox (consumer side) tables.
--
-- Objects are created in the first schema on `search_path`: `outbox::migrate`
-- sets it for you; when you run this file with your own tool, run
-- `SET search_path TO your_schema;` first (the schema must exist).
--
-- Idempotent: every object is created only when missing (functions are
-- replaced with identical text), so running the file twice changes nothing.
-- It creates only objects whose names start with `outbox_` or `inbox_`.

-- One row of install-time settings, read by the enqueue function and the relay.
CREATE TABLE IF NOT EXISTS outbox_settings (
    singleton boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    partitions smallint NOT NULL DEFAULT 64 CHECK (partitions BETWEEN 1 AND 1024),
    notify boolean NOT NULL DEFAULT true,
    notify_channel text NOT NULL DEFAULT left('outbox_' || current_schema(), 63),
    max_payload_bytes integer NOT NULL DEFAULT 262144 CHECK (max_payload_bytes > 0)
);
COMMENT ON TABLE outbox_settings IS 'Install-time settings of the outbox; exactly one row.';
COMMENT ON COLUMN outbox_settings.singleton IS 'Always true: keeps the table at one row.';
COMMENT ON COLUMN outbox_settings.partitions IS 'Number of partitions the relay splits the outbox into; fixed at install because changing it would move keys between partitions.';
COMMENT ON COLUMN outbox_settings.notify IS 'Whether enqueue sends pg_notify on commit to wake the relay; switch off for write-heavy systems (the relay then polls).';
COMMENT ON COLUMN outbox_settings.notify_channel IS 'LISTEN/NOTIFY channel for this schema''s outbox; the payload is the partition number.';
COMMENT ON COLUMN outbox_settings.max_payload_bytes IS 'Largest payload outbox_enqueue accepts when the caller passes no limit of its own.';
INSERT INTO outbox_settings DEFAULT VALUES ON CONFLICT DO NOTHING;

-- The partition count is fixed once rows exist: changing it would move keys
-- between partitions (and two relays could then work one key at once), and
-- lowering it would strand rows in partitions no relay scans.
CREATE OR REPLACE FUNCTION outbox_settings_guard() RETURNS trigger
LANGUAGE plpgsql
SET search_path FROM CURRENT
AS $fn$
BEGIN
    IF NEW.partitions <> OLD.partitions AND EXISTS (SELECT 1 FROM outbox_messages) THEN
        RAISE EXCEPTION 'outbox: outbox_settings.partitions is fixed while outbox_messages has rows (% -> %)',
            OLD.partitions, NEW.partitions USING ERRCODE = '55000';
    END IF;
    RETURN NEW;
END
$fn$;
COMMENT ON FUNCTION outbox_settings_guard() IS 'Refuses changing the partition count while the outbox holds rows.';

-- The per-key counter. Enqueue increments it under its row lock, held to
-- commit, so writers of one key serialise and key_seq is gapless in commit order.
CREATE TABLE IF NOT EXISTS outbox_keys (
    ordering_key text PRIMARY KEY,
    last_seq bigint NOT NULL CHECK (last_seq > 0)
);
COMMENT ON TABLE outbox_keys IS 'Per ordering key counter; its row lock orders writers of the key.';
COMMENT ON COLUMN outbox_keys.ordering_key IS 'The ordering key, as given to enqueue.';
COMMENT ON COLUMN outbox_keys.last_seq IS 'key_seq of the newest committed event of the key.';

CREATE TABLE IF NOT EXISTS outbox_messages (
    seq bigserial PRIMARY KEY,
    id uuid NOT NULL UNIQUE,
    ordering_key text,
    key_seq bigint,
    "partition" smallint NOT NULL,
    exchange text NOT NULL,
    routing_key text NOT NULL,
    event_type text NOT NULL,
    event_version integer NOT NULL CHECK (event_version > 0),
    payload bytea NOT NULL,
    headers jsonb NOT NULL DEFAULT '{}'::jsonb,
    created_at timestamptz NOT NULL DEFAULT now(),
    attempts integer NOT NULL DEFAULT 0,
    next_attempt_at timestamptz NOT NULL DEFAULT now(),
    last_error text,
    published_at timestamptz,
    parked_at timestamptz,
    CONSTRAINT outbox_messages_key_seq_with_key CHECK ((ordering_key IS NULL) = (key_seq IS NULL)),
    CONSTRAINT outbox_messages_key_seq_unique UNIQUE (ordering_key, key_seq)
);
COMMENT ON TABLE outbox_messages IS 'Events written in the producer''s transaction, waiting for the relay.';
COMMENT ON COLUMN outbox_messages.seq IS 'Scan order for the relay; not commit order (see key_seq).';
COMMENT ON COLUMN outbox_messages.id IS 'Message id on the wire (UUID v7); consumers dedupe on it.';
COMMENT ON COLUMN outbox_messages.ordering_key IS 'Events sharing a key are delivered in commit order; NULL for unordered events.';
COMMENT ON COLUMN outbox_messages.key_seq IS 'Gapless 1, 2, 3.. per ordering key in commit order; NULL when unkeyed.';
COMMENT ON COLUMN outbox_messages."partition" IS 'Hash of the ordering key (of the id when unkeyed) modulo outbox_settings.partitions; one relay works a partition at a time.';
COMMENT ON COLUMN outbox_messages.exchange IS 'Topic exchange to publish to, named after the producing service.';
COMMENT ON COLUMN outbox_messages.routing_key IS 'Versioned routing key, e.g. order.v1.submitted.';
COMMENT ON COLUMN outbox_messages.event_type IS 'Event type, sent as the AMQP type property.';
COMMENT ON COLUMN outbox_messages.event_version IS 'Payload schema version, sent as the x-event-version header.';
COMMENT ON COLUMN outbox_messages.payload IS 'The event''s JSON body, byte for byte as published.';
COMMENT ON COLUMN outbox_messages.headers IS 'User headers and W3C trace context (traceparent, tracestate).';
COMMENT ON COLUMN outbox_messages.created_at IS 'Time of the enqueueing transaction.';
COMMENT ON COLUMN outbox_messages.attempts IS 'Failed publish attempts so far.';
COMMENT ON COLUMN outbox_messages.next_attempt_at IS 'Earliest time of the next publish attempt (retry backoff).';
COMMENT ON COLUMN outbox_messages.last_error IS 'Why the last publish attempt failed.';
COMMENT ON COLUMN outbox_messages.published_at IS 'When the broker confirmed the message; NULL while pending.';
COMMENT ON COLUMN outbox_messages.parked_at IS 'When the relay gave up after the maximum attempts; NULL unless parked.';

DROP TRIGGER IF EXISTS outbox_settings_guard ON outbox_settings;
CREATE TRIGGER outbox_settings_guard BEFORE UPDATE ON outbox_settings
    FOR EACH ROW EXECUTE FUNCTION outbox_settings_guard();

-- The relay's scan: pending rows of one partition in seq order. Partial, so
-- its size follows the backlog, not the table.
CREATE INDEX IF NOT EXISTS outbox_messages_pending
    ON outbox_messages ("partition", seq)
    WHERE published_at IS NULL AND parked_at IS NULL;
-- Rows waiting for a retry: they hold back later rows of their key. Only
-- failed rows are in it, so it stays tiny.
CREATE INDEX IF NOT EXISTS outbox_messages_retrying
    ON outbox_messages ("partition", next_attempt_at)
    WHERE published_at IS NULL AND parked_at IS NULL AND attempts > 0;
-- Retention clean-up of published rows, and the parked list.
CREATE INDEX IF NOT EXISTS outbox_messages_published
    ON outbox_messages (published_at) WHERE published_at IS NOT NULL;
CREATE INDEX IF NOT EXISTS outbox_messages_parked
    ON outbox_messages (parked_at) WHERE parked_at IS NOT NULL;

-- Consumer side: one row per applied message id and consumer name.
CREATE TABLE IF NOT EXISTS inbox_messages (
    consumer text NOT NULL,
    message_id uuid NOT NULL,
    ordering_key text,
    key_seq bigint,
    outcome text NOT NULL DEFAULT 'applied',
    processed_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (consumer, message_id)
);
COMMENT ON TABLE inbox_messages IS 'Message ids a consumer has processed; written in the handler''s transaction.';
COMMENT ON COLUMN inbox_messages.consumer IS 'Consumer name; each consumer applies a message once.';
COMMENT ON COLUMN inbox_messages.message_id IS 'The message id (AMQP message_id).';
COMMENT ON COLUMN inbox_messages.ordering_key IS 'x-ordering-key of the message, if any.';
COMMENT ON COLUMN inbox_messages.key_seq IS 'x-key-seq of the message, if any.';
COMMENT ON COLUMN inbox_messages.outcome IS 'applied, discarded or dead-lettered.';
COMMENT ON COLUMN inbox_messages.processed_at IS 'When the handler''s transaction committed; rows older than the retention are pruned.';
CREATE INDEX IF NOT EXISTS inbox_messages_processed_at ON inbox_messages (processed_at);

-- Consumer side: the position of each ordering key.
CREATE TABLE IF NOT EXISTS inbox_keys (
    consumer text NOT NULL,
    ordering_key text NOT NULL,
    last_seq bigint NOT NULL DEFAULT 0,
    updated_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (consumer, ordering_key)
);
COMMENT ON TABLE inbox_keys IS 'Per consumer and ordering key, the last applied key_seq; its row lock orders handlers of the key.';
COMMENT ON COLUMN inbox_keys.consumer IS 'Consumer name.';
COMMENT ON COLUMN inbox_keys.ordering_key IS 'The ordering key.';
COMMENT ON COLUMN inbox_keys.last_seq IS 'key_seq of the last message applied (or moved past) for the key.';
COMMENT ON COLUMN inbox_keys.updated_at IS 'When last_seq last moved.';

-- UUID version 7 (time-ordered), for callers that let the database pick the id.
CREATE OR REPLACE FUNCTION outbox_uuid_v7() RETURNS uuid
LANGUAGE sql VOLATILE PARALLEL SAFE
AS $fn$
    SELECT encode(
        set_bit(set_bit(
            overlay(uuid_send(gen_random_uuid())
                    PLACING substring(int8send(floor(extract(epoch FROM clock_timestamp()) * 1000)::bigint) FROM 3)
                    FROM 1 FOR 6),
            52, 1), 53, 1),
        'hex')::uuid
$fn$;
COMMENT ON FUNCTION outbox_uuid_v7() IS 'A new UUID v7: 48-bit millisecond time, version 7, random rest.';

-- The partition of a key: every writer, in any language, agrees because the
-- database computes it.
CREATE OR REPLACE FUNCTION outbox_partition(p_key text, p_partitions integer) RETURNS smallint
LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE
AS $fn$
    SELECT (((hashtextextended(p_key, 0) % p_partitions) + p_partitions) % p_partitions)::smallint
$fn$;
COMMENT ON FUNCTION outbox_partition(text, integer) IS 'Partition of an ordering key: hashtextextended(key, 0) modulo the partition count.';

-- Enqueue one event inside the caller's transaction. The Rust API calls this
-- function, so the two cannot drift. Raises SQLSTATE 22023 with a message
-- naming the field on bad input, before anything is written.
CREATE OR REPLACE FUNCTION outbox_enqueue(
    p_exchange text,
    p_routing_key text,
    p_event_type text,
    p_payload bytea,
    p_ordering_key text DEFAULT NULL,
    p_event_version integer DEFAULT 1,
    p_headers jsonb DEFAULT '{}'::jsonb,
    p_id uuid DEFAULT NULL,
    p_max_payload_bytes integer DEFAULT NULL
) RETURNS TABLE (id uuid, seq bigint, key_seq bigint, "partition" smallint)
LANGUAGE plpgsql VOLATILE
SET search_path FROM CURRENT
AS $fn$
#variable_conflict use_column
DECLARE
    v_settings outbox_settings%ROWTYPE;
    v_id uuid := coalesce(p_id, outbox_uuid_v7());
    v_key_seq bigint;
    v_partition smallint;
    v_seq bigint;
    v_max integer;
    v_header text;
BEGIN
    SELECT * INTO STRICT v_settings FROM outbox_settings;
    v_max := coalesce(p_max_payload_bytes, v_settings.max_payload_bytes);

    IF p_exchange IS NULL OR p_exchange !~ '^[A-Za-z0-9_.:-]{1,255}$' THEN
        RAISE EXCEPTION 'outbox: invalid exchange %: use 1 to 255 of A-Z a-z 0-9 _ . : -', quote_nullable(p_exchange)
            USING ERRCODE = '22023';
    END IF;
    IF p_exchange LIKE 'amq.%' THEN
        RAISE EXCEPTION 'outbox: invalid exchange %: the amq. prefix is reserved by the broker', quote_literal(p_exchange)
            USING ERRCODE = '22023';
    END IF;
    IF p_routing_key IS NULL OR octet_length(p_routing_key) > 255
       OR p_routing_key !~ '^[A-Za-z0-9_:-]+(\.[A-Za-z0-9_:-]+)*$' THEN
        RAISE EXCEPTION 'outbox: invalid routing key %: use dot-separated words of A-Z a-z 0-9 _ : -, at most 255 bytes', quote_nullable(p_routing_key)
            USING ERRCODE = '22023';
    END IF;
    IF p_event_type IS NULL OR p_event_type = '' OR octet_length(p_event_type) > 255
       OR p_event_type ~ '[[:cntrl:]]' THEN
        RAISE EXCEPTION 'outbox: invalid event type %: must be 1 to 255 bytes without control characters', quote_nullable(p_event_type)
            USING ERRCODE = '22023';
    END IF;
    IF p_event_version IS NULL OR p_event_version < 1 THEN
        RAISE EXCEPTION 'outbox: invalid event version %: must be 1 or more', coalesce(p_event_version::text, 'NULL')
            USING ERRCODE = '22023';
    END IF;
    IF p_ordering_key IS NOT NULL AND (p_ordering_key = '' OR octet_length(p_ordering_key) > 255) THEN
        RAISE EXCEPTION 'outbox: invalid ordering key %: must be 1 to 255 bytes (NULL for unordered events)', quote_literal(left(p_ordering_key, 64))
            USING ERRCODE = '22023';
    END IF;
    IF p_payload IS NULL THEN
        RAISE EXCEPTION 'outbox: invalid payload NULL: must be JSON bytes' USING ERRCODE = '22023';
    END IF;
    IF octet_length(p_payload) > v_max THEN
        RAISE EXCEPTION 'outbox: payload of % is % bytes, over the maximum of % bytes', p_event_type, octet_length(p_payload), v_max
            USING ERRCODE = '22023';
    END IF;
    -- Must parse as JSON: consumers are promised a JSON body.
    PERFORM convert_from(p_payload, 'UTF8')::jsonb;
    IF p_headers IS NULL OR jsonb_typeof(p_headers) <> 'object' THEN
        RAISE EXCEPTION 'outbox: invalid headers %: must be a JSON object', coalesce(p_headers::text, 'NULL')
            USING ERRCODE = '22023';
    END IF;
    FOR v_header IN SELECT jsonb_object_keys(p_headers) LOOP
        IF v_header = '' OR octet_length(v_header) > 255 THEN
            RAISE EXCEPTION 'outbox: invalid header name %: must be 1 to 255 bytes', quote_literal(left(v_header, 64))
                USING ERRCODE = '22023';
        END IF;
        IF lower(v_header) IN ('x-ordering-key', 'x-key-seq', 'x-event-version') THEN
            RAISE EXCEPTION 'outbox: invalid header name %: reserved, the relay sets it', quote_literal(v_header)
                USING ERRCODE = '22023';
        END IF;
    END LOOP;

    IF p_ordering_key IS NOT NULL THEN
        -- The row lock taken here is held until commit: writers of this key
        -- serialise, so key_seq order is commit order and has no gaps.
        INSERT INTO outbox_keys AS k (ordering_key, last_seq) VALUES (p_ordering_key, 1)
        ON CONFLICT (ordering_key) DO UPDATE SET last_seq = k.last_seq + 1
        RETURNING k.last_seq INTO v_key_seq;
        v_partition := outbox_partition(p_ordering_key, v_settings.partitions);
    ELSE
        v_partition := outbox_partition(v_id::text, v_settings.partitions);
    END IF;

    INSERT INTO outbox_messages AS m
        (id, ordering_key, key_seq, "partition", exchange, routing_key, event_type, event_version, payload, headers)
    VALUES
        (v_id, p_ordering_key, v_key_seq, v_partition, p_exchange, p_routing_key, p_event_type, p_event_version, p_payload, p_headers)
    RETURNING m.seq INTO v_seq;

    IF v_settings.notify THEN
        -- Delivered on commit only; identical payloads in one transaction fold into one.
        PERFORM pg_notify(v_settings.notify_channel, v_partition::text);
    END IF;

    RETURN QUERY SELECT v_id, v_seq, v_key_seq, v_partition;
END
$fn$;
COMMENT ON FUNCTION outbox_enqueue(text, text, text, bytea, text, integer, jsonb, uuid, integer) IS
    'Enqueue one event in the caller''s transaction; returns its id, seq, key_seq and partition.';

-- Enqueue many events in one round trip. Counter locks are taken in ordering
-- key order (byte order), so two batches cannot deadlock on each other; events
-- of one key keep their order in the arrays. Returns one row per input, with
-- its 1-based position in the arrays.
CREATE OR REPLACE FUNCTION outbox_enqueue_batch(
    p_exchanges text[],
    p_routing_keys text[],
    p_event_types text[],
    p_payloads bytea[],
    p_ordering_keys text[],
    p_event_versions integer[],
    p_headers jsonb[],
    p_ids uuid[],
    p_max_payload_bytes integer DEFAULT NULL
) RETURNS TABLE (ordinal bigint, id uuid, seq bigint, key_seq bigint, "partition" smallint)
LANGUAGE plpgsql VOLATILE
SET search_path FROM CURRENT
AS $fn$
#variable_conflict use_column
DECLARE
    v_n integer := coalesce(cardinality(p_exchanges), 0);
    r record;
BEGIN
    IF coalesce(cardinality(p_routing_keys), 0) <> v_n OR coalesce(cardinality(p_event_types), 0) <> v_n
       OR coalesce(cardinality(p_payloads), 0) <> v_n OR coalesce(cardinality(p_ordering_keys), 0) <> v_n
       OR coalesce(cardinality(p_event_versions), 0) <> v_n OR coalesce(cardinality(p_headers), 0) <> v_n
       OR coalesce(cardinality(p_ids), 0) <> v_n THEN
        RAISE EXCEPTION 'outbox: invalid batch: every array must have % elements', v_n USING ERRCODE = '22023';
    END IF;
    FOR r IN
        SELECT t.*
        FROM unnest(p_exchanges, p_routing_keys, p_event_types, p_payloads, p_ordering_keys,
                    p_event_versions, p_headers, p_ids) WITH ORDINALITY
             AS t(exchange, routing_key, event_type, payload, ordering_key, event_version, headers, id, ord)
        ORDER BY t.ordering_key COLLATE "C" NULLS LAST, t.ord
    LOOP
        RETURN QUERY
            SELECT r.ord, e.id, e.seq, e.key_seq, e."partition"
            FROM outbox_enqueue(r.exchange, r.routing_key, r.event_type, r.payload, r.ordering_key,
                                r.event_version, r.headers, r.id, p_max_payload_bytes) AS e;
    END LOOP;
END
$fn$;
COMMENT ON FUNCTION outbox_enqueue_batch(text[], text[], text[], bytea[], text[], integer[], jsonb[], uuid[], integer) IS
    'Enqueue several events in one call, taking key locks in key order; one result row per input position.';

-- The relay's batch read, as a function so its plan is cached per session
-- (the relay runs it for every batch): takes the partition's advisory lock
-- for the rest of the transaction and returns up to p_limit due rows in seq
-- order, or nothing when another relay holds the partition.
-- A key with a failed row pending is held back: until that row is confirmed
-- or parked, it is the only row of its key returned (once its retry is due).
CREATE OR REPLACE FUNCTION outbox_relay_claim(p_partition smallint, p_limit integer, p_lock_namespace text)
RETURNS TABLE (seq bigint, id uuid, ordering_key text, key_seq bigint, exchange text, routing_key text,
               event_type text, event_version integer, payload bytea, headers jsonb,
               created_at timestamptz, attempts integer)
LANGUAGE plpgsql VOLATILE
SET search_path FROM CURRENT
AS $fn$
BEGIN
    IF NOT pg_try_advisory_xact_lock(hashtext(p_lock_namespace), p_partition) THEN
        RETURN;
    END IF;
    RETURN QUERY
        WITH failing AS (
            -- The earliest failed row of each failing key (small: the
            -- outbox_messages_retrying index holds only failed rows).
            SELECT DISTINCT ON (f.ordering_key) f.ordering_key, f.key_seq, f.next_attempt_at
            FROM outbox_messages f
            WHERE f."partition" = p_partition AND f.published_at IS NULL AND f.parked_at IS NULL
              AND f.attempts > 0 AND f.ordering_key IS NOT NULL
            ORDER BY f.ordering_key, f.key_seq
        )
        SELECT m.seq, m.id, m.ordering_key, m.key_seq, m.exchange, m.routing_key, m.event_type,
               m.event_version, m.payload, m.headers, m.created_at, m.attempts
        FROM outbox_messages m
        WHERE m."partition" = p_partition AND m.published_at IS NULL AND m.parked_at IS NULL
          AND m.next_attempt_at <= now()
          AND NOT EXISTS (
              SELECT 1 FROM failing f
              WHERE f.ordering_key = m.ordering_key
                AND (m.key_seq > f.key_seq OR f.next_attempt_at > now()))
        ORDER BY m.seq
        LIMIT p_limit;
END
$fn$;
COMMENT ON FUNCTION outbox_relay_claim(smallint, integer, text) IS
    'Relay: lock a partition for the transaction and return its due rows in seq order, holding back keys behind a failed row.';

-- The relay's record of confirmed rows: deleted, or stamped when kept.
CREATE OR REPLACE FUNCTION outbox_relay_published(p_ids uuid[], p_keep boolean) RETURNS void
LANGUAGE plpgsql VOLATILE
SET search_path FROM CURRENT
AS $fn$
BEGIN
    IF p_keep THEN
        UPDATE outbox_messages SET published_at = now() WHERE id = ANY (p_ids);
    ELSE
        DELETE FROM outbox_messages WHERE id = ANY (p_ids);
    END IF;
END
$fn$;
COMMENT ON FUNCTION outbox_relay_published(uuid[], boolean) IS
    'Relay: record confirmed rows (delete them, or stamp published_at when kept for retention).';
