//! Command-line interface: flag definitions and the `migrate` / `lease` commands.

use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};
use serde::Serialize;

use crate::config::Schema;
use crate::lease::{ClusterName, Holder, Lease, LeaseName, LeaseStore};
use crate::telemetry::LogFormat;
use crate::{Error, Result};

/// Timeout for each database call made by a one-shot command.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, Parser)]
#[command(
    name = "reaper-operator",
    version,
    about = "Runs exactly one reaper, arbitrated by a PostgreSQL lease"
)]
pub struct Cli {
    #[command(flatten)]
    pub database: DatabaseArgs,

    /// Log format.
    #[arg(
        long,
        env = "REAPER_LOG_FORMAT",
        value_enum,
        default_value = "text",
        global = true
    )]
    pub log_format: LogFormat,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Args)]
pub struct DatabaseArgs {
    /// PostgreSQL URL, e.g. postgres://user:pass@host:5432/db (PgBouncer in transaction
    /// mode works for lease operations; `migrate` needs a direct connection).
    #[arg(long, env = "DATABASE_URL", hide_env_values = true, global = true)]
    pub database_url: Option<String>,

    /// Schema holding the lease tables (a plain identifier).
    #[arg(
        long,
        env = "REAPER_DB_SCHEMA",
        default_value = "public",
        global = true
    )]
    pub schema: String,
}

impl DatabaseArgs {
    pub fn schema(&self) -> Result<Schema> {
        Schema::new(&self.schema)
    }

    pub fn url(&self) -> Result<&str> {
        self.database_url.as_deref().ok_or_else(|| {
            Error::Config("no database URL: pass --database-url or set DATABASE_URL".into())
        })
    }
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the controller: hold leases, scale the singleton Deployments, serve probes.
    Run(RunArgs),
    /// Print the Reaper CustomResourceDefinition as YAML.
    Crdgen,
    /// Create or upgrade the lease tables in the schema (idempotent).
    Migrate,
    /// Inspect or operate a lease by hand (scripting, emergencies).
    Lease {
        #[command(subcommand)]
        command: LeaseCommand,
    },
    /// Run a command only while this cluster holds a lease; stop it (SIGTERM, then
    /// SIGKILL) as soon as that can no longer be confirmed (docs/guard.md).
    Guard(GuardArgs),
    /// Copy this binary to PATH (mode 0755), e.g. from an init container into an
    /// emptyDir: a file named `guard` then runs as `reaper-operator guard`, so a
    /// workload's command can become `/reaper/guard --lease … -- original command`.
    InstallGuard {
        /// Destination file, e.g. /reaper/guard.
        path: std::path::PathBuf,
    },
    /// The guard's watchdog (started by `guard`, not by hand).
    #[command(hide = true)]
    GuardWatchdog {
        #[arg(long)]
        pgid: i32,
        #[arg(long)]
        grace_ms: u64,
        #[arg(long)]
        kill_at_ns: u64,
    },
    /// The guard's gate (started by `guard`, not by hand): waits until the guard has
    /// started its watchdog, then becomes the command (exec, same process and group).
    #[command(hide = true)]
    GuardExec {
        #[arg(long)]
        gate_fd: i32,
        #[arg(last = true, required = true)]
        command: Vec<std::ffi::OsString>,
    },
}

#[derive(Debug, Args)]
pub struct GuardArgs {
    /// The lease row name (a Reaper's `status.leaseName`, e.g. `<namespace>.<reaper>`).
    #[arg(long, env = "REAPER_LEASE_NAME", value_parser = lease_name)]
    pub lease: LeaseName,

    /// This cluster's name (the operator's `--cluster-name`): the command runs only while
    /// a replica of this cluster holds the lease.
    #[arg(long = "cluster-name", env = "REAPER_CLUSTER_NAME", value_parser = cluster_name)]
    pub cluster_name: ClusterName,

    /// Direct PostgreSQL URL used only to LISTEN for lease changes (fast loss detection),
    /// for when --database-url points at PgBouncer in transaction mode.
    #[arg(long, env = "REAPER_LISTEN_DATABASE_URL", hide_env_values = true)]
    pub listen_database_url: Option<String>,

