//! The lease through a failover of its PostgreSQL: a real primary with a real streaming
//! standby (synchronous or asynchronous), two local control planes as two clusters, two
//! `reaper-operator run` replicas in each, all going through PgBouncer, which the
//! failover step repoints to the promoted standby.
//!
//! Throughout, a sampler counts the reaper pods that can still act in both clusters
//! (Terminating ones count) every 100 ms and reads the lease row: never more than one
//! pod, and no epoch handed out after the failover is one handed out before it.
//!
//! The asynchronous scenario first makes the old primary's history diverge from the
//! standby's (replication stopped, then a takeover acknowledged only by the old
//! primary), and shows what the promoted standby's row alone would allow: a takeover
//! before the last holder's renew deadline, and that holder's epoch handed out again
//! (docs/operations.md, "A highly available database").
//!
//! The lease statements alone across two failovers, then the two scenarios, as trials
//! (support::trials): the scenarios share two clusters, each with a database pair of its
//! own, and the clusters are stopped after the last.

mod support;

use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};
use support::id::{self, SpelledNames};

use anyhow::{Context, Result, anyhow, bail, ensure};
use chrono::{DateTime, Utc};
use reaper_operator::config::Schema;
use reaper_operator::lease::{Lease, LeaseStore, WorkloadCounts};
use reaper_operator::reaper::LeaseSpec;
use serde_json::json;
use support::cluster::wait_until;
use support::db::unique_schema;
use support::fixtures::{self, create_deployment, create_namespace, create_reaper, live_pods};
use support::ha_db::{Failover, HaDatabase, Replication, first_seen_on_timeline};
use support::operator::{OperatorProcess, OperatorSpec, with_logs};
use support::trials::Suite;
use support::two_clusters::{self, Cluster};
use tokio::task::JoinHandle;

// A renew deadline well short of the ttl, so that the asynchronous scenario's lost renews
// leave seconds between what the row alone allows and the holder's deadline.
const TTL: u64 = 6;
const DEADLINE: u64 = 4;
const RETRY: u64 = 1;

/// Epochs handed out on WAL timeline 2 (the first promotion) are above this.
const TIMELINE_2_EPOCH_FLOOR: i64 = 1 << 32;

fn main() -> ExitCode {
    let suite = Suite::new(async || two_clusters::start("dbf").await);
    // The statements first: they need no cluster, so filtering them in starts none.
    let trials = vec![
        suite.test(
            "lease_statements_across_a_failover",
            lease_statements_across_a_failover,
        ),
        suite.case(
            "synchronous standby: failover under two clusters of two replicas",
            synchronous_failover,
        ),
        suite.case(
            "asynchronous standby behind: the lost history is not trusted",
            asynchronous_failover_with_lost_history,
        ),
    ];
    suite.run(trials, async |clusters| two_clusters::stop(clusters))
}

/// One Reaper on one lease in each cluster, two replicas per cluster, over one HA
/// database.
struct World<'a> {
    clusters: &'a [Cluster; 2],
    db: HaDatabase,
    ns: String,
    lease: String,
    /// Reads the lease row through PgBouncer (follows the failover).
    store: LeaseStore,
    ops: Vec<OperatorProcess>,
}

impl<'a> World<'a> {
    async fn start(
        clusters: &'a [Cluster; 2],
        prefix: &str,
        replication: Replication,
    ) -> Result<Self> {
        let db = HaDatabase::start(prefix, replication)?;
        let schema = unique_schema("dbf");
        let admin =
            LeaseStore::connect(db.primary_url(), &schema, Duration::from_secs(10), 1).await?;
        admin.migrate().await?;
        admin.close().await;
        let ns = format!("{prefix}-{:x}", Utc::now().timestamp_subsec_nanos());
        let lease = format!("{ns}.reaper");
        for c in clusters {
            create_namespace(&c.client, &ns).await?;
            create_deployment(&c.client, &ns, "reaper", "Recreate", json!({})).await?;
            create_reaper(&c.client, &ns, "reaper", "reaper", lease_spec(&lease)).await?;
        }
        let ops = clusters
            .iter()
            .flat_map(|c| ["op-1", "op-2"].map(|id| operator(c, &db, &schema, &ns, id)))
            .collect();
        let store =
            LeaseStore::connect_lazy(db.pgbouncer_url(), &schema, Duration::from_secs(1), 2)?;
        Ok(Self {
            clusters,
            db,
            ns,
            lease,
            store,
            ops,
        })
    }

