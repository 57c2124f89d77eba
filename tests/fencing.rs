//! Fencing for the workload (docs/fencing.md) against a real PostgreSQL, each scenario
//! both directly and through PgBouncer in transaction mode: a fenced unit of work never
//! delays a renew, and a takeover waits for the fenced work in flight.

mod support;

use std::time::{Duration, Instant};
use support::id::{self, SpelledNames};

use reaper_operator::Error;
use reaper_operator::config::Schema;
use reaper_operator::lease::{Lease, LeaseStore};
use support::db::{self, Via};

const LONG: Duration = Duration::from_secs(60);

both_paths!(
    fenced_work_never_delays_renews,
    old_recipe_for_share_blocked_renews,
    takeover_waits_for_fenced_work_in_flight,
    takeover_gives_up_after_the_lock_timeout,
    fence_refuses_other_isolation_levels,
);

/// Opens the workload's unit of work on `conn` the documented way: BEGIN, then the fence
/// check. Returns what the fence said (the transaction stays open).
async fn begin_fenced(
    conn: &mut sqlx::PgConnection,
    schema: &Schema,
    name: &str,
    epoch: i64,
) -> bool {
    db::raw(conn, "BEGIN").await.unwrap();
    db::scalar(
        conn,
        &format!(
            "SELECT \"{}\".lease_fence('{name}', {epoch})",
            schema.as_str()
        ),
    )
    .await
    .unwrap()
}

/// `lease_fence_cluster(name, cluster)` in `conn`'s open transaction: the epoch at which
/// `cluster` holds `name`, or `None` when it does not.
async fn fence_cluster(
    conn: &mut sqlx::PgConnection,
    schema: &Schema,
    name: &str,
    cluster: &str,
) -> Option<i64> {
    db::scalar(
        conn,
        &format!(
            "SELECT \"{}\".lease_fence_cluster('{name}', '{cluster}')",
            schema.as_str()
        ),
    )
    .await
    .unwrap()
}

/// A fresh schema, and a store on it whose statements give up after waiting `lock_timeout` for a
/// lock.
async fn fresh_store_with_lock_timeout(via: Via, lock_timeout: Duration) -> (LeaseStore, Schema) {
    let (_, schema) = db::fresh_schema(via).await;
    let store = db::store(via, &schema, 2)
        .await
        .with_lock_timeout(lock_timeout);
    (store, schema)
}

/// east/a takes the free leases "l" and "other" (epoch 1 each); returns "l".
async fn east_holds_l_and_other(store: &LeaseStore) -> Lease {
    let l = store.try_acquire("l", "east/a", LONG).await.unwrap();
    store.try_acquire("other", "east/a", LONG).await.unwrap();
    l
}

/// Creates the table the test workload writes to.
async fn work_table(schema: &Schema) -> String {
    let work = schema.qualify("work");
    db::exec(&format!(
        "CREATE TABLE {work} (epoch bigint NOT NULL, at timestamptz NOT NULL DEFAULT clock_timestamp())"
    ))
    .await;
    work
}

/// How many requests for the fence lock of `name` wait in `mode` (`ExclusiveLock` for a
/// takeover, `ShareLock` for fenced work), seen on a direct connection.
async fn waiting_for_fence(schema: &Schema, name: &str, mode: &str) -> i64 {
    let mut conn = db::connection(Via::Direct).await;
    let n = db::scalar(
        &mut conn,
        &format!(
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND objsubid = 1 \
             AND NOT granted AND mode = '{mode}' \
             AND ((classid::bigint << 32) | objid::bigint) = \"{}\".lease_fence_key('{name}')",
            schema.as_str()
        ),
    )
    .await
    .unwrap();
    let _ = sqlx::Connection::close(conn).await;
    n
}

