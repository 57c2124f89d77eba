//! `reaper-operator guard`: runs a command only while this cluster holds a lease, and
//! stops it as soon as that can no longer be confirmed (docs/guard.md).
//!
//! The guard never acquires or renews; it reads the lease row. A *confirming read* shows
//! a holder of this cluster and an unexpired lease; it proves that nobody else can take
//! the lease before `expires_at`, i.e. for `remaining = expires_at - observed_at` (both on
//! the database's clock) after the read was *sent*. So the child must be dead by
//! `sent + remaining - margin` on the boot-time clock (`CLOCK_BOOTTIME`): the guard sends SIGTERM
//! `grace` before that instant and SIGKILL at it, unless a later read confirms again.
//!
//! A frozen guard (SIGSTOP, a stalled runtime) cannot stop anything, so a watchdog
//! process of its own (the hidden `guard-watchdog` command) holds the same SIGKILL
//! instant and fires it by itself; the guard moves it forward with each confirming read.

use std::io::Write;
use std::ops::ControlFlow;
use std::process::ExitStatus;
use std::time::Duration;

use nix::sys::signal::{Signal, killpg};
use nix::time::{ClockId, clock_gettime};
use nix::unistd::Pid;

use crate::lease::{ClusterName, Lease, LeaseName};

/// Exit code of the guard when it stopped the child because the lease could no longer
/// be confirmed (lost to another cluster, or no confirming read in time).
pub const EXIT_LEASE_LOST: u8 = 3;

/// The time on `CLOCK_BOOTTIME`, the clock the guard and its watchdog share: it does not
/// jump with the wall clock, and unlike `CLOCK_MONOTONIC` it keeps counting while the
/// machine is suspended, so a suspend cannot stretch a deadline past the lease's expiry.
pub fn clock_now() -> Duration {
    let t = clock_gettime(ClockId::CLOCK_BOOTTIME).expect("CLOCK_BOOTTIME is always available");
    Duration::new(t.tv_sec() as u64, t.tv_nsec() as u32)
}

/// The watchdog looks at the clock at least this often: its sleeps run on the monotonic
/// clock, which stops during a suspend.
const WATCHDOG_TICK: Duration = Duration::from_millis(100);

/// The least time a confirmation must leave before the first SIGTERM instant for the
/// command to be started (the watchdog must start and answer first).
const START_ALLOWANCE: Duration = Duration::from_millis(500);

/// The least time between two reads that notifications start.
const MIN_WAKE_SPACING: Duration = Duration::from_millis(50);

/// What one read of the lease row says about this cluster's right to run the child.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Reading {
    /// A holder of this cluster, not expired: nobody else can take it for `remaining`.
    Confirmed {
        holder: String,
        epoch: i64,
        remaining: Duration,
    },
    /// A holder of another cluster.
    Elsewhere { holder: String, epoch: i64 },
    /// Released (no holder) at this epoch: its holder handed the singleton over on
    /// purpose, after stopping the workload it knows of.
    Free { epoch: i64 },
    /// Expired, or no row: proves nothing either way.
    NotHeld,
}

impl Reading {
    pub fn of(lease: Option<&Lease>, cluster: &str) -> Self {
        let Some(lease) = lease else {
            return Reading::NotHeld;
        };
        if lease.is_free() {
            return Reading::Free { epoch: lease.epoch };
        }
        if !lease.is_held() {
            return Reading::NotHeld;
        }
        if lease.holder_cluster() != Some(cluster) {
            return Reading::Elsewhere {
                holder: lease.holder.clone(),
                epoch: lease.epoch,
            };
        }
        Reading::Confirmed {
            holder: lease.holder.clone(),
            epoch: lease.epoch,
            remaining: (lease.expires_at - lease.observed_at)
                .to_std()
                .unwrap_or_default(),
        }
    }
}

/// Why the child must stop.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StopReason {
    HeldElsewhere {
        holder: String,
        epoch: i64,
    },
    /// The epoch moved by more than one between two reads: somebody (maybe another
    /// cluster) held the lease in between, unseen.
    EpochSkipped {
        from: i64,
        to: i64,
    },
    /// The lease was released: its holder handed over, so nothing may run here any more.
    Released {
        epoch: i64,
    },
    /// No read confirmed the lease in time.
    Unconfirmed,
    /// The watchdog is gone or stuck: nothing would stop the command if the guard froze.
    NoWatchdog,
}

impl std::fmt::Display for StopReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StopReason::HeldElsewhere { holder, epoch } => {
                write!(
                    f,
                    "the lease is held by {holder} (epoch {epoch}), another cluster"
                )
            }
            StopReason::EpochSkipped { from, to } => write!(
                f,
                "the epoch moved from {from} to {to}: the lease was held by somebody else in between"
            ),
            StopReason::Released { epoch } => write!(
                f,
                "the lease was released at epoch {epoch}: its holder handed the singleton over"
            ),
            StopReason::NoWatchdog => write!(f, "the guard's watchdog is gone or stuck"),
            StopReason::Unconfirmed => {
                write!(f, "no read confirmed the lease before it could expire")
            }
        }
    }
}

/// The guard's knowledge: the epoch it last confirmed and the instant (boot-time clock) by
/// which the child must be dead.
#[derive(Clone, Debug, Default)]
pub struct Confirmation {
    pub epoch: Option<i64>,
    pub holder: String,
    /// SIGKILL instant; `None` before the first confirming read.
    pub kill_at: Option<Duration>,
}