    /// Waits until one cluster runs the reaper and the lease row says so.
    async fn wait_leading(&self, timeout: Duration, newer_than: i64) -> Result<Lease> {
        wait_until("one cluster running the reaper", timeout, || async {
            let Ok(Some(row)) = self.store.get(&id::lease(&self.lease)).await else {
                return Ok(None);
            };
            let Some(c) = self
                .clusters
                .iter()
                .position(|c| row.holder.starts_with(&format!("{}/", c.name)))
            else {
                return Ok(None);
            };
            let ready = live_pods(&self.clusters[c].client, &self.ns, "reaper").await? == 1
                && live_pods(&self.clusters[1 - c].client, &self.ns, "reaper").await? == 0;
            Ok((row.is_held() && row.epoch > newer_than && ready).then_some(row))
        })
        .await
    }

    fn op(&self, holder: &str) -> Result<&OperatorProcess> {
        self.ops
            .iter()
            .find(|o| o.holder() == holder)
            .ok_or_else(|| anyhow!("no replica {holder}"))
    }

    /// Fails the database over, waits until one cluster runs the reaper again at an epoch
    /// above `newer_than`, and stops `sampler` 3 s after that.
    async fn fail_over(&mut self, sampler: Sampler, newer_than: i64) -> Result<FailedOver> {
        let failover = tokio::task::block_in_place(|| self.db.fail_over())?;
        let after = self
            .wait_leading(Duration::from_secs(TTL * 4 + 20), newer_than)
            .await?;
        tokio::time::sleep(Duration::from_secs(3)).await;
        let samples = sampler.finish().await?;
        Ok(FailedOver {
            failover,
            after,
            samples,
        })
    }

    /// `result`, with the replicas' log tails added to an error. The replicas stop here,
    /// before the database they use.
    fn finish(mut self, result: Result<()>) -> Result<()> {
        let result = with_logs(result, &self.ops);
        self.ops.clear();
        result
    }
}

/// What a database failover left, seen by a [`Sampler`] from before it until the reaper
/// ran again.
struct FailedOver {
    failover: Failover,
    /// The lease row once one cluster runs the reaper again.
    after: Lease,
    samples: Vec<Sample>,
}

impl FailedOver {
    /// How long after the kill of the old primary the sampler first saw the lease held at
    /// the new epoch (or later) and a pod in the holder's cluster, none in the other.
    fn running_again(&self, clusters: &[Cluster; 2]) -> Result<Duration> {
        let since = self.failover.killed_at;
        self.samples
            .iter()
            .filter(|s| s.at >= since)
            .find(|s| {
                s.row.as_ref().is_some_and(|r| {
                    let c = clusters
                        .iter()
                        .position(|c| r.holder.starts_with(&format!("{}/", c.name)));
                    r.epoch >= self.after.epoch
                        && r.is_held()
                        && c.is_some_and(|c| s.pods[c] == 1 && s.pods[1 - c] == 0)
                })
            })
            .map(|s| s.at - since)
            .context("the sampler never saw the reaper running again")
    }
}

fn lease_spec(name: &str) -> LeaseSpec {
    fixtures::lease_spec(name, TTL, DEADLINE, RETRY, 0)
}

