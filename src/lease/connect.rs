//! Database URLs: checked once, then turned into the connect options that every
//! connection of the process uses (the lease pools and the `LISTEN` connection).
//!
//! The URL is libpq's `postgres://user:password@host:port/db?param=value` form, read by
//! sqlx. Two things are added on top of sqlx:
//!
//! - **TLS settings are checked before anything connects** (see [`connect_options`]):
//!   combinations that sqlx would quietly weaken or ignore are refused with the reason,
//!   and the certificate and key files must exist and hold what rustls can use.
//! - **No `extra_float_digits` startup parameter.** sqlx sends it by default; a PgBouncer
//!   with a default configuration refuses every client that does (`unsupported startup
//!   parameter: extra_float_digits`). Nothing here reads a floating-point column, and
//!   PostgreSQL 12 and later print floats exactly anyway.

use std::str::FromStr;

use sqlx::postgres::{PgConnectOptions, PgListener, PgPoolOptions, PgSslMode};

use crate::{Error, Result};

/// Query parameters sqlx reads besides the TLS ones. Anything else is refused: sqlx
/// would only log "ignoring unrecognized connect parameter", so a misspelt `sslmode`
/// would silently leave the connection unverified.
const OTHER_PARAMS: &[&str] = &[
    "host",
    "hostaddr",
    "port",
    "dbname",
    "user",
    "password",
    "application_name",
    "options",
    "statement-cache-capacity",
];

/// The value of `sslrootcert` that means "the trust store of the system" (as in libpq 16).
const SYSTEM_ROOTS: &str = "system";

/// Connect options for `url`, after checking its TLS settings (see the module docs).
///
/// TLS parameters come from the URL and otherwise from the libpq environment variables
/// `PGSSLMODE`, `PGSSLROOTCERT`, `PGSSLCERT` and `PGSSLKEY` (sqlx reads them too). The
/// rules, each refused with a message that says what to write instead:
///
/// - `sslmode` is one of `disable`, `prefer` (the default), `require`, `verify-ca`,
///   `verify-full`. `allow` is refused: sqlx treats it as `disable`.
/// - `verify-ca` and `verify-full` need `sslrootcert` (a PEM file of CA certificates, or
///   `system`); the other modes do not check the server's certificate, so an
///   `sslrootcert` with them is refused rather than ignored (libpq would turn `require`
///   into `verify-ca`; say `verify-full` or `verify-ca` instead).
/// - `sslrootcert=system` needs `verify-full`, as in libpq.
/// - `verify-ca` needs `SSL_CERT_FILE` or `SSL_CERT_DIR`. The TLS stack trusts the
///   system's CA store *in addition to* `sslrootcert`; without a host name check, any
///   certificate a public CA issued, for any name, would pass. Those variables replace
///   the system store (set `SSL_CERT_FILE` to the `sslrootcert` file).
/// - `sslcert` and `sslkey` go together, and not with `sslmode=disable`.
/// - The files are read now: each certificate file must hold PEM certificates; the key
///   must be an unencrypted PEM key (PKCS#8 `PRIVATE KEY`, PKCS#1 `RSA PRIVATE KEY` or
///   SEC1 `EC PRIVATE KEY`). sqlx reads them again for each new connection, so renewed
///   files are picked up without a restart.
pub fn connect_options(url: &str) -> Result<PgConnectOptions> {
    connect_options_with_env(url, |name| std::env::var(name).ok())
}

/// [`PgListener::connect`] with the options of [`connect_options`]. The listener owns
/// a pool of one connection, which it uses to reconnect.
pub async fn listener(url: &str) -> std::result::Result<PgListener, sqlx::Error> {
    let options =
        connect_options(url).map_err(|e| sqlx::Error::Configuration(e.to_string().into()))?;
    // As PgListener::connect: one connection, no timeouts (they do not apply to a
    // connection that waits for notifications).
    let pool = PgPoolOptions::new()
        .max_connections(1)
        .max_lifetime(None)
        .idle_timeout(None)
        .connect_with(options)
        .await?;
    let mut listener = PgListener::connect_with(&pool).await?;
    listener.ignore_pool_close_event(true);
    Ok(listener)
}