impl Confirmation {
    /// Applies a read that was sent at `sent`. Only a confirming read moves `kill_at`
    /// (to the latest read's bound, which is the most precise one).
    pub fn apply(
        &mut self,
        sent: Duration,
        reading: &Reading,
        margin: Duration,
    ) -> Result<(), StopReason> {
        match reading {
            Reading::Elsewhere { holder, epoch } => Err(StopReason::HeldElsewhere {
                holder: holder.clone(),
                epoch: *epoch,
            }),
            // Expired or missing after a confirmation: with sound clocks the command is
            // already past its bound; if clocks are off, stopping is the safe side.
            Reading::NotHeld if self.epoch.is_some() => Err(StopReason::Unconfirmed),
            Reading::NotHeld => Ok(()),
            // A release at the epoch this guard ran under, or at a later one it never saw.
            Reading::Free { epoch } if self.epoch.is_some_and(|last| *epoch >= last) => {
                Err(StopReason::Released { epoch: *epoch })
            }
            Reading::Free { .. } => Ok(()),
            Reading::Confirmed {
                holder,
                epoch,
                remaining,
            } => {
                if let Some(last) = self.epoch
                    && (*epoch > last + 1 || *epoch < last)
                {
                    return Err(StopReason::EpochSkipped {
                        from: last,
                        to: *epoch,
                    });
                }
                self.epoch = Some(*epoch);
                self.holder = holder.clone();
                self.kill_at = Some((sent + *remaining).saturating_sub(margin));
                Ok(())
            }
        }
    }

    /// The SIGTERM instant: `grace` before the SIGKILL instant.
    pub fn term_at(&self, grace: Duration) -> Option<Duration> {
        self.kill_at.map(|k| k.saturating_sub(grace))
    }
}

/// Checks that a lease with this ttl leaves the child time to run: a healthy holder
/// renews at least every ttl/2, so a read shows at least that much remaining; the child
/// runs only while `remaining - margin - grace` exceeds the time to the next read.
pub fn check_timing(
    ttl: Duration,
    grace: Duration,
    margin: Duration,
    poll: Duration,
) -> Result<(), String> {
    let needed = grace + margin + poll * 2;
    if needed * 2 > ttl {
        return Err(format!(
            "the lease's ttl ({:.1} s) is too short for --grace-seconds {:.1} + --margin-ms {} + 2 × \
             --poll-interval-ms {}: the guard stops the child {:.1} s before the lease could \
             expire, so it needs 2 × {:.1} s = {:.1} s of ttl at least. Lower the grace or \
             raise the Reaper's lease.ttlSeconds",
            ttl.as_secs_f64(),
            grace.as_secs_f64(),
            margin.as_millis(),
            poll.as_millis(),
            (grace + margin).as_secs_f64(),
            needed.as_secs_f64(),
            (needed * 2).as_secs_f64(),
        ));
    }
    Ok(())
}

/// The child's exit status as a process exit code (128 + signal when killed).
pub fn exit_code(status: ExitStatus) -> u8 {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(code), _) => code.clamp(0, 255) as u8,
        (None, Some(signal)) => (128 + signal).clamp(0, 255) as u8,
        _ => 1,
    }
}

/// Sends `signal` to everything of the command: its session `sid` (the gate makes the
/// command a session leader, so `sid` is also its process group). A process that moved to
/// a group of its own (`setpgid`: job-control shells, `timeout`) stays in the session and
/// is found through /proc. Gone is not an error.
pub fn signal_command(sid: i32, signal: Signal) {
    match killpg(Pid::from_raw(sid), signal) {
        Ok(()) | Err(nix::errno::Errno::ESRCH) => {}
        Err(error) => tracing::warn!(%error, sid, %signal, "cannot signal the command"),
    }
    // A SIGKILL sweep repeats while it finds somebody: a process forked during a pass
    // may have got a number the pass had already gone by.
    let passes = if signal == Signal::SIGKILL { 3 } else { 1 };
    for _ in 0..passes {
        let mut found = false;
        let Ok(entries) = std::fs::read_dir("/proc") else {
            return;
        };
        for entry in entries.flatten() {
            let Some(pid) = entry
                .file_name()
                .to_str()
                .and_then(|n| n.parse::<i32>().ok())
            else {
                continue;
            };
            if let Some((state, session)) = stat_of(pid)
                && session == sid
                && state != 'Z'
            {
                found = true;
                let _ = nix::sys::signal::kill(Pid::from_raw(pid), signal);
            }
        }
        if !found {
            return;
        }
    }
}

/// The state and session id of `pid` from /proc/PID/stat (the fields after the command
/// name, which may itself hold spaces and parentheses: state, ppid, pgrp, session).
fn stat_of(pid: i32) -> Option<(char, i32)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let (_, after_name) = stat.rsplit_once(')')?;
    let mut fields = after_name.split_whitespace();
    let state = fields.next()?.chars().next()?;
    let session = fields.nth(2)?.parse().ok()?;
    Some((state, session))
}

/// The command's session can only be stopped whole through a /proc of this process's own
/// pid namespace: checked at start (a /proc of another namespace would name other
/// processes by the same numbers).
pub fn check_proc() -> Result<(), String> {
    let pid = std::process::id() as i32;
    let sid = nix::unistd::getsid(None).map_err(|e| format!("getsid: {e}"))?;
    match stat_of(pid) {
        Some((_, session)) if session == sid.as_raw() => Ok(()),
        Some(_) => Err(format!(
            "/proc/{pid}/stat is not this process's: /proc belongs to another pid namespace"
        )),
        None => Err("/proc is not mounted: the guard needs it to stop every process of                      its command"
            .into()),
    }
}