    /// How often the lease row is read (50 ms to an hour).
    #[arg(
        long,
        env = "REAPER_GUARD_POLL_INTERVAL_MS",
        default_value_t = 1000,
        value_parser = clap::value_parser!(u64).range(50..=3_600_000)
    )]
    pub poll_interval_ms: u64,

    /// Time between SIGTERM and SIGKILL when the guard stops the command. The command is
    /// sent SIGTERM this long before the lease could expire.
    #[arg(long, env = "REAPER_GUARD_GRACE_SECONDS", default_value_t = 5.0)]
    pub grace_seconds: f64,

    /// Safety margin subtracted from every bound (clock rate differences, kill latency);
    /// 50 ms to 10 minutes: the bound needs slack for the kill to land and for clock
    /// rates to differ.
    #[arg(
        long,
        env = "REAPER_GUARD_MARGIN_MS",
        default_value_t = 500,
        value_parser = clap::value_parser!(u64).range(50..=600_000)
    )]
    pub margin_ms: u64,

    /// The command and its arguments, after `--`.
    #[arg(required = true, last = true)]
    pub command: Vec<std::ffi::OsString>,
}

#[derive(Debug, Args)]
pub struct RunArgs {
    /// Name of this Kubernetes cluster; the lease holder is `<cluster-name>/<identity>`.
    /// Give every cluster that shares the database its own name: two clusters with one
    /// name look like one, and then nothing waits for the other's pod to stop. Without
    /// it the name is `default`, with a warning.
    #[arg(long, env = "REAPER_CLUSTER_NAME", value_parser = cluster_name)]
    pub cluster_name: Option<ClusterName>,

    /// This replica's identity (the pod name in a cluster). Default: `<hostname>-<pid>`.
    #[arg(long, env = "POD_NAME")]
    pub identity: Option<String>,

    /// Address of the HTTP server (`/healthz`, `/readyz`).
    #[arg(long, env = "REAPER_HTTP_ADDR", default_value = "0.0.0.0:8080")]
    pub http_addr: std::net::SocketAddr,

    /// Do not apply migrations at start (e.g. when --database-url is a transaction
    /// pooler; run `reaper-operator migrate` against a direct connection instead).
    #[arg(long, env = "REAPER_NO_MIGRATE")]
    pub no_migrate: bool,

    /// Direct PostgreSQL URL used only to LISTEN for lease notifications, for when
    /// --database-url points at PgBouncer in transaction mode. Default: --database-url.
    #[arg(long, env = "REAPER_LISTEN_DATABASE_URL", hide_env_values = true)]
    pub listen_database_url: Option<String>,

    /// Watch Reapers and Deployments in this namespace only (default: all namespaces).
    #[arg(long, env = "REAPER_WATCH_NAMESPACE")]
    pub watch_namespace: Option<String>,

    /// How long a shutdown waits for the workload's pods to stop before releasing.
    /// Keep it above the workload's stop time (its terminationGracePeriodSeconds), and
    /// the operator pod's terminationGracePeriodSeconds above this.
    #[arg(
        long,
        env = "REAPER_SHUTDOWN_TIMEOUT_SECONDS",
        default_value_t = 45,
        value_parser = clap::value_parser!(u64).range(1..=3600)
    )]
    pub shutdown_timeout_seconds: u64,

    /// How long a Kubernetes API call may wait for its response to begin. The client
    /// keeps connections open between calls; one that went silent (a restarted load
    /// balancer, a NAT entry dropped) would otherwise hold a call until TCP gives up,
    /// minutes later. Keep it above the API server's own `--request-timeout` (60 s by
    /// default): then no call is abandoned that the server could still carry out, and a
    /// scale-up the operator gave up on cannot land later. Watches are not cut by it
    /// (their response begins at once). The fence's scale-down has a tighter bound of
    /// its own.
    #[arg(
        long,
        env = "REAPER_KUBE_API_TIMEOUT_SECONDS",
        default_value_t = 70,
        value_parser = clap::value_parser!(u64).range(1..=3600)
    )]
    pub kube_api_timeout_seconds: u64,

    /// Use `spec.lease.name` as the lease row name as written, so Reapers of different
    /// namespaces can share one lease. Off by default: a Reaper's lease row is then
    /// always `<its namespace>.<name>`, and whoever may create Reapers in one namespace
    /// cannot hold down another namespace's singleton.
    #[arg(long, env = "REAPER_ALLOW_CROSS_NAMESPACE_LEASES")]
    pub allow_cross_namespace_leases: bool,
}

