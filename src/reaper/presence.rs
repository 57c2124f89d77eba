//! Each replica's presence: a `coordination.k8s.io` Lease in the operator's namespace
//! that the replica renews while it leads and its electors' database calls work.
//!
//! A replica cut off from the database must decide whether a pod that a peer of its
//! cluster scaled up may run on (see `decide::decide_scale`): it may while that peer
//! still renews, since the peer stops its own pod once it cannot. The presence says so
//! with one write per replica per period, whatever the number of Reapers; a status write
//! per Reaper per period would cost the API server N writes and N watch events.
//!
//! Readers judge a presence on their own clock: how long since they saw its `renewTime`
//! change. Clocks of different machines are never compared.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use kube::Client;
use kube::api::{Api, DeleteParams, ObjectMeta, Patch, PatchParams, Preconditions};
use kube::runtime::{WatchStreamExt, watcher};

use super::candidates::Candidates;
use super::reconcile::FIELD_MANAGER;
use super::watches::QUIET_AFTER_FAILURE;
use crate::metrics::Metrics;

/// The label that marks a presence Lease (its value is always "replica").
pub const LABEL: &str = "pglease.dev/presence";

/// How often the writer checks whether this replica leads anything.
const CHECK: Duration = Duration::from_millis(250);

/// Renewals not seen change for this long are forgotten: they vouch for nobody, and a
/// holder without one counts as unseen since this replica made its presences (at its
/// start), which is earlier.
const FORGET_AFTER: Duration = Duration::from_secs(3600);

/// The presences of this replica's peers, as this replica has seen them.
#[derive(Debug)]
pub struct Presences {
    state: Mutex<Seen>,
}

#[derive(Debug)]
struct Seen {
    /// Per holder (`<cluster>/<identity>`): its last `renewTime`, and when this replica
    /// first saw that value (or, for one delivered after a watch gap, when the gap began).
    renewals: HashMap<String, (String, Instant)>,
    /// When watching began. A holder without a presence counts as unseen since then.
    since: Instant,
    /// The first and the last error of the watch's current trouble: a renewal delivered
    /// meanwhile (a backlog, a re-list) may have been written any time since the first.
    failing: Option<(Instant, Instant)>,
}

impl Default for Presences {
    fn default() -> Self {
        Self {
            state: Mutex::new(Seen {
                renewals: HashMap::new(),
                since: Instant::now(),
                failing: None,
            }),
        }
    }
}

impl Presences {
    /// How long, on this replica's clock, `holder`'s presence has not been renewed: since
    /// its last renewal was first seen, or, if it has none, since this replica made its
    /// presences (at its start).
    pub fn unseen_for(&self, holder: &str) -> Duration {
        let state = self.state.lock().expect("presence mutex poisoned");
        state
            .renewals
            .get(holder)
            .map_or(state.since, |(_, seen)| *seen)
            .elapsed()
    }

    /// A deleted presence, or one a re-list no longer shows, keeps its last renewal: it
    /// stopped being renewed then, and ages from there.
    fn saw(&self, event: watcher::Event<Lease>) {
        let mut state = self.state.lock().expect("presence mutex poisoned");
        if state
            .failing
            .is_some_and(|(_, last)| last.elapsed() > QUIET_AFTER_FAILURE)
        {
            state.failing = None;
        }
        match event {
            watcher::Event::Apply(lease) | watcher::Event::InitApply(lease) => {
                if let Some((holder, renewed)) = renewal(&lease) {
                    state.record(holder, renewed);
                }
            }
            watcher::Event::InitDone => state
                .renewals
                .retain(|_, (_, seen)| seen.elapsed() < FORGET_AFTER),
            watcher::Event::Delete(_) | watcher::Event::Init => {}
        }
    }

    fn failed(&self) {
        let mut state = self.state.lock().expect("presence mutex poisoned");
        let now = Instant::now();
        state.failing = Some(state.failing.map_or((now, now), |(first, _)| (first, now)));
    }
}

impl Seen {
    fn record(&mut self, holder: String, renewed: String) {
        let seen = self.failing.map_or_else(Instant::now, |(first, _)| first);
        match self.renewals.get(&holder) {
            Some((last, _)) if *last == renewed => {}
            _ => {
                self.renewals.insert(holder, (renewed, seen));
            }
        }
    }
}

