//! Validated configuration values shared by the CLI and the controller.

use std::fmt;
use std::time::Duration;

use crate::{Error, Result};

/// A PostgreSQL schema name restricted to a plain lower-case identifier, so it can be
/// interpolated (double-quoted) into SQL without any escaping concerns.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Schema(String);

impl Schema {
    pub fn new(name: &str) -> Result<Self> {
        let mut chars = name.chars();
        let first_ok = matches!(chars.next(), Some('a'..='z' | '_'));
        let rest_ok = chars.all(|c| matches!(c, 'a'..='z' | '0'..='9' | '_'));
        if !first_ok || !rest_ok || name.len() > 63 {
            return Err(Error::Config(format!(
                "schema {name:?} is not a plain identifier: use 1-63 characters of a-z, 0-9 and _, \
                 not starting with a digit"
            )));
        }
        Ok(Self(name.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// `"schema"."table"`.
    pub fn qualify(&self, table: &str) -> String {
        use postgres_protocol::escape::escape_identifier;
        format!(
            "{}.{}",
            escape_identifier(&self.0),
            escape_identifier(table)
        )
    }
}

impl Default for Schema {
    fn default() -> Self {
        Self("public".to_owned())
    }
}

impl fmt::Display for Schema {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Lease timings. Invariant (checked by [`LeaseTimings::new`]):
/// `ttl > renew_deadline > 1.2 × retry_period`, all non-zero.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LeaseTimings {
    pub ttl: Duration,
    pub renew_deadline: Duration,
    pub retry_period: Duration,
}

impl Default for LeaseTimings {
    /// client-go's leader-election defaults.
    fn default() -> Self {
        Self {
            ttl: Duration::from_secs(15),
            renew_deadline: Duration::from_secs(10),
            retry_period: Duration::from_secs(2),
        }
    }
}

impl LeaseTimings {
    pub fn new(ttl: Duration, renew_deadline: Duration, retry_period: Duration) -> Result<Self> {
        if retry_period.is_zero() {
            return Err(Error::Config("retry period must be greater than 0".into()));
        }
        if ttl <= renew_deadline {
            return Err(Error::Config(format!(
                "ttl ({ttl:?}) must be greater than the renew deadline ({renew_deadline:?}): \
                 a holder must stop acting before others may take the lease"
            )));
        }
        // Compare in integer milliseconds: renew_deadline * 10 > retry_period * 12.
        if renew_deadline.as_millis() * 10 <= retry_period.as_millis() * 12 {
            return Err(Error::Config(format!(
                "renew deadline ({renew_deadline:?}) must be greater than 1.2 × retry period \
                 ({retry_period:?}): a holder needs more than one renew attempt per deadline"
            )));
        }
        Ok(Self {
            ttl,
            renew_deadline,
            retry_period,
        })
    }

    /// Timeout for a single database call: one retry period, so a hung call never
    /// delays the next tick.
    pub fn call_timeout(&self) -> Duration {
        self.retry_period
    }
}

#[cfg(test)]
impl LeaseTimings {
    /// Valid timings from milliseconds, for unit tests.
    pub(crate) fn from_millis(ttl: u64, renew_deadline: u64, retry_period: u64) -> Self {
        Self::new(
            Duration::from_millis(ttl),
            Duration::from_millis(renew_deadline),
            Duration::from_millis(retry_period),
        )
        .expect("valid test timings")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schema_accepts_plain_identifiers_only() {
        for ok in ["public", "reaper", "_x", "a1_b2"] {
            assert_eq!(Schema::new(ok).unwrap().as_str(), ok);
        }
        for bad in [
            "",
            "1abc",
            "Public",
            "a-b",
            "a b",
            "x\"; drop",
            &"a".repeat(64),
        ] {
            let err = Schema::new(bad).unwrap_err().to_string();
            assert!(err.contains("not a plain identifier"), "{bad:?}: {err}");
        }
    }

    #[test]
    fn timings_enforce_ordering() {
        let s = Duration::from_secs;
        assert!(LeaseTimings::new(s(15), s(10), s(2)).is_ok());
        assert_eq!(
            LeaseTimings::default(),
            LeaseTimings::new(s(15), s(10), s(2)).unwrap()
        );
        let e = LeaseTimings::new(s(10), s(10), s(2))
            .unwrap_err()
            .to_string();
        assert!(e.contains("ttl"), "{e}");
        let e = LeaseTimings::new(s(5), s(10), s(2))
            .unwrap_err()
            .to_string();
        assert!(e.contains("greater than the renew deadline"), "{e}");
        // 12 * 10 = 120 is not > 10 * 12 = 120
        let e = LeaseTimings::new(s(15), s(12), s(10))
            .unwrap_err()
            .to_string();
        assert!(e.contains("1.2"), "{e}");
        assert!(LeaseTimings::new(s(15), s(13), s(10)).is_ok());
        assert!(LeaseTimings::new(s(15), s(10), s(0)).is_err());
    }
}
