-- A database failover must not let two holders act at once, nor hand out an epoch twice
-- (docs/operations.md, "A highly available database").
--
-- After a promotion the lease rows are whatever reached the standby: with asynchronous
-- replication an acknowledged renew or acquire may be missing, and the new primary's
-- clock is not the old one's. So the history before a promotion is not trusted:
--
-- * Every row records the WAL timeline it was last acquired on; a renew, a release or a
--   fence check of a row from an earlier timeline fails, so every holder steps down.
-- * `lease_timeline` records when each timeline was first seen by an acquire. No lease
--   is acquired until a full ttl has passed since then, on the new primary's clock: any
--   holder of the lost history stops acting within its renew deadline (< ttl) of its
--   last acknowledged renew, which came before the promotion.
-- * Epochs handed out on timeline T are at least (T - 1) * 2^32 + 1, above any epoch of
--   an earlier timeline, so an epoch lost with the old primary is never handed out again.
--
-- The timeline is the one the server writes WAL on now (the first 8 hex digits of the
-- current WAL file's name); it changes at the promotion, before the server takes writes.
DO $migration$
DECLARE
    s text := current_schema();
BEGIN
    EXECUTE format($f$
        CREATE FUNCTION %1$I.lease_server_timeline() RETURNS bigint
        LANGUAGE sql VOLATILE
        AS $body$ SELECT ('x' || left(pg_walfile_name(pg_current_wal_lsn()), 8))::bit(32)::bigint $body$
    $f$, s);

    -- As in 20261202000001_lease_fence.sql, plus: a row of an earlier timeline is not
    -- held (its holder may have lost it in the history the failover dropped).
    EXECUTE format($f$
        CREATE OR REPLACE FUNCTION %1$I.lease_fence(lease_name text, lease_epoch bigint) RETURNS boolean
        LANGUAGE plpgsql VOLATILE STRICT
        AS $body$
        BEGIN
            PERFORM %1$I.lease_fence_lock(lease_name);
            -- A new snapshot, taken after the lock was granted (READ COMMITTED).
            RETURN EXISTS (
                SELECT 1 FROM %1$I.lease AS l
                WHERE l.name = lease_name AND l.epoch = lease_epoch AND l.holder <> ''
                  AND l.timeline = %1$I.lease_server_timeline()
                  AND l.renewed_at + l.ttl_ms * interval '1 millisecond' > clock_timestamp());
        END
        $body$
    $f$, s);

    EXECUTE format($f$
        CREATE OR REPLACE FUNCTION %1$I.lease_fence_cluster(lease_name text, cluster text) RETURNS bigint
        LANGUAGE plpgsql VOLATILE STRICT
        AS $body$
        BEGIN
            PERFORM %1$I.lease_fence_lock(lease_name);
            -- A new snapshot, taken after the lock was granted (READ COMMITTED).
            RETURN (
                SELECT l.epoch FROM %1$I.lease AS l
                WHERE l.name = lease_name AND l.holder <> ''
                  AND split_part(l.holder, '/', 1) = cluster
                  AND l.timeline = %1$I.lease_server_timeline()
                  AND l.renewed_at + l.ttl_ms * interval '1 millisecond' > clock_timestamp());
        END
        $body$
    $f$, s);
END
$migration$;

CREATE TABLE lease_timeline (
    timeline      bigint      PRIMARY KEY,
    -- When an acquire first ran on this timeline; no acquire succeeds before this + ttl.
    first_seen_at timestamptz NOT NULL
);

-- Timeline 1 has never been promoted, so no history was dropped: no wait. On a later
-- timeline this migration may run moments after a failover, or run again after its
-- first run was lost in one (with acquisitions made in between), so the wait starts now.
-- Holders keep renewing meanwhile.
INSERT INTO lease_timeline (timeline, first_seen_at)
SELECT lease_server_timeline(),
       CASE WHEN lease_server_timeline() = 1 THEN '-infinity'::timestamptz ELSE clock_timestamp() END;

-- The default covers rows an older version inserts during a rolling upgrade (its
-- takeovers and renews know nothing of timelines: docs/operations.md).
ALTER TABLE lease ADD COLUMN timeline bigint NOT NULL DEFAULT lease_server_timeline();

-- A workload report from before a failover proves nothing about the pods now: the
-- cluster's later reports (its own takeover, a starting pod) may be lost. Readers count
-- such a report as "may run pods" until its own bound has passed since the new timeline
-- was first seen (src/lease/store.rs, `sync_workload`).
ALTER TABLE lease_workload ADD COLUMN timeline bigint NOT NULL DEFAULT lease_server_timeline();
