-- Per-key order that does not depend on the broker keeping a key in one
-- queue (docs/DESIGN.md, "Ordering"):
--
-- * Producers: each event of a key records, per exchange and routing key,
--   the key_seq of the latest earlier event of the key (`key_prev`), so a
--   consumer bound to only some of a key's routing keys knows which earlier
--   event it must have applied first.
-- * Consumers: an event that arrives ahead of its key waits in the database
--   (`inbox_held`), not in memory, so a gap can wait without blocking other
--   keys or being lost at a crash; live instances are known by the
--   advisory lock each holds; the partition count and the queues that may
--   still hold messages are recorded (`inbox_topology`).
--
-- Idempotent, like 00001: run with search_path set to the outbox's schema.

-- Producer side ------------------------------------------------------------

ALTER TABLE outbox_keys ADD COLUMN IF NOT EXISTS prev_routes jsonb NOT NULL DEFAULT '{}'::jsonb;
ALTER TABLE outbox_keys ADD COLUMN IF NOT EXISTS prev_any bigint NOT NULL DEFAULT 0;
ALTER TABLE outbox_keys ADD COLUMN IF NOT EXISTS last_exchange text;
ALTER TABLE outbox_keys ADD COLUMN IF NOT EXISTS last_routing_key text;
COMMENT ON COLUMN outbox_keys.prev_routes IS 'Per exchange and routing key, the key_seq of the latest event before the newest one: {exchange: {routing_key: key_seq}}.';
COMMENT ON COLUMN outbox_keys.prev_any IS 'Events up to this key_seq were written before routes were recorded (their routes are unknown); 0 when none.';
COMMENT ON COLUMN outbox_keys.last_exchange IS 'Exchange of the newest event of the key (folded into prev_routes by the next one).';
COMMENT ON COLUMN outbox_keys.last_routing_key IS 'Routing key of the newest event of the key.';

ALTER TABLE outbox_messages ADD COLUMN IF NOT EXISTS key_prev jsonb;
ALTER TABLE outbox_messages ADD COLUMN IF NOT EXISTS key_prev_any bigint;
COMMENT ON COLUMN outbox_messages.key_prev IS 'For keyed events: per exchange and routing key, the key_seq of the latest earlier event of the key ({exchange: {routing_key: key_seq}}); sent as the x-key-prev header.';
COMMENT ON COLUMN outbox_messages.key_prev_any IS 'Earlier events of the key up to this key_seq have unknown routes; sent as x-key-prev-any. NULL when none.';

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
    v_prev jsonb;
    v_prev_any bigint;
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
        IF lower(v_header) IN ('x-ordering-key', 'x-key-seq', 'x-event-version', 'x-key-prev', 'x-key-prev-any')
           OR lower(v_header) LIKE 'outbox-%' THEN
            RAISE EXCEPTION 'outbox: invalid header name %: reserved, the relay sets it', quote_literal(v_header)
                USING ERRCODE = '22023';
        END IF;
    END LOOP;

    IF p_ordering_key IS NOT NULL THEN
        -- The row lock taken here is held until commit: writers of this key
        -- serialise, so key_seq order is commit order and has no gaps. The
        -- same statement folds the previous event's route into prev_routes
        -- and returns it: what came before this event, per route.
        INSERT INTO outbox_keys AS k (ordering_key, last_seq, last_exchange, last_routing_key)
        VALUES (p_ordering_key, 1, p_exchange, p_routing_key)
        ON CONFLICT (ordering_key) DO UPDATE SET
            last_seq = k.last_seq + 1,
            prev_routes = CASE WHEN k.last_exchange IS NULL THEN k.prev_routes
                ELSE jsonb_set(k.prev_routes, ARRAY[k.last_exchange],
                               coalesce(k.prev_routes -> k.last_exchange, '{}'::jsonb)
                               || jsonb_build_object(k.last_routing_key, k.last_seq)) END,
            -- A key from before routes were recorded: everything up to its
            -- last event has an unknown route.
            prev_any = CASE WHEN k.last_exchange IS NULL THEN k.last_seq ELSE k.prev_any END,
            last_exchange = EXCLUDED.last_exchange,
            last_routing_key = EXCLUDED.last_routing_key
        RETURNING k.last_seq, k.prev_routes, k.prev_any INTO v_key_seq, v_prev, v_prev_any;
        v_partition := outbox_partition(p_ordering_key, v_settings.partitions);
    ELSE
        v_partition := outbox_partition(v_id::text, v_settings.partitions);
    END IF;

    INSERT INTO outbox_messages AS m
        (id, ordering_key, key_seq, "partition", exchange, routing_key, event_type, event_version, payload, headers,
         key_prev, key_prev_any)
    VALUES
        (v_id, p_ordering_key, v_key_seq, v_partition, p_exchange, p_routing_key, p_event_type, p_event_version, p_payload, p_headers,
         v_prev, nullif(v_prev_any, 0))
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

