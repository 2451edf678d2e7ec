//! Times of task output: the RFC 3339 form they take in JSON and on a terminal, and the
//! `--since` value (`drover logs --since 10m` or `--since 2026-12-03T10:00:00Z`) with
//! the one parser the CLI and the controller's `since` query parameter share.

use crate::Millis;
use std::fmt;
use std::time::{Duration, UNIX_EPOCH};

/// `ms` as an RFC 3339 time in UTC with millisecond precision, e.g.
/// `2026-12-03T10:00:00.123Z`; always 24 characters, so printed times line up.
pub fn format_rfc3339_millis(ms: Millis) -> String {
    // Times before 1970 only come from a broken clock; they show as the epoch rather
    // than as a time the formatter cannot express.
    let at = UNIX_EPOCH + Duration::from_millis(u64::try_from(ms).unwrap_or(0));
    humantime::format_rfc3339_millis(at).to_string()
}

/// Reads an RFC 3339 time (`2026-12-03T10:00:00Z`, with any fraction of a second, and
/// `Z` or a `+HH:MM`/`-HH:MM` offset) as milliseconds since the epoch.
pub fn parse_rfc3339(s: &str) -> Result<Millis, String> {
    let bad = || {
        format!(
            "expected an RFC 3339 time like 2026-12-03T10:00:00Z or 2026-12-03T11:00:00+01:00, got {s:?}"
        )
    };
    // Everything below slices by bytes, which is only safe for ASCII.
    if !s.is_ascii() || s.len() < "2026-12-03T10:00:00Z".len() || s.as_bytes()[10] != b'T' {
        return Err(bad());
    }
    let (utc, offset_minutes) = if s.ends_with('Z') || s.ends_with('z') {
        (format!("{}Z", &s[..s.len() - 1]), 0i64)
    } else {
        // The last six bytes are the offset: a sign, two digits, a colon, two digits.
        let (rest, zone) = s.split_at(s.len() - 6);
        let z = zone.as_bytes();
        let sign = match z[0] {
            b'+' => 1,
            b'-' => -1,
            _ => return Err(bad()),
        };
        let digits = |a: u8, b: u8| -> Option<i64> {
            Some(i64::from(
                (a as char).to_digit(10)? * 10 + (b as char).to_digit(10)?,
            ))
        };
        let (Some(h), Some(m), b':') = (digits(z[1], z[2]), digits(z[4], z[5]), z[3]) else {
            return Err(bad());
        };
        if h > 23 || m > 59 {
            return Err(bad());
        }
        (format!("{rest}Z"), sign * (h * 60 + m))
    };
    let at = humantime::parse_rfc3339(&utc).map_err(|_| bad())?;
    let ms = at
        .duration_since(UNIX_EPOCH)
        .map_err(|_| bad())
        .map(crate::duration_millis)?;
    // `10:00+01:00` is 09:00 in UTC.
    Ok(ms.saturating_sub(offset_minutes * 60_000))
}

/// Where `drover logs --since` starts: a time ago, or a moment.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Since {
    /// This long before now, by the clock of whoever resolves it (the controller, so
    /// that the CLI's clock does not matter).
    Ago(Duration),
    /// A moment, in milliseconds since the epoch.
    At(Millis),
}

impl Since {
    /// The moment this names, `now` being the current time.
    pub fn resolve(self, now: Millis) -> Millis {
        match self {
            Since::Ago(d) => now.saturating_sub(crate::duration_millis(d)),
            Since::At(at) => at,
        }
    }
}

/// What a wrong `--since` or `since` is told.
pub const SINCE_FORMS: &str =
    "a duration like 10m or 1h30m, or an RFC 3339 time like 2026-12-03T10:00:00Z";

impl std::str::FromStr for Since {
    type Err = String;

    fn from_str(s: &str) -> Result<Since, String> {
        let t = s.trim();
        // A time starts with its four-digit year and a dash; anything else is read as
        // a duration.
        let looks_like_time = t.len() > 4 && t.as_bytes()[4] == b'-';
        let parsed = if looks_like_time {
            parse_rfc3339(t).ok().map(Since::At)
        } else {
            humantime::parse_duration(t).ok().map(Since::Ago)
        };
        parsed.ok_or_else(|| {
            format!("expected {SINCE_FORMS} (a time ends in Z or an offset like +01:00), got {s:?}")
        })
    }
}