fn connect_options_with_env(
    url: &str,
    env: impl Fn(&str) -> Option<String>,
) -> Result<PgConnectOptions> {
    // The URL is never repeated in messages: it may hold a password.
    let parsed = url::Url::parse(url)
        .map_err(|e| Error::Config(format!("database URL is not valid: {e}")))?;
    if !matches!(parsed.scheme(), "postgres" | "postgresql") {
        return Err(Error::Config(format!(
            "database URL is not valid: the scheme is {:?}; use postgres://",
            parsed.scheme()
        )));
    }
    let mut tls = Tls {
        mode: env("PGSSLMODE"),
        root_cert: env("PGSSLROOTCERT"),
        cert: env("PGSSLCERT"),
        key: env("PGSSLKEY"),
    };
    for (key, value) in parsed.query_pairs() {
        let value = value.into_owned();
        match &*key {
            "sslmode" | "ssl-mode" => tls.mode = Some(value),
            "sslrootcert" | "ssl-root-cert" | "ssl-ca" => tls.root_cert = Some(value),
            "sslcert" | "ssl-cert" => tls.cert = Some(value),
            "sslkey" | "ssl-key" => tls.key = Some(value),
            k if OTHER_PARAMS.contains(&k) => {}
            k if k.starts_with("options[") && k.ends_with(']') => {}
            k => {
                return Err(Error::Config(format!(
                    "database URL parameter {k:?} is not supported: the PostgreSQL driver \
                     would ignore it. Supported: sslmode, sslrootcert, sslcert, sslkey, {}",
                    OTHER_PARAMS.join(", ")
                )));
            }
        }
    }
    let system_roots = tls.check(|name| env(name).is_some_and(|v| !v.is_empty()))?;

    let mut options = PgConnectOptions::from_str(url)
        .map_err(|e| Error::Config(format!("database URL is not valid: {e}")))?;
    if system_roots {
        // No file to add: the system's store, which sqlx always loads, is the trust.
        options = options.ssl_root_cert_from_pem(Vec::new());
    }
    if options.get_application_name().is_none() {
        options = options.application_name("reaper-operator");
    }
    Ok(options.extra_float_digits(None))
}

/// The TLS parameters of one URL (or the environment).
struct Tls {
    mode: Option<String>,
    root_cert: Option<String>,
    cert: Option<String>,
    key: Option<String>,
}

impl Tls {
    /// Checks the combination and the files; true when `sslrootcert=system`.
    fn check(&self, env_set: impl Fn(&str) -> bool) -> Result<bool> {
        let bad = |why: String| Err(Error::Config(format!("database URL: {why}")));
        let mode = match self.mode.as_deref() {
            None => PgSslMode::Prefer,
            Some(m) => match m.to_ascii_lowercase().as_str() {
                "disable" => PgSslMode::Disable,
                "prefer" => PgSslMode::Prefer,
                "require" => PgSslMode::Require,
                "verify-ca" => PgSslMode::VerifyCa,
                "verify-full" => PgSslMode::VerifyFull,
                "allow" => {
                    return bad(
                        "sslmode=allow is not supported (the driver would never use TLS \
                         with it): use sslmode=verify-full, or prefer, require or disable"
                            .into(),
                    );
                }
                other => {
                    return bad(format!(
                        "sslmode={other:?} is not one of disable, prefer, require, verify-ca, \
                         verify-full"
                    ));
                }
            },
        };
        let mode_name = self.mode.as_deref().unwrap_or("prefer");
        let verifies = matches!(mode, PgSslMode::VerifyCa | PgSslMode::VerifyFull);
        let mut system_roots = false;
        match (&self.root_cert, verifies) {
            (None, true) => {
                return bad(format!(
                    "sslmode={mode_name} needs sslrootcert: the PEM file of the CA that \
                     signed the server's certificate (e.g. /etc/reaper/pg-tls/ca.crt), or \
                     sslrootcert=system for the system's CA store"
                ));
            }
            (Some(_), false) => {
                return bad(format!(
                    "sslrootcert is only used with sslmode=verify-full or verify-ca; \
                     sslmode={mode_name} does not check the server's certificate (use \
                     sslmode=verify-full)"
                ));
            }
            (Some(root), true) if root == SYSTEM_ROOTS => {
                if !matches!(mode, PgSslMode::VerifyFull) {
                    return bad("sslrootcert=system needs sslmode=verify-full".into());
                }
                system_roots = true;
            }
            (Some(root), true) => pem_file("sslrootcert", root, Pem::Certificates)?,
            (None, false) => {}
        }
        if matches!(mode, PgSslMode::VerifyCa)
            && !env_set("SSL_CERT_FILE")
            && !env_set("SSL_CERT_DIR")
        {
            return bad(
                "sslmode=verify-ca needs SSL_CERT_FILE (or SSL_CERT_DIR) in the environment, \
                 e.g. SSL_CERT_FILE=<the sslrootcert file>: the system's CA store is \
                 trusted besides sslrootcert, and verify-ca does not check the host name, \
                 so a certificate any public CA issued for any name would pass. Or use \
                 sslmode=verify-full"
                    .into(),
            );
        }
        match (&self.cert, &self.key) {
            (None, None) => {}
            (Some(_), None) => return bad("sslcert is given without sslkey".into()),
            (None, Some(_)) => return bad("sslkey is given without sslcert".into()),
            (Some(_), Some(_)) if matches!(mode, PgSslMode::Disable) => {
                return bad("sslcert and sslkey need TLS, and sslmode=disable turns it off".into());
            }
            (Some(cert), Some(key)) => {
                pem_file("sslcert", cert, Pem::Certificates)?;
                pem_file("sslkey", key, Pem::PrivateKey)?;
            }
        }
        Ok(system_roots)
    }
}