impl RunArgs {
    /// Checks every flag before anything starts.
    pub fn settings(&self, db: &DatabaseArgs) -> Result<crate::operator::Settings> {
        let cluster = match &self.cluster_name {
            Some(name) => name.clone(),
            None => {
                tracing::warn!(
                    "no --cluster-name (REAPER_CLUSTER_NAME): using \"default\". Every cluster that \
                     shares the lease database needs a name of its own, or the operator cannot \
                     tell their pods apart and may start a second reaper"
                );
                ClusterName::new("default")?
            }
        };
        let identity = match &self.identity {
            Some(id) => id.clone(),
            None => format!(
                "{}-{}",
                std::env::var("HOSTNAME")
                    .ok()
                    .filter(|h| !h.is_empty())
                    .or_else(|| std::fs::read_to_string("/etc/hostname")
                        .ok()
                        .map(|h| h.trim().to_owned()))
                    .unwrap_or_else(|| "reaper".into()),
                std::process::id()
            ),
        };
        // Its errors name the identity first ("identity ... must not ..."): say which flag.
        let holder = Holder::of(&cluster, &identity)
            .map_err(|e| Error::Config(format!("--{}", reason(e))))?;
        let database_url = db.url()?.to_owned();
        // Check the URLs (TLS settings and files included) now, so a typo stops the
        // process at start instead of failing every connection later.
        for url in std::iter::once(&database_url).chain(self.listen_database_url.as_ref()) {
            crate::lease::connect_options(url)?;
        }
        Ok(crate::operator::Settings {
            database_url,
            listen_database_url: self.listen_database_url.clone(),
            schema: db.schema()?,
            cluster,
            holder,
            http_addr: self.http_addr,
            migrate: !self.no_migrate,
            shutdown_timeout: Duration::from_secs(self.shutdown_timeout_seconds),
            kube_api_timeout: Duration::from_secs(self.kube_api_timeout_seconds),
            namespace: self.watch_namespace.clone().filter(|ns| !ns.is_empty()),
            lease_scope: if self.allow_cross_namespace_leases {
                crate::reaper::LeaseScope::Shared
            } else {
                crate::reaper::LeaseScope::Namespace
            },
        })
    }
}

/// `run`: the first SIGTERM/SIGINT starts a graceful handover, a second one exits at once.
pub async fn run(db: &DatabaseArgs, args: &RunArgs) -> anyhow::Result<Outcome> {
    let settings = args.settings(db)?;
    let stop = tokio_util::sync::CancellationToken::new();
    let first_signal = stop.clone();
    tokio::spawn(async move {
        use tokio::signal::unix::{SignalKind, signal};
        let (Ok(mut term), Ok(mut int)) = (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        ) else {
            // As before any signal: a replica that cannot be stopped gracefully stops now.
            tracing::error!("cannot install signal handlers; stopping");
            first_signal.cancel();
            return;
        };
        tokio::select! { _ = term.recv() => {}, _ = int.recv() => {} }
        tracing::info!("signal received: handing over (a second signal exits at once)");
        first_signal.cancel();
        tokio::select! { _ = term.recv() => {}, _ = int.recv() => {} }
        tracing::warn!("second signal: exiting without handover");
        std::process::exit(130);
    });
    crate::operator::run(settings, stop).await?;
    Ok(Outcome::Done)
}

