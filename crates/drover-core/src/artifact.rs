//! Artifacts: immutable `NAME:VERSION` entries that map platforms to content-addressed
//! blobs, so each node gets the build that runs there.

use crate::Millis;
use crate::ids::ProjectId;
use crate::platform::BinaryPlatform;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use sha2::Digest as _;
use std::fmt;
use std::io;
use std::str::FromStr;

/// A blob's content address: `sha256:` and 64 lowercase hex digits.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Digest(String);

impl Digest {
    /// The digest of `bytes`, for tests and small payloads; uploads and downloads hash as
    /// they stream, through [`Digest::hasher`].
    pub fn of(bytes: &[u8]) -> Digest {
        let mut hasher = Digest::hasher();
        hasher.update(bytes);
        hasher.finish()
    }

    /// A hasher to feed content to piece by piece, for content too large to hold whole.
    pub fn hasher() -> DigestHasher {
        DigestHasher {
            sha256: sha2::Sha256::new(),
            hashed: 0,
        }
    }

    /// The digest of everything `reader` gives until its end, and how many bytes that
    /// was. The reader is the caller's: this reads, and opens nothing itself.
    pub fn of_reader(mut reader: impl io::Read) -> io::Result<(Digest, u64)> {
        let mut hasher = Digest::hasher();
        // Larger than `io::copy`'s buffer, so a big file takes fewer reads.
        let mut buf = vec![0u8; READ_BUFFER];
        loop {
            match reader.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => hasher.update(&buf[..n]),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        let hashed = hasher.hashed();
        Ok((hasher.finish(), hashed))
    }

    /// A digest from its 64 lowercase hex digits alone, as a file name holds them.
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

/// How much [`Digest::of_reader`] reads at a time.
const READ_BUFFER: usize = 1 << 20;

/// SHA-256 fed piece by piece, ending in a [`Digest`]. It is an [`io::Write`] too, so it
/// can stand at the end of `io::copy` or inside a writer that hashes what it passes on.
pub struct DigestHasher {
    sha256: sha2::Sha256,
    hashed: u64,
}

impl DigestHasher {
    pub fn update(&mut self, bytes: &[u8]) {
        self.sha256.update(bytes);
        self.hashed += bytes.len() as u64;
    }

    /// How many bytes were hashed so far.
    pub fn hashed(&self) -> u64 {
        self.hashed
    }

    pub fn finish(self) -> Digest {
        // Hex of a SHA-256 is exactly 64 lowercase hex digits, which is what a digest is
        // made of, so this is built directly rather than parsed.
        Digest(format!("sha256:{}", hex::encode(self.sha256.finalize())))
    }
}

impl io::Write for DigestHasher {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.update(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl fmt::Debug for DigestHasher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DigestHasher")
            .field("hashed", &self.hashed)
            .finish_non_exhaustive()
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
    fn digests_of_content_agree_however_it_is_fed() {
        // The SHA-256 of "abc", from FIPS 180-2's examples.
        let abc = "sha256:ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad";
        assert_eq!(Digest::of(b"abc").as_str(), abc);
        let mut hasher = Digest::hasher();
        hasher.update(b"a");
        io::Write::write_all(&mut hasher, b"bc").unwrap();
        assert_eq!(hasher.hashed(), 3);
        assert_eq!(hasher.finish().as_str(), abc);
        let (d, n) = Digest::of_reader(&b"abc"[..]).unwrap();
        assert_eq!((d.as_str(), n), (abc, 3));
        // What it builds parses back as the same digest.
        assert_eq!(abc.parse::<Digest>().unwrap(), Digest::of(b"abc"));
        let big = vec![7u8; READ_BUFFER * 2 + 5];
        let mut copied = Digest::hasher();
        io::copy(&mut &big[..], &mut copied).unwrap();
        assert_eq!(
            Digest::of_reader(&big[..]).unwrap(),
            (Digest::of(&big), big.len() as u64)
        );
        assert_eq!(copied.finish(), Digest::of(&big));
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
