//! Human-friendly quantities in specs: memory sizes like `64Mi` and durations like `5s`.

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::fmt;
use std::time::Duration;

/// A number of bytes, written in specs as `512`, `64Mi`, `1Gi`, `500M` or `2k`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ByteSize(pub u64);

impl ByteSize {
    pub fn parse(s: &str) -> Result<Self, String> {
        let s = s.trim();
        let split = s
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(s.len());
        let (num, unit) = s.split_at(split);
        let value: f64 = num
            .parse()
            .map_err(|_| format!("expected a size like 64Mi or 1Gi, got {s:?}"))?;
        let mult: u64 = match unit.trim() {
            "" | "B" => 1,
            "k" | "K" | "kB" | "KB" => 1_000,
            "Ki" | "KiB" => 1 << 10,
            "M" | "MB" => 1_000_000,
            "Mi" | "MiB" => 1 << 20,
            "G" | "GB" => 1_000_000_000,
            "Gi" | "GiB" => 1 << 30,
            "T" | "TB" => 1_000_000_000_000,
            "Ti" | "TiB" => 1 << 40,
            other => {
                return Err(format!(
                    "unknown size unit {other:?} in {s:?}; expected one of B, k, Ki, M, Mi, G, Gi, T, Ti"
                ));
            }
        };
        if value < 0.0 || !value.is_finite() {
            return Err(format!("size must be a positive number, got {s:?}"));
        }
        Ok(ByteSize((value * mult as f64).round() as u64))
    }
}

impl fmt::Display for ByteSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = self.0;
        if b >= 1 << 30 && b.is_multiple_of(1 << 30) {
            write!(f, "{}Gi", b >> 30)
        } else if b >= 1 << 20 && b.is_multiple_of(1 << 20) {
            write!(f, "{}Mi", b >> 20)
        } else if b >= 1 << 10 && b.is_multiple_of(1 << 10) {
            write!(f, "{}Ki", b >> 10)
        } else {
            write!(f, "{b}")
        }
    }
}

impl Serialize for ByteSize {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(self.0)
    }
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Num(u64),
            Text(String),
        }
        match Raw::deserialize(d)? {
            Raw::Num(n) => Ok(ByteSize(n)),
            Raw::Text(t) => ByteSize::parse(&t).map_err(serde::de::Error::custom),
        }
    }
}

/// A duration written in specs as `500ms`, `5s`, `1m30s`; stored as milliseconds.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Dur(pub Duration);

impl Dur {
    pub const fn from_millis(ms: u64) -> Self {
        Dur(Duration::from_millis(ms))
    }

    pub const fn from_secs(s: u64) -> Self {
        Dur(Duration::from_secs(s))
    }

    /// The duration in whole milliseconds, saturating at `u64::MAX`: a spec stored
    /// before durations were bounded may hold one whose milliseconds do not fit, and a
    /// wrapped value would turn a huge grace into a tiny one.
    pub fn as_millis(&self) -> u64 {
        u64::try_from(self.0.as_millis()).unwrap_or(u64::MAX)
    }
}

impl fmt::Display for Dur {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", humantime::format_duration(self.0))
    }
}

impl Serialize for Dur {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&humantime::format_duration(self.0).to_string())
    }
}

impl<'de> Deserialize<'de> for Dur {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Secs(u64),
            Text(String),
        }
        match Raw::deserialize(d)? {
            Raw::Secs(n) => Ok(Dur(Duration::from_secs(n))),
            Raw::Text(t) => humantime::parse_duration(t.trim()).map(Dur).map_err(|e| {
                serde::de::Error::custom(format!(
                    "expected a duration like 500ms, 5s or 1m, got {t:?} ({e})"
                ))
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_sizes_parse_binary_and_decimal_units() {
        for (text, bytes) in [
            ("512", 512),
            ("64Mi", 64 << 20),
            ("1Gi", 1 << 30),
            ("500M", 500_000_000),
            ("2k", 2_000),
            ("1.5Gi", 3 << 29),
        ] {
            assert_eq!(ByteSize::parse(text), Ok(ByteSize(bytes)), "{text}");
        }
        assert!(
            ByteSize::parse("12Zb")
                .unwrap_err()
                .contains("unknown size unit")
        );
        assert!(ByteSize::parse("lots").is_err());
    }

    #[test]
    fn durations_round_trip_through_text() {
        let d: Dur = serde_json::from_str("\"1m30s\"").unwrap();
        assert_eq!(d.0, Duration::from_secs(90));
        let back: Dur = serde_json::from_str(&serde_json::to_string(&d).unwrap()).unwrap();
        assert_eq!(back, d);
        let n: Dur = serde_json::from_str("3").unwrap();
        assert_eq!(n.0, Duration::from_secs(3));
        assert!(serde_json::from_str::<Dur>("\"soon\"").is_err());
    }

    #[test]
    fn milliseconds_of_a_huge_duration_saturate_instead_of_wrapping() {
        assert_eq!(Dur::from_secs(u64::MAX).as_millis(), u64::MAX);
        assert_eq!(Dur::from_secs(3600).as_millis(), 3_600_000);
    }
}