#[derive(Debug, Subcommand)]
pub enum LeaseCommand {
    /// Take the lease if it is free or expired (epoch + 1).
    Acquire {
        #[command(flatten)]
        target: LeaseTarget,
        #[arg(
            long,
            default_value_t = 15,
            allow_negative_numbers = true,
            value_parser = clap::value_parser!(i64).range(1..=86_400)
        )]
        ttl_seconds: i64,
        #[arg(short = 'o', long, value_enum, default_value = "text")]
        output: Output,
    },
    /// Extend the lease held by HOLDER at EPOCH (fails once it expired).
    Renew {
        #[command(flatten)]
        target: LeaseTarget,
        #[arg(long, allow_negative_numbers = true, value_parser = clap::value_parser!(i64).range(1..))]
        epoch: i64,
        #[arg(short = 'o', long, value_enum, default_value = "text")]
        output: Output,
    },
    /// Free the lease held by HOLDER at EPOCH.
    Release {
        #[command(flatten)]
        target: LeaseTarget,
        #[arg(long, allow_negative_numbers = true, value_parser = clap::value_parser!(i64).range(1..))]
        epoch: i64,
        #[arg(short = 'o', long, value_enum, default_value = "text")]
        output: Output,
    },
    /// Show one lease, or all of them.
    Status {
        #[arg(long, value_parser = lease_name)]
        name: Option<LeaseName>,
        #[arg(short = 'o', long, value_enum, default_value = "text")]
        output: Output,
    },
}

/// The lease a `lease` subcommand changes, and for whom.
#[derive(Debug, Args)]
pub struct LeaseTarget {
    #[arg(long, value_parser = lease_name)]
    name: LeaseName,
    #[arg(long, value_parser = holder)]
    holder: Holder,
}

fn lease_name(value: &str) -> Result<LeaseName, String> {
    LeaseName::new(value).map_err(reason)
}

fn holder(value: &str) -> Result<Holder, String> {
    Holder::new(value).map_err(reason)
}

fn cluster_name(value: &str) -> Result<ClusterName, String> {
    ClusterName::new(value).map_err(reason)
}

