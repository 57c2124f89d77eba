//! A TCP proxy on loopback that can cut the path to a server, for fault injection:
//! `Reset` closes every connection and refuses new ones; `Blackhole` keeps sockets open
//! but forwards nothing (a partition: calls hang until their timeout).

use std::sync::Arc;

use tokio::io::copy_bidirectional;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Pass,
    Reset,
    Blackhole,
}

pub struct FaultProxy {
    pub port: u16,
    mode: Arc<watch::Sender<Mode>>,
    task: tokio::task::JoinHandle<()>,
}

impl FaultProxy {
    /// Proxies 127.0.0.1:<port> to `upstream` (host:port).
    pub async fn start(upstream: String) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let (tx, _) = watch::channel(Mode::Pass);
        let mode = Arc::new(tx);
        let accept_mode = mode.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((client, _)) = listener.accept().await else {
                    return;
                };
                let mut rx = accept_mode.subscribe();
                let upstream = upstream.clone();
                tokio::spawn(async move { serve(client, upstream, &mut rx).await });
            }
        });
        Self { port, mode, task }
    }

    pub fn set(&self, mode: Mode) {
        self.mode.send_if_modified(|current| {
            let changed = *current != mode;
            *current = mode;
            changed
        });
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

async fn serve(mut client: TcpStream, upstream: String, rx: &mut watch::Receiver<Mode>) {
    loop {
        let mode = *rx.borrow_and_update();
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
                let mode = *rx.borrow_and_update();
                match mode {
                    Mode::Pass => continue,
                    Mode::Reset => return,
                    Mode::Blackhole => {
                        // Hold both sockets open and silent until the mode changes again.
                        loop {
                            if rx.changed().await.is_err() { return; }
                            let mode = *rx.borrow_and_update();
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
