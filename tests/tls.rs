//! PostgreSQL and PgBouncer over TLS, and PgBouncers with a default configuration, with
//! real servers and the real binary.
//!
//! The numbered cases share a set-up (support::trials), made by the first of them: a PKI
//! made with the `openssl` command at test time (nothing is committed): a CA, a server
//! certificate for 127.0.0.1 and localhost, client certificates for the role
//! `reaper_cert` with keys in the three formats rustls reads, an unrelated second CA with
//! a client certificate of its own, and a CA with the first one's name but another key;
//! and a PostgreSQL and PgBouncers of their own, started with `REAPER_DB_TLS_DIR=...
//! tests/db/up.sh`: `ssl=on`, a `hostssl`-only pg_hba.conf (`hostnossl ... reject`),
//! PgBouncer with `client_tls_sslmode=require` and `server_tls_sslmode=verify-full`. The
//! cases run in order (each runs even when an earlier one failed), then the servers stop:
//!
//! 1. `sslmode=verify-full` with the right CA: lease operations (acquire, renew, release)
//!    directly and through PgBouncer, on server connections that really are TLS; no
//!    `sslmode` (prefer) also ends up on TLS.
//! 2. `LISTEN` over TLS, with the connect options the operator uses.
//! 3. The binary: `migrate` and `lease acquire/renew/status/release`, with verify-full.
//! 4. A wrong CA is refused, and the message says the certificate is not trusted: an
//!    unrelated CA, and one with the right name but another key.
//! 5. Plaintext (`sslmode=disable`) is refused by the server (pg_hba) and by PgBouncer,
//!    and the message says TLS is required.
//! 6. The host name: verify-full refuses 127.0.0.2 (not in the certificate); verify-ca
//!    accepts it when `SSL_CERT_FILE` narrows the trust store, and is refused without.
//! 7. Client certificates (pg_hba `cert`): keys in PKCS#8, SEC1 and PKCS#1 work; no
//!    certificate, one from another CA, and an encrypted key are refused clearly.
//! 8. What TLS costs a renew and a new connection (printed, not asserted).
//!
//! The other tests use the shared database of `tests/db/up.sh` (as `make test` starts it),
//! whose two PgBouncers have no `ignore_startup_parameters`: the transaction-mode one,
//! and a stock one (session mode). Both refuse sqlx's default connect options and serve
//! the operator's; the stock one also runs migrations.

mod support;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Output};
use std::time::{Duration, Instant};
use support::id;

use anyhow::{Context, Result, anyhow, bail, ensure};
use reaper_operator::cli::describe_error;
use reaper_operator::config::Schema;
use reaper_operator::lease::{LeaseStore, NOTIFY_CHANNEL, connect_options, connection_hint};
use serde_json::Value;
use support::cluster::repo_root;
use support::db;
use support::trials::Suite;

const BIN: &str = env!("CARGO_BIN_EXE_reaper-operator");
const CALL: Duration = Duration::from_secs(10);
const TTL: Duration = Duration::from_secs(60);

fn main() -> ExitCode {
    let suite = Suite::new(set_up);
    // The two on the shared database first: without it, the binary stops with one line
    // before it makes a PKI and starts servers.
    let trials = vec![
        suite.test(
            "default_pgbouncers_refuse_sqlx_defaults_and_serve_the_operator",
            default_pgbouncers_refuse_sqlx_defaults_and_serve_the_operator,
        ),
        suite.test(
            "stock_pgbouncer_in_session_mode_runs_migrations_and_lease_operations",
            stock_pgbouncer_in_session_mode_runs_migrations_and_lease_operations,
        ),
        suite.case("1 verify-full: lease operations", Ctx::lease_operations),
        suite.case("2 LISTEN over TLS", Ctx::listen),
        suite.case("3 the binary", Ctx::binary),
        suite.case("4 wrong CA", Ctx::wrong_ca),
        suite.case("5 plaintext", Ctx::plaintext),
        suite.case("6 host name", Ctx::host_name),
        suite.case("7 client certificates", Ctx::client_certificates),
        suite.case("8 cost", Ctx::cost),
    ];
    suite.run(trials, async |ctx: Ctx| {
        let Ctx { s, pki } = ctx;
        drop(s);
        drop(pki);
        Ok(())
    })
}

