//! Kubernetes Events about Reapers, published in the background a few at a time.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::ObjectReference;
use kube::Client;
use kube::runtime::events::{Event, Recorder, Reporter};
use tokio::sync::mpsc;

/// Events in flight at once. A replica that takes 10 000 leases over publishes 10 000
/// Events within seconds; one request (and one connection) each at the same moment
/// would cost far more memory than the queue.
const IN_FLIGHT: usize = 4;

/// How long one Event may take: four requests held up by a slow API server would stop
/// every later Event meanwhile (the client's own bound is above a minute).
const SEND_TIMEOUT: Duration = Duration::from_secs(10);

/// How long the queue stays empty before the recorder is replaced by a new one. kube's
/// [`Recorder`] keeps every Event it sent for six minutes, to count a repeat as a
/// series of the first, but drops old ones only when it sends the next: after a replica
/// took 10 000 leases over, a quiet one kept the 10 000 `LeaseAcquired` Events (about
/// 3 KB each) for good. The price of forgetting sooner: an Event repeated after a quiet
/// minute is created anew instead of counted on the first.
const FORGET_AFTER: Duration = Duration::from_secs(60);

/// Events a recorder sends before it is replaced, however busy the queue: a replica
/// taking 10 000 leases over sends them within minutes, and a cache that holds them all
/// until the queue is quiet costs 30 MB at the peak and leaves the heap full of holes
/// after it. Repeats further apart than this many Events are created anew.
const FORGET_EVERY: u32 = 1_000;

/// Where the controller's Events go: a queue in front of a [`Recorder`].
#[derive(Clone)]
pub struct Events {
    recorder: Arc<Mutex<Recorder>>,
    queue: mpsc::UnboundedSender<(Event, ObjectReference)>,
}

impl Events {
    /// Starts the task that publishes what [`Events::publish`] queues; it ends with the
    /// last clone of the returned value.
    pub fn spawn(client: Client, reporter: Reporter) -> Self {
        let new_recorder = move || Recorder::new(client.clone(), reporter.clone());
        let fresh_recorder = new_recorder.clone();
        let recorder = Arc::new(Mutex::new(new_recorder()));
        let (queue, rx) = mpsc::unbounded_channel::<(Event, ObjectReference)>();
        let shared = recorder.clone();
        let queued = futures::stream::unfold(rx, move |mut rx| {
            let shared = shared.clone();
            let new_recorder = new_recorder.clone();
            async move {
                loop {
                    match tokio::time::timeout(FORGET_AFTER, rx.recv()).await {
                        Ok(item) => return item.map(|item| (item, rx)),
                        Err(_) => *lock(&shared) = new_recorder(),
                    }
                }
            }
        });
        let background = recorder.clone();
        let mut sent = 0_u32;
        tokio::spawn(
            queued.for_each_concurrent(IN_FLIGHT, move |(event, reference)| {
                sent = sent.wrapping_add(1);
                if sent.is_multiple_of(FORGET_EVERY) {
                    *lock(&background) = fresh_recorder();
                }
                let recorder = lock(&background).clone();
                async move { send(&recorder, &event, &reference).await }
            }),
        );
        Self { recorder, queue }
    }

    /// Queues an Event without waiting for it; a failed Event is only logged.
    pub fn publish(&self, event: Event, reference: &ObjectReference) {
        let _ = self.queue.send((event, reference.clone()));
    }

    /// Publishes an Event now, for callers that must not end before it is sent (a
    /// shutdown's last words); a failed Event is only logged.
    pub async fn publish_now(&self, event: &Event, reference: &ObjectReference) {
        let recorder = lock(&self.recorder).clone();
        send(&recorder, event, reference).await;
    }
}

fn lock(recorder: &Mutex<Recorder>) -> std::sync::MutexGuard<'_, Recorder> {
    // Only ever held to clone or replace the recorder, which cannot panic halfway.
    recorder
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

async fn send(recorder: &Recorder, event: &Event, reference: &ObjectReference) {
    match tokio::time::timeout(SEND_TIMEOUT, recorder.publish(event, reference)).await {
        Ok(Ok(())) => {}
        Ok(Err(error)) => {
            tracing::debug!(%error, reason = %event.reason, "could not publish event")
        }
        Err(_) => tracing::debug!(reason = %event.reason, "publishing an event timed out"),
    }
}
