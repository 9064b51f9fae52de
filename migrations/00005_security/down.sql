-- Removes what 00005_security/up.sql created.
DROP TABLE IF EXISTS inbox_replays;
ALTER TABLE outbox_messages DROP CONSTRAINT IF EXISTS outbox_messages_headers_unreserved;
DROP FUNCTION IF EXISTS outbox_headers_unreserved(jsonb);