/// How long the watchdog may leave a message unanswered before the guard treats it as
/// stuck (frozen, starved): it answers each within its 100 ms tick when it runs at all.
const WATCHDOG_ANSWER_LIMIT: Duration = Duration::from_secs(2);

/// The guard's side of the watchdog: one line per message on the watchdog's stdin, one
/// answer line per message on its stdout.
pub struct WatchdogLink {
    stdin: std::process::ChildStdin,
    stdout: std::process::ChildStdout,
    child: std::process::Child,
    /// When each unanswered message was sent, oldest first.
    unanswered: std::collections::VecDeque<Duration>,
}

impl WatchdogLink {
    /// Starts `reaper-operator guard-watchdog` in a process group of its own (so a stop
    /// aimed at the guard's group does not freeze it) for the command's session `sid`, and
    /// waits until it says it runs (at most until `ready_by`, boot-time clock).
    pub fn start(
        sid: i32,
        grace: Duration,
        kill_at: Duration,
        ready_by: Duration,
    ) -> std::io::Result<Self> {
        use std::io::Read;
        use std::os::unix::process::CommandExt;
        // /proc/self/exe: still this binary when a new copy replaced the file. argv[0]
        // "reaper-operator": a copy named `guard` would read its arguments as `guard ...`.
        let mut child = std::process::Command::new("/proc/self/exe")
            .arg0("reaper-operator")
            .arg("guard-watchdog")
            .args(["--pgid", &sid.to_string()])
            .args(["--grace-ms", &grace.as_millis().to_string()])
            .args(["--kill-at-ns", &kill_at.as_nanos().to_string()])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .process_group(0)
            .spawn()?;
        let stdin = child.stdin.take().expect("piped stdin");
        let stdout = child.stdout.take().expect("piped stdout");
        let mut link = Self {
            stdin,
            stdout,
            child,
            unanswered: Default::default(),
        };
        // The watchdog's first line, "ready", comes once its loop runs: only then does it
        // hold the kill instant.
        let mut ready = [0u8; 6];
        let waited = poll_readable(&link.stdout, ready_by.saturating_sub(clock_now()))
            .and_then(|()| link.stdout.read_exact(&mut ready));
        if waited.is_err() || &ready != b"ready\n" {
            let _ = link.child.kill();
            let _ = link.child.wait();
            return Err(std::io::Error::other(match waited {
                Err(e) => format!("the watchdog did not start in time: {e}"),
                Ok(()) => "the watchdog did not start".into(),
            }));
        }
        // Non-blocking from now on: a stopped watchdog fills the pipe, and a blocking
        // write would freeze the guard with it.
        if let Err(e) = set_nonblocking(&link.stdin).and_then(|()| set_nonblocking(&link.stdout)) {
            let _ = link.child.kill();
            let _ = link.child.wait();
            return Err(e);
        }
        Ok(link)
    }

    /// Moves the SIGKILL instant. An error means the watchdog is gone or stuck (it left a
    /// message unanswered too long): the guard must then stop the command itself, since
    /// nothing else would if it froze.
    pub fn extend(&mut self, kill_at: Duration) -> std::io::Result<()> {
        self.check()?;
        self.stdin
            .write_all(format!("kill-at {}\n", kill_at.as_nanos()).as_bytes())?;
        self.unanswered.push_back(clock_now());
        Ok(())
    }

    /// Reads the answers so far; an error if the watchdog exited or is stuck.
    pub fn check(&mut self) -> std::io::Result<()> {
        self.read_answers()?;
        if let Some(status) = self.child.try_wait()? {
            return Err(std::io::Error::other(format!(
                "the watchdog exited ({status})"
            )));
        }
        if self
            .unanswered
            .front()
            .is_some_and(|oldest| clock_now().saturating_sub(*oldest) > WATCHDOG_ANSWER_LIMIT)
            && !self.answered_after_a_look()?
            && let Some(oldest) = self.unanswered.front()
        {
            return Err(std::io::Error::other(format!(
                "the watchdog has not answered for {:?} (stopped or starved)",
                clock_now().saturating_sub(*oldest)
            )));
        }
        Ok(())
    }

    /// Gives a late watchdog two of its ticks more (this process may have been frozen
    /// with it, e.g. a paused container, and looks first); true if it answered meanwhile.
    fn answered_after_a_look(&mut self) -> std::io::Result<bool> {
        let before = self.unanswered.len();
        let _ = tokio::task::block_in_place(|| poll_readable(&self.stdout, 2 * WATCHDOG_TICK));
        self.read_answers()?;
        Ok(self.unanswered.len() < before)
    }

