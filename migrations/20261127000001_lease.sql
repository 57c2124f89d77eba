-- The lease table and its append-only audit trail.
-- The operator runs every migration with `SET LOCAL search_path` pointing at the
-- configured schema, so names here are unqualified on purpose.

CREATE TABLE lease (
    name            text        PRIMARY KEY CHECK (name <> ''),
    -- '' means free.
    holder          text        NOT NULL DEFAULT '',
    -- Fencing token: +1 on every acquisition, never decreases.
    epoch           bigint      NOT NULL DEFAULT 0 CHECK (epoch >= 0),
    -- Stored in the row so every candidate judges expiry by the holder's ttl.
    ttl_ms          bigint      NOT NULL CHECK (ttl_ms > 0),
    acquired_at     timestamptz NOT NULL,
    renewed_at      timestamptz NOT NULL,
    -- Holder displaced by the latest acquisition ('' if the lease was free).
    previous_holder text        NOT NULL DEFAULT ''
);

CREATE TABLE lease_event (
    id              bigserial   PRIMARY KEY,
    name            text        NOT NULL,
    epoch           bigint      NOT NULL,
    -- The actor: the new holder for acquire/takeover, the releasing holder for release.
    holder          text        NOT NULL,
    previous_holder text        NOT NULL DEFAULT '',
    kind            text        NOT NULL CHECK (kind IN ('acquire', 'takeover', 'release')),
    at              timestamptz NOT NULL
);

CREATE INDEX lease_event_name_epoch ON lease_event (name, epoch);

CREATE FUNCTION lease_event_append_only() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'lease_event is append-only (% refused)', TG_OP
        USING HINT = 'disable trigger lease_event_append_only to prune old history on purpose';
END;
$$;

CREATE TRIGGER lease_event_append_only
    BEFORE UPDATE OR DELETE ON lease_event
    FOR EACH ROW EXECUTE FUNCTION lease_event_append_only();
