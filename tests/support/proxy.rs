//! A TCP proxy on loopback that can cut the path to a server, for fault injection:
//! `Reset` closes every connection and refuses new ones; `Blackhole` keeps sockets open
//! but forwards nothing (a partition: calls hang until their timeout). `stall_open`
//! silences only the connections already open, for good, while new ones pass: a pooled
//! keep-alive connection whose path died without a reset (a restarted load balancer, a
//! dropped NAT entry).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use tokio::io::copy_bidirectional;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Pass,
    Reset,
    Blackhole,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct State {
    mode: Mode,
    /// Connections accepted before this many stay silent whatever the mode but `Reset`.
    stalled_below: u64,
}

impl State {
    fn mode_of(self, connection: u64) -> Mode {
        match self.mode {
            Mode::Reset => Mode::Reset,
            _ if connection < self.stalled_below => Mode::Blackhole,
            mode => mode,
        }
    }
}

pub struct FaultProxy {
    pub port: u16,
    state: Arc<watch::Sender<State>>,
    accepted: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl FaultProxy {
    /// Proxies 127.0.0.1:<port> to `upstream` (host:port).
    pub async fn start(upstream: String) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let (tx, _) = watch::channel(State {
            mode: Mode::Pass,
            stalled_below: 0,
        });
        let state = Arc::new(tx);
        let accepted = Arc::new(AtomicU64::new(0));
        let accept_state = state.clone();
        let counter = accepted.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((client, _)) = listener.accept().await else {
                    return;
                };
                let mut rx = accept_state.subscribe();
                let connection = counter.fetch_add(1, Ordering::SeqCst);
                let upstream = upstream.clone();
                tokio::spawn(async move { serve(client, upstream, connection, &mut rx).await });
            }
        });
        Self {
            port,
            state,
            accepted,
            task,
        }
    }

    pub fn set(&self, mode: Mode) {
        self.state.send_if_modified(|current| {
            let changed = current.mode != mode;
            current.mode = mode;
            changed
        });
    }

    /// Silences every connection open now, until `Reset` closes them; later connections
    /// follow the mode. Returns how many connections were silenced.
    pub fn stall_open(&self) -> u64 {
        let mut stalled = 0;
        self.state.send_modify(|current| {
            current.stalled_below = self.accepted.load(Ordering::SeqCst);
            stalled = current.stalled_below;
        });
        stalled
    }

    /// Rewrites a postgres URL so it points at this proxy.
    pub fn url_for(&self, url: &str) -> String {
        let (before_at, after_at) = url.rsplit_once('@').expect("URL with credentials");
        let (_, path) = after_at.split_once('/').unwrap_or((after_at, ""));
        format!("{before_at}@127.0.0.1:{}/{path}", self.port)
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn serve(
    mut client: TcpStream,
    upstream: String,
    connection: u64,
    rx: &mut watch::Receiver<State>,
) {
    loop {
        let mode = rx.borrow_and_update().mode_of(connection);
        match mode {
            Mode::Reset => return,
            Mode::Blackhole => {
                if rx.changed().await.is_err() {
                    return;
                }
            }
            Mode::Pass => break,
        }
    }
    let Ok(mut server) = TcpStream::connect(&upstream).await else {
        return;
    };
    loop {
        tokio::select! {
            _ = copy_bidirectional(&mut client, &mut server) => return,
            changed = rx.changed() => {
                if changed.is_err() { return; }
                let mode = rx.borrow_and_update().mode_of(connection);
                match mode {
                    Mode::Pass => continue,
                    Mode::Reset => return,
                    Mode::Blackhole => {
                        // Hold both sockets open and silent until the mode changes again.
                        loop {
                            if rx.changed().await.is_err() { return; }
                            let mode = rx.borrow_and_update().mode_of(connection);
                            match mode {
                                Mode::Blackhole => continue,
                                Mode::Reset => return,
                                // Bytes were dropped mid-stream: the session is no longer
                                // usable, so close it as a real partition would end it.
                                Mode::Pass => return,
                            }
                        }
                    }
                }
            }
        }
    }
}
