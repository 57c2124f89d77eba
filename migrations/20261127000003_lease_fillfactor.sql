-- Leave room on each page so a renew (which only changes renewed_at, an unindexed
-- column) is a HOT update on the same page: one WAL record per row instead of three,
-- which keeps a batched renew of thousands of leases cheap.
ALTER TABLE lease SET (fillfactor = 50);
