-- Names nobody outside the toolkit can forge. Idempotent.
--
-- 1. A table constraint refusing the header names the toolkit interprets
--    (the ones outbox_enqueue already refuses), so a row written with a
--    plain INSERT cannot carry them either. NOT VALID: rows already there
--    are not rechecked; the relay strips such names from them.
-- 2. Replays a consumer can trust: `consumer::replay_dead_letters` records
--    each message it puts back, with where it was first published, before
--    it publishes it. The consumer applies a message as a replay (whatever
--    its key's position, routed by the recorded exchange and routing key)
--    only when it arrives straight in its own queue and is recorded here,
--    so a producer cannot forge a replay with headers.

-- One expression, no subquery: PostgreSQL inlines it into the constraint.
-- (A version with EXISTS over jsonb_object_keys was planned anew for every
-- row inserted and cost producers 0.15 ms per event, more than the insert.)
CREATE OR REPLACE FUNCTION outbox_headers_unreserved(p_headers jsonb)
RETURNS boolean
LANGUAGE sql IMMUTABLE PARALLEL SAFE
AS $$
    SELECT jsonb_typeof(p_headers) IS DISTINCT FROM 'object'
        OR NOT jsonb_path_exists(p_headers,
            '$.keyvalue() ? (@.key like_regex "^(x-ordering-key|x-key-seq|x-event-version|x-key-prev|x-key-prev-any|outbox-.*|x-dead-letter-.*|x-original-.*)$" flag "is")')
$$;
COMMENT ON FUNCTION outbox_headers_unreserved(jsonb) IS 'False when the headers use a name the toolkit sets or interprets (outbox::wire::is_reserved).';

DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_constraint
                   WHERE conname = 'outbox_messages_headers_unreserved'
                     AND conrelid = 'outbox_messages'::regclass) THEN
        ALTER TABLE outbox_messages ADD CONSTRAINT outbox_messages_headers_unreserved
            CHECK (outbox_headers_unreserved(headers)) NOT VALID;
    END IF;
END
$$;

CREATE TABLE IF NOT EXISTS inbox_replays (
    consumer text NOT NULL,
    message_id uuid NOT NULL,
    original_exchange text NOT NULL,
    original_routing_key text NOT NULL,
    recorded_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (consumer, message_id)
);
COMMENT ON TABLE inbox_replays IS 'Dead letters put back by the replay tool, not yet applied; a replay is honoured only if recorded here.';
COMMENT ON COLUMN inbox_replays.consumer IS 'Consumer name.';
COMMENT ON COLUMN inbox_replays.message_id IS 'The replayed message id.';
COMMENT ON COLUMN inbox_replays.original_exchange IS 'Exchange the message was first published to: its handler is chosen by it.';
COMMENT ON COLUMN inbox_replays.original_routing_key IS 'Routing key it was first published with.';
COMMENT ON COLUMN inbox_replays.recorded_at IS 'When the replay tool recorded it.';