/// Why a value was refused, without the "invalid configuration" its flag's error
/// already says.
fn reason(error: Error) -> String {
    match error {
        Error::Config(reason) => reason,
        other => other.to_string(),
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Output {
    Text,
    Json,
}

/// How a command ended, apart from errors (exit code 2).
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Exit 0.
    Done,
    /// Exit 1: someone else holds the lease, or you no longer do.
    NotDone,
    /// This exit code (`guard`: the command's own, or 3 when the guard stopped it).
    Exit(u8),
}

/// Exits for a command line clap refused. A bad value is refused in one line, like every
/// other bad input; help, the version and unknown flags are clap's own.
pub fn exit_on_parse_error(error: clap::Error) -> ! {
    use clap::error::ErrorKind;
    if matches!(
        error.kind(),
        ErrorKind::InvalidValue | ErrorKind::ValueValidation
    ) {
        let rendered = error.render().to_string();
        eprintln!("{}", rendered.lines().next().unwrap_or_default());
        std::process::exit(2);
    }
    error.exit()
}

/// Arguments as given, with `guard` inserted when the binary was invoked under that name
/// (the copy `install-guard` makes).
pub fn args_with_guard_alias() -> Vec<std::ffi::OsString> {
    let mut args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    let invoked_as_guard = args
        .first()
        .and_then(|a| std::path::Path::new(a).file_name())
        .is_some_and(|name| name == "guard");
    if invoked_as_guard {
        args[0] = "reaper-operator".into();
        args.insert(1, "guard".into());
    }
    args
}

/// `install-guard PATH`: copies the running binary (static in the image) to PATH,
/// through a temporary file in the same directory and a rename, so a restarted init
/// container never leaves a half-written `guard` behind.
pub fn install_guard(path: &std::path::Path) -> anyhow::Result<Outcome> {
    use std::os::unix::fs::PermissionsExt;
    let exe = std::env::current_exe()?;
    let file_name = path
        .file_name()
        .ok_or_else(|| anyhow::anyhow!("{} is not a file path", path.display()))?;
    let mut temporary_name = std::ffi::OsString::from(".");
    temporary_name.push(file_name);
    temporary_name.push(format!(".{}.tmp", std::process::id()));
    let temporary = path.with_file_name(temporary_name);
    let copied = std::fs::copy(&exe, &temporary)
        .and_then(|_| std::fs::set_permissions(&temporary, std::fs::Permissions::from_mode(0o755)))
        .and_then(|()| std::fs::File::open(&temporary)?.sync_all())
        .and_then(|()| std::fs::rename(&temporary, path));
    if let Err(e) = copied {
        let _ = std::fs::remove_file(&temporary);
        anyhow::bail!("cannot copy {} to {}: {e}", exe.display(), path.display());
    }
    eprintln!("installed the guard at {}", path.display());
    Ok(Outcome::Done)
}

/// `guard`: checks its flags, then runs the command under the lease.
pub async fn guard(db: &DatabaseArgs, args: GuardArgs) -> anyhow::Result<Outcome> {
    if !(0.0..=600.0).contains(&args.grace_seconds) {
        anyhow::bail!("--grace-seconds must be between 0 and 600");
    }
    let poll = Duration::from_millis(args.poll_interval_ms);
    let url = db.url()?;
    for url in std::iter::once(url).chain(args.listen_database_url.as_deref()) {
        url.parse::<sqlx::postgres::PgConnectOptions>()
            .map_err(|e| Error::Config(format!("database URL is not valid: {e}")))?;
    }
    // Reads of a running command are bounded by its deadline anyway; this only stops a
    // hung read (and opening a connection on a slow machine needs the time).
    let store = LeaseStore::connect_lazy(url, &db.schema()?, Duration::from_secs(2), 2)?;
    // A permit, not a queue: a flood of notifications costs one read, not one each.
    let wake = std::sync::Arc::new(tokio::sync::Notify::new());
    let wake_tx = wake.clone();
    let listen_url = args
        .listen_database_url
        .clone()
        .unwrap_or_else(|| url.to_owned());
    let lease_name = args.lease.clone();
    let listener = tokio::spawn(async move {
        // Wake-ups only speed up loss detection; the guard is safe without them (through
        // PgBouncer in transaction mode LISTEN cannot work and this just keeps retrying).
        loop {
            let ended: std::result::Result<(), sqlx::Error> = async {
                let mut listener = crate::lease::connect::listener(&listen_url).await?;
                listener.listen(crate::lease::NOTIFY_CHANNEL).await?;
                loop {
                    let n = listener.recv().await?;
                    if lease_name == n.payload() {
                        wake_tx.notify_one();
                    }
                }
            }
            .await;
            if let Err(error) = ended {
                tracing::debug!(%error, "LISTEN for wake-ups failed; retrying in 5 s");
            }
            tokio::time::sleep(Duration::from_secs(5)).await;
        }
    });
    let settings = crate::guard::GuardSettings {
        lease: args.lease,
        cluster: args.cluster_name,
        poll,
        grace: Duration::from_secs_f64(args.grace_seconds),
        margin: Duration::from_millis(args.margin_ms),
        command: args.command,
    };
    let code = crate::guard::run(settings, store, wake).await;
    listener.abort();
    Ok(Outcome::Exit(code?))
}

pub async fn migrate(db: &DatabaseArgs) -> Result<Outcome> {
    let schema = db.schema()?;
    let store = LeaseStore::connect(db.url()?, &schema, COMMAND_TIMEOUT, 1).await?;
    store.migrate().await?;
    eprintln!("schema {schema} is up to date");
    Ok(Outcome::Done)
}

pub async fn lease(db: &DatabaseArgs, command: LeaseCommand) -> Result<Outcome> {
    // Validate everything before touching the database.
    let schema = db.schema()?;
    let url = db.url()?;
    let store = LeaseStore::connect(url, &schema, COMMAND_TIMEOUT, 1).await?;
    match command {
        LeaseCommand::Acquire {
            target: LeaseTarget { name, holder },
            ttl_seconds,
            output,
        } => acquire(&store, &name, &holder, ttl_seconds, output).await,
        LeaseCommand::Renew {
            target: LeaseTarget { name, holder },
            epoch,
            output,
        } => match store.renew(&name, &holder, epoch).await? {
            Some(lease) => {
                print_lease(&lease, output);
                Ok(Outcome::Done)
            }
            None => {
                eprintln!(
                    "not renewed: {holder:?} does not hold lease {name:?} at epoch {epoch} \
                     (taken over, released or expired)"
                );
                Ok(Outcome::NotDone)
            }
        },
        LeaseCommand::Release {
            target: LeaseTarget { name, holder },
            epoch,
            output,
        } => match store.release(&name, &holder, epoch).await? {
            Some(lease) => {
                print_lease(&lease, output);
                Ok(Outcome::Done)
            }
            None => {
                eprintln!("not released: {holder:?} does not hold lease {name:?} at epoch {epoch}");
                Ok(Outcome::NotDone)
            }
        },
        LeaseCommand::Status {
            name: Some(name),
            output,
        } => match store.get(&name).await? {
            Some(lease) => {
                print_lease(&lease, output);
                Ok(Outcome::Done)
            }
            None => {
                eprintln!("lease {name:?} does not exist (it is created by the first acquire)");
                Ok(Outcome::NotDone)
            }
        },
        LeaseCommand::Status { name: None, output } => {
            let leases = store.list().await?;
            match output {
                Output::Json => {
                    let leases: Vec<LeaseJson> = leases.iter().map(LeaseJson::from).collect();
                    println!("{}", to_json(&leases));
                }
                Output::Text => print_table(&leases),
            }
            Ok(Outcome::Done)
        }
    }
}

/// `lease acquire`; when refused, says why on stderr.
async fn acquire(
    store: &LeaseStore,
    name: &LeaseName,
    holder: &Holder,
    ttl_seconds: i64,
    output: Output,
) -> Result<Outcome> {
    let ttl = Duration::from_secs(ttl_seconds as u64);
    match store.acquire(name, holder, ttl).await? {
        Some(lease) => {
            print_lease(&lease, output);
            Ok(Outcome::Done)
        }
        None => {
            let current = store.get(name).await?;
            match &current {
                Some(lease) if lease.is_held() => {
                    eprintln!(
                        "lease {name:?} is held by {:?} (epoch {}) until {}",
                        lease.holder,
                        lease.epoch,
                        lease.expires_at.to_rfc3339()
                    );
                    print_lease(lease, output);
                }
                Some(lease) if !lease.on_current_timeline => {
                    eprintln!(
                        "lease {name:?} cannot be acquired yet: the database failed \
                         over recently, and nothing is acquired until a ttl after \
                         the new primary first saw an acquire (try again then)"
                    );
                    print_lease(lease, output);
                }
                Some(lease) => {
                    eprintln!(
                        "lease {name:?} changed hands while it was being acquired, \
                         or the database failed over recently: try again"
                    );
                    print_lease(lease, output);
                }
                None => eprintln!(
                    "lease {name:?} cannot be acquired yet: the database failed over \
                     recently (try again in a ttl)"
                ),
            }
            Ok(Outcome::NotDone)
        }
    }
}

/// Adds the hint a person needs when the tables are missing, or when the connection
/// failed for a reason a bare driver error hides (an untrusted TLS certificate, a server
/// that accepts only TLS; see [`crate::lease::connection_hint`]).
pub fn describe_error(err: &Error) -> String {
    if err.is_missing_schema() {
        return format!(
            "{err} (the lease tables do not exist: run `reaper-operator migrate` first)"
        );
    }
    let mut inner = err;
    while let Error::Shared(shared) = inner {
        inner = shared;
    }
    let hint = match inner {
        Error::Database(db) => crate::lease::connection_hint(db),
        Error::Migrate(sqlx::migrate::MigrateError::Execute(db)) => {
            crate::lease::connection_hint(db)
        }
        _ => None,
    };
    match hint {
        Some(hint) => format!("cannot connect to the database: {hint} ({err})"),
        None => err.to_string(),
    }
}

/// The JSON shape of a lease, shared by every `-o json` output.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct LeaseJson<'a> {
    name: &'a str,
    holder: &'a str,
    epoch: i64,
    ttl_seconds: f64,
    acquired_at: String,
    renewed_at: String,
    expires_at: String,
    previous_holder: &'a str,
    state: &'static str,
    observed_at: String,
}

