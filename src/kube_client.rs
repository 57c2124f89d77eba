//! How the operator talks to the API server: the client every loop shares, and the
//! fence's, which never reuses a connection.
//!
//! kube sets no read timeout, and its client keeps connections open between calls. One
//! whose path died without a reset (a restarted load balancer, a dropped NAT entry)
//! swallows whatever is sent on it, and the call waits for TCP to give up, minutes
//! later. Both clients bound a call until its response begins (`tower`'s timeout
//! resolves with the response head; a watch's events stream after it).

use std::time::Duration;

use http::{Method, Request, Response};
use kube::client::retry::RetryPolicy;
use kube::client::{Body, ConfigExt};
use kube::{Client, Config};
use tower::buffer::BufferLayer;
use tower::retry::{Policy, RetryLayer};
use tower::timeout::TimeoutLayer;
use tower::{BoxError, ServiceBuilder};

use crate::{Error, Result};

/// The client of `Client::try_default`, each call bounded by `timeout`. kube's own
/// retries of answers 429, 503 and 504 are kept for reads only, outside the bound (each
/// attempt has all of it): a write resent after a 504 and then cut by the bound could
/// still land after the operator gave up on it, so writes are retried by their callers,
/// who read again first. Reads keep them: without, one 429 when a watch reopens would
/// distrust a cache and send every Reaper's reconcile to the API server at once.
pub async fn infer(timeout: Duration) -> Result<(Client, Config)> {
    let mut config = Config::infer().await.map_err(|e| {
        Error::Config(format!(
            "cannot configure the Kubernetes client (KUBECONFIG or in-cluster): {e}"
        ))
    })?;
    config.default_retry = false;
    let client = kube::client::ClientBuilder::try_from(config.clone())
        .map_err(|e| Error::Config(format!("cannot build the Kubernetes client: {e}")))?
        .with_layer(&TimeoutLayer::new(timeout))
        // A retry needs a service it can clone; kube's stack is boxed, a buffer is not
        // (and holds as many waiting calls as the one `Client` puts in front of it).
        .with_layer(&BufferLayer::new(1024))
        .with_layer(&RetryLayer::new(RetryReads(RetryPolicy::server_retry())))
        .build();
    Ok((client, config))
}

/// kube's retry policy, for GET requests (reads, lists and watches) only.
#[derive(Clone)]
struct RetryReads(RetryPolicy);

impl<Res> Policy<Request<Body>, Response<Res>, BoxError> for RetryReads {
    type Future = tokio::time::Sleep;

    fn retry(
        &mut self,
        request: &mut Request<Body>,
        result: &mut std::result::Result<Response<Res>, BoxError>,
    ) -> Option<Self::Future> {
        if request.method() != Method::GET {
            return None;
        }
        self.0.retry(request, result)
    }

    fn clone_request(&mut self, request: &Request<Body>) -> Option<Request<Body>> {
        if request.method() != Method::GET {
            return None;
        }
        <RetryPolicy as Policy<Request<Body>, Response<Res>, BoxError>>::clone_request(
            &mut self.0,
            request,
        )
    }
}

/// A client that opens a new connection for every call and keeps none idle: a fence's
/// scale-down must not be sent on a pooled connection that went silent, and its
/// attempts are rare (a missed renew deadline). Same TLS, credentials and headers as
/// [`infer`]'s. `timeout` bounds a call with its credentials (an exec plugin's run
/// included) and may be short: a scale-down given up early is tried again, and one
/// that lands late does no harm.
pub fn unpooled(config: &Config, timeout: Duration) -> Result<Client> {
    let fail = |e: kube::Error| Error::Config(format!("cannot build the fence's client: {e}"));
    let https = config.rustls_https_connector().map_err(fail)?;
    let http = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .pool_max_idle_per_host(0)
        .build(https);
    let service = ServiceBuilder::new()
        .layer(TimeoutLayer::new(timeout))
        .layer(config.base_uri_layer())
        .option_layer(config.auth_layer().map_err(fail)?)
        .layer(config.extra_headers_layer().map_err(fail)?)
        // The credentials layer needs the errors of both its paths in one type.
        .map_err(tower::BoxError::from)
        .service(http);
    Ok(Client::new(service, config.default_namespace.clone()))
}