fn operator(
    cluster: &Cluster,
    db: &HaDatabase,
    schema: &Schema,
    ns: &str,
    identity: &str,
) -> OperatorProcess {
    OperatorProcess::start(OperatorSpec {
        kubeconfig: cluster.test.kubeconfig(),
        database_url: db.pgbouncer_url(),
        listen_database_url: Some(db.pgbouncer_session_url()),
        schema: schema.as_str(),
        cluster: cluster.name,
        identity,
        migrate: false,
        namespace: ns,
    })
}

/// What the sampler saw at one instant.
#[derive(Clone, Debug)]
struct Sample {
    at: Instant,
    /// Reaper pods that can still act, per cluster.
    pods: [usize; 2],
    /// The lease row through PgBouncer, when it could be read.
    row: Option<Lease>,
}

struct Sampler {
    stop: Arc<AtomicBool>,
    task: JoinHandle<Vec<Sample>>,
}

impl Sampler {
    fn start(world: &World<'_>) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let clients = [
            world.clusters[0].client.clone(),
            world.clusters[1].client.clone(),
        ];
        let (ns, lease, store) = (world.ns.clone(), world.lease.clone(), world.store.clone());
        let flag = stop.clone();
        let task = tokio::spawn(async move {
            let mut samples = Vec::new();
            while !flag.load(Ordering::Relaxed) {
                let at = Instant::now();
                let mut pods = [0; 2];
                for (i, client) in clients.iter().enumerate() {
                    // A failed read counts as a pod: it cannot prove there is none.
                    pods[i] = live_pods(client, &ns, "reaper").await.unwrap_or(1);
                }
                let row = store.get(&id::lease(&lease)).await.ok().flatten();
                samples.push(Sample { at, pods, row });
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            samples
        });
        Self { stop, task }
    }

    async fn finish(self) -> Result<Vec<Sample>> {
        self.stop.store(true, Ordering::Relaxed);
        Ok(self.task.await?)
    }
}

/// Fails when any sample saw pods that can act in both clusters; names them by their
/// time since the first sample.
fn at_most_one_pod(samples: &[Sample]) -> Result<()> {
    let Some(first) = samples.first() else {
        bail!("no sample was taken");
    };
    let both: Vec<String> = samples
        .iter()
        .filter(|s| s.pods[0] + s.pods[1] > 1)
        .map(|s| format!("{:.1?}: {:?}", s.at - first.at, s.pods))
        .collect();
    ensure!(
        both.is_empty(),
        "more than one reaper pod could act: {}",
        both.join(", ")
    );
    Ok(())
}

/// How long after `since` the sampler first read the lease row from the new primary
/// (through PgBouncer).
fn first_read_after(samples: &[Sample], since: Instant) -> Result<Duration> {
    samples
        .iter()
        .filter(|s| s.at >= since)
        .filter(|s| {
            s.row
                .as_ref()
                .is_some_and(|r| !r.on_current_timeline || r.epoch > TIMELINE_2_EPOCH_FLOOR)
        })
        .map(|s| s.at - since)
        .next()
        .context("the sampler never read the lease row after the failover")
}

/// The highest epoch the sampler saw before `until`.
fn highest_epoch_before(samples: &[Sample], until: Instant) -> i64 {
    samples
        .iter()
        .filter(|s| s.at < until)
        .filter_map(|s| s.row.as_ref().map(|r| r.epoch))
        .max()
        .unwrap_or(0)
}

/// The lease row as the standby has it, by the row alone (no timeline: a standby in
/// recovery has no current WAL position).
struct StandbyRow {
    holder: String,
    epoch: i64,
    renewed_at: DateTime<Utc>,
    expires_at: DateTime<Utc>,
}