async fn wait_until_waiting_for_fence(schema: &Schema, name: &str, mode: &str) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while waiting_for_fence(schema, name, mode).await == 0 {
        assert!(
            Instant::now() < deadline,
            "nobody waits for the fence of {name} in {mode}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// (a) While fenced work of a lease is in flight, renews of that lease and of others,
/// alone or batched, complete at once; so does an acquire of the held lease (it fails,
/// without waiting). With the old recipe (`FOR SHARE` on the lease row) every one of the
/// renews below waited for the workload's transaction: see
/// `old_recipe_for_share_blocked_renews`.
async fn fenced_work_never_delays_renews(via: Via) {
    let (store, schema) = db::fresh_schema(via).await;
    let work = work_table(&schema).await;
    let l = east_holds_l_and_other(&store).await;

    let mut workload = db::connection(via).await;
    assert!(begin_fenced(&mut workload, &schema, "l", l.epoch).await);
    db::raw(
        &mut workload,
        &format!("INSERT INTO {work} (epoch) VALUES ({})", l.epoch),
    )
    .await
    .unwrap();
    // A second unit of work, fenced by cluster, on the other lease.
    let mut by_cluster = db::connection(via).await;
    db::raw(&mut by_cluster, "BEGIN").await.unwrap();
    let epoch = fence_cluster(&mut by_cluster, &schema, "other", "east").await;
    assert_eq!(epoch, Some(1));

    // Were they blocked, each would fail after the store's lock timeout (2.5 s here).
    let held = [("l", l.epoch), ("other", 1)];
    let mut slowest = Duration::ZERO;
    for round in 0..5 {
        let started = Instant::now();
        assert!(store.try_renew("l", "east/a", l.epoch).await.is_some());
        let renew = started.elapsed();
        let started = Instant::now();
        assert_eq!(store.try_renew_many("east/a", &held).await.len(), 2);
        let renew_many = started.elapsed();
        let started = Instant::now();
        assert!(store.try_acquire("l", "west/b", LONG).await.is_none());
        let acquire = started.elapsed();
        for (what, took) in [
            ("renew", renew),
            ("renew_many", renew_many),
            ("acquire", acquire),
        ] {
            assert!(
                took < Duration::from_secs(1),
                "round {round}: {what} took {took:?} while fenced work was open"
            );
            slowest = slowest.max(took);
        }
    }
    eprintln!("{via:?}: slowest statement while fenced work was open: {slowest:?}");
    assert_eq!(waiting_for_fence(&schema, "l", "ExclusiveLock").await, 0);

    db::raw(&mut workload, "COMMIT").await.unwrap();
    db::raw(&mut by_cluster, "COMMIT").await.unwrap();
    let row = store.row("l").await.unwrap();
    assert_eq!((row.holder.as_str(), row.epoch), ("east/a", 1));
}

/// (c) The recipe this replaces: `SELECT ... FOR SHARE` on the lease row, held for the
/// workload's whole transaction. A renew of that lease waits for it (here it gives up at
/// the lock timeout), and so does a batched renew, which fails for every lease of the
/// batch. `fenced_work_never_delays_renews` runs the same renews under the new recipe.
async fn old_recipe_for_share_blocked_renews(via: Via) {
    let lock_timeout = Duration::from_millis(300);
    let (store, schema) = fresh_store_with_lock_timeout(via, lock_timeout).await;
    east_holds_l_and_other(&store).await;

    let mut workload = db::connection(via).await;
    db::raw(&mut workload, "BEGIN").await.unwrap();
    let epoch: i64 = db::scalar(
        &mut workload,
        &format!(
            "SELECT epoch FROM {} WHERE name = 'l' AND split_part(holder, '/', 1) = 'east' \
             AND renewed_at + ttl_ms * interval '1 millisecond' > clock_timestamp() FOR SHARE",
            schema.qualify("lease")
        ),
    )
    .await
    .unwrap();
    assert_eq!(epoch, 1);

    let held = [(id::lease("l"), 1), (id::lease("other"), 1)];
    let started = Instant::now();
    let renew = store.renew(&id::lease("l"), &id::holder("east/a"), 1).await;
    let renew_many = store.renew_many(&id::holder("east/a"), &held).await;
    let took = started.elapsed();
    assert!(matches!(renew, Err(Error::LockTimeout(_))), "{renew:?}");
    assert!(
        matches!(renew_many, Err(Error::LockTimeout(_))),
        "{renew_many:?}"
    );
    assert!(
        took >= 2 * lock_timeout - Duration::from_millis(100),
        "{took:?}"
    );

    db::raw(&mut workload, "COMMIT").await.unwrap();
    let renewed = store.renew_many(&id::holder("east/a"), &held).await;
    assert_eq!(renewed.unwrap().len(), 2);
}

/// (b) A takeover of an expired lease, started while fenced work of the old epoch is in
/// flight, waits until that work commits; fenced work that starts while the takeover
/// waits queues behind it and then sees the new epoch; work fenced with the old epoch
/// after the takeover is refused.
async fn takeover_waits_for_fenced_work_in_flight(via: Via) {
    let (store, schema) = db::fresh_schema(via).await;
    let work = work_table(&schema).await;
    let s = schema.as_str().to_owned();
    let ttl = Duration::from_millis(300);
    let old = store.try_acquire("l", "east/a", ttl).await.unwrap();

    let mut in_flight = db::connection(via).await;
    assert!(begin_fenced(&mut in_flight, &schema, "l", old.epoch).await);
    tokio::time::sleep(ttl + Duration::from_millis(100)).await;
    assert!(store.row("l").await.unwrap().is_expired());

    let started = Instant::now();
    let takeover = {
        let store = store.clone();
        tokio::spawn(async move {
            store
                .acquire(&id::lease("l"), &id::holder("west/b"), LONG)
                .await
        })
    };
    wait_until_waiting_for_fence(&schema, "l", "ExclusiveLock").await;

    // Work that starts now, checking for the epoch the takeover will create: it waits
    // for the takeover, then reads the lease row after it committed.
    let mut next = db::connection(via).await;
    let next_check = {
        let s = s.clone();
        tokio::spawn(async move {
            db::raw(&mut next, "BEGIN").await.unwrap();
            let ok: bool = db::scalar(&mut next, &format!("SELECT \"{s}\".lease_fence('l', 2)"))
                .await
                .unwrap();
            (ok, next)
        })
    };
    wait_until_waiting_for_fence(&schema, "l", "ShareLock").await;

    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        !takeover.is_finished(),
        "the takeover did not wait for the fenced work"
    );
    assert!(
        !next_check.is_finished(),
        "new fenced work did not queue behind the takeover"
    );
    // The old epoch's write goes in, before the takeover.
    db::raw(
        &mut in_flight,
        &format!("INSERT INTO {work} (epoch) VALUES ({})", old.epoch),
    )
    .await
    .unwrap();
    let committed = Instant::now();
    db::raw(&mut in_flight, "COMMIT").await.unwrap();

    let new = takeover
        .await
        .unwrap()
        .expect("takeover failed")
        .expect("expired lease not taken over");
    let took = started.elapsed();
    assert_eq!(
        (new.holder.as_str(), new.epoch, new.previous_holder.as_str()),
        ("west/b", 2, "east/a")
    );
    assert!(
        took >= committed - started,
        "takeover took {took:?}, less than the fenced work that was in flight"
    );
    assert!(
        new.acquired_at >= db_time_of_last_write(&work).await,
        "takeover decided before the fenced write committed"
    );

    let (ok, mut next) = next_check.await.unwrap();
    assert!(
        ok,
        "fenced work queued behind the takeover did not see its epoch"
    );
    db::raw(&mut next, &format!("INSERT INTO {work} (epoch) VALUES (2)"))
        .await
        .unwrap();
    db::raw(&mut next, "COMMIT").await.unwrap();

    // After the takeover, the old epoch and the old cluster are refused.
    let mut late = db::connection(via).await;
    assert!(!begin_fenced(&mut late, &schema, "l", old.epoch).await);
    let east = fence_cluster(&mut late, &schema, "l", "east").await;
    let west = fence_cluster(&mut late, &schema, "l", "west").await;
    assert_eq!((east, west), (None, Some(2)));
    db::raw(&mut late, "ROLLBACK").await.unwrap();
}

async fn db_time_of_last_write(work: &str) -> chrono::DateTime<chrono::Utc> {
    let mut conn = db::connection(Via::Direct).await;
    let at = db::scalar(&mut conn, &format!("SELECT max(at) FROM {work}"))
        .await
        .unwrap();
    let _ = sqlx::Connection::close(conn).await;
    at
}

/// (b') The wait of a takeover is bounded by the lock timeout: fenced work that outlasts
/// it fails this attempt (the lease stays with the old epoch, expired), and the next
/// attempt after the work committed succeeds.
async fn takeover_gives_up_after_the_lock_timeout(via: Via) {
    let lock_timeout = Duration::from_millis(300);
    let (store, schema) = fresh_store_with_lock_timeout(via, lock_timeout).await;
    let ttl = Duration::from_millis(200);
    let old = store.try_acquire("l", "east/a", ttl).await.unwrap();

    let mut in_flight = db::connection(via).await;
    assert!(begin_fenced(&mut in_flight, &schema, "l", old.epoch).await);
    tokio::time::sleep(ttl + Duration::from_millis(100)).await;

    let started = Instant::now();
    let attempt = store
        .acquire(&id::lease("l"), &id::holder("west/b"), LONG)
        .await;
    let took = started.elapsed();
    assert!(
        matches!(attempt, Err(Error::LockTimeout(t)) if t == lock_timeout),
        "{attempt:?}"
    );
    assert!(
        took >= lock_timeout - Duration::from_millis(50) && took < Duration::from_secs(2),
        "{took:?}"
    );
    let row = store.row("l").await.unwrap();
    assert_eq!((row.holder.as_str(), row.epoch), ("east/a", 1));
    assert_eq!(
        store.history("l").await.len(),
        1,
        "a failed attempt was audited"
    );

    db::raw(&mut in_flight, "COMMIT").await.unwrap();
    let new = store.try_acquire("l", "west/b", LONG).await.unwrap();
    assert_eq!(new.epoch, 2);
}

/// Only READ COMMITTED reads the lease row after the fence lock is granted; the fence
/// refuses the other isolation levels instead of answering from an older snapshot.
async fn fence_refuses_other_isolation_levels(via: Via) {
    let (store, schema) = db::fresh_schema(via).await;
    store.try_acquire("l", "east/a", LONG).await.unwrap();
    let mut conn = db::connection(via).await;
    for level in ["REPEATABLE READ", "SERIALIZABLE"] {
        db::raw(&mut conn, &format!("BEGIN ISOLATION LEVEL {level}"))
            .await
            .unwrap();
        let fence = format!("SELECT \"{}\".lease_fence('l', 1)", schema.as_str());
        db::refused(
            db::scalar::<bool>(&mut conn, &fence).await,
            "the lease fence needs a READ COMMITTED transaction",
        );
        db::raw(&mut conn, "ROLLBACK").await.unwrap();
    }
    assert!(begin_fenced(&mut conn, &schema, "l", 1).await);
    db::raw(&mut conn, "COMMIT").await.unwrap();
}
