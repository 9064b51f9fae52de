-- Least-privilege grants on the outbox and inbox objects of one schema, for
-- three roles:
--
--   producer  the service that enqueues events (outbox_enqueue and
--             outbox_enqueue_batch, in its own transactions)
--   relay     the outbox-relay sidecar (run, status, parked list/retry/purge)
--   consumer  the idempotent consumer (its inbox_* tables)
--
-- Run it as the role that owns the objects (the one that ran the migrations)
-- or as a superuser, with psql:
--
--   psql "$OWNER_DATABASE_URL" -v schema=shop \
--        -v producer=shop_app -v relay=shop_relay -v consumer=shop_consumer \
--        -f docs/grants.sql
--
-- Leave a role's variable out to skip that role (a service that only
-- produces has no consumer role). The roles must exist; this file creates
-- none and sets no passwords. One variable may name the same role as
-- another: a consumer whose handlers enqueue events needs the producer's
-- grants as well, so pass its role as both -v consumer=... and -v producer=...
--
-- The file sets the roles' privileges on these objects rather than adding
-- to them: it first revokes everything each named role holds on the outbox
-- and inbox objects, then grants what is below, all in one transaction (a
-- live service never sees a gap). Run it again after every migration: new
-- tables have no grants, and new functions are executable by PUBLIC until
-- this file revokes that.
--
-- What each role can and cannot do, the RabbitMQ permissions, and what
-- the grants still allow: docs/PRIVILEGES.md. Checked by
-- examples/shop/tests/privileges.rs.

\set ON_ERROR_STOP on

\if :{?schema}
\else
    \echo 'grants.sql: no schema given: psql -v schema=... (see the top of the file)'
    SELECT 1 / 0 AS "grants.sql needs -v schema=...";
\endif

BEGIN;

