//! Artifacts: immutable `NAME:VERSION` entries that map platforms to content-addressed
//! blobs, so each node gets the build that runs there.

use crate::Millis;
use crate::ids::ProjectId;
use crate::platform::BinaryPlatform;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::fmt;
use std::str::FromStr;

/// A blob's content address: `sha256:` and 64 lowercase hex digits.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Digest(String);

impl Digest {
    /// The digest of `bytes`, for tests and small payloads; uploads hash as they stream.
    pub fn of_hex(hex: &str) -> Result<Digest, String> {
        format!("sha256:{hex}").parse()
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The 64 hex digits alone, as used in file names.
    pub fn hex(&self) -> &str {
        &self.0["sha256:".len()..]
    }
}

impl FromStr for Digest {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let hex = s
            .strip_prefix("sha256:")
            .ok_or_else(|| format!("digest {s:?}: expected sha256: followed by 64 hex digits"))?;
        let ok = hex.len() == 64
            && hex
                .chars()
                .all(|c| c.is_ascii_digit() || ('a'..='f').contains(&c));
        if !ok {
            return Err(format!(
                "digest {s:?}: expected sha256: followed by 64 lowercase hex digits"
            ));
        }
        Ok(Digest(s.to_string()))
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl Serialize for Digest {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for Digest {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

/// `NAME:VERSION`, as jobs and the CLI name an artifact.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ArtifactRef {
    pub name: String,
    pub version: String,
}

fn valid_part(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 128
        && s.chars().next().is_some_and(|c| c.is_ascii_alphanumeric())
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

impl FromStr for ArtifactRef {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (name, version) = s
            .split_once(':')
            .ok_or_else(|| format!("artifact {s:?}: expected NAME:VERSION, e.g. app:1.2"))?;
        if !valid_part(name) || !valid_part(version) {
            return Err(format!(
                "artifact {s:?}: name and version are 1-128 of letters, digits, '-', '_' or '.', starting with a letter or digit"
            ));
        }
        Ok(ArtifactRef {
            name: name.to_string(),
            version: version.to_string(),
        })
    }
}

impl fmt::Display for ArtifactRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.name, self.version)
    }
}

impl Serialize for ArtifactRef {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for ArtifactRef {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

/// One build of an artifact: what it runs on and where its bytes are.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Variant {
    pub platform: BinaryPlatform,
    pub digest: Digest,
    pub size: u64,
}

/// An immutable artifact version.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Artifact {
    pub project: ProjectId,
    pub name: String,
    pub version: String,
    pub variants: Vec<Variant>,
    pub created_at: Millis,
}

impl Artifact {
    pub fn reference(&self) -> ArtifactRef {
        ArtifactRef {
            name: self.name.clone(),
            version: self.version.clone(),
        }
    }
}

/// What `POST /v1/artifacts` takes: the blobs must have been uploaded first.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewArtifact {
    pub name: String,
    pub version: String,
    pub variants: Vec<Variant>,
}

impl NewArtifact {
    /// Checks the name, the version and that no platform is offered twice.
    pub fn validate(&self) -> Result<ArtifactRef, String> {
        let r: ArtifactRef = format!("{}:{}", self.name, self.version).parse()?;
        if self.variants.is_empty() {
            return Err("variants: at least one is required".into());
        }
        for (i, v) in self.variants.iter().enumerate() {
            if self.variants[..i].iter().any(|w| w.platform == v.platform) {
                return Err(format!(
                    "variants[{i}].platform: {} is offered twice",
                    v.platform
                ));
            }
        }
        Ok(r)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digests_and_references_parse_strictly() {
        let hex = "a".repeat(64);
        let d: Digest = format!("sha256:{hex}").parse().unwrap();
        assert_eq!(d.hex(), hex);
        for bad in [
            "sha256:abc",
            "md5:0000",
            &format!("sha256:{}", "A".repeat(64)),
            &"a".repeat(64),
        ] {
            assert!(bad.parse::<Digest>().is_err(), "{bad}");
        }
        let r: ArtifactRef = "app:1.2.3".parse().unwrap();
        assert_eq!((r.name.as_str(), r.version.as_str()), ("app", "1.2.3"));
        assert_eq!(r.to_string(), "app:1.2.3");
        for bad in ["app", "app:", ":1", "a b:1", "app:1:2", "../x:1"] {
            assert!(bad.parse::<ArtifactRef>().is_err(), "{bad}");
        }
    }

    #[test]
    fn a_platform_offered_twice_is_refused() {
        let v = |p: &str| Variant {
            platform: p.parse().unwrap(),
            digest: Digest::of_hex(&"0".repeat(64)).unwrap(),
            size: 1,
        };
        let a = NewArtifact {
            name: "app".into(),
            version: "1".into(),
            variants: vec![v("linux/amd64"), v("linux/arm64"), v("linux/amd64")],
        };
        assert!(a.validate().unwrap_err().contains("variants[2].platform"));
    }
}