/// The PKI and the TLS-only servers of the numbered cases.
async fn set_up() -> Result<Ctx> {
    let started = Instant::now();
    let pki = Pki::generate().context("cannot make the test PKI")?;
    let servers = TlsServers::start(&pki).context("cannot start the TLS-only database")?;
    eprintln!(
        "PKI and TLS-only servers ready in {:.1?}",
        started.elapsed()
    );
    Ok(Ctx { s: servers, pki })
}

/// sqlx's own defaults send `extra_float_digits`, which a PgBouncer refuses unless
/// told to ignore it; the operator's connect options do not. This also shows that the
/// test PgBouncers really run without `ignore_startup_parameters`.
async fn default_pgbouncers_refuse_sqlx_defaults_and_serve_the_operator() {
    use sqlx::Connection as _;
    for (label, url) in [
        ("transaction mode", db::url(db::Via::PgBouncer)),
        ("stock, session mode", session_url()),
    ] {
        let refused = sqlx::PgConnection::connect(&url)
            .await
            .err()
            .unwrap_or_else(|| panic!("{label}: PgBouncer accepted extra_float_digits"));
        assert!(
            refused
                .to_string()
                .contains("unsupported startup parameter: extra_float_digits"),
            "{label}: {refused}"
        );
        let hint = connection_hint(&refused).unwrap_or_default();
        assert!(
            hint.contains("PgBouncer refuses the startup parameter \"extra_float_digits\""),
            "{label}: {hint}"
        );
        let mut conn = sqlx::PgConnection::connect_with(&db::options(&url))
            .await
            .unwrap_or_else(|e| panic!("{label}: {e}"));
        let one: i32 = db::scalar(&mut conn, "SELECT 1").await.unwrap();
        assert_eq!(one, 1);
        conn.close().await.unwrap();
    }
}

/// A PgBouncer with a stock configuration (session mode) serves the binary end to end:
/// `migrate` too, which needs a session (sqlx takes a session advisory lock).
async fn stock_pgbouncer_in_session_mode_runs_migrations_and_lease_operations() {
    let url = session_url();
    let schema = db::unique_schema("stock").to_string();
    let no_env: [(&str, &str); 0] = [];
    let out = cli(&url, &schema, &["migrate"], no_env);
    assert_eq!(code(&out), 0, "migrate: {}", stderr(&out));
    lease_cycle(&url, &schema, "stock", no_env).unwrap();

    let store = LeaseStore::connect(&url, &Schema::new(&schema).unwrap(), CALL, 2)
        .await
        .unwrap();
    store_cycle(&store, "stock-lib").await.unwrap();
}

fn session_url() -> String {
    db::env_url("REAPER_TEST_PGBOUNCER_SESSION_URL")
}

/// The servers stop (on drop) before the PKI's directory goes.
struct Ctx {
    s: TlsServers,
    pki: Pki,
}

impl Ctx {
    fn verify_full(&self) -> String {
        format!(
            "sslmode=verify-full&sslrootcert={}",
            self.pki.path("ca.crt").display()
        )
    }

    /// A migrated schema of its own, made on a direct verify-full connection.
    async fn migrated(&self, prefix: &str) -> Result<Schema> {
        let schema = db::unique_schema(prefix);
        let url = self.s.url(self.s.pg_port, &self.verify_full());
        let admin = LeaseStore::connect(&url, &schema, CALL, 1).await?;
        admin.migrate().await?;
        admin.pool().close().await;
        Ok(schema)
    }