async fn standby_row(world: &World<'_>) -> Result<StandbyRow> {
    use sqlx::Row;
    let mut conn = <sqlx::PgConnection as sqlx::Connection>::connect_with(&support::db::options(
        world.db.standby_url(),
    ))
    .await?;
    let sql = format!(
        "SELECT holder, epoch, renewed_at, renewed_at + ttl_ms * interval '1 millisecond' AS expires_at \
         FROM {} WHERE name = '{}'",
        world.store.schema().qualify("lease"),
        world.lease
    );
    let row = sqlx::raw_sql(sqlx::AssertSqlSafe(sql))
        .fetch_one(&mut conn)
        .await
        .context("the lease row on the standby")?;
    Ok(StandbyRow {
        holder: row.try_get("holder")?,
        epoch: row.try_get("epoch")?,
        renewed_at: row.try_get("renewed_at")?,
        expires_at: row.try_get("expires_at")?,
    })
}

fn secs(d: Duration) -> String {
    format!("{:.2} s", d.as_secs_f64())
}

async fn synchronous_failover(clusters: &[Cluster; 2]) -> Result<()> {
    let mut world = World::start(clusters, "dbf-sync", Replication::Sync).await?;
    let result = async {
        let before = world.wait_leading(Duration::from_secs(60), 0).await?;
        let sampler = Sampler::start(&world);
        tokio::time::sleep(Duration::from_secs(2)).await;

        let failed_over = world.fail_over(sampler, before.epoch).await?;
        let FailedOver {
            failover,
            after,
            samples,
        } = &failed_over;

        at_most_one_pod(samples)?;
        let seen_before = highest_epoch_before(samples, failover.killed_at);
        ensure!(
            after.epoch > seen_before && after.epoch > TIMELINE_2_EPOCH_FLOOR,
            "epoch after the failover {} is not above every earlier one ({seen_before}) \
             and the floor of timeline 2",
            after.epoch
        );
        let events = world.store.events(&id::lease(&world.lease)).await?;
        let mut epochs: Vec<i64> = events.iter().map(|e| e.epoch).collect();
        epochs.sort_unstable();
        epochs.dedup();
        ensure!(
            epochs.len() == events.iter().filter(|e| e.kind != "release").count(),
            "an epoch was handed out twice: {events:?}"
        );
        eprintln!(
            "synchronous failover: kill -> new primary serving {}, -> the reaper running \
             again in cluster {} (epoch {} -> {}) {}",
            secs(first_read_after(samples, failover.killed_at)?),
            after.holder,
            before.epoch,
            after.epoch,
            secs(failed_over.running_again(clusters)?)
        );
        Ok(())
    }
    .await;
    world.finish(result)
}

async fn asynchronous_failover_with_lost_history(clusters: &[Cluster; 2]) -> Result<()> {
    let mut world = World::start(clusters, "dbf-async", Replication::Async).await?;
    let result = async {
        let first = world.wait_leading(Duration::from_secs(60), 0).await?;
        let sampler = Sampler::start(&world);

        // From here on the old primary acknowledges what the standby never gets.
        world.db.pause_replication()?;
        // kill -9 of the holder: its peer takes the lease over on the old primary only.
        world.op(&first.holder)?.signal("KILL");
        let peer = wait_until(
            "the peer's takeover on the old primary",
            Duration::from_secs(TTL * 3 + 10),
            || async {
                Ok(world
                    .store
                    .get(&id::lease(&world.lease))
                    .await
                    .ok()
                    .flatten()
                    .filter(|r| r.is_held() && r.epoch > first.epoch))
            },
        )
        .await?;
        // Let it renew a few times, each acknowledged by the old primary alone.
        tokio::time::sleep(Duration::from_secs(2)).await;
        let last_acknowledged = world
            .store
            .get(&id::lease(&world.lease))
            .await?
            .context("the lease row is missing on the old primary")?;

        // The standby's row, which the promotion will make the primary's: what a
        // candidate going by the row alone would judge by.
        let stale = standby_row(&world).await?;
        let failed_over = world.fail_over(sampler, first.epoch).await?;
        let FailedOver {
            failover,
            after,
            samples,
        } = &failed_over;

        the_failover_lost_history(samples, failover, &first, &peer, &last_acknowledged, &stale)?;
        the_wait_covers_the_lost_history(
            &world,
            samples,
            failover,
            &peer,
            &last_acknowledged,
            after,
        )
        .await?;
        eprintln!(
            "asynchronous failover: taken again by {} at epoch {} {} after the kill; \
             the reaper running again {} after it",
            after.holder,
            after.epoch,
            secs(
                (after.acquired_at - failover.killed_wall)
                    .to_std()
                    .unwrap_or_default()
            ),
            secs(failed_over.running_again(clusters)?)
        );
        Ok(())
    }
    .await;
    world.finish(result)
}