/// The holder and the renewal of a presence Lease; `None` for one without either.
fn renewal(lease: &Lease) -> Option<(String, String)> {
    let spec = lease.spec.as_ref()?;
    let holder = spec.holder_identity.clone()?;
    let renewed = spec.renew_time.as_ref()?.0.to_string();
    Some((holder, renewed))
}

/// Keeps `presences` current from the presence Leases of `namespace` until the process
/// ends. A failing watch leaves the renewals as they were, so they age: a reader then
/// stops vouching for its peers, never the other way round.
pub async fn watch(client: Client, namespace: String, presences: Arc<Presences>) {
    let leases: Api<Lease> = Api::namespaced(client, &namespace);
    watcher(leases, watcher::Config::default().labels(LABEL))
        .default_backoff()
        .for_each(|event| {
            match event {
                Ok(event) => presences.saw(event),
                Err(error) => {
                    presences.failed();
                    tracing::warn!(%error, %namespace, "watch of replica presences failed");
                }
            }
            futures::future::ready(())
        })
        .await;
}

/// The name of `identity`'s presence Lease: a DNS subdomain whatever the identity (a
/// label value may hold upper case and `_`). Two identities that map to one name share
/// the object; each write names its holder, so neither is credited with the other's.
pub fn object_name(identity: &str) -> String {
    let cleaned: String = identity
        .chars()
        .map(|c| match c.to_ascii_lowercase() {
            c @ ('a'..='z' | '0'..='9') => c,
            _ => '-',
        })
        .collect();
    format!("reaper-operator.{}", cleaned.trim_matches('-'))
}

/// This replica's own presence.
pub struct Presence {
    leases: Api<Lease>,
    name: String,
    holder: String,
    /// The resourceVersion of the last write, so that shutdown deletes only what this
    /// process wrote last (not a successor's or a namesake's).
    written: Mutex<Option<String>>,
}

impl Presence {
    pub fn new(client: Client, namespace: &str, identity: &str, holder: &str) -> Arc<Self> {
        Arc::new(Self {
            leases: Api::namespaced(client, namespace),
            name: object_name(identity),
            holder: holder.to_owned(),
            written: Mutex::new(None),
        })
    }

