-- Removes every object 00001_outbox_tables/up.sql created, and nothing else.
-- Run with the same search_path as the up migration.
DROP FUNCTION IF EXISTS outbox_relay_published(uuid[], boolean);
DROP FUNCTION IF EXISTS outbox_relay_claim(smallint, integer, text);
DROP FUNCTION IF EXISTS outbox_enqueue_batch(text[], text[], text[], bytea[], text[], integer[], jsonb[], uuid[], integer);
DROP FUNCTION IF EXISTS outbox_enqueue(text, text, text, bytea, text, integer, jsonb, uuid, integer);
DROP FUNCTION IF EXISTS outbox_partition(text, integer);
DROP FUNCTION IF EXISTS outbox_uuid_v7();
DROP TABLE IF EXISTS inbox_keys;
DROP TABLE IF EXISTS inbox_messages;
DROP TABLE IF EXISTS outbox_messages;
DROP TABLE IF EXISTS outbox_keys;
DROP TABLE IF EXISTS outbox_settings;
DROP FUNCTION IF EXISTS outbox_settings_guard();
