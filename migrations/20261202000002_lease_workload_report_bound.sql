-- Workload reports carry their writer's bound; epochs are unique per lease in the audit.

-- How long a workload report stays credible, chosen by the cluster that writes it (its
-- ttl plus its pods' grace period; it refreshes the report several times within that). Readers judge a report's age
-- by the reporter's bound, not their own ttl, so clusters with different timings do not
-- presume each other dead too early (nor trust a dead one too long).

ALTER TABLE lease_workload
    ADD COLUMN stale_after_ms bigint NOT NULL DEFAULT 15000 CHECK (stale_after_ms > 0);

-- How often the writer refreshes its report while it reaches the database. A new
-- holder presumes a silent cluster dead only after holding the lease for two of these:
-- after an outage of the database itself every report is old, live clusters' included,
-- and they need that long to report again.
ALTER TABLE lease_workload
    ADD COLUMN refresh_ms bigint NOT NULL DEFAULT 3750 CHECK (refresh_ms > 0);

-- An epoch is handed out once per lease: two acquisitions of one epoch (a row deleted and
-- recreated while another acquire waited on the fence lock, reading an older history)
-- fail the second instead of repeating a fencing token.
CREATE UNIQUE INDEX lease_event_one_acquisition_per_epoch
    ON lease_event (name, epoch) WHERE kind IN ('acquire', 'takeover');