/// The hazard, exactly: the row the failover left is older than what the old
/// primary acknowledged.
fn the_failover_lost_history(
    samples: &[Sample],
    failover: &Failover,
    first: &Lease,
    peer: &Lease,
    last_acknowledged: &Lease,
    stale: &StandbyRow,
) -> Result<()> {
    // The peer's last renew the old primary acknowledged: the newest the sampler saw
    // before the kill (a renew is sent before it is read back).
    let last_renew = samples
        .iter()
        .filter(|s| s.at < failover.killed_at)
        .filter_map(|s| s.row.as_ref())
        .filter(|r| r.holder == peer.holder && r.epoch == peer.epoch)
        .map(|r| r.renewed_at)
        .max()
        .unwrap_or(last_acknowledged.renewed_at)
        .max(last_acknowledged.renewed_at);
    let peer_deadline: DateTime<Utc> = last_renew + chrono::Duration::seconds(DEADLINE as i64);
    let lost: chrono::Duration = last_renew - stale.renewed_at;
    let early = (peer_deadline - stale.expires_at)
        .to_std()
        .unwrap_or_default();
    eprintln!(
        "asynchronous failover: the promoted standby shows {} at epoch {} renewed {:.2} s \
         before the last renew the old primary acknowledged ({} at epoch {}); going by \
         the row alone a candidate could take the lease {} before that holder's renew \
         deadline, at epoch {} (already {}'s)",
        stale.holder,
        stale.epoch,
        lost.as_seconds_f64(),
        last_acknowledged.holder,
        last_acknowledged.epoch,
        secs(early),
        stale.epoch + 1,
        peer.holder,
    );
    ensure!(
        stale.epoch < peer.epoch && stale.holder == first.holder,
        "the takeover at epoch {} reached the standby (row {} at epoch {}): the scenario \
         did not lose history",
        peer.epoch,
        stale.holder,
        stale.epoch
    );
    ensure!(
        stale.expires_at < peer_deadline,
        "the promoted standby's row expires at {}, not before the holder's deadline \
         {peer_deadline}: the scenario shows no hazard",
        stale.expires_at
    );
    Ok(())
}

