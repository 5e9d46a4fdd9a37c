//! The host's clock, read in one place.
//!
//! Host time is only ever *recorded* (when a snapshot or key was made, when a lock was last
//! refreshed, for people to read); whether a lock is live or a mark is due is decided by the
//! storage's clock ([`crate::backend::ObjectInfo::modified`]), never by this one, since hosts'
//! clocks disagree (docs/design.md, "prune").

use std::time::{SystemTime, UNIX_EPOCH};

/// Seconds since the Unix epoch by this host's clock (0 for a clock set before 1970).
pub fn unix_now() -> i64 {
    unix_now_ns().div_euclid(1_000_000_000)
}

/// Nanoseconds since the Unix epoch by this host's clock (0 for a clock set before 1970).
pub fn unix_now_ns() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as i64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    #[test]
    fn seconds_and_nanoseconds_agree() {
        let (s, ns) = (super::unix_now(), super::unix_now_ns());
        assert!(s > 1_700_000_000, "the clock reads {s}");
        assert!((ns / 1_000_000_000 - s).abs() <= 1);
    }
}