#[derive(Clone, Copy)]
enum Pem {
    Certificates,
    PrivateKey,
}

/// Reads a PEM file and checks that it holds what `kind` needs. The checks look only at
/// the PEM labels; rustls parses the contents when it connects.
fn pem_file(param: &str, path: &str, kind: Pem) -> Result<()> {
    let bad = |why: String| {
        Err(Error::Config(format!(
            "database URL: {param} {path}: {why}"
        )))
    };
    let text = match std::fs::read(path) {
        Ok(bytes) => String::from_utf8_lossy(&bytes).into_owned(),
        Err(e) => return bad(format!("cannot read it: {e}")),
    };
    let labels: Vec<&str> = text
        .lines()
        .filter_map(|line| line.trim().strip_prefix("-----BEGIN "))
        .filter_map(|rest| rest.strip_suffix("-----"))
        .collect();
    match kind {
        Pem::Certificates if labels.contains(&"CERTIFICATE") => Ok(()),
        Pem::Certificates => bad("no PEM certificate (-----BEGIN CERTIFICATE-----) in it".into()),
        Pem::PrivateKey => {
            if labels
                .iter()
                .any(|l| matches!(*l, "PRIVATE KEY" | "RSA PRIVATE KEY" | "EC PRIVATE KEY"))
            {
                Ok(())
            } else if labels.contains(&"ENCRYPTED PRIVATE KEY")
                || text.contains("Proc-Type: 4,ENCRYPTED")
            {
                bad(
                    "the key is encrypted, which is not supported: store it unencrypted \
                     (openssl pkey -in KEY -out KEY.plain) and protect the file instead"
                        .into(),
                )
            } else {
                bad(
                    "no PEM private key in it: use an unencrypted PKCS#8 (BEGIN PRIVATE \
                     KEY), PKCS#1 (BEGIN RSA PRIVATE KEY) or SEC1 (BEGIN EC PRIVATE KEY) key"
                        .into(),
                )
            }
        }
    }
}

/// What went wrong, in words, when `error` is a failure to connect securely (a TLS
/// verification failure, a server or PgBouncer that refuses unencrypted connections, a
/// startup parameter PgBouncer refuses); `None` for any other error. The driver's own
/// message (which names the rustls or server error) is for the caller to add.
pub fn connection_hint(error: &sqlx::Error) -> Option<String> {
    match error {
        sqlx::Error::Io(io) => io
            .get_ref()
            .and_then(|inner| inner.downcast_ref::<rustls::Error>())
            .map(tls_hint),
        sqlx::Error::Tls(inner) => match inner.downcast_ref::<rustls::Error>() {
            Some(tls) => Some(tls_hint(tls)),
            None if inner.to_string().contains("does not support TLS") => Some(
                "the server does not offer TLS, and the URL's sslmode requires it (enable \
                 ssl on the server or PgBouncer's client_tls_*, or change sslmode)"
                    .into(),
            ),
            None => None,
        },
        sqlx::Error::Database(db) => {
            let message = db.message();
            if message.contains("no encryption") {
                Some(
                    "the server accepts only TLS connections (pg_hba.conf): set \
                     sslmode=verify-full and sslrootcert in the database URL"
                        .into(),
                )
            } else if message.contains("SSL required") {
                Some(
                    "PgBouncer accepts only TLS connections (client_tls_sslmode): set \
                     sslmode=verify-full and sslrootcert in the database URL"
                        .into(),
                )
            } else {
                message
                    .strip_prefix("unsupported startup parameter: ")
                    .map(|param| {
                        format!(
                            "PgBouncer refuses the startup parameter {param:?}: remove it from \
                             the database URL (e.g. options=...), or list it in PgBouncer's \
                             ignore_startup_parameters"
                        )
                    })
            }
        }
        _ => None,
    }
}

