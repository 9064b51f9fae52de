-- Removes what 00002_consumer_members/up.sql created.
DROP TABLE IF EXISTS inbox_members;
COMMENT ON COLUMN inbox_messages.outcome IS 'applied, discarded or dead-lettered.';
