//! A TCP proxy on loopback that can cut the path to a server, for fault injection:
//! `Reset` closes every connection and refuses new ones; `Blackhole` keeps sockets open
//! but forwards nothing (a partition: calls hang until their timeout). `stall_open`
//! silences only the connections already open, for good, while new ones pass: a pooled
//! keep-alive connection whose path died without a reset (a restarted load balancer, a
//! dropped NAT entry). `HoldPushes` delays a watch's events but not the calls' answers:
//! a client whose caches fall behind its own writes.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Pass,
    Reset,
    Blackhole,
    /// Answers pass, pushes wait: what the server sends more than [`ANSWER_WITHIN`]
    /// after the client last sent anything (a watch's events, not a call's response) is
    /// held back until the mode is `Pass` again.
    HoldPushes,
}

/// How long after a client's last bytes the server's are still taken for its answer
/// (generous for a loaded machine; a watch's request is minutes old).
const ANSWER_WITHIN: Duration = Duration::from_secs(2);

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

/// Waits while the mode keeps the new `connection` out; false when it is to be reset
/// (or the proxy is gone).
async fn admitted(connection: u64, rx: &mut watch::Receiver<State>) -> bool {
    loop {
        let mode = rx.borrow_and_update().mode_of(connection);
        match mode {
            Mode::Reset => return false,
            Mode::Blackhole => {
                if rx.changed().await.is_err() {
                    return false;
                }
            }
            Mode::Pass | Mode::HoldPushes => return true,
        }
    }
}

async fn serve(
    mut client: TcpStream,
    upstream: String,
    connection: u64,
    rx: &mut watch::Receiver<State>,
) {
    if !admitted(connection, rx).await {
        return;
    }
    let Ok(mut server) = TcpStream::connect(&upstream).await else {
        return;
    };
    let (mut client_read, mut client_write) = client.split();
    let (mut server_read, mut server_write) = server.split();
    let opened = Instant::now();
    // Milliseconds from `opened` to the client's last bytes.
    let client_spoke = AtomicU64::new(0);
    // Each direction copies on its own, so neither waits on the other's full buffer;
    // a cut is seen at once by `cut`, whatever the copies are blocked on.
    let upstream = async {
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            let Ok(n @ 1..) = client_read.read(&mut buf).await else {
                return;
            };
            client_spoke.store(opened.elapsed().as_millis() as u64, Ordering::Relaxed);
            if server_write.write_all(&buf[..n]).await.is_err() {
                return;
            }
        }
    };
    let mut modes = rx.clone();
    let downstream = async {
        let mut buf = vec![0u8; 16 * 1024];
        let mut held = Vec::new();
        loop {
            tokio::select! {
                read = server_read.read(&mut buf) => {
                    let Ok(n @ 1..) = read else {
                        let _ = client_write.write_all(&held).await;
                        return;
                    };
                    let quiet_for = opened.elapsed().saturating_sub(Duration::from_millis(
                        client_spoke.load(Ordering::Relaxed),
                    ));
                    let hold = modes.borrow().mode_of(connection) == Mode::HoldPushes;
                    if hold && (quiet_for > ANSWER_WITHIN || !held.is_empty()) {
                        held.extend_from_slice(&buf[..n]);
                    } else if client_write.write_all(&buf[..n]).await.is_err() {
                        return;
                    }
                }
                changed = modes.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    let mode = modes.borrow_and_update().mode_of(connection);
                    if mode == Mode::Pass && !held.is_empty() {
                        if client_write.write_all(&held).await.is_err() {
                            return;
                        }
                        held.clear();
                    }
                }
            }
        }
    };
    let cut = async {
        loop {
            if rx.changed().await.is_err() {
                return None;
            }
            match rx.borrow_and_update().mode_of(connection) {
                Mode::Pass | Mode::HoldPushes => continue,
                cut => return Some(cut),
            }
        }
    };
    let cut = tokio::select! {
        _ = upstream => return,
        _ = downstream => return,
        cut = cut => cut,
    };
    if cut == Some(Mode::Blackhole) {
        // Hold both sockets open and silent until the mode changes again; bytes were
        // dropped mid-stream, so the session is no longer usable: close it then, as a
        // real partition would end it.
        while rx.changed().await.is_ok() {
            if rx.borrow_and_update().mode_of(connection) != Mode::Blackhole {
                return;
            }
        }
    }
}
