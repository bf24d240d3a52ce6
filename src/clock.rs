//! The one wall clock the proxy reads for time-windowed counts.
//!
//! In production it is the system clock. Tests build a manual clock, hand it to the proxy
//! in its [`crate::config::Config`], and move it forward themselves: a test of hour edges
//! or of retention never sleeps for minutes to pass.
//!
//! Owns "what time is it" for windows, and the text forms of times and spans that the
//! queries accept and print (Unix seconds, RFC 3339, durations). Does not own timeouts, TTLs
//! or intervals: those are durations, measured with tokio's monotonic clock.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

#[derive(Clone, Default)]
pub struct Clock {
    /// Milliseconds since the Unix epoch, when set by hand; None: the system clock.
    manual: Option<Arc<AtomicU64>>,
}

impl Clock {
    /// The system clock.
    pub fn system() -> Clock {
        Clock::default()
    }

    /// A clock that reads `unix_ms` until moved with [`Clock::set_ms`] or [`Clock::advance`].
    pub fn manual(unix_ms: u64) -> Clock {
        Clock {
            manual: Some(Arc::new(AtomicU64::new(unix_ms))),
        }
    }

    pub fn now_ms(&self) -> u64 {
        match &self.manual {
            Some(t) => t.load(Ordering::SeqCst),
            None => std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_millis() as u64)
                .unwrap_or(0),
        }
    }

    /// Whole seconds since the Unix epoch.
    pub fn now_secs(&self) -> u64 {
        self.now_ms() / 1000
    }

    /// Sets a manual clock (no effect on the system clock).
    pub fn set_ms(&self, unix_ms: u64) {
        if let Some(t) = &self.manual {
            t.store(unix_ms, Ordering::SeqCst);
        }
    }

    /// Moves a manual clock forward by `secs` seconds.
    pub fn advance(&self, secs: u64) {
        if let Some(t) = &self.manual {
            t.fetch_add(secs * 1000, Ordering::SeqCst);
        }
    }

    pub fn is_manual(&self) -> bool {
        self.manual.is_some()
    }
}

impl std::fmt::Debug for Clock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.manual {
            Some(t) => write!(f, "Clock::manual({})", t.load(Ordering::SeqCst)),
            None => f.write_str("Clock::system"),
        }
    }
}

/// Parses a time: Unix seconds, or RFC 3339 (`2026-11-23T17:00:00Z`, `...+01:00`, with
/// optional fractional seconds, which are dropped).
pub fn parse_time(s: &str) -> Result<u64, String> {
    let s = s.trim();
    if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) {
        return s
            .parse::<u64>()
            .ok()
            .filter(|&v| v < 1 << 40)
            .ok_or_else(|| format!("time {s:?} is out of range"));
    }
    parse_rfc3339(s).ok_or_else(|| {
        format!("invalid time {s:?}: use Unix seconds or RFC 3339 (2026-11-23T17:00:00Z)")
    })
}

fn parse_rfc3339(s: &str) -> Option<u64> {
    let b = s.as_bytes();
    let num = |r: std::ops::Range<usize>| -> Option<i64> {
        let part = b.get(r)?;
        if !part.iter().all(u8::is_ascii_digit) {
            return None;
        }
        std::str::from_utf8(part).ok()?.parse().ok()
    };
    if b.len() < 20 || b[4] != b'-' || b[7] != b'-' || b[13] != b':' || b[16] != b':' {
        return None;
    }
    if !matches!(b[10], b'T' | b't' | b' ') {
        return None;
    }
    let (y, mo, d) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (h, mi, sec) = (num(11..13)?, num(14..16)?, num(17..19)?);
    if !(1..=12).contains(&mo) || d < 1 || d > days_in_month(y, mo) || h > 23 || mi > 59 || sec > 60
    {
        return None;
    }
    let mut at = 19;
    if b.get(at) == Some(&b'.') {
        at += 1;
        let start = at;
        while b.get(at).is_some_and(u8::is_ascii_digit) {
            at += 1;
        }
        if at == start {
            return None;
        }
    }
    let offset = match b.get(at)? {
        b'Z' | b'z' if at + 1 == b.len() => 0,
        sign @ (b'+' | b'-') if at + 6 == b.len() && b[at + 3] == b':' => {
            let (oh, om) = (num(at + 1..at + 3)?, num(at + 4..at + 6)?);
            if oh > 23 || om > 59 {
                return None;
            }
            let o = oh * 3600 + om * 60;
            if *sign == b'+' {
                o
            } else {
                -o
            }
        }
        _ => return None,
    };
    let secs = days_from_civil(y, mo, d) * 86400 + h * 3600 + mi * 60 + sec.min(59) - offset;
    u64::try_from(secs).ok()
}