/// The mitigation: nobody took the lease before a ttl after the failover, no
/// second pod, and the epoch is above the lost one.
async fn the_wait_covers_the_lost_history(
    world: &World<'_>,
    samples: &[Sample],
    failover: &Failover,
    peer: &Lease,
    last_acknowledged: &Lease,
    after: &Lease,
) -> Result<()> {
    at_most_one_pod(samples)?;
    let killed_wall = failover.killed_wall;
    let events = world.store.events(&id::lease(&world.lease)).await?;
    // Every renew the old primary acknowledged was sent before the kill.
    let latest_deadline = killed_wall + chrono::Duration::seconds(DEADLINE as i64);
    for e in events
        .iter()
        .filter(|e| e.at >= killed_wall && e.kind != "release")
    {
        ensure!(
            e.at >= latest_deadline,
            "{} took the lease at {}, {} before the latest renew deadline of {}, whose \
             renews the old primary acknowledged",
            e.holder,
            e.at,
            secs((latest_deadline - e.at).to_std().unwrap_or_default()),
            last_acknowledged.holder
        );
    }
    for e in &events {
        ensure!(
            e.epoch != peer.epoch || e.kind == "release",
            "epoch {} went to {} on the old primary and is in the new primary's history \
             as {} by {} at {} (killed at {killed_wall}): {}",
            peer.epoch,
            peer.holder,
            e.kind,
            e.holder,
            e.at,
            if e.at < killed_wall {
                "the takeover was not lost"
            } else {
                "handed out twice"
            }
        );
    }
    let seen_before = highest_epoch_before(samples, failover.killed_at);
    ensure!(
        after.epoch > seen_before && after.epoch > peer.epoch,
        "epoch after the failover {} is not above the lost one {} (seen {seen_before})",
        after.epoch,
        peer.epoch
    );
    // Every acquisition on the new timeline came a ttl or more after the new
    // primary first saw an acquire (the earliest instant the wait can start from).
    let first_seen = first_seen_on_timeline(&world.db, world.store.schema(), 2).await?;
    let events = world.store.events(&id::lease(&world.lease)).await?;
    let early: Vec<_> = events
        .iter()
        .filter(|e| e.epoch > TIMELINE_2_EPOCH_FLOOR && e.kind != "release")
        .filter(|e| e.at < first_seen + chrono::Duration::seconds(TTL as i64))
        .collect();
    ensure!(
        early.is_empty(),
        "acquired less than a ttl after timeline 2 was first seen ({first_seen}): {early:?}"
    );
    Ok(())
}

/// The lease statements themselves across an asynchronous failover that lost a renew,
/// then a second failover: a row from before a failover can be neither renewed nor
/// released nor used as a fence, even unexpired; a workload report from before it counts
/// as "may run pods"; nothing is acquired until a ttl after the new primary first saw an
/// acquire; the next epoch is above every epoch of the earlier timelines.
async fn lease_statements_across_a_failover() {
    let ttl = Duration::from_secs(2);
    // Unexpired through the whole test: its checks cannot pass for expiry alone.
    let long = Duration::from_secs(60);
    let mut db = HaDatabase::start("dbf-stmt", Replication::Async).unwrap();
    let schema = unique_schema("dbf");
    let admin = LeaseStore::connect(db.primary_url(), &schema, Duration::from_secs(10), 1)
        .await
        .unwrap();
    admin.migrate().await.unwrap();
    admin.close().await;
    let store = LeaseStore::connect(db.pgbouncer_url(), &schema, Duration::from_secs(5), 2)
        .await
        .unwrap();
    let held = store.try_acquire("l", "a/1", ttl).await.unwrap();
    assert_eq!(held.epoch, 1, "timeline 1 keeps the epochs it always had");
    let long_held = store.try_acquire("long", "a/1", long).await.unwrap();
    // Cluster b reports no pods, with a short bound; its later report of a starting pod
    // will be lost.
    let b_bound = Duration::from_millis(400);
    store
        .report("l", "b", "b/1", WorkloadCounts::default(), b_bound)
        .await;
    // Replicated: the standby has all of that.
    wait_until(
        "the standby to catch up",
        Duration::from_secs(10),
        || async { Ok(db.replay_caught_up()?.then_some(())) },
    )
    .await
    .unwrap();
    db.pause_replication().unwrap();
    let renewed = store.try_renew("l", "a/1", 1).await.unwrap();
    let starting = WorkloadCounts {
        replicas: 1,
        running_pods: 1,
        ready_pods: 0,
    };
    store.report("l", "b", "b/1", starting, b_bound).await;
    // Long enough for b's surviving report to be stale by its own date.
    tokio::time::sleep(b_bound).await;

    rows_from_before_the_failover_are_dead(&mut db, &store, &schema, &renewed, &long_held).await;
    // b's report of no pods survived, its report of a starting pod did not: it now
    // counts as "may run pods", dated now (no acquire has seen this timeline yet).
    let b = b_report(&store).await;
    assert!(
        b.running_pods >= 1 && !b.is_stale(),
        "a report from before the failover proves no pods: {b:?}"
    );
    let before_wait = store.acquirable(&[id::lease("l")]).await.unwrap();
    assert!(
        before_wait[0].acquirable,
        "a row from before the failover is worth an acquire (it starts the wait): {before_wait:?}"
    );

    let first_try = nothing_is_acquired_during_the_wait(&db, &store, &schema, ttl, b_bound).await;

    // A schema migrated after a failover waits too: its migration may have been lost.
    let late = unique_schema("dbf");
    let migrator = LeaseStore::connect(db.primary_url(), &late, Duration::from_secs(10), 1)
        .await
        .unwrap();
    migrator.migrate().await.unwrap();
    assert_eq!(
        migrator.try_acquire("x", "b/1", ttl).await,
        None,
        "acquired at once in a schema migrated on timeline 2"
    );
    migrator.close().await;
    let taken = acquire_after_the_wait(&store, "l", "b/1", ttl, first_try).await;
    assert_eq!(taken.epoch, TIMELINE_2_EPOCH_FLOOR + 1);
    assert!(taken.on_current_timeline && taken.is_held());
    assert!(store.try_renew("l", "b/1", taken.epoch).await.is_some());
    let created = store.try_acquire("new-lease", "b/1", ttl).await.unwrap();
    assert_eq!(created.epoch, TIMELINE_2_EPOCH_FLOOR + 1);

    a_second_failover_costs_the_wait_too(&mut db, &store, ttl).await;
    store.close().await;
}