    /// Takes the answers waiting in the pipe (one line each) off the unanswered list.
    fn read_answers(&mut self) -> std::io::Result<()> {
        use std::io::Read;
        let mut answers = [0u8; 512];
        loop {
            match self.stdout.read(&mut answers) {
                Ok(0) => return Err(std::io::Error::other("the watchdog exited")),
                Ok(n) => {
                    for _ in answers[..n].iter().filter(|&&b| b == b'\n') {
                        self.unanswered.pop_front();
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// The command is gone: the watchdog exits without signalling anything (a stuck one
    /// is killed). Returns the watchdog's exit code: [`EXIT_LEASE_LOST`] if it fired.
    pub fn finish(mut self) -> Option<u8> {
        let _ = writeln!(self.stdin, "exit");
        drop(self.stdin);
        let until = clock_now() + Duration::from_secs(1);
        loop {
            match self.child.try_wait() {
                Ok(Some(status)) => return status.code().map(|c| c as u8),
                Ok(None) if clock_now() < until => std::thread::sleep(Duration::from_millis(5)),
                _ => {
                    let _ = self.child.kill();
                    let _ = self.child.wait();
                    return None;
                }
            }
        }
    }
}

fn set_nonblocking(fd: &impl std::os::fd::AsFd) -> std::io::Result<()> {
    use nix::fcntl::{FcntlArg, OFlag, fcntl};
    let flags = OFlag::from_bits_truncate(fcntl(fd, FcntlArg::F_GETFL)?);
    fcntl(fd, FcntlArg::F_SETFL(flags | OFlag::O_NONBLOCK))?;
    Ok(())
}

/// Waits until `fd` has something to read (or is closed), at most `timeout`.
fn poll_readable(fd: &impl std::os::fd::AsFd, timeout: Duration) -> std::io::Result<()> {
    use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
    let until = clock_now() + timeout;
    loop {
        let left = until.saturating_sub(clock_now());
        let millis = left.as_millis().clamp(1, i32::MAX as u128) as i32;
        let mut fds = [PollFd::new(fd.as_fd(), PollFlags::POLLIN)];
        match poll(
            &mut fds,
            PollTimeout::try_from(millis).unwrap_or(PollTimeout::MAX),
        ) {
            Ok(0) => {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    "timed out",
                ));
            }
            Ok(_) => return Ok(()),
            // A signal is not data: wait for the time left.
            Err(nix::errno::Errno::EINTR) if clock_now() < until => continue,
            Err(nix::errno::Errno::EINTR) => {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    "timed out",
                ));
            }
            Err(e) => return Err(e.into()),
        }
    }
}

/// The watchdog: SIGKILLs the command's session `sid` at `kill_at` (boot-time clock)
/// unless the guard moves it; if the guard goes away without saying `exit`, it sends
/// SIGTERM at once and SIGKILL `grace` later (or at `kill_at`, if sooner). One thread, no
/// runtime: it answers "ready" once it runs and "ok" to each message, so the guard can
/// tell that it runs.
pub fn watchdog(sid: i32, grace: Duration, mut kill_at: Duration) -> u8 {
    // Raw reads and writes: std's buffered stdin would keep bytes that poll(2) no longer
    // reports, and answers are best effort (a guard that stopped reading them must not
    // block this, so stdout is non-blocking).
    let stdin = std::io::stdin();
    let stdout = std::io::stdout();
    let _ = set_nonblocking(&stdout);
    // A read must never wait: only poll(2) waits, and it is bounded by the kill instant.
    let _ = set_nonblocking(&stdin);
    let answer = |line: &[u8]| {
        let _ = nix::unistd::write(&stdout, line);
    };
    answer(b"ready\n");
    let mut pending = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let now = clock_now();
        if now >= kill_at {
            signal_command(sid, Signal::SIGKILL);
            let _ = writeln!(
                std::io::stderr(),
                "reaper-operator guard-watchdog: no confirming read in time: killed the command (session {sid})"
            );
            return EXIT_LEASE_LOST;
        }
        let gone = match poll_readable(&stdin, kill_at.saturating_sub(now).min(WATCHDOG_TICK)) {
            Err(e) if e.kind() == std::io::ErrorKind::TimedOut => continue,
            Err(_) => true,
            Ok(()) => match nix::unistd::read(&stdin, &mut chunk) {
                Ok(0) => true,
                Ok(n) => {
                    pending.extend_from_slice(&chunk[..n]);
                    false
                }
                Err(nix::errno::Errno::EINTR | nix::errno::Errno::EAGAIN) => false,
                Err(_) => true,
            },
        };
        if gone {
            signal_command(sid, Signal::SIGTERM);
            let until = kill_at.min(clock_now() + grace);
            while clock_now() < until {
                std::thread::sleep(until.saturating_sub(clock_now()).min(WATCHDOG_TICK));
            }
            signal_command(sid, Signal::SIGKILL);
            return EXIT_LEASE_LOST;
        }
        while let Some(end) = pending.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = pending.drain(..=end).collect();
            let line = String::from_utf8_lossy(&line);
            let line = line.trim();
            if line == "exit" {
                return 0;
            }
            if let Some(ns) = line.strip_prefix("kill-at ")
                && let Ok(ns) = ns.parse::<u64>()
            {
                kill_at = Duration::from_nanos(ns);
                answer(b"ok\n");
            }
        }
    }
}

/// What the guard writes to open the gate; anything else (the guard gone: end of file)
/// keeps it shut.
const GATE_OPEN: &[u8] = b"go\n";

/// The gate (`guard-exec`): waits for the guard to open it, then execs the command in
/// this process (same pid and process group, so the watchdog's target). Returns an exit
/// code only when the command does not start.
pub fn exec_after_gate(gate_fd: i32, command: &[std::ffi::OsString]) -> u8 {
    use std::io::Read;
    use std::os::fd::FromRawFd;
    use std::os::unix::process::CommandExt;
    // SAFETY: the guard passes the read end of a pipe it made for this process alone.
    let mut gate = unsafe { std::fs::File::from_raw_fd(gate_fd) };
    let mut opened = [0u8; GATE_OPEN.len()];
    let result = gate.read_exact(&mut opened);
    // Closed before the exec: the command must not inherit the gate.
    drop(gate);
    if result.is_err() || opened != GATE_OPEN {
        eprintln!(
            "reaper-operator guard: the guard went away before the command could start; not starting it"
        );
        return EXIT_LEASE_LOST;
    }
    let error = std::process::Command::new(&command[0])
        .args(&command[1..])
        .exec();
    eprintln!(
        "reaper-operator guard: cannot start {:?}: {error}",
        command[0]
    );
    // A shell's codes: 127 not found, 126 found but not runnable.
    if error.kind() == std::io::ErrorKind::NotFound {
        127
    } else {
        126
    }
}

