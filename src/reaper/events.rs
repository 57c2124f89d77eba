//! Kubernetes Events about Reapers, published in the background a few at a time.

use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::ObjectReference;
use kube::runtime::events::{Event, Recorder};
use tokio::sync::mpsc;

/// Events in flight at once. A replica that takes 10 000 leases over publishes 10 000
/// Events within seconds; one request (and one connection) each at the same moment
/// would cost far more memory than the queue.
const IN_FLIGHT: usize = 4;

/// How long one Event may take. The client sets no read timeout: four requests whose
/// connections went silent would otherwise stop every later Event for good.
const SEND_TIMEOUT: Duration = Duration::from_secs(10);

/// Where the controller's Events go: a queue in front of a [`Recorder`].
#[derive(Clone)]
pub struct Events {
    recorder: Recorder,
    queue: mpsc::UnboundedSender<(Event, ObjectReference)>,
}

impl Events {
    /// Starts the task that publishes what [`Events::publish`] queues; it ends with the
    /// last clone of the returned value.
    pub fn spawn(recorder: Recorder) -> Self {
        let (queue, rx) = mpsc::unbounded_channel::<(Event, ObjectReference)>();
        let background = recorder.clone();
        let queued = futures::stream::unfold(rx, |mut rx| async move {
            rx.recv().await.map(|item| (item, rx))
        });
        tokio::spawn(
            queued.for_each_concurrent(IN_FLIGHT, move |(event, reference)| {
                let recorder = background.clone();
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
        send(&self.recorder, event, reference).await;
    }
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