    async fn lease_operations(&self) -> Result<()> {
        let schema = self.migrated("tls").await?;
        for (path, port) in self.s.paths() {
            let store =
                LeaseStore::connect(&self.s.url(port, &self.verify_full()), &schema, CALL, 2)
                    .await
                    .with_context(|| format!("{path}: connect with verify-full"))?;
            ensure!(
                server_connection_is_tls(&store).await?,
                "{path}: the server connection is not TLS"
            );
            store_cycle(&store, path)
                .await
                .with_context(|| format!("{path}: lease operations"))?;
            store.pool().close().await;
        }
        // The default mode, prefer, takes TLS when the server offers it.
        let store = LeaseStore::connect(&self.s.url(self.s.pg_port, ""), &schema, CALL, 1).await?;
        ensure!(
            server_connection_is_tls(&store).await?,
            "sslmode=prefer did not use the TLS the server offers"
        );
        Ok(())
    }

    async fn listen(&self) -> Result<()> {
        let schema = self.migrated("tlslisten").await?;
        let direct = self.s.url(self.s.pg_port, &self.verify_full());
        let mut listener = reaper_operator::lease::connect::listener(&direct).await?;
        listener.listen(NOTIFY_CHANNEL).await?;
        let bounced = self.s.url(self.s.bouncer_port, &self.verify_full());
        let store = LeaseStore::connect(&bounced, &schema, CALL, 1).await?;
        let name = format!("listen-{}", std::process::id());
        store
            .acquire(&id::lease(&name), &id::holder("c/a"), TTL)
            .await?
            .ok_or_else(|| anyhow!("acquire of a new lease failed"))?;
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let got = tokio::time::timeout(left, listener.recv())
                .await
                .context("no notification within 10 s")??;
            if got.payload() == name {
                return Ok(());
            }
        }
    }

    async fn binary(&self) -> Result<()> {
        let schema = db::unique_schema("tlscli").to_string();
        let direct = self.s.url(self.s.pg_port, &self.verify_full());
        let out = cli(&direct, &schema, &["migrate"], []);
        ensure!(code(&out) == 0, "migrate: {}", stderr(&out));
        let bounced = self.s.url(self.s.bouncer_port, &self.verify_full());
        for (path, url) in [("direct", &direct), ("pgbouncer", &bounced)] {
            lease_cycle(url, &schema, path, []).with_context(|| path.to_owned())?;
        }
        Ok(())
    }

    async fn wrong_ca(&self) -> Result<()> {
        let schema = Schema::new("public")?;
        for ((path, port), ca) in self
            .s
            .paths()
            .into_iter()
            .flat_map(|p| [(p, "wrong-ca.crt"), (p, "impostor-ca.crt")])
        {
            let query = format!(
                "sslmode=verify-full&sslrootcert={}",
                self.pki.path(ca).display()
            );
            let path = format!("{path} with {ca}");
            let url = self.s.url(port, &query);
            let error = match LeaseStore::connect(&url, &schema, CALL, 1).await {
                Ok(_) => bail!("{path}: connected although the CA is wrong"),
                Err(e) => describe_error(&e),
            };
            ensure!(
                error.contains("certificate is not trusted"),
                "{path}: library error: {error}"
            );
            let err = refused_lease_status(&url, "public", &path)?;
            ensure!(
                err.contains("the server's TLS certificate is not trusted")
                    && err.contains("certificate verification failed"),
                "{path}: CLI message: {err}"
            );
        }
        Ok(())
    }

    async fn plaintext(&self) -> Result<()> {
        for (path, port, says) in [
            (
                "direct",
                self.s.pg_port,
                "the server accepts only TLS connections",
            ),
            (
                "pgbouncer",
                self.s.bouncer_port,
                "PgBouncer accepts only TLS connections",
            ),
        ] {
            let err = refused_lease_status(&self.s.url(port, "sslmode=disable"), "public", path)?;
            ensure!(err.contains(says), "{path}: CLI message: {err}");
            let server_said = match path {
                "direct" => "pg_hba.conf rejects connection",
                _ => "SSL required",
            };
            ensure!(
                err.contains(server_said),
                "{path}: the server's own words are missing: {err}"
            );
        }
        Ok(())
    }

    async fn host_name(&self) -> Result<()> {
        let ca = self.pki.path("ca.crt");
        let other_name = |query: &str| {
            format!(
                "postgres://reaper:reaper@127.0.0.2:{}/postgres?{query}",
                self.s.pg_port
            )
        };
        let err = refused_lease_status(
            &other_name(&self.verify_full()),
            "public",
            "verify-full to 127.0.0.2",
        )?;
        ensure!(
            err.contains("does not name the host"),
            "verify-full to 127.0.0.2: {err}"
        );

        let verify_ca = other_name(&format!("sslmode=verify-ca&sslrootcert={}", ca.display()));
        let schema = db::unique_schema("tlsca").to_string();
        let narrowed = [("SSL_CERT_FILE", ca.to_str().unwrap())];
        let out = cli(&verify_ca, &schema, &["migrate"], narrowed);
        ensure!(
            code(&out) == 0,
            "verify-ca with SSL_CERT_FILE: {}",
            stderr(&out)
        );
        let err = refused_lease_status(&verify_ca, &schema, "verify-ca without SSL_CERT_FILE")?;
        ensure!(
            err.contains("sslmode=verify-ca needs SSL_CERT_FILE"),
            "verify-ca without SSL_CERT_FILE: {err}"
        );
        Ok(())
    }

    async fn client_certificates(&self) -> Result<()> {
        let user = &self.s.cert_user;
        let url = |cert: &str, key: &str| {
            let mut query = self.verify_full();
            if !cert.is_empty() {
                query += &format!(
                    "&sslcert={}&sslkey={}",
                    self.pki.path(cert).display(),
                    self.pki.path(key).display()
                );
            }
            format!(
                "postgres://{user}@127.0.0.1:{}/postgres?{query}",
                self.s.pg_port
            )
        };
        let schema = db::unique_schema("tlscert").to_string();
        let pkcs8 = url("client.crt", "client.key");
        let out = cli(&pkcs8, &schema, &["migrate"], []);
        ensure!(code(&out) == 0, "migrate as {user}: {}", stderr(&out));
        lease_cycle(&pkcs8, &schema, "cert", []).context("PKCS#8 key")?;
        for (format, cert, key) in [
            ("SEC1", "client.crt", "client-sec1.key"),
            ("PKCS#1", "client-rsa.crt", "client-rsa.key"),
        ] {
            let out = cli(&url(cert, key), &schema, &["lease", "status"], []);
            ensure!(code(&out) == 0, "{format} key: {}", stderr(&out));
        }

        for (case, cert, key, says) in [
            (
                "no client certificate",
                "",
                "",
                "requires a valid client certificate",
            ),
            (
                "client certificate of another CA",
                "wrong-client.crt",
                "wrong-client.key",
                "the server refused this client's TLS certificate",
            ),
            (
                "encrypted key",
                "client.crt",
                "client-encrypted.key",
                "the key is encrypted, which is not supported",
            ),
        ] {
            let err = refused_lease_status(&url(cert, key), &schema, case)?;
            ensure!(err.contains(says), "{case}: {err}");
        }
        Ok(())
    }

    /// Sequential renews and new connections, over TLS (this test's servers) and in
    /// plaintext (the shared database of tests/db/up.sh, configured the same otherwise).
    async fn cost(&self) -> Result<()> {
        const RENEWS: u32 = 300;
        const CONNECTS: u32 = 20;
        let schema = self.migrated("tlscost").await?;
        let plain_schema = db::unique_schema("plaincost");
        let admin = LeaseStore::connect(&db::direct_url(), &plain_schema, CALL, 1).await?;
        admin.migrate().await?;
        admin.pool().close().await;
        let targets = [
            (
                "TLS, direct",
                self.s.url(self.s.pg_port, &self.verify_full()),
                &schema,
            ),
            (
                "TLS, PgBouncer",
                self.s.url(self.s.bouncer_port, &self.verify_full()),
                &schema,
            ),
            ("plaintext, direct", db::direct_url(), &plain_schema),
            (
                "plaintext, PgBouncer",
                db::url(db::Via::PgBouncer),
                &plain_schema,
            ),
        ];
        for (label, url, schema) in targets {
            let store = LeaseStore::connect(&url, schema, CALL, 1).await?;
            let name = format!("cost-{}", std::process::id());
            let lease = store
                .acquire(&id::lease(&name), &id::holder("c/a"), TTL)
                .await?
                .ok_or_else(|| anyhow!("{label}: acquire failed"))?;
            for _ in 0..20 {
                store
                    .renew(&id::lease(&name), &id::holder("c/a"), lease.epoch)
                    .await?;
            }
            let started = Instant::now();
            for _ in 0..RENEWS {
                store
                    .renew(&id::lease(&name), &id::holder("c/a"), lease.epoch)
                    .await?
                    .ok_or_else(|| anyhow!("{label}: renew lost the lease"))?;
            }
            let renew = started.elapsed() / RENEWS;
            store
                .release(&id::lease(&name), &id::holder("c/a"), lease.epoch)
                .await?;
            store.pool().close().await;

            let options = connect_options(&url)?;
            let started = Instant::now();
            for _ in 0..CONNECTS {
                use sqlx::Connection as _;
                let mut conn = sqlx::PgConnection::connect_with(&options).await?;
                sqlx::raw_sql("SELECT 1").execute(&mut conn).await?;
                conn.close().await?;
            }
            let connect = started.elapsed() / CONNECTS;
            eprintln!(
                "cost {label}: renew {:.0} µs (mean of {RENEWS}), new connection + SELECT 1 \
                 {:.1} ms (mean of {CONNECTS})",
                renew.as_secs_f64() * 1e6,
                connect.as_secs_f64() * 1e3
            );
        }
        Ok(())
    }
}