type Signals = Vec<(tokio::signal::unix::SignalKind, tokio::signal::unix::Signal)>;

/// The next of the signals the guard forwards.
async fn next_signal(signals: &mut Signals) -> tokio::signal::unix::SignalKind {
    let waits = signals.iter_mut().map(|(kind, s)| {
        let kind = *kind;
        Box::pin(async move {
            s.recv().await;
            kind
        })
    });
    futures::future::select_all(waits).await.0
}

/// Settings of `guard`.
#[derive(Clone, Debug)]
pub struct GuardSettings {
    pub lease: LeaseName,
    pub cluster: ClusterName,
    pub poll: Duration,
    pub grace: Duration,
    pub margin: Duration,
    pub command: Vec<std::ffi::OsString>,
}

/// Runs the guard to the end; returns the process exit code: the child's own, or
/// [`EXIT_LEASE_LOST`] when the guard stopped it.
pub async fn run(
    settings: GuardSettings,
    store: crate::lease::LeaseStore,
    wake: std::sync::Arc<tokio::sync::Notify>,
) -> anyhow::Result<u8> {
    check_proc().map_err(|reason| anyhow::anyhow!(reason))?;
    let mut signals = forwarded_signals()?;
    // 1. Wait until this cluster holds the lease (a pod started during a handover), with
    //    time enough left to start the command.
    let confirmation = match wait_for_lease(&settings, &store, &wake, &mut signals).await? {
        ControlFlow::Continue(confirmation) => confirmation,
        ControlFlow::Break(code) => return Ok(code),
    };

    // 2. Start the child in a process group of its own, behind a gate; then the
    //    watchdog; then open the gate. The command cannot act before a watchdog holds
    //    its kill instant, even if this process freezes or dies in between.
    let epoch = confirmation.epoch.unwrap_or_default();
    let (mut child, gate_write) = spawn_behind_gate(&settings, &confirmation, epoch)?;
    let pgid = child.id().expect("a running child has a pid") as i32;
    let watchdog =
        match start_watchdog_then_open_gate(&settings, &confirmation, &mut child, pgid, gate_write)
            .await?
        {
            ControlFlow::Continue(watchdog) => watchdog,
            ControlFlow::Break(code) => return Ok(code),
        };
    tracing::info!(lease = %settings.lease, epoch, holder = %confirmation.holder, pgid, "command started");

    // 3. Keep confirming; stop the child when that fails.
    let mut command = GuardedCommand {
        child,
        pgid,
        watchdog,
        confirmation,
    };
    let stop = match command
        .keep_confirming(&settings, &store, &wake, &mut signals)
        .await
    {
        Ended::CommandExited(status) => return command.after_exit(status),
        Ended::MustStop(reason) => reason,
    };

    // 4. Stop: SIGTERM now, SIGKILL after the grace or at the kill instant, if sooner.
    Ok(command.stop(stop, &settings).await)
}

/// Listens to the signals the guard forwards to the command (before the command starts,
/// each of them ends the guard).
fn forwarded_signals() -> anyhow::Result<Signals> {
    use tokio::signal::unix::{SignalKind, signal};
    let kinds = [
        SignalKind::terminate(),
        SignalKind::interrupt(),
        SignalKind::hangup(),
        SignalKind::quit(),
        SignalKind::user_defined1(),
        SignalKind::user_defined2(),
    ];
    let mut signals: Signals = Vec::new();
    for kind in kinds {
        signals.push((kind, signal(kind)?));
    }
    Ok(signals)
}

/// Reads the lease until a read confirms it with time enough left to start the command:
/// that confirmation, or the exit code when a signal comes first.
async fn wait_for_lease(
    settings: &GuardSettings,
    store: &crate::lease::LeaseStore,
    wake: &tokio::sync::Notify,
    signals: &mut Signals,
) -> anyhow::Result<ControlFlow<u8, Confirmation>> {
    let mut checked_ttl = None;
    let confirmation = loop {
        let sent = clock_now();
        match store.get(&settings.lease).await {
            Ok(lease) => {
                let reading = Reading::of(lease.as_ref(), settings.cluster.as_str());
                match (&reading, lease) {
                    (Reading::Confirmed { .. }, Some(lease)) => {
                        if checked_ttl != Some(lease.ttl) {
                            check_timing(lease.ttl, settings.grace, settings.margin, settings.poll)
                                .map_err(|reason| anyhow::anyhow!(reason))?;
                            checked_ttl = Some(lease.ttl);
                        }
                        let mut fresh = Confirmation::default();
                        fresh
                            .apply(sent, &reading, settings.margin)
                            .expect("a first confirming read always applies");
                        // Time enough to start the watchdog and the command before the
                        // first SIGTERM instant; otherwise wait for a renewal.
                        let allowance = settings.poll.max(START_ALLOWANCE);
                        if fresh
                            .term_at(settings.grace)
                            .is_some_and(|t| clock_now() + allowance < t)
                        {
                            break fresh;
                        }
                        tracing::info!(
                            ?reading,
                            "the lease is about to expire; waiting for a renewal"
                        );
                    }
                    _ => tracing::info!(
                        lease = %settings.lease, cluster = %settings.cluster, ?reading,
                        "waiting for this cluster to hold the lease before starting the command"
                    ),
                }
            }
            // Retrying cannot fix these: exit with the reason (the pod shows it).
            Err(error) if error.needs_a_person() => {
                anyhow::bail!(
                    "cannot read the lease: {}",
                    crate::cli::describe_error(&error)
                )
            }
            Err(error) => tracing::warn!(%error, "cannot read the lease; retrying"),
        }
        tokio::select! {
            _ = tokio::time::sleep(settings.poll) => {}
            _ = wake.notified() => {}
            kind = next_signal(signals) => {
                tracing::info!(signal = kind.as_raw_value(), "signal before the command started; exiting");
                return Ok(ControlFlow::Break((128 + kind.as_raw_value()) as u8));
            }
        }
    };
    Ok(ControlFlow::Continue(confirmation))
}

