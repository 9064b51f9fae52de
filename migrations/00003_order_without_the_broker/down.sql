-- Removes what 00003_order_without_the_broker/up.sql created and puts back
-- the functions as 00001 defined them. Run with the same search_path.
DROP TABLE IF EXISTS inbox_topology;
ALTER TABLE inbox_members DROP COLUMN IF EXISTS lock_key;
DROP TABLE IF EXISTS inbox_held;
ALTER TABLE inbox_keys DROP COLUMN IF EXISTS held;
COMMENT ON COLUMN inbox_messages.outcome IS 'applied, discarded, dead-lettered or ignored.';

DROP FUNCTION IF EXISTS outbox_relay_claim_v2(smallint, integer, text);
DROP FUNCTION IF EXISTS outbox_enqueue(text, text, text, bytea, text, integer, jsonb, uuid, integer);
ALTER TABLE outbox_messages DROP COLUMN IF EXISTS key_prev_any;
ALTER TABLE outbox_messages DROP COLUMN IF EXISTS key_prev;
ALTER TABLE outbox_keys DROP COLUMN IF EXISTS last_routing_key;
ALTER TABLE outbox_keys DROP COLUMN IF EXISTS last_exchange;
ALTER TABLE outbox_keys DROP COLUMN IF EXISTS prev_any;
ALTER TABLE outbox_keys DROP COLUMN IF EXISTS prev_routes;

-- 00001's definition of outbox_enqueue, unchanged.
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
