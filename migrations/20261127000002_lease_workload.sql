-- What each cluster last saw of the workload behind a lease. A new holder in one
-- cluster scales up only once every other cluster reports no running pods (or has not
-- reported for longer than the ttl: it is dead or cut off).

CREATE TABLE lease_workload (
    name         text        NOT NULL,
    cluster      text        NOT NULL,
    reported_by  text        NOT NULL,
    -- spec.replicas of the cluster's Deployment.
    replicas     integer     NOT NULL,
    -- Pods of the Deployment that are not finished, terminating ones included.
    running_pods integer     NOT NULL,
    ready_pods   integer     NOT NULL,
    reported_at  timestamptz NOT NULL,
    PRIMARY KEY (name, cluster)
);
