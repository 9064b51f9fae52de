-- Live consumer instances, so instances of one consumer name can share its
-- partition queues: each heartbeats here and takes the queues whose index
-- modulo the live count is its rank among the live instance ids.
CREATE TABLE IF NOT EXISTS inbox_members (
    consumer text NOT NULL,
    instance uuid NOT NULL,
    heartbeat_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (consumer, instance)
);
COMMENT ON TABLE inbox_members IS 'Live instances of each consumer name; they share its partition queues.';
COMMENT ON COLUMN inbox_members.consumer IS 'Consumer name.';
COMMENT ON COLUMN inbox_members.instance IS 'Random id of one running instance.';
COMMENT ON COLUMN inbox_members.heartbeat_at IS 'Last heartbeat; an instance silent for longer than its TTL counts as gone.';
COMMENT ON COLUMN inbox_messages.outcome IS 'applied, discarded, dead-lettered or ignored.';