/// A failover that lost the acknowledged renew: a row from before it can be neither renewed
/// nor released nor used as a fence, even unexpired.
async fn rows_from_before_the_failover_are_dead(
    db: &mut HaDatabase,
    store: &LeaseStore,
    schema: &Schema,
    renewed: &Lease,
    long_held: &Lease,
) {
    db.fail_over().unwrap();
    // The store's connections to the old primary are dead; statements go on through
    // PgBouncer to the new one.
    let row = wait_until(
        "the new primary through PgBouncer",
        Duration::from_secs(20),
        || async { Ok(store.get(&id::lease("l")).await.ok().flatten()) },
    )
    .await
    .unwrap();
    assert!(
        row.renewed_at < renewed.renewed_at,
        "the acknowledged renew survived the failover: {row:?} vs {renewed:?}"
    );
    assert!(!row.on_current_timeline && !row.is_held(), "{row:?}");
    let long_row = store.row("long").await.unwrap();
    assert!(
        !long_row.is_expired() && !long_row.on_current_timeline && !long_row.is_held(),
        "{long_row:?}"
    );
    let e = long_held.epoch;
    assert_eq!(
        store.try_renew("long", "a/1", e).await,
        None,
        "renewed across the failover"
    );
    let many = store
        .renew_many(&id::holder("a/1"), &[(id::lease("long"), e)])
        .await
        .unwrap();
    assert!(
        many.is_empty(),
        "renewed in a batch across the failover: {many:?}"
    );
    let mut conn = <sqlx::PgConnection as sqlx::Connection>::connect_with(&support::db::options(
        db.primary_url(),
    ))
    .await
    .unwrap();
    let s = schema.as_str();
    let fence: bool = support::db::scalar(
        &mut conn,
        &format!("SELECT \"{s}\".lease_fence('long', {e})"),
    )
    .await
    .unwrap();
    assert!(
        !fence,
        "the fence let a write through on a row from before the failover"
    );
    let fence_cluster: Option<i64> = support::db::scalar(
        &mut conn,
        &format!("SELECT \"{s}\".lease_fence_cluster('long', 'a')"),
    )
    .await
    .unwrap();
    assert_eq!(fence_cluster, None, "the cluster fence let a write through");
    assert_eq!(
        store.try_release("long", "a/1", e).await,
        None,
        "released across the failover"
    );
}