/// True when the server connection behind `store`'s pool is TLS (through PgBouncer: the
/// PgBouncer's connection to the server).
async fn server_connection_is_tls(store: &LeaseStore) -> Result<bool> {
    use sqlx::Row as _;
    let row = sqlx::raw_sql("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
        .fetch_one(store.pool())
        .await?;
    Ok(row.try_get(0)?)
}

/// Acquire, renew, get and release a lease of its own with the library.
async fn store_cycle(store: &LeaseStore, tag: &str) -> Result<()> {
    let name = format!("{tag}-{}", std::process::id());
    let lease = store
        .acquire(&id::lease(&name), &id::holder("c/a"), TTL)
        .await?
        .ok_or_else(|| anyhow!("acquire of a new lease failed"))?;
    let renewed = store
        .renew(&id::lease(&name), &id::holder("c/a"), lease.epoch)
        .await?
        .ok_or_else(|| anyhow!("renew failed"))?;
    ensure!(
        renewed.renewed_at >= lease.renewed_at,
        "renew went back in time"
    );
    let seen = store
        .get(&id::lease(&name))
        .await?
        .ok_or_else(|| anyhow!("lease missing"))?;
    ensure!(
        seen.holder == "c/a" && seen.epoch == lease.epoch,
        "{seen:?}"
    );
    store
        .release(&id::lease(&name), &id::holder("c/a"), lease.epoch)
        .await?
        .ok_or_else(|| anyhow!("release failed"))?;
    ensure!(
        store
            .get(&id::lease(&name))
            .await?
            .is_some_and(|l| l.is_free()),
        "not free after release"
    );
    Ok(())
}

/// `lease acquire`, `renew`, `status` and `release` with the binary.
fn lease_cycle<'a>(
    url: &str,
    schema: &str,
    tag: &str,
    env: impl IntoIterator<Item = (&'a str, &'a str)> + Clone,
) -> Result<()> {
    let name = format!("{tag}-{}", std::process::id());
    let run = |args: &[&str]| -> Result<Value> {
        let out = cli(url, schema, args, env.clone());
        ensure!(
            code(&out) == 0,
            "{args:?}: exit {}: {}",
            code(&out),
            stderr(&out)
        );
        serde_json::from_slice(&out.stdout).with_context(|| format!("{args:?}: stdout is not JSON"))
    };
    let lease = run(&[
        "lease", "acquire", "--name", &name, "--holder", "c/cli", "-o", "json",
    ])?;
    let epoch = lease["epoch"].to_string();
    run(&[
        "lease", "renew", "--name", &name, "--holder", "c/cli", "--epoch", &epoch, "-o", "json",
    ])?;
    let status = run(&["lease", "status", "--name", &name, "-o", "json"])?;
    ensure!(status["state"] == "held", "{status}");
    run(&[
        "lease", "release", "--name", &name, "--holder", "c/cli", "--epoch", &epoch, "-o", "json",
    ])?;
    Ok(())
}