/// Starts the command (through `guard-exec`) in a session of its own, held behind a gate
/// until the guard writes [`GATE_OPEN`]: the child, and the write end of its gate.
fn spawn_behind_gate(
    settings: &GuardSettings,
    confirmation: &Confirmation,
    epoch: i64,
) -> anyhow::Result<(tokio::process::Child, std::os::fd::OwnedFd)> {
    let (gate_read, gate_write) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?;
    let gate_fd = std::os::fd::AsRawFd::as_raw_fd(&gate_read);
    // /proc/self/exe: still this binary when a new copy replaced the file.
    let mut gated = tokio::process::Command::new("/proc/self/exe");
    gated
        .arg0("reaper-operator")
        .arg("guard-exec")
        .args(["--gate-fd", &gate_fd.to_string(), "--"])
        .args(&settings.command)
        .env("REAPER_LEASE_NAME", settings.lease.as_str())
        .env("REAPER_LEASE_EPOCH", epoch.to_string())
        .env("REAPER_HOLDER", &confirmation.holder)
        .kill_on_drop(true);
    // A session of its own, so `setpgid` in the command cannot take a process out of
    // reach (signal_command). SAFETY: only setsid and fcntl, which are
    // async-signal-safe, run between fork and exec.
    unsafe {
        gated.pre_exec(move || {
            nix::unistd::setsid()?;
            let fd = std::os::fd::BorrowedFd::borrow_raw(gate_fd);
            nix::fcntl::fcntl(
                fd,
                nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::empty()),
            )
            .map(|_| ())
            .map_err(std::io::Error::from)
        });
    }
    let child = gated
        .spawn()
        .map_err(|e| anyhow::anyhow!("cannot start {:?}: {e}", settings.command[0]))?;
    // Only the gate keeps the read end: this process exiting closes the gate for good.
    drop(gate_read);
    Ok((child, gate_write))
}

/// Starts the watchdog with the confirmation's kill instant, then opens the gate: the
/// watchdog, or the exit code when the command must not start (it is then killed).
async fn start_watchdog_then_open_gate(
    settings: &GuardSettings,
    confirmation: &Confirmation,
    child: &mut tokio::process::Child,
    pgid: i32,
    gate_write: std::os::fd::OwnedFd,
) -> anyhow::Result<ControlFlow<u8, WatchdogLink>> {
    let first_term_at = confirmation.term_at(settings.grace).unwrap_or_default();
    let started = tokio::task::block_in_place(|| {
        WatchdogLink::start(
            pgid,
            settings.grace,
            confirmation.kill_at.expect("confirmed"),
            first_term_at,
        )
    });
    let watchdog = match started {
        Ok(watchdog) => watchdog,
        Err(e) => {
            signal_command(pgid, Signal::SIGKILL);
            let _ = child.wait().await;
            if clock_now() >= first_term_at {
                // Slow (or frozen) past the bound: like a lost lease, not a setup error.
                let _ = writeln!(
                    std::io::stderr(),
                    "reaper-operator guard: did not start the command ({e}): {}",
                    StopReason::Unconfirmed
                );
                return Ok(ControlFlow::Break(EXIT_LEASE_LOST));
            }
            anyhow::bail!("cannot start the guard's watchdog: {e}");
        }
    };
    // Frozen or slow since the confirming read, or the gate already killed: the command
    // never starts.
    let opened = if clock_now() >= first_term_at {
        Err(std::io::Error::other("too late"))
    } else {
        std::fs::File::from(gate_write).write_all(GATE_OPEN)
    };
    if let Err(error) = opened {
        signal_command(pgid, Signal::SIGKILL);
        let _ = child.wait().await;
        watchdog.finish();
        eprintln!(
            "reaper-operator guard: did not start the command ({error}): {}",
            StopReason::Unconfirmed
        );
        return Ok(ControlFlow::Break(EXIT_LEASE_LOST));
    }
    Ok(ControlFlow::Continue(watchdog))
}

/// The started command, and what the guard holds to stop it in time.
struct GuardedCommand {
    child: tokio::process::Child,
    /// The command's session, which is also its process group.
    pgid: i32,
    watchdog: WatchdogLink,
    confirmation: Confirmation,
}

/// How [`GuardedCommand::keep_confirming`] ended.
enum Ended {
    /// The command exited by itself (or waiting for it failed).
    CommandExited(std::io::Result<ExitStatus>),
    /// The lease can no longer be confirmed.
    MustStop(StopReason),
}