fn tls_hint(error: &rustls::Error) -> String {
    use rustls::{AlertDescription, CertificateError};
    let hint = match error {
        rustls::Error::InvalidCertificate(cert) => match cert {
            // BadSignature: signed by a CA of the same name as one in sslrootcert, but
            // not by its key (a CA that was made again, say).
            CertificateError::UnknownIssuer | CertificateError::BadSignature => {
                "the server's TLS certificate is not trusted: certificate verification \
                 failed, it is not signed by the CA in sslrootcert"
            }
            CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. } => {
                "the server's TLS certificate does not name the host in the database URL \
                 (sslmode=verify-full checks it): connect with a name or address the \
                 certificate lists"
            }
            CertificateError::Expired
            | CertificateError::ExpiredContext { .. }
            | CertificateError::NotValidYet
            | CertificateError::NotValidYetContext { .. } => {
                "the server's TLS certificate is outside its validity period (or this \
                 machine's clock is wrong): certificate verification failed"
            }
            _ => "the server's TLS certificate failed verification",
        },
        rustls::Error::AlertReceived(
            AlertDescription::CertificateRequired
            | AlertDescription::BadCertificate
            | AlertDescription::UnknownCA
            | AlertDescription::CertificateUnknown
            | AlertDescription::AccessDenied,
        ) => {
            "the server refused this client's TLS certificate (sslcert and sslkey): it \
             requires one signed by a CA it trusts"
        }
        _ => "the TLS handshake with the server failed",
    };
    hint.to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(url: &str) -> Result<PgConnectOptions> {
        connect_options_with_env(url, |_| None)
    }

    fn refused(url: &str) -> String {
        match check(url) {
            Ok(_) => panic!("{url} was accepted"),
            Err(e) => e.to_string(),
        }
    }

    /// A temporary PEM file with `body`.
    struct TempFile(std::path::PathBuf);

    impl TempFile {
        fn new(name: &str, body: &str) -> Self {
            let path = std::env::temp_dir().join(format!(
                "reaper-connect-{}-{name}-{:?}",
                std::process::id(),
                std::thread::current().id()
            ));
            std::fs::write(&path, body).unwrap();
            Self(path)
        }

        fn path(&self) -> &str {
            self.0.to_str().unwrap()
        }
    }

    impl Drop for TempFile {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }

    const CERT: &str = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n";

    #[test]
    fn plain_urls_are_accepted_and_extra_float_digits_is_not_sent() {
        let options = check("postgres://u:p@db:5432/x").unwrap();
        assert!(matches!(options.get_ssl_mode(), PgSslMode::Prefer));
        assert_eq!(options.get_application_name(), Some("reaper-operator"));
        // The Debug output is the only window on the field; "None" means not sent.
        assert!(
            format!("{options:?}").contains("extra_float_digits: None"),
            "{options:?}"
        );
        let named = check("postgresql://u@db/x?sslmode=disable&application_name=east").unwrap();
        assert_eq!(named.get_application_name(), Some("east"));
        assert!(check("postgres://u@db/x?sslmode=require").is_ok());
    }

    #[test]
    fn unknown_parameters_and_modes_are_refused() {
        let e = refused("postgres://u@db/x?sslmod=verify-full");
        assert!(e.contains("parameter \"sslmod\" is not supported"), "{e}");
        let e = refused("postgres://u@db/x?sslmode=verify_full");
        assert!(e.contains("is not one of disable, prefer"), "{e}");
        let e = refused("postgres://u@db/x?sslmode=allow");
        assert!(e.contains("sslmode=allow is not supported"), "{e}");
        let e = refused("mysql://u@db/x");
        assert!(e.contains("use postgres://"), "{e}");
        let e = refused("postgres://u:secret@db:99999/x");
        assert!(!e.contains("secret"), "{e}");
    }

    #[test]
    fn verification_needs_a_root_and_a_root_needs_verification() {
        let e = refused("postgres://u@db/x?sslmode=verify-full");
        assert!(e.contains("sslmode=verify-full needs sslrootcert"), "{e}");
        let ca = TempFile::new("ca", CERT);
        let e = refused(&format!(
            "postgres://u@db/x?sslmode=require&sslrootcert={}",
            ca.path()
        ));
        assert!(e.contains("sslrootcert is only used with"), "{e}");
        assert!(
            check(&format!(
                "postgres://u@db/x?sslmode=verify-full&sslrootcert={}",
                ca.path()
            ))
            .is_ok()
        );
        assert!(check("postgres://u@db/x?sslmode=verify-full&sslrootcert=system").is_ok());
        let e = refused("postgres://u@db/x?sslmode=verify-ca&sslrootcert=system");
        assert!(
            e.contains("sslrootcert=system needs sslmode=verify-full"),
            "{e}"
        );
    }

    #[test]
    fn verify_ca_needs_a_narrowed_trust_store() {
        let ca = TempFile::new("ca-narrow", CERT);
        let url = format!(
            "postgres://u@db/x?sslmode=verify-ca&sslrootcert={}",
            ca.path()
        );
        let e = refused(&url);
        assert!(e.contains("needs SSL_CERT_FILE"), "{e}");
        let with_env = connect_options_with_env(&url, |name| {
            (name == "SSL_CERT_FILE").then(|| ca.path().to_owned())
        });
        assert!(matches!(
            with_env.unwrap().get_ssl_mode(),
            PgSslMode::VerifyCa
        ));
    }

    #[test]
    fn the_environment_supplies_what_the_url_does_not() {
        let url = "postgres://u@db/x";
        let e = connect_options_with_env(url, |name| {
            (name == "PGSSLMODE").then(|| "verify-full".to_owned())
        })
        .unwrap_err()
        .to_string();
        assert!(e.contains("needs sslrootcert"), "{e}");
        // The URL wins over the environment.
        assert!(
            connect_options_with_env(&format!("{url}?sslmode=disable"), |name| {
                (name == "PGSSLMODE").then(|| "verify-full".to_owned())
            })
            .is_ok()
        );
    }

    #[test]
    fn certificate_and_key_files_are_checked() {
        let cert = TempFile::new("cert", CERT);
        let key = TempFile::new(
            "key",
            "-----BEGIN PRIVATE KEY-----\nMIIE\n-----END PRIVATE KEY-----\n",
        );
        let url = |cert: &str, key: &str| {
            format!("postgres://u@db/x?sslmode=require&sslcert={cert}&sslkey={key}")
        };
        assert!(check(&url(cert.path(), key.path())).is_ok());
        let e = refused(&format!("postgres://u@db/x?sslcert={}", cert.path()));
        assert!(e.contains("sslcert is given without sslkey"), "{e}");
        let e = refused(&url(cert.path(), "/nonexistent/key.pem"));
        assert!(
            e.contains("sslkey /nonexistent/key.pem: cannot read it"),
            "{e}"
        );
        let e = refused(&url(key.path(), key.path()));
        assert!(e.contains("no PEM certificate"), "{e}");
        let e = refused(&url(cert.path(), cert.path()));
        assert!(e.contains("no PEM private key"), "{e}");
        let encrypted = TempFile::new(
            "enc",
            "-----BEGIN ENCRYPTED PRIVATE KEY-----\nMIIE\n-----END ENCRYPTED PRIVATE KEY-----\n",
        );
        let e = refused(&url(cert.path(), encrypted.path()));
        assert!(e.contains("the key is encrypted"), "{e}");
        let e = refused(&format!(
            "postgres://u@db/x?sslmode=disable&sslcert={}&sslkey={}",
            cert.path(),
            key.path()
        ));
        assert!(e.contains("sslmode=disable turns it off"), "{e}");
    }

    #[test]
    fn tls_failures_are_explained() {
        use rustls::CertificateError;
        let io = |e: rustls::Error| {
            sqlx::Error::Io(std::io::Error::new(std::io::ErrorKind::InvalidData, e))
        };
        let hint = connection_hint(&io(rustls::Error::InvalidCertificate(
            CertificateError::UnknownIssuer,
        )))
        .unwrap();
        assert!(hint.contains("is not trusted"), "{hint}");
        let hint = connection_hint(&io(rustls::Error::InvalidCertificate(
            CertificateError::BadSignature,
        )))
        .unwrap();
        assert!(hint.contains("is not trusted"), "{hint}");
        let hint = connection_hint(&io(rustls::Error::InvalidCertificate(
            CertificateError::NotValidForName,
        )))
        .unwrap();
        assert!(hint.contains("does not name the host"), "{hint}");
        assert!(connection_hint(&sqlx::Error::PoolTimedOut).is_none());
        assert!(
            connection_hint(&sqlx::Error::Io(std::io::ErrorKind::ConnectionReset.into())).is_none()
        );
    }
}
