-- Fencing for the workload (docs/fencing.md), without ever blocking a renew.
--
-- A fenced unit of work of the workload runs, first in its own READ COMMITTED
-- transaction, `SELECT lease_fence(name, epoch)` (or `lease_fence_cluster(name,
-- cluster)`) and writes only if that says so. The function takes a transaction-scoped
-- advisory lock of the lease in SHARED mode, then reads the lease row without locking it.
-- An acquire that takes the lease over takes the same advisory lock EXCLUSIVELY before it
-- decides (src/lease/store.rs), so it waits for fenced work in flight, and fenced work
-- that starts later waits for it and then sees the new epoch. Renews never touch the
-- advisory lock and nothing locks the lease row, so the workload never blocks a renew.
--
-- Transaction-scoped advisory locks end with their transaction, so this is safe behind
-- PgBouncer in transaction mode (session advisory locks are not).
--
-- The schema is part of the lock key, so schemas sharing a database do not share fences.
-- The functions are created with the schema written into them (this runs with
-- `SET LOCAL search_path` set to the configured schema), so they work whatever the
-- caller's search_path is.
DO $migration$
DECLARE
    s text := current_schema();
BEGIN
    -- The advisory lock key of a lease. Must match `fence_key_text` in
    -- src/lease/store.rs, which computes the same key inside the acquire statement.
    EXECUTE format($f$
        CREATE FUNCTION %1$I.lease_fence_key(lease_name text) RETURNS bigint
        LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE
        AS $body$ SELECT hashtextextended(%2$L || lease_name, 0) $body$
    $f$, s, 'reaper-operator:' || s || ':');

    -- Takes the fence of a lease in shared mode until the caller's transaction ends.
    -- Only READ COMMITTED reads the lease row after the lock is granted: a REPEATABLE
    -- READ or SERIALIZABLE transaction keeps the snapshot of its first statement, taken
    -- before the lock wait, and could miss a takeover that committed during the wait.
    EXECUTE format($f$
        CREATE FUNCTION %1$I.lease_fence_lock(lease_name text) RETURNS void
        LANGUAGE plpgsql VOLATILE STRICT
        AS $body$
        BEGIN
            IF current_setting('transaction_isolation') <> 'read committed' THEN
                RAISE EXCEPTION 'the lease fence needs a READ COMMITTED transaction, not %%',
                    current_setting('transaction_isolation')
                    USING ERRCODE = 'invalid_transaction_state',
                          HINT = 'Run the fenced unit of work with BEGIN ISOLATION LEVEL READ COMMITTED: '
                              || 'an older snapshot could miss a takeover that committed while the fence waited.';
            END IF;
            PERFORM pg_advisory_xact_lock_shared(%1$I.lease_fence_key(lease_name));
        END
        $body$
    $f$, s);

    -- True when `lease_epoch` is the lease's current epoch, held and unexpired; the
    -- caller's transaction then holds the fence until it ends. Anything but true: stop.
    EXECUTE format($f$
        CREATE FUNCTION %1$I.lease_fence(lease_name text, lease_epoch bigint) RETURNS boolean
        LANGUAGE plpgsql VOLATILE STRICT
        AS $body$
        BEGIN
            PERFORM %1$I.lease_fence_lock(lease_name);
            -- A new snapshot, taken after the lock was granted (READ COMMITTED).
            RETURN EXISTS (
                SELECT 1 FROM %1$I.lease AS l
                WHERE l.name = lease_name AND l.epoch = lease_epoch AND l.holder <> ''
                  AND l.renewed_at + l.ttl_ms * interval '1 millisecond' > clock_timestamp());
        END
        $body$
    $f$, s);

    -- The current epoch when a holder of `cluster` (holder `<cluster>/<pod>`) holds the
    -- lease unexpired, else NULL: for a workload that knows its cluster but not the
    -- epoch. A takeover within the same cluster keeps the same Deployment running, so
    -- its work goes on under the new epoch; a takeover from another cluster stops it.
    EXECUTE format($f$
        CREATE FUNCTION %1$I.lease_fence_cluster(lease_name text, cluster text) RETURNS bigint
        LANGUAGE plpgsql VOLATILE STRICT
        AS $body$
        BEGIN
            PERFORM %1$I.lease_fence_lock(lease_name);
            -- A new snapshot, taken after the lock was granted (READ COMMITTED).
            RETURN (
                SELECT l.epoch FROM %1$I.lease AS l
                WHERE l.name = lease_name AND l.holder <> ''
                  AND split_part(l.holder, '/', 1) = cluster
                  AND l.renewed_at + l.ttl_ms * interval '1 millisecond' > clock_timestamp());
        END
        $body$
    $f$, s);
END
$migration$;