impl<'a> From<&'a Lease> for LeaseJson<'a> {
    fn from(lease: &'a Lease) -> Self {
        Self {
            name: &lease.name,
            holder: &lease.holder,
            epoch: lease.epoch,
            ttl_seconds: lease.ttl.as_secs_f64(),
            acquired_at: lease.acquired_at.to_rfc3339(),
            renewed_at: lease.renewed_at.to_rfc3339(),
            expires_at: lease.expires_at.to_rfc3339(),
            previous_holder: &lease.previous_holder,
            state: state(lease),
            observed_at: lease.observed_at.to_rfc3339(),
        }
    }
}

fn to_json(value: &impl Serialize) -> String {
    serde_json::to_string(value).expect("plain data serializes")
}

fn state(lease: &Lease) -> &'static str {
    if lease.is_free() {
        "free"
    } else if !lease.on_current_timeline {
        // Acquired before a failover of the database: nobody can renew it, and it can
        // be taken once a ttl has passed since the new primary first saw an acquire.
        "lost-in-failover"
    } else if lease.is_expired() {
        "expired"
    } else {
        "held"
    }
}

fn print_lease(lease: &Lease, output: Output) {
    match output {
        Output::Json => println!("{}", to_json(&LeaseJson::from(lease))),
        Output::Text => print_table(std::slice::from_ref(lease)),
    }
}

