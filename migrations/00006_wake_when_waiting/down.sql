-- Removes what 00006_wake_when_waiting/up.sql created and puts back the
-- outbox_enqueue of 00004 (its body reads outbox_waiting, so it goes first).
-- Run with the same search_path.
DROP FUNCTION IF EXISTS outbox_enqueue(text, text, text, bytea, text, integer, jsonb, uuid, integer);
DROP TABLE IF EXISTS outbox_waiting;
ALTER TABLE outbox_settings DROP COLUMN IF EXISTS notify_when;

-- 00004's definition of outbox_enqueue, unchanged.
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
    IF v_max < 1 OR v_max > 134217728 THEN
        RAISE EXCEPTION 'outbox: invalid p_max_payload_bytes %: must be 1 to 134217728 (128 MiB, RabbitMQ''s default message limit)', v_max
            USING ERRCODE = '22023';
    END IF;

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
        RAISE EXCEPTION 'outbox: invalid headers %: must be a JSON object', left(coalesce(p_headers::text, 'NULL'), 64)
            USING ERRCODE = '22023';
    END IF;
    -- The broker takes all of a message's properties in one frame (128 KiB
    -- by default; over it, it closes the connection): headers stay well under.
    IF octet_length(p_headers::text) > 16384 THEN
        RAISE EXCEPTION 'outbox: headers are % bytes as JSON, over the maximum of 16384', octet_length(p_headers::text)
            USING ERRCODE = '22023';
    END IF;
    FOR v_header IN SELECT jsonb_object_keys(p_headers) LOOP
        IF v_header = '' OR octet_length(v_header) > 255 THEN
            RAISE EXCEPTION 'outbox: invalid header name %: must be 1 to 255 bytes', quote_literal(left(v_header, 64))
                USING ERRCODE = '22023';
        END IF;
        IF lower(v_header) IN ('x-ordering-key', 'x-key-seq', 'x-event-version', 'x-key-prev', 'x-key-prev-any')
           OR lower(v_header) LIKE 'outbox-%' OR lower(v_header) LIKE 'x-dead-letter-%'
           OR lower(v_header) LIKE 'x-original-%' THEN
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