/// The first acquire on the new timeline starts the wait; none succeeds before it ends. Returns when the first
/// acquire was tried.
async fn nothing_is_acquired_during_the_wait(
    db: &HaDatabase,
    store: &LeaseStore,
    schema: &Schema,
    ttl: Duration,
    b_bound: Duration,
) -> Instant {
    let first_try = Instant::now();
    assert_eq!(store.try_acquire("l", "b/1", ttl).await, None);
    assert_eq!(
        store.try_acquire("new-lease", "b/1", ttl).await,
        None,
        "a lease created in the wait"
    );
    let in_wait = store.acquirable(&[id::lease("l")]).await.unwrap().remove(0);
    assert!(
        !in_wait.acquirable,
        "acquirable during the wait: {in_wait:?}"
    );
    // From the first acquire on, b's old report is dated when the timeline was first
    // seen, and goes stale by its own bound from there.
    let first_seen = first_seen_on_timeline(db, schema, 2).await.unwrap();
    // Acquirable once the wait is over: a ttl (the row's) after the timeline was seen.
    let seen_row = in_wait.lease.as_ref().unwrap();
    let left_us = (first_seen + chrono::TimeDelta::from_std(ttl).unwrap() - seen_row.observed_at)
        .num_microseconds()
        .unwrap();
    assert_eq!(
        in_wait.acquirable_in,
        Duration::from_millis((left_us as u64).div_ceil(1000)),
        "{in_wait:?}"
    );
    let b = b_report(store).await;
    assert_eq!(b.reported_at, first_seen, "{b:?}");
    tokio::time::sleep(b_bound).await;
    assert!(b_report(store).await.is_stale(), "never stale");
    // b's own report on the new timeline counts as it is.
    store
        .report("l", "b", "b/2", WorkloadCounts::default(), b_bound)
        .await;
    let b = b_report(store).await;
    assert!(b.running_pods == 0 && !b.is_stale(), "{b:?}");
    first_try
}

/// A second failover (nothing held back this time) still costs the wait, and
/// epochs move above timeline 3's floor.
async fn a_second_failover_costs_the_wait_too(
    db: &mut HaDatabase,
    store: &LeaseStore,
    ttl: Duration,
) {
    db.add_standby().unwrap();
    db.fail_over().unwrap();
    let first_try = loop {
        let tried = Instant::now();
        match store
            .acquire(&id::lease("l"), &id::holder("c/1"), ttl)
            .await
        {
            Ok(None) => break tried,
            Ok(Some(lease)) => panic!("acquired at once after a failover: {lease:?}"),
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    };
    let again = acquire_after_the_wait(store, "l", "c/1", ttl, first_try).await;
    assert_eq!(again.epoch, 2 * TIMELINE_2_EPOCH_FLOOR + 1);
}

/// Cluster b's report as cluster a reads it (a reports no pods).
async fn b_report(store: &LeaseStore) -> reaper_operator::lease::WorkloadReport {
    let reports = store
        .report(
            "l",
            "a",
            "a/1",
            WorkloadCounts::default(),
            Duration::from_secs(6),
        )
        .await;
    reports
        .into_iter()
        .find(|r| r.cluster == "b")
        .expect("b's report")
}

/// Tries every 50 ms until acquired; checks that it took a ttl after `first_try`.
async fn acquire_after_the_wait(
    store: &LeaseStore,
    name: &str,
    holder: &str,
    ttl: Duration,
    first_try: Instant,
) -> Lease {
    let taken = loop {
        if let Some(lease) = store.try_acquire(name, holder, ttl).await {
            break lease;
        }
        assert!(
            first_try.elapsed() < ttl * 3,
            "never acquired after the failover"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(
        first_try.elapsed() >= ttl - Duration::from_millis(100),
        "acquired {:?} after the first try on the new timeline, before the ttl",
        first_try.elapsed()
    );
    taken
}