fn print_table(leases: &[Lease]) {
    let rows: Vec<[String; 6]> = leases
        .iter()
        .map(|l| {
            [
                l.name.clone(),
                if l.holder.is_empty() {
                    "-".into()
                } else {
                    l.holder.clone()
                },
                l.epoch.to_string(),
                state(l).to_owned(),
                format!("{}s", l.ttl.as_secs_f64()),
                if l.is_free() {
                    "-".into()
                } else {
                    l.expires_at
                        .to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
                },
            ]
        })
        .collect();
    let header = ["NAME", "HOLDER", "EPOCH", "STATE", "TTL", "EXPIRES"];
    let mut widths = header.map(str::len);
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.len());
        }
    }
    let line = |cells: [&str; 6]| {
        let padded: Vec<String> = cells
            .iter()
            .zip(widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        println!("{}", padded.join("   ").trim_end());
    };
    line(header);
    for row in &rows {
        line(row.each_ref().map(String::as_str));
    }
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::*;

    /// clap's own checks of the definition (conflicting names, bad defaults, ranges):
    /// otherwise they run only when a user reaches the broken subcommand.
    #[test]
    fn the_command_line_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn a_lease_prints_as_the_documented_json() {
        let at = chrono::DateTime::parse_from_rfc3339("2026-01-02T03:04:05Z")
            .unwrap()
            .with_timezone(&chrono::Utc);
        let lease = Lease {
            name: "jobs.reaper".into(),
            holder: "east/op-1".into(),
            epoch: 7,
            ttl: Duration::from_secs(15),
            acquired_at: at,
            renewed_at: at,
            expires_at: at + chrono::Duration::seconds(15),
            previous_holder: "west/op-2".into(),
            observed_at: at,
            on_current_timeline: true,
        };
        let json: serde_json::Value =
            serde_json::from_str(&to_json(&LeaseJson::from(&lease))).unwrap();
        assert_eq!(json["name"], "jobs.reaper");
        assert_eq!(json["holder"], "east/op-1");
        assert_eq!(json["epoch"], 7);
        assert_eq!(json["ttlSeconds"], 15.0);
        assert_eq!(json["acquiredAt"], "2026-01-02T03:04:05+00:00");
        assert_eq!(json["expiresAt"], "2026-01-02T03:04:20+00:00");
        assert_eq!(json["previousHolder"], "west/op-2");
        assert_eq!(json["observedAt"], "2026-01-02T03:04:05+00:00");
        assert_eq!(json.as_object().unwrap().len(), 10);
    }
}