-- The relay's claim with the new columns. A new name, since a function's
-- result type cannot change in place (and 00001 must stay re-runnable);
-- outbox_relay_claim stays for relays of earlier versions.
CREATE OR REPLACE FUNCTION outbox_relay_claim_v2(p_partition smallint, p_limit integer, p_lock_namespace text)
RETURNS TABLE (seq bigint, id uuid, ordering_key text, key_seq bigint, exchange text, routing_key text,
               event_type text, event_version integer, payload bytea, headers jsonb,
               created_at timestamptz, attempts integer, key_prev jsonb, key_prev_any bigint)
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
               m.event_version, m.payload, m.headers, m.created_at, m.attempts, m.key_prev, m.key_prev_any
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
COMMENT ON FUNCTION outbox_relay_claim_v2(smallint, integer, text) IS
    'Relay: lock a partition for the transaction and return its due rows in seq order (with key_prev), holding back keys behind a failed row.';

-- Consumer side ------------------------------------------------------------

ALTER TABLE inbox_keys ADD COLUMN IF NOT EXISTS held integer NOT NULL DEFAULT 0;
COMMENT ON COLUMN inbox_keys.held IS 'Messages of the key waiting in inbox_held; whoever moves the key applies the next of them.';

CREATE TABLE IF NOT EXISTS inbox_held (
    consumer text NOT NULL,
    message_id uuid NOT NULL,
    ordering_key text NOT NULL,
    key_seq bigint NOT NULL,
    after_seq bigint NOT NULL,
    exchange text NOT NULL,
    routing_key text NOT NULL,
    properties bytea NOT NULL,
    body bytea NOT NULL,
    held_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (consumer, message_id)
);
COMMENT ON TABLE inbox_held IS 'Messages that arrived ahead of their key, acked and kept until the key reaches them.';
COMMENT ON COLUMN inbox_held.consumer IS 'Consumer name.';
COMMENT ON COLUMN inbox_held.message_id IS 'The message id; also in inbox_messages with outcome held.';
COMMENT ON COLUMN inbox_held.ordering_key IS 'The ordering key.';
COMMENT ON COLUMN inbox_held.key_seq IS 'x-key-seq of the message.';
COMMENT ON COLUMN inbox_held.after_seq IS 'The key position it waits for: the key_seq of the latest earlier event this consumer binds.';
COMMENT ON COLUMN inbox_held.exchange IS 'Exchange the message was published to.';
COMMENT ON COLUMN inbox_held.routing_key IS 'Routing key it was published with.';
COMMENT ON COLUMN inbox_held.properties IS 'Its AMQP basic properties (headers included), encoded as on the wire.';
COMMENT ON COLUMN inbox_held.body IS 'Its body, byte for byte.';
COMMENT ON COLUMN inbox_held.held_at IS 'When it was held; with the key''s updated_at, decides when the gap wait is over.';
CREATE INDEX IF NOT EXISTS inbox_held_key ON inbox_held (consumer, ordering_key, key_seq);

ALTER TABLE inbox_members ADD COLUMN IF NOT EXISTS lock_key bigint;
COMMENT ON COLUMN inbox_members.lock_key IS 'Session advisory lock the instance holds while it lives; an instance whose lock is free is gone.';

CREATE TABLE IF NOT EXISTS inbox_topology (
    consumer text PRIMARY KEY,
    partitions integer NOT NULL CHECK (partitions BETWEEN 1 AND 64),
    retiring text[] NOT NULL DEFAULT '{}',
    changed_at timestamptz NOT NULL DEFAULT now()
);
COMMENT ON TABLE inbox_topology IS 'Per consumer name, the partition queues in use and the ones being drained.';
COMMENT ON COLUMN inbox_topology.consumer IS 'Consumer name.';
COMMENT ON COLUMN inbox_topology.partitions IS 'Partition queues the consumer''s bindings feed now.';
COMMENT ON COLUMN inbox_topology.retiring IS 'Queues of an earlier partition count: unbound, consumed until empty, then deleted.';
COMMENT ON COLUMN inbox_topology.changed_at IS 'When the partition count last changed.';

COMMENT ON COLUMN inbox_messages.outcome IS 'applied, discarded, dead-lettered, ignored or held (waiting in inbox_held).';
