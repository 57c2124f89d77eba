-- Guards that keep the audit history and the fencing tokens from being reset by hand.
-- Like every migration, this runs with `SET LOCAL search_path` set to the configured
-- schema, so names are unqualified on purpose.

-- lease_event refuses UPDATE and DELETE row by row; TRUNCATE fires no row triggers, so
-- it needs a statement trigger of its own. The history is what keeps epochs growing when
-- a lease row is deleted (acquire recreates a missing row after the highest audited
-- epoch), so erasing it would let a fencing token repeat.
CREATE FUNCTION lease_event_refuse_truncate() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'lease_event is append-only (TRUNCATE refused): it is the history that keeps lease epochs growing'
        USING HINT = 'To prune old history on purpose, in a maintenance window: '
            || 'ALTER TABLE lease_event DISABLE TRIGGER lease_event_append_only; '
            || 'DELETE old rows but keep the latest row of every lease; '
            || 'ALTER TABLE lease_event ENABLE TRIGGER lease_event_append_only.';
END;
$$;

CREATE TRIGGER lease_event_refuse_truncate
    BEFORE TRUNCATE ON lease_event
    FOR EACH STATEMENT EXECUTE FUNCTION lease_event_refuse_truncate();

-- Deleting a held, unexpired lease row would let the next acquire in at once: a second
-- holder while the first still acts. A free or expired row may go (the next acquire
-- recreates it with an epoch above its audit history).
CREATE FUNCTION lease_refuse_delete_held() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF OLD.holder <> ''
       AND OLD.renewed_at + OLD.ttl_ms * interval '1 millisecond' > clock_timestamp() THEN
        RAISE EXCEPTION 'lease % is held by % (epoch %) until %: deleting it would let a second holder in at once',
            OLD.name, OLD.holder, OLD.epoch, OLD.renewed_at + OLD.ttl_ms * interval '1 millisecond'
            USING ERRCODE = 'object_in_use',
                  HINT = 'Release it (reaper-operator lease release) or wait until it expires; '
                      || 'a free or expired lease can be deleted.';
    END IF;
    RETURN OLD;
END;
$$;

CREATE TRIGGER lease_refuse_delete_held
    BEFORE DELETE ON lease
    FOR EACH ROW EXECUTE FUNCTION lease_refuse_delete_held();

-- TRUNCATE bypasses the row trigger above, so it is refused outright.
CREATE FUNCTION lease_refuse_truncate() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'TRUNCATE of the lease table refused: it would drop held leases and let second holders in'
        USING ERRCODE = 'object_in_use',
              HINT = 'DELETE the free or expired leases instead (held ones are refused); '
                  || 'the next acquire recreates a missing row with a continuing epoch.';
END;
$$;

CREATE TRIGGER lease_refuse_truncate
    BEFORE TRUNCATE ON lease
    FOR EACH STATEMENT EXECUTE FUNCTION lease_refuse_truncate();