/// The form the controller's `since` query parameter takes: whole milliseconds for a
/// duration (no spaces to escape), RFC 3339 in UTC for a moment.
impl fmt::Display for Since {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Since::Ago(d) => write!(f, "{}ms", d.as_millis()),
            Since::At(at) => f.write_str(&format_rfc3339_millis(*at)),
        }
    }
}

/// Serde for an optional [`Millis`] written as an RFC 3339 time, as the `time` of a log
/// event appears in JSON.
pub mod rfc3339_opt {
    use crate::Millis;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &Option<Millis>, s: S) -> Result<S::Ok, S::Error> {
        match v {
            Some(ms) => s.serialize_str(&super::format_rfc3339_millis(*ms)),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Millis>, D::Error> {
        let text: Option<String> = Option::deserialize(d)?;
        text.map(|t| super::parse_rfc3339(&t).map_err(serde::de::Error::custom))
            .transpose()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_format_with_milliseconds_and_parse_back() {
        assert_eq!(format_rfc3339_millis(0), "1970-01-01T00:00:00.000Z");
        let t = parse_rfc3339("2026-12-03T10:00:00.123Z").unwrap();
        assert_eq!(format_rfc3339_millis(t), "2026-12-03T10:00:00.123Z");
        assert_eq!(parse_rfc3339("2026-12-03T10:00:00Z").unwrap(), t - 123);
        assert_eq!(
            parse_rfc3339("2026-12-03T11:00:00.123+01:00").unwrap(),
            t,
            "an offset ahead of UTC"
        );
        assert_eq!(parse_rfc3339("2026-12-03T08:30:00.123-01:30").unwrap(), t);
        for bad in [
            "",
            "yesterday",
            "2026-12-03",
            "2026-12-03 10:00:00Z",
            "2026-12-03T10:00:00",
            "2026-12-03T10:00:00+1:00",
            "2026-12-03T10:00:00+25:00",
            "2026-13-03T10:00:00Z",
            "2026-12-03T10:00:00Zé",
        ] {
            let e = parse_rfc3339(bad).unwrap_err();
            assert!(e.contains("expected an RFC 3339 time"), "{bad}: {e}");
        }
    }

    #[test]
    fn since_is_a_duration_or_a_time() {
        assert_eq!(
            "10m".parse::<Since>(),
            Ok(Since::Ago(Duration::from_secs(600)))
        );
        assert_eq!(
            "1h30m".parse::<Since>(),
            Ok(Since::Ago(Duration::from_secs(5400)))
        );
        let at = parse_rfc3339("2026-12-03T10:00:00Z").unwrap();
        assert_eq!("2026-12-03T10:00:00Z".parse::<Since>(), Ok(Since::At(at)));
        assert_eq!(Since::Ago(Duration::from_secs(60)).resolve(100_000), 40_000);
        assert_eq!(Since::At(at).resolve(0), at);
        // What the CLI sends reads back as the same value.
        for v in [Since::Ago(Duration::from_millis(1500)), Since::At(at + 7)] {
            assert_eq!(v.to_string().parse::<Since>(), Ok(v));
        }
        for bad in [
            "",
            "ten minutes",
            "10",
            "-5m",
            "2026-12-03",
            "2026-12-03T10:00",
        ] {
            let e = bad.parse::<Since>().unwrap_err();
            assert!(
                e.contains("a duration like 10m") && e.contains("RFC 3339"),
                "{bad}: {e}"
            );
        }
    }

    #[test]
    fn an_optional_time_is_rfc3339_in_json() {
        #[derive(serde::Serialize, serde::Deserialize, PartialEq, Debug)]
        struct E {
            #[serde(default, with = "rfc3339_opt")]
            time: Option<Millis>,
        }
        let e = E {
            time: Some(1_796_292_000_123),
        };
        let text = serde_json::to_string(&e).unwrap();
        assert_eq!(text, r#"{"time":"2026-12-03T10:00:00.123Z"}"#);
        assert_eq!(serde_json::from_str::<E>(&text).unwrap(), e);
        assert_eq!(serde_json::from_str::<E>("{}").unwrap(), E { time: None });
        assert!(serde_json::from_str::<E>(r#"{"time":"noon"}"#).is_err());
    }
}