fn cli<'a>(
    url: &str,
    schema: &str,
    args: &[&str],
    env: impl IntoIterator<Item = (&'a str, &'a str)>,
) -> Output {
    let mut cmd = Command::new(BIN);
    cmd.args(args)
        .env("DATABASE_URL", url)
        .env("REAPER_DB_SCHEMA", schema)
        .env_remove("RUST_LOG")
        .env_remove("SSL_CERT_FILE")
        .env_remove("SSL_CERT_DIR");
    for var in ["PGSSLMODE", "PGSSLROOTCERT", "PGSSLCERT", "PGSSLKEY"] {
        cmd.env_remove(var);
    }
    cmd.envs(env).output().expect("run reaper-operator")
}

/// `lease status` at `url` as the CLI runs it, which must be refused (exit 2): its
/// stderr. `case` names the attempt in the error.
fn refused_lease_status(url: &str, schema: &str, case: &str) -> Result<String> {
    let out = cli(url, schema, &["lease", "status"], []);
    let err = stderr(&out);
    ensure!(code(&out) == 2, "{case}: exit {}: {err}", code(&out));
    Ok(err)
}

fn code(out: &Output) -> i32 {
    out.status.code().expect("exited by signal")
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Certificates and keys made with the `openssl` command in a temporary directory,
/// removed on drop.
struct Pki {
    dir: PathBuf,
}

impl Pki {
    fn generate() -> Result<Self> {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .subsec_nanos();
        let dir = std::env::temp_dir().join(format!("reaper-tls-{}-{nanos:x}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        let pki = Self { dir };
        pki.write_configs()?;
        pki.cas()?;
        pki.ec_key("server")?;
        pki.sign("server", "127.0.0.1", "ca", "server.ext")?;
        pki.client_keys()?;
        Ok(pki)
    }

    /// The openssl configuration of the CAs and the extensions of the certificates.
    fn write_configs(&self) -> Result<()> {
        self.write(
            "req.cnf",
            "[req]\ndistinguished_name = dn\nprompt = no\n[dn]\n\
             [ca]\nbasicConstraints = critical, CA:TRUE\n\
             keyUsage = critical, keyCertSign, cRLSign\nsubjectKeyIdentifier = hash\n",
        )?;
        self.write(
            "server.ext",
            "basicConstraints = critical, CA:FALSE\nkeyUsage = critical, digitalSignature, keyEncipherment\n\
             extendedKeyUsage = serverAuth\nsubjectAltName = IP:127.0.0.1, DNS:localhost\n",
        )?;
        self.write(
            "client.ext",
            "basicConstraints = critical, CA:FALSE\nkeyUsage = critical, digitalSignature, keyEncipherment\n\
             extendedKeyUsage = clientAuth\n",
        )?;
        Ok(())
    }

    /// The CA, an unrelated one, and an impostor.
    fn cas(&self) -> Result<()> {
        // The impostor has the CA's name but not its key (a CA made again, say).
        for (ca, common_name) in [
            ("ca", "reaper test CA"),
            ("wrong-ca", "another test CA"),
            ("impostor-ca", "reaper test CA"),
        ] {
            self.ec_key(ca)?;
            self.openssl(&[
                "req",
                "-new",
                "-x509",
                "-key",
                &format!("{ca}.key"),
                "-subj",
                &format!("/CN={common_name}"),
                "-config",
                "req.cnf",
                "-extensions",
                "ca",
                "-days",
                "2",
                "-out",
                &format!("{ca}.crt"),
            ])?;
        }
        Ok(())
    }

    /// The role's certificates and keys, and one from the unrelated CA; checks the keys'
    /// formats.
    fn client_keys(&self) -> Result<()> {
        // The role's certificate, with its key as PKCS#8 (client.key), SEC1 and PKCS#1
        // (an RSA key of its own), and PKCS#8 encrypted.
        self.ec_key("client")?;
        self.sign("client", "reaper_cert", "ca", "client.ext")?;
        self.openssl(&[
            "pkey",
            "-in",
            "client.key",
            "-traditional",
            "-out",
            "client-sec1.key",
        ])?;
        self.openssl(&[
            "genpkey",
            "-algorithm",
            "RSA",
            "-pkeyopt",
            "rsa_keygen_bits:2048",
            "-out",
            "client-rsa.pkcs8",
        ])?;
        self.openssl(&[
            "pkey",
            "-in",
            "client-rsa.pkcs8",
            "-traditional",
            "-out",
            "client-rsa.key",
        ])?;
        self.sign("client-rsa", "reaper_cert", "ca", "client.ext")?;
        self.openssl(&[
            "pkey",
            "-in",
            "client.key",
            "-aes256",
            "-passout",
            "pass:secret",
            "-out",
            "client-encrypted.key",
        ])?;
        self.ec_key("wrong-client")?;
        self.sign("wrong-client", "reaper_cert", "wrong-ca", "client.ext")?;
        for (file, label) in [
            ("client.key", "BEGIN PRIVATE KEY"),
            ("client-sec1.key", "BEGIN EC PRIVATE KEY"),
            ("client-rsa.key", "BEGIN RSA PRIVATE KEY"),
            ("client-encrypted.key", "BEGIN ENCRYPTED PRIVATE KEY"),
        ] {
            let text = std::fs::read_to_string(self.path(file))?;
            ensure!(
                text.contains(label),
                "{file} is not in the expected format ({label})"
            );
        }
        Ok(())
    }

    fn path(&self, file: &str) -> PathBuf {
        self.dir.join(file)
    }

    fn write(&self, file: &str, text: &str) -> Result<()> {
        std::fs::write(self.path(file), text).with_context(|| format!("write {file}"))
    }

    fn ec_key(&self, name: &str) -> Result<()> {
        self.openssl(&[
            "genpkey",
            "-algorithm",
            "EC",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-out",
            &format!("{name}.key"),
        ])
    }

    /// `<name>.crt` for `<name>.key`, signed by the CA `<ca>.crt`.
    fn sign(&self, name: &str, common_name: &str, ca: &str, ext: &str) -> Result<()> {
        self.openssl(&[
            "req",
            "-new",
            "-key",
            &format!("{name}.key"),
            "-subj",
            &format!("/CN={common_name}"),
            "-config",
            "req.cnf",
            "-out",
            &format!("{name}.csr"),
        ])?;
        static SERIAL: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(1);
        let serial = SERIAL.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
        self.openssl(&[
            "x509",
            "-req",
            "-in",
            &format!("{name}.csr"),
            "-CA",
            &format!("{ca}.crt"),
            "-CAkey",
            &format!("{ca}.key"),
            "-set_serial",
            &serial.to_string(),
            "-days",
            "2",
            "-extfile",
            ext,
            "-out",
            &format!("{name}.crt"),
        ])
    }

    fn openssl(&self, args: &[&str]) -> Result<()> {
        let out = Command::new("openssl")
            .args(args)
            .current_dir(&self.dir)
            .output()
            .context("run openssl (on Debian: apt-get install openssl)")?;
        ensure!(
            out.status.success(),
            "openssl {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(())
    }
}

impl Drop for Pki {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A TLS-only PostgreSQL and its PgBouncers, started with `tests/db/up.sh` and
/// `REAPER_DB_TLS_DIR`; stopped with `tests/db/down.sh` on drop, also after a panic.
struct TlsServers {
    name: String,
    pg_port: u16,
    bouncer_port: u16,
    cert_user: String,
}

impl TlsServers {
    fn start(pki: &Pki) -> Result<Self> {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .subsec_nanos();
        let name = format!("tls-{}-{nanos:x}", std::process::id());
        let out = Command::new("bash")
            .arg(repo_root().join("tests/db/up.sh"))
            .arg(&name)
            .env("REAPER_DB_TLS_DIR", &pki.dir)
            .output()
            .context("run tests/db/up.sh")?;
        // From here on the servers may be running: drop stops them.
        let mut servers = Self {
            name,
            pg_port: 0,
            bouncer_port: 0,
            cert_user: String::new(),
        };
        ensure!(
            out.status.success(),
            "tests/db/up.sh failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let stdout = String::from_utf8(out.stdout)?;
        let env_file = stdout
            .lines()
            .last()
            .ok_or_else(|| anyhow!("tests/db/up.sh printed no env file"))?;
        let env = read_env_file(Path::new(env_file))?;
        let get = |key: &str| {
            env.get(key)
                .cloned()
                .ok_or_else(|| anyhow!("{key} missing from {env_file}"))
        };
        let port = |key: &str| -> Result<u16> {
            url::Url::parse(&get(key)?)?
                .port()
                .ok_or_else(|| anyhow!("{key} has no port"))
        };
        servers.pg_port = port("REAPER_TEST_DATABASE_URL")?;
        servers.bouncer_port = port("REAPER_TEST_PGBOUNCER_URL")?;
        servers.cert_user = get("REAPER_TEST_TLS_CERT_USER")?;
        ensure!(
            get("REAPER_TEST_DATABASE_URL")?.contains("sslmode=verify-full"),
            "up.sh did not start the TLS variant"
        );
        Ok(servers)
    }

    /// The password user's URL to 127.0.0.1:`port` with the query `query`.
    fn url(&self, port: u16, query: &str) -> String {
        let sep = if query.is_empty() { "" } else { "?" };
        format!("postgres://reaper:reaper@127.0.0.1:{port}/postgres{sep}{query}")
    }

    fn paths(&self) -> [(&'static str, u16); 2] {
        [("direct", self.pg_port), ("pgbouncer", self.bouncer_port)]
    }
}

impl Drop for TlsServers {
    fn drop(&mut self) {
        let status = Command::new("bash")
            .arg(repo_root().join("tests/db/down.sh"))
            .arg(&self.name)
            .status();
        if !matches!(status, Ok(s) if s.success()) {
            eprintln!(
                "tests/db/down.sh {} failed ({status:?}); stop it by hand",
                self.name
            );
        }
    }
}

/// `KEY=value` and `KEY='value'` lines of the env file up.sh writes.
fn read_env_file(path: &Path) -> Result<HashMap<String, String>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("read {}", path.display()))?;
    Ok(text
        .lines()
        .filter_map(|line| line.split_once('='))
        .map(|(k, v)| {
            let v = v
                .strip_prefix('\'')
                .and_then(|v| v.strip_suffix('\''))
                .unwrap_or(v);
            (k.to_owned(), v.to_owned())
        })
        .collect())
}