impl GuardedCommand {
    /// Reads the lease every poll interval (and on a wake) while the command runs,
    /// forwarding signals to it, until it exits or must stop.
    async fn keep_confirming(
        &mut self,
        settings: &GuardSettings,
        store: &crate::lease::LeaseStore,
        wake: &tokio::sync::Notify,
        signals: &mut Signals,
    ) -> Ended {
        let mut ticker = tokio::time::interval(settings.poll);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_sent = clock_now();
        let stop = loop {
            let term_at = self
                .confirmation
                .term_at(settings.grace)
                .unwrap_or_default();
            let until_term = term_at.saturating_sub(clock_now());
            tokio::select! {
                status = self.child.wait() => return Ended::CommandExited(status),
                kind = next_signal(signals) => {
                    // Forwarded; the lease is still enforced while the child shuts down.
                    if let Ok(signal) = Signal::try_from(kind.as_raw_value()) {
                        signal_command(self.pgid, signal);
                    }
                    continue;
                }
                _ = tokio::time::sleep(until_term) => {
                    if clock_now() >= term_at {
                        break StopReason::Unconfirmed;
                    }
                    continue;
                }
                _ = ticker.tick() => {}
                _ = wake.notified() => {
                    // Notifications anybody can send must not turn into back-to-back reads.
                    let earliest = (last_sent + MIN_WAKE_SPACING).min(term_at);
                    tokio::time::sleep(earliest.saturating_sub(clock_now())).await;
                }
            }
            if let Err(error) = self.watchdog.check() {
                tracing::error!(%error, "the guard's watchdog cannot be relied on");
                break StopReason::NoWatchdog;
            }
            // A guard that was frozen must not trust a read it sends now to cover the time
            // it lost: the bound only ever comes from the read's own send instant.
            let sent = clock_now();
            if sent >= term_at {
                break StopReason::Unconfirmed;
            }
            last_sent = sent;
            if let Err(reason) = self.confirm(settings, store, sent, term_at).await {
                break reason;
            }
        };
        Ended::MustStop(stop)
    }

    /// Reads the lease (the read sent at `sent`) and applies what it says; a confirming
    /// read moves the watchdog's kill instant. An error says why the command must stop;
    /// a read that fails changes nothing.
    async fn confirm(
        &mut self,
        settings: &GuardSettings,
        store: &crate::lease::LeaseStore,
        sent: Duration,
        term_at: Duration,
    ) -> Result<(), StopReason> {
        // A slow read must not delay the SIGTERM instant (the watchdog holds SIGKILL's).
        let result = tokio::select! {
            result = store.get(&settings.lease) => result,
            _ = tokio::time::sleep(term_at.saturating_sub(sent)) => return Err(StopReason::Unconfirmed),
        };
        let reading = match result {
            Ok(lease) => Reading::of(lease.as_ref(), settings.cluster.as_str()),
            Err(error) => {
                tracing::warn!(%error, "cannot read the lease");
                return Ok(());
            }
        };
        let previous = self.confirmation.epoch;
        self.confirmation.apply(sent, &reading, settings.margin)?;
        if self.confirmation.epoch != previous {
            tracing::info!(epoch = ?self.confirmation.epoch, holder = %self.confirmation.holder, "a replica of this cluster took the lease over");
        }
        if let Some(kill_at) = self.confirmation.kill_at
            && let Err(error) = self.watchdog.extend(kill_at)
        {
            tracing::error!(%error, "the guard's watchdog cannot be reached");
            return Err(StopReason::NoWatchdog);
        }
        Ok(())
    }

    /// The command exited by itself: kills what it left in its session and ends the
    /// watchdog; returns the guard's exit code.
    fn after_exit(self, status: std::io::Result<ExitStatus>) -> anyhow::Result<u8> {
        let status = match status {
            Ok(status) => status,
            Err(error) => {
                signal_command(self.pgid, Signal::SIGKILL);
                self.watchdog.finish();
                return Err(error.into());
            }
        };
        // Background processes it left in its group must not outlive the guard.
        signal_command(self.pgid, Signal::SIGKILL);
        if self.watchdog.finish() == Some(EXIT_LEASE_LOST) {
            // The watchdog killed it while this process could not run (frozen).
            eprintln!(
                "reaper-operator guard: the watchdog stopped the command: {}",
                StopReason::Unconfirmed
            );
            return Ok(EXIT_LEASE_LOST);
        }
        tracing::info!(?status, "command exited");
        Ok(exit_code(status))
    }