-- PostgreSQL lets PUBLIC execute every new function. The outbox functions
-- are SECURITY INVOKER (they run with the caller's table privileges), so
-- this alone opened no table; still, only the roles below need them.
-- (A trigger function's EXECUTE privilege is checked when the trigger is
-- created, not when it fires: outbox_settings_guard keeps working.)
REVOKE EXECUTE ON FUNCTION
    :"schema".outbox_settings_guard(),
    :"schema".outbox_uuid_v7(),
    :"schema".outbox_partition(text, integer),
    :"schema".outbox_enqueue(text, text, text, bytea, text, integer, jsonb, uuid, integer),
    :"schema".outbox_enqueue_batch(text[], text[], text[], bytea[], text[], integer[], jsonb[], uuid[], integer),
    :"schema".outbox_relay_claim(smallint, integer, text),
    :"schema".outbox_relay_claim_v2(smallint, integer, text),
    :"schema".outbox_relay_claim_v3(smallint, integer, bigint, text),
    :"schema".outbox_relay_published(uuid[], boolean)
FROM PUBLIC;

-- Start each named role from nothing on these objects (table-level REVOKE
-- ALL takes the column-level privileges with it). Their privileges on the
-- service's own tables are not touched.
\if :{?producer}
REVOKE ALL ON TABLE
    :"schema".outbox_settings, :"schema".outbox_keys, :"schema".outbox_messages,
    :"schema".inbox_messages, :"schema".inbox_keys, :"schema".inbox_held,
    :"schema".inbox_members, :"schema".inbox_topology, :"schema".inbox_replays,
    :"schema".outbox_waiting
FROM :"producer";
REVOKE ALL ON SEQUENCE :"schema".outbox_messages_seq_seq FROM :"producer";
REVOKE ALL ON FUNCTION
    :"schema".outbox_uuid_v7(), :"schema".outbox_partition(text, integer),
    :"schema".outbox_enqueue(text, text, text, bytea, text, integer, jsonb, uuid, integer),
    :"schema".outbox_enqueue_batch(text[], text[], text[], bytea[], text[], integer[], jsonb[], uuid[], integer),
    :"schema".outbox_relay_claim(smallint, integer, text),
    :"schema".outbox_relay_claim_v2(smallint, integer, text),
    :"schema".outbox_relay_claim_v3(smallint, integer, bigint, text),
    :"schema".outbox_relay_published(uuid[], boolean)
FROM :"producer";
\endif
\if :{?relay}
REVOKE ALL ON TABLE
    :"schema".outbox_settings, :"schema".outbox_keys, :"schema".outbox_messages,
    :"schema".inbox_messages, :"schema".inbox_keys, :"schema".inbox_held,
    :"schema".inbox_members, :"schema".inbox_topology, :"schema".inbox_replays,
    :"schema".outbox_waiting
FROM :"relay";
REVOKE ALL ON SEQUENCE :"schema".outbox_messages_seq_seq FROM :"relay";
REVOKE ALL ON FUNCTION
    :"schema".outbox_uuid_v7(), :"schema".outbox_partition(text, integer),
    :"schema".outbox_enqueue(text, text, text, bytea, text, integer, jsonb, uuid, integer),
    :"schema".outbox_enqueue_batch(text[], text[], text[], bytea[], text[], integer[], jsonb[], uuid[], integer),
    :"schema".outbox_relay_claim(smallint, integer, text),
    :"schema".outbox_relay_claim_v2(smallint, integer, text),
    :"schema".outbox_relay_claim_v3(smallint, integer, bigint, text),
    :"schema".outbox_relay_published(uuid[], boolean)
FROM :"relay";
\endif
\if :{?consumer}
REVOKE ALL ON TABLE
    :"schema".outbox_settings, :"schema".outbox_keys, :"schema".outbox_messages,
    :"schema".inbox_messages, :"schema".inbox_keys, :"schema".inbox_held,
    :"schema".inbox_members, :"schema".inbox_topology, :"schema".inbox_replays,
    :"schema".outbox_waiting
FROM :"consumer";
REVOKE ALL ON SEQUENCE :"schema".outbox_messages_seq_seq FROM :"consumer";
REVOKE ALL ON FUNCTION
    :"schema".outbox_uuid_v7(), :"schema".outbox_partition(text, integer),
    :"schema".outbox_enqueue(text, text, text, bytea, text, integer, jsonb, uuid, integer),
    :"schema".outbox_enqueue_batch(text[], text[], text[], bytea[], text[], integer[], jsonb[], uuid[], integer),
    :"schema".outbox_relay_claim(smallint, integer, text),
    :"schema".outbox_relay_claim_v2(smallint, integer, text),
    :"schema".outbox_relay_claim_v3(smallint, integer, bigint, text),
    :"schema".outbox_relay_published(uuid[], boolean)
FROM :"consumer";
\endif

-- Producer --------------------------------------------------------------
--
-- outbox_enqueue is SECURITY INVOKER: every statement inside it runs with
-- the caller's privileges, so the caller needs each one below. Each was
-- found necessary by taking it away (the enqueue then fails with
-- "permission denied").
\if :{?producer}
-- To name the functions and tables at all.
GRANT USAGE ON SCHEMA :"schema" TO :"producer";
-- The two entry points, and the two helpers outbox_enqueue calls (an id
-- when the caller gives none; the partition of a key).
GRANT EXECUTE ON FUNCTION
    :"schema".outbox_enqueue(text, text, text, bytea, text, integer, jsonb, uuid, integer),
    :"schema".outbox_enqueue_batch(text[], text[], text[], bytea[], text[], integer[], jsonb[], uuid[], integer),
    :"schema".outbox_uuid_v7(),
    :"schema".outbox_partition(text, integer)
TO :"producer";
-- `SELECT * INTO v_settings FROM outbox_settings`: every column (partition
-- count, payload limit, notify switch and channel; nothing secret).
GRANT SELECT ON :"schema".outbox_settings TO :"producer";
-- Whether a relay worker waits for this partition's NOTIFY (00006).
GRANT SELECT ON :"schema".outbox_waiting TO :"producer";
-- The insert of the event: only the columns the function writes, so the
-- producer cannot set published_at, parked_at, attempts, created_at,
-- next_attempt_at or last_error (the relay's bookkeeping).
GRANT INSERT (id, ordering_key, key_seq, "partition", exchange, routing_key, event_type,
              event_version, payload, headers, key_prev, key_prev_any)
    ON :"schema".outbox_messages TO :"producer";
-- `RETURNING m.seq` needs SELECT on seq, and on seq alone: no payload,
-- header or routing column of any event is readable (count(*) and the
-- seq numbers are).
GRANT SELECT (seq) ON :"schema".outbox_messages TO :"producer";
-- seq is a bigserial: nextval() needs USAGE on its sequence.
GRANT USAGE ON SEQUENCE :"schema".outbox_messages_seq_seq TO :"producer";
-- The per-key counter upsert (keyed events only):
--   INSERT .. (ordering_key, last_seq, last_exchange, last_routing_key)
--   ON CONFLICT (ordering_key) DO UPDATE SET last_seq, prev_routes,
--     prev_any, last_exchange, last_routing_key = <reads k.*>
--   RETURNING k.last_seq, k.prev_routes, k.prev_any
-- INSERT on the inserted columns, UPDATE on the updated ones, and SELECT
-- on every column: the conflict target, the SET expressions and RETURNING
-- between them read all six (each column-level SELECT was taken away in
-- turn; every one is required). So a producer can read every key's row
-- (ordering keys and their routes, no payloads) and, having UPDATE, could
-- rewrite a counter directly: see docs/PRIVILEGES.md, "What the grants
-- still allow". No DELETE.
GRANT SELECT ON :"schema".outbox_keys TO :"producer";
GRANT INSERT (ordering_key, last_seq, last_exchange, last_routing_key)
    ON :"schema".outbox_keys TO :"producer";
GRANT UPDATE (last_seq, prev_routes, prev_any, last_exchange, last_routing_key)
    ON :"schema".outbox_keys TO :"producer";
-- pg_notify (the wake-up on commit) needs no privilege. Nothing on inbox_*.
\endif

-- Relay -----------------------------------------------------------------
--
-- Every statement of relay/src/store.rs, for `outbox-relay run` and the
-- admin commands `status`, `parked list`, `parked retry`, `parked purge`.
-- LISTEN, pg_try_advisory_xact_lock and the pg_proc lookup of the
-- migration level need no grant. The relay never inserts events and never
-- touches outbox_keys or the inbox tables.
\if :{?relay}
GRANT USAGE ON SCHEMA :"schema" TO :"relay";
-- The claim (a partition's due rows under its advisory lock) and the
-- record of confirmed rows (deleted, or stamped with a retention).
GRANT EXECUTE ON FUNCTION
    :"schema".outbox_relay_claim_v3(smallint, integer, bigint, text),
    :"schema".outbox_relay_published(uuid[], boolean)
TO :"relay";
-- The partition count and the NOTIFY channel to LISTEN on.
GRANT SELECT (partitions, notify_channel) ON :"schema".outbox_settings TO :"relay";
-- Its workers say when they wait for a NOTIFY (00006); stale rows of dead
-- relays are deleted.
GRANT SELECT, INSERT, UPDATE, DELETE ON :"schema".outbox_waiting TO :"relay";
-- The claim reads every column but last_error, `parked list` reads
-- last_error: all of them. (The relay has to read the payloads it ships.)
GRANT SELECT ON :"schema".outbox_messages TO :"relay";
-- Its bookkeeping only: published (retention), failed and parked rows,
-- `parked retry`. It cannot change an event's exchange, routing key,
-- payload, headers, key or sequence. UPDATE also lets the retention
-- clean-up lock rows (SELECT .. FOR UPDATE SKIP LOCKED).
GRANT UPDATE (published_at, attempts, last_error, next_attempt_at, parked_at)
    ON :"schema".outbox_messages TO :"relay";
-- Confirmed rows without a retention, expired rows, `parked purge`.
GRANT DELETE ON :"schema".outbox_messages TO :"relay";
\endif

-- Consumer --------------------------------------------------------------
--
-- Every statement of consumer/src/{inbox,held,batch,members,topology}.rs
-- and of consumer::replay_dead_letters.
-- pg_locks, pg_database and pg_try_advisory_lock (the membership check)
-- are readable and executable by PUBLIC. Nothing on the outbox: a consumer
-- whose handlers enqueue events also gets the producer's grants (name its
-- role in -v producer=... too). Its handlers' own tables are the
-- service's business; grant those separately.
\if :{?consumer}
GRANT USAGE ON SCHEMA :"schema" TO :"consumer";
-- Dedupe rows: recorded (INSERT .. ON CONFLICT, RETURNING), re-marked
-- (a replayed dead letter, a held message released), pruned after the
-- retention.
GRANT SELECT, INSERT, DELETE ON :"schema".inbox_messages TO :"consumer";
GRANT UPDATE (outcome, processed_at) ON :"schema".inbox_messages TO :"consumer";
-- Key positions: locked by an upsert, moved, held counts. Never deleted.
GRANT SELECT, INSERT ON :"schema".inbox_keys TO :"consumer";
GRANT UPDATE (last_seq, updated_at, held) ON :"schema".inbox_keys TO :"consumer";
-- Messages ahead of their key: kept, read back, taken out. Never updated.
GRANT SELECT, INSERT, DELETE ON :"schema".inbox_held TO :"consumer";
-- Live instances: joined (upsert), listed, left, dead ones removed.
GRANT SELECT, INSERT, DELETE ON :"schema".inbox_members TO :"consumer";
GRANT UPDATE (heartbeat_at, lock_key) ON :"schema".inbox_members TO :"consumer";
-- The partition count and the queues being drained. Never deleted.
GRANT SELECT, INSERT ON :"schema".inbox_topology TO :"consumer";
GRANT UPDATE (partitions, retiring, changed_at) ON :"schema".inbox_topology TO :"consumer";
-- Dead letters put back by consumer::replay_dead_letters (run with the
-- consumer's config): recorded before each is published (an upsert), looked
-- up when it arrives (a replay is honoured only if recorded), pruned with
-- the dedupe rows. The producer and the relay get nothing here: a replay
-- cannot be forged by writing this table.
GRANT SELECT, INSERT, DELETE ON :"schema".inbox_replays TO :"consumer";
GRANT UPDATE (original_exchange, original_routing_key, recorded_at)
    ON :"schema".inbox_replays TO :"consumer";
\endif

COMMIT;