    /// Renews the presence while this replica leads a lease and has just renewed all it
    /// leads (`Candidates::presence_period`), until the process ends. Leading nothing,
    /// it writes nothing.
    pub async fn renew(self: Arc<Self>, candidates: Candidates, metrics: Arc<Metrics>) {
        let mut last: Option<Instant> = None;
        let mut failing = false;
        let mut interval = tokio::time::interval(CHECK);
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            interval.tick().await;
            let Some(period) = candidates.presence_period() else {
                continue;
            };
            if last.is_some_and(|at| at.elapsed() < period) {
                continue;
            }
            match self.apply().await {
                Ok(()) => {
                    if failing {
                        tracing::info!(lease = %self.name, "presence renewed again");
                    }
                    failing = false;
                    last = Some(Instant::now());
                }
                Err(error) => {
                    metrics.presence_errors.inc();
                    if !failing {
                        tracing::warn!(%error, lease = %self.name, "cannot renew this replica's presence; a peer cut off from the database will stop this replica's pods");
                    }
                    failing = true;
                }
            }
        }
    }

    async fn apply(&self) -> kube::Result<()> {
        let lease = Lease {
            metadata: ObjectMeta {
                name: Some(self.name.clone()),
                labels: Some([(LABEL.to_owned(), "replica".to_owned())].into()),
                ..ObjectMeta::default()
            },
            spec: Some(LeaseSpec {
                holder_identity: Some(self.holder.clone()),
                renew_time: Some(MicroTime(k8s_openapi::jiff::Timestamp::now())),
                ..LeaseSpec::default()
            }),
        };
        let written = self
            .leases
            .patch(
                &self.name,
                &PatchParams::apply(FIELD_MANAGER).force(),
                &Patch::Apply(&lease),
            )
            .await?;
        *self.written.lock().expect("presence mutex poisoned") = written.metadata.resource_version;
        Ok(())
    }

    /// Deletes the presence at shutdown, once this replica leads nothing, unless someone
    /// wrote it since: replicas of a Deployment get new names on every rollout.
    pub async fn withdraw(&self) {
        let Some(version) = self
            .written
            .lock()
            .expect("presence mutex poisoned")
            .clone()
        else {
            return;
        };
        let params = DeleteParams {
            preconditions: Some(Preconditions {
                resource_version: Some(version),
                uid: None,
            }),
            ..DeleteParams::default()
        };
        let deleted = tokio::time::timeout(
            Duration::from_secs(2),
            self.leases.delete(&self.name, &params),
        )
        .await;
        match deleted {
            Ok(Ok(_)) => {}
            Ok(Err(kube::Error::Api(e))) if e.code == 404 || e.code == 409 => {}
            Ok(Err(error)) => {
                tracing::debug!(%error, lease = %self.name, "cannot delete this replica's presence");
            }
            Err(_) => {
                tracing::debug!(lease = %self.name, "deleting this replica's presence timed out")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn presence(holder: &str, renewed_second: i64) -> Lease {
        Lease {
            metadata: ObjectMeta::default(),
            spec: Some(LeaseSpec {
                holder_identity: Some(holder.to_owned()),
                renew_time: Some(MicroTime(
                    k8s_openapi::jiff::Timestamp::from_second(renewed_second).unwrap(),
                )),
                ..LeaseSpec::default()
            }),
        }
    }

    const WAIT: Duration = Duration::from_millis(30);

    #[test]
    fn a_renewal_is_seen_when_its_time_changes_not_when_it_is_read_again() {
        let p = Presences::default();
        p.saw(watcher::Event::Init);
        p.saw(watcher::Event::InitApply(presence("a/op-1", 1)));
        p.saw(watcher::Event::InitDone);
        std::thread::sleep(WAIT);
        // The same renewal again (a re-list, a label edit) is no renewal.
        p.saw(watcher::Event::Apply(presence("a/op-1", 1)));
        assert!(p.unseen_for("a/op-1") >= WAIT);
        p.saw(watcher::Event::Apply(presence("a/op-1", 2)));
        assert!(p.unseen_for("a/op-1") < WAIT);
    }

    #[test]
    fn a_holder_without_presence_is_unseen_since_watching_began() {
        let p = Presences::default();
        std::thread::sleep(WAIT);
        p.saw(watcher::Event::Init);
        p.saw(watcher::Event::InitDone);
        assert!(p.unseen_for("a/op-9") >= WAIT);
    }

    #[test]
    fn a_deleted_or_unlisted_presence_ages_from_its_last_renewal() {
        let p = Presences::default();
        p.saw(watcher::Event::Apply(presence("a/op-1", 1)));
        p.saw(watcher::Event::Apply(presence("a/op-2", 1)));
        std::thread::sleep(WAIT);
        p.saw(watcher::Event::Delete(presence("a/op-1", 1)));
        p.saw(watcher::Event::Init);
        p.saw(watcher::Event::InitDone);
        for holder in ["a/op-1", "a/op-2"] {
            let unseen = p.unseen_for(holder);
            assert!(unseen >= WAIT && unseen < 10 * WAIT, "{holder}: {unseen:?}");
        }
    }

    #[test]
    fn a_renewal_delivered_after_a_watch_error_counts_from_the_error() {
        let p = Presences::default();
        p.saw(watcher::Event::Apply(presence("a/op-1", 1)));
        p.failed();
        std::thread::sleep(WAIT);
        // Delivered now, but it may have been written any time since the error.
        p.saw(watcher::Event::Apply(presence("a/op-1", 2)));
        assert!(p.unseen_for("a/op-1") >= WAIT);
    }

    #[test]
    fn object_names_are_dns_subdomains() {
        assert_eq!(
            object_name("reaper-operator-7d9f-x2"),
            "reaper-operator.reaper-operator-7d9f-x2"
        );
        assert_eq!(object_name("Op_1"), "reaper-operator.op-1");
        assert_eq!(object_name("a..B"), "reaper-operator.a--b");
    }
}