    /// Stops the command for `reason`: SIGTERM now, SIGKILL after the grace or at the kill
    /// instant, if sooner. Returns [`EXIT_LEASE_LOST`].
    async fn stop(mut self, reason: StopReason, settings: &GuardSettings) -> u8 {
        tracing::warn!(reason = %reason, pgid = self.pgid, "stopping the command");
        let kill_at = self
            .confirmation
            .kill_at
            .unwrap_or_default()
            .min(clock_now() + settings.grace);
        // The watchdog keeps this instant too, in case this process freezes while waiting.
        let _ = self.watchdog.extend(kill_at);
        signal_command(self.pgid, Signal::SIGTERM);
        let waited =
            tokio::time::timeout(kill_at.saturating_sub(clock_now()), self.child.wait()).await;
        if waited.is_err() {
            signal_command(self.pgid, Signal::SIGKILL);
            let _ = self.child.wait().await;
        }
        // Whatever else is left in the group.
        signal_command(self.pgid, Signal::SIGKILL);
        self.watchdog.finish();
        eprintln!("reaper-operator guard: stopped the command: {reason}");
        EXIT_LEASE_LOST
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::Utc;

    fn lease(holder: &str, epoch: i64, remaining_ms: i64) -> Lease {
        let now = Utc::now();
        Lease {
            name: "ns.r".into(),
            holder: holder.into(),
            epoch,
            ttl: Duration::from_secs(15),
            acquired_at: now,
            renewed_at: now,
            expires_at: now + chrono::Duration::milliseconds(remaining_ms),
            previous_holder: String::new(),
            observed_at: now,
            on_current_timeline: true,
        }
    }

    const MARGIN: Duration = Duration::from_millis(500);

    #[test]
    fn only_an_unexpired_holder_of_this_cluster_confirms() {
        assert_eq!(
            Reading::of(Some(&lease("east/op-1", 4, 9000)), "east"),
            Reading::Confirmed {
                holder: "east/op-1".into(),
                epoch: 4,
                remaining: Duration::from_secs(9)
            }
        );
        assert_eq!(
            Reading::of(Some(&lease("west/op-1", 5, 9000)), "east"),
            Reading::Elsewhere {
                holder: "west/op-1".into(),
                epoch: 5
            }
        );
        // A cluster whose name is a prefix of ours is another cluster.
        assert!(matches!(
            Reading::of(Some(&lease("eas/op-1", 5, 9000)), "east"),
            Reading::Elsewhere { .. }
        ));
        assert_eq!(
            Reading::of(Some(&lease("east/op-1", 4, -1)), "east"),
            Reading::NotHeld
        );
        assert_eq!(
            Reading::of(Some(&lease("", 4, 9000)), "east"),
            Reading::Free { epoch: 4 }
        );
        assert_eq!(Reading::of(None, "east"), Reading::NotHeld);
        // Acquired before a failover of the database: the holder may have lost it in the
        // history the failover dropped.
        let before_failover = Lease {
            on_current_timeline: false,
            ..lease("east/op-1", 4, 9000)
        };
        assert_eq!(
            Reading::of(Some(&before_failover), "east"),
            Reading::NotHeld
        );
    }

    #[test]
    fn the_kill_instant_is_the_latest_confirmation_minus_the_margin() {
        let mut c = Confirmation::default();
        let t0 = Duration::from_secs(100);
        let read = |epoch, remaining| Reading::Confirmed {
            holder: "east/op-1".into(),
            epoch,
            remaining: Duration::from_millis(remaining),
        };
        c.apply(t0, &read(4, 10_000), MARGIN).unwrap();
        assert_eq!(c.kill_at, Some(Duration::from_millis(109_500)));
        assert_eq!(
            c.term_at(Duration::from_secs(3)),
            Some(Duration::from_millis(106_500))
        );
        // Expired or missing after a confirmation: fail closed.
        assert_eq!(
            c.clone()
                .apply(t0 + Duration::from_secs(1), &Reading::NotHeld, MARGIN),
            Err(StopReason::Unconfirmed)
        );
        // Before any confirmation it proves nothing either way.
        assert_eq!(
            Confirmation::default().apply(t0, &Reading::NotHeld, MARGIN),
            Ok(())
        );
        // A frozen holder: later reads show less remaining, and the bound follows them.
        c.apply(t0 + Duration::from_secs(2), &read(4, 2_000), MARGIN)
            .unwrap();
        assert_eq!(c.kill_at, Some(Duration::from_millis(103_500)));
        // A peer of this cluster took over: one epoch up is fine.
        c.apply(t0 + Duration::from_secs(3), &read(5, 15_000), MARGIN)
            .unwrap();
        assert_eq!(c.epoch, Some(5));
    }

    #[test]
    fn a_cluster_named_like_the_start_of_another_does_not_confirm() {
        // "east" must not take "east-2"'s lease for its own, nor the other way round.
        let of_east_2 = lease("east-2/op-1", 4, 5000);
        assert!(!matches!(
            Reading::of(Some(&of_east_2), "east"),
            Reading::Confirmed { .. }
        ));
        let of_east = lease("east/op-1", 4, 5000);
        assert!(!matches!(
            Reading::of(Some(&of_east), "east-2"),
            Reading::Confirmed { .. }
        ));
        assert!(matches!(
            Reading::of(Some(&of_east_2), "east-2"),
            Reading::Confirmed { .. }
        ));
    }

    #[test]
    fn another_cluster_or_an_unseen_epoch_stops_the_child() {
        let mut c = Confirmation::default();
        let t0 = Duration::from_secs(100);
        let confirmed = |epoch| Reading::Confirmed {
            holder: "east/op-1".into(),
            epoch,
            remaining: Duration::from_secs(10),
        };
        c.apply(t0, &confirmed(4), MARGIN).unwrap();
        assert_eq!(
            c.apply(t0, &confirmed(6), MARGIN),
            Err(StopReason::EpochSkipped { from: 4, to: 6 })
        );
        assert_eq!(
            c.apply(t0, &confirmed(3), MARGIN),
            Err(StopReason::EpochSkipped { from: 4, to: 3 })
        );
        assert_eq!(
            c.apply(t0, &Reading::Free { epoch: 4 }, MARGIN),
            Err(StopReason::Released { epoch: 4 }),
            "a release by this cluster's holder stops the command at once"
        );
        assert!(matches!(
            c.apply(
                t0,
                &Reading::Elsewhere {
                    holder: "west/a".into(),
                    epoch: 5
                },
                MARGIN
            ),
            Err(StopReason::HeldElsewhere { .. })
        ));
    }

    #[test]
    fn timing_is_checked_against_the_ttl() {
        let s = Duration::from_secs;
        let ms = Duration::from_millis;
        assert!(check_timing(s(15), s(5), ms(500), s(1)).is_ok());
        let err = check_timing(s(15), s(10), ms(500), s(1)).unwrap_err();
        assert!(err.contains("ttl (15.0 s) is too short"), "{err}");
    }
}