fn days_in_month(y: i64, m: i64) -> i64 {
    match m {
        4 | 6 | 9 | 11 => 30,
        2 if (y % 4 == 0 && y % 100 != 0) || y % 400 == 0 => 29,
        2 => 28,
        _ => 31,
    }
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's algorithm).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146097 + doe - 719468
}

/// RFC 3339 in UTC, whole seconds: `2026-11-23T17:00:00Z`.
pub fn format_time(t: u64) -> String {
    let days = (t / 86400) as i64;
    let rem = t % 86400;
    // Inverse of days_from_civil.
    let z = days + 719468;
    let era = z.div_euclid(146097);
    let doe = z - era * 146097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + if m <= 2 { 1 } else { 0 };
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// Parses a window length or step: whole seconds (`60`) or a duration (`60s`, `1h30m`,
/// `7d`); at least one second.
pub fn parse_span(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let secs = if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) {
        s.parse::<u64>()
            .map_err(|e| format!("invalid duration {s:?}: {e}"))?
    } else {
        humantime::parse_duration(s)
            .map_err(|e| format!("invalid duration {s:?}: {e}"))?
            .as_secs()
    };
    if secs == 0 || secs >= 1 << 40 {
        return Err(format!("duration {s:?} must be between 1s and 30000 years"));
    }
    Ok(secs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_manual_clock_moves_only_when_told() {
        let c = Clock::manual(1_000_500);
        assert_eq!(c.now_secs(), 1000);
        c.advance(60);
        assert_eq!(c.now_ms(), 1_060_500);
        c.set_ms(5);
        assert_eq!(c.now_secs(), 0);
        let sys = Clock::system();
        assert!(sys.now_secs() > 1_700_000_000);
    }

    const DAY0: u64 = 1_763_856_000; // 2025-11-23T00:00:00Z

    #[test]
    fn times_parse_and_print_in_utc() {
        assert_eq!(format_time(DAY0), "2025-11-23T00:00:00Z");
        assert_eq!(parse_time("2025-11-23T00:00:00Z"), Ok(DAY0));
        assert_eq!(parse_time("1763856000"), Ok(DAY0));
        assert_eq!(parse_time("2025-11-23T01:30:00+01:30"), Ok(DAY0));
        assert_eq!(parse_time("2025-11-22T23:00:00.750-01:00"), Ok(DAY0));
        assert_eq!(parse_time("2024-02-29T12:00:00Z"), Ok(1_709_208_000));
        assert_eq!(format_time(1_709_208_000), "2024-02-29T12:00:00Z");
        assert_eq!(format_time(0), "1970-01-01T00:00:00Z");
        for bad in [
            "",
            "2025-02-29T00:00:00Z",
            "2025-11-23",
            "2025-11-23T24:00:00Z",
            "2025-11-23T00:00:00",
            "2025-11-23T00:00:00+0100",
            "yesterday",
            "-5",
            "2025-11-23T00:00:00.Z",
        ] {
            assert!(parse_time(bad).is_err(), "{bad:?}");
        }
        for t in [0, 59, 86399, 951_782_400, DAY0 + 12345, 4_102_444_800] {
            assert_eq!(parse_time(&format_time(t)), Ok(t), "{t}");
        }
    }

    #[test]
    fn spans_take_seconds_or_durations() {
        assert_eq!(parse_span("60"), Ok(60));
        assert_eq!(parse_span("60s"), Ok(60));
        assert_eq!(parse_span("1h 30m"), Ok(5400));
        assert_eq!(parse_span("7d"), Ok(7 * 86400));
        assert!(parse_span("0s").is_err());
        assert!(parse_span("500ms").is_err());
        assert!(parse_span("soon").is_err());
    }
}
