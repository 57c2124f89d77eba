-- How long a workload report stays credible, chosen by the cluster that writes it (its
-- ttl; it refreshes the report several times within that). Readers judge a report's age
-- by the reporter's bound, not their own ttl, so clusters with different timings do not
-- presume each other dead too early (nor trust a dead one too long).

ALTER TABLE lease_workload
    ADD COLUMN stale_after_ms bigint NOT NULL DEFAULT 15000 CHECK (stale_after_ms > 0);
