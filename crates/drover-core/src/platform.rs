//! Platforms: what a node's machine is, what a binary needs, and which binaries run where.
//!
//! A platform is written `os/arch[/variant]` in containerd's spelling (`linux/amd64/v3`,
//! `linux/arm64/v8.2`, `darwin/arm64`). Aliases from `uname` and compilers (`x86_64`,
//! `aarch64`, `armv7l`, `i686`...) are normalised when parsed, so every platform has one
//! written form. A binary additionally needs a C library on Linux ([`LibcNeed`]), and a
//! node reports the one it has ([`Libc`]).
//!
//! Selection ([`select`]) follows containerd's ordering: the node's exact platform first,
//! then lower variants its CPU also runs (an amd64 v3 node runs v3, v2, v1 and unversioned
//! amd64 binaries), and a platform-independent `any` (a script) last. Unlike containerd,
//! no other architecture is ever offered (amd64 → 386, arm64 → arm): a 32-bit binary
//! needs kernel support and 32-bit libraries that a node does not report.
//!
//! [`detect_executable`] reads a file's first bytes (ELF, Mach-O, PE or `#!`) and says
//! which platforms it was built for. Everything here is pure: callers do the reading.

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::fmt;
use std::str::FromStr;

/// Why a platform, variant or libc could not be parsed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PlatformError {
    #[error(
        "platform {0:?}: expected os/arch[/variant], e.g. linux/amd64, linux/amd64/v3 or linux/arm64/v8"
    )]
    Shape(String),
    #[error("unknown os {0:?}: expected linux, darwin (or macos), windows or freebsd")]
    Os(String),
    #[error(
        "unknown arch {0:?}: expected amd64 (x86_64), arm64 (aarch64), arm (armv7l, armhf), \
         386 (i386, i686), riscv64, ppc64le or s390x"
    )]
    Arch(String),
    #[error("variant {0:?}: expected vN or vN.M, e.g. v3 or v8.2")]
    VariantSyntax(String),
    #[error("variant {variant:?} for {arch}: expected {expected}")]
    Variant {
        arch: Arch,
        variant: String,
        expected: &'static str,
    },
    #[error("{alias} means {arch}/{implied}, which contradicts the variant {given}")]
    VariantConflict {
        alias: String,
        arch: Arch,
        implied: Variant,
        given: Variant,
    },
    #[error("unknown libc {0:?}: expected gnu (glibc), musl or static")]
    Libc(String),
    #[error("{platform}: a libc (+{libc}) applies only to linux binaries")]
    LibcOs { platform: Platform, libc: LibcNeed },
}

/// An operating system, in containerd's spelling.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Os {
    Linux,
    Darwin,
    Windows,
    FreeBsd,
}

impl Os {
    pub fn as_str(self) -> &'static str {
        match self {
            Os::Linux => "linux",
            Os::Darwin => "darwin",
            Os::Windows => "windows",
            Os::FreeBsd => "freebsd",
        }
    }
}

impl FromStr for Os {
    type Err = PlatformError;

    /// Accepts containerd's names and `uname -s` values, in any case (`Linux`, `Darwin`).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "linux" => Ok(Os::Linux),
            "darwin" | "macos" => Ok(Os::Darwin),
            "windows" => Ok(Os::Windows),
            "freebsd" => Ok(Os::FreeBsd),
            _ => Err(PlatformError::Os(s.to_string())),
        }
    }
}

impl fmt::Display for Os {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A CPU architecture, in containerd's spelling.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Arch {
    Amd64,
    Arm64,
    /// 32-bit ARM; its variant (v5 to v8) is the instruction set version.
    Arm,
    /// 32-bit x86, written `386`.
    I386,
    Riscv64,
    Ppc64le,
    S390x,
}

impl Arch {
    pub fn as_str(self) -> &'static str {
        match self {
            Arch::Amd64 => "amd64",
            Arch::Arm64 => "arm64",
            Arch::Arm => "arm",
            Arch::I386 => "386",
            Arch::Riscv64 => "riscv64",
            Arch::Ppc64le => "ppc64le",
            Arch::S390x => "s390x",
        }
    }

    /// Normalises an architecture name from containerd, `uname -m` or a compiler
    /// (`x86_64`, `aarch64`, `armv7l`, `i686`, Rust's `x86`), case-insensitively. Some
    /// names also imply a variant (`armv7l` and `armhf` are `arm` `v7`), returned with it.
    pub fn normalise(s: &str) -> Result<(Arch, Option<Variant>), PlatformError> {
        let v = |major| Some(Variant { major, minor: 0 });
        Ok(match s.to_ascii_lowercase().as_str() {
            "amd64" | "x86_64" | "x86-64" | "x64" => (Arch::Amd64, None),
            "arm64" | "aarch64" => (Arch::Arm64, None),
            "arm" => (Arch::Arm, None),
            "armhf" | "armv7" | "armv7l" => (Arch::Arm, v(7)),
            "armel" | "armv6" | "armv6l" => (Arch::Arm, v(6)),
            "armv5" | "armv5l" | "armv5tel" | "armv5tejl" => (Arch::Arm, v(5)),
            // A 32-bit user space on an ARMv8 CPU.
            "armv8l" => (Arch::Arm, v(8)),
            "386" | "i386" | "i486" | "i586" | "i686" | "x86" => (Arch::I386, None),
            "riscv64" => (Arch::Riscv64, None),
            "ppc64le" | "powerpc64le" => (Arch::Ppc64le, None),
            "s390x" => (Arch::S390x, None),
            _ => return Err(PlatformError::Arch(s.to_string())),
        })
    }

    /// The variant an unversioned binary or node of this architecture is taken to have:
    /// the baseline every CPU of the architecture runs (containerd treats `amd64` as
    /// `amd64/v1`, `arm64` as `arm64/v8` and `arm` as `arm/v7`).
    pub fn baseline(self) -> Option<Variant> {
        match self {
            Arch::Amd64 => Some(Variant { major: 1, minor: 0 }),
            Arch::Arm64 => Some(Variant { major: 8, minor: 0 }),
            Arch::Arm => Some(Variant { major: 7, minor: 0 }),
            _ => None,
        }
    }

    /// Checks that a variant exists for this architecture.
    fn check(self, v: Variant) -> Result<(), PlatformError> {
        let (ok, expected) = match self {
            Arch::Amd64 => (
                v.minor == 0 && (1..=4).contains(&v.major),
                "v1, v2, v3 or v4 (the x86-64 microarchitecture levels)",
            ),
            Arch::Arm64 => (
                (8..=9).contains(&v.major) && v.minor <= 9,
                "v8, v8.1 ... v8.9, v9 or v9.1 ... v9.9",
            ),
            Arch::Arm => (
                v.minor == 0 && (5..=8).contains(&v.major),
                "v5, v6, v7 or v8",
            ),
            _ => (false, "no variant"),
        };
        if ok {
            Ok(())
        } else {
            Err(PlatformError::Variant {
                arch: self,
                variant: v.to_string(),
                expected,
            })
        }
    }

    /// The variants a CPU of variant `top` runs, best first (`top` itself included).
    fn levels_down(self, top: Variant) -> Vec<Variant> {
        let v = |major, minor| Variant { major, minor };
        match self {
            Arch::Amd64 => (1..=top.major).rev().map(|m| v(m, 0)).collect(),
            Arch::Arm => (5..=top.major).rev().map(|m| v(m, 0)).collect(),
            Arch::Arm64 if top.major == 9 => {
                // v9.0 diverged from v8.5, so a v9.x CPU also runs v8.{x+5} and below,
                // as containerd's matcher has it.
                let nines = (0..=top.minor).rev().map(|m| v(9, m));
                let top8 = top.minor.saturating_add(5).min(9);
                let eights = (0..=top8).rev().map(|m| v(8, m));
                nines.chain(eights).collect()
            }
            Arch::Arm64 if top.major == 8 => (0..=top.minor).rev().map(|m| v(8, m)).collect(),
            _ => vec![top],
        }
    }
}

impl FromStr for Arch {
    type Err = PlatformError;

    /// The architecture alone; a variant implied by the name (`armv7l`) is dropped. Use
    /// [`Arch::normalise`] to keep it.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Arch::normalise(s).map(|(a, _)| a)
    }
}

impl fmt::Display for Arch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An architecture variant, `vMAJOR[.MINOR]`: an x86-64 microarchitecture level (`v1` to
/// `v4`), an ARM architecture version (`v7`, `v8.2`, `v9`). Ordered by version, so a
/// higher variant of the same architecture sorts later.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Variant {
    major: u8,
    minor: u8,
}

impl Variant {
    pub const fn new(major: u8, minor: u8) -> Self {
        Variant { major, minor }
    }

    pub fn major(self) -> u8 {
        self.major
    }

    pub fn minor(self) -> u8 {
        self.minor
    }
}

impl FromStr for Variant {
    type Err = PlatformError;

    /// Parses `v3`, `v8.2`, or the bare numbers containerd also accepts (`7`, `8.1`).
    /// Whether the variant exists for an architecture is checked by [`Platform::new`].
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || PlatformError::VariantSyntax(s.to_string());
        let digits = s.strip_prefix(['v', 'V']).unwrap_or(s);
        let (major, minor) = match digits.split_once('.') {
            Some((a, b)) => (a, Some(b)),
            None => (digits, None),
        };
        let number = |t: &str| -> Result<u8, PlatformError> {
            if t.is_empty() || !t.bytes().all(|b| b.is_ascii_digit()) {
                return Err(bad());
            }
            t.parse().map_err(|_| bad())
        };
        Ok(Variant {
            major: number(major)?,
            minor: minor.map(number).transpose()?.unwrap_or(0),
        })
    }
}

impl fmt::Display for Variant {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // containerd writes a version's `.0` away: `v8`, not `v8.0`.
        if self.minor == 0 {
            write!(f, "v{}", self.major)
        } else {
            write!(f, "v{}.{}", self.major, self.minor)
        }
    }
}

/// A normalised platform, written `os/arch[/variant]`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Platform {
    pub os: Os,
    pub arch: Arch,
    pub variant: Option<Variant>,
}

impl Platform {
    /// A platform whose variant is checked against its architecture. An unversioned
    /// `arm` becomes `arm/v7`, as containerd normalises it.
    pub fn new(os: Os, arch: Arch, variant: Option<Variant>) -> Result<Self, PlatformError> {
        if let Some(v) = variant {
            arch.check(v)?;
        }
        let variant = match (arch, variant) {
            (Arch::Arm, None) => arch.baseline(),
            _ => variant,
        };
        Ok(Platform { os, arch, variant })
    }

    /// The variant this platform is taken to have: its own, or its architecture's baseline.
    fn level(&self) -> Option<Variant> {
        self.variant.or(self.arch.baseline())
    }

    /// The platforms a node of this platform runs, best first: itself, the lower variants
    /// of its architecture, then the unversioned architecture (an `amd64/v3` node gives
    /// `amd64/v3`, `amd64/v2`, `amd64/v1`, `amd64`). The os never changes.
    pub fn fallbacks(&self) -> Vec<Platform> {
        let mut out = vec![self.clone()];
        let Some(top) = self.level() else {
            return out;
        };
        for v in self.arch.levels_down(top) {
            if Some(v) != self.variant {
                out.push(Platform {
                    variant: Some(v),
                    ..self.clone()
                });
            }
        }
        // An unversioned binary needs the baseline, so only a node at or above it runs one.
        // Unversioned `arm` is not listed: it always normalises to `arm/v7`.
        let unversioned = self.variant.is_some() && self.arch != Arch::Arm;
        if unversioned && self.arch.baseline().is_some_and(|b| top >= b) {
            out.push(Platform {
                variant: None,
                ..self.clone()
            });
        }
        out
    }
}

impl FromStr for Platform {
    type Err = PlatformError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let parts: Vec<&str> = s.trim().split('/').collect();
        if !(2..=3).contains(&parts.len()) || parts.iter().any(|p| p.is_empty()) {
            return Err(PlatformError::Shape(s.to_string()));
        }
        let os: Os = parts[0].parse()?;
        let (arch, implied) = Arch::normalise(parts[1])?;
        let given = parts.get(2).map(|v| v.parse::<Variant>()).transpose()?;
        let variant = match (implied, given) {
            (Some(i), Some(g)) if i != g => {
                return Err(PlatformError::VariantConflict {
                    alias: parts[1].to_string(),
                    arch,
                    implied: i,
                    given: g,
                });
            }
            (i, g) => g.or(i),
        };
        Platform::new(os, arch, variant)
    }
}

impl fmt::Display for Platform {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.os, self.arch)?;
        if let Some(v) = self.variant {
            write!(f, "/{v}")?;
        }
        Ok(())
    }
}

/// Serialises a type as its `Display` form and parses it back with `FromStr`, so the
/// wire and the store hold the same text a user writes.
macro_rules! serde_as_string {
    ($t:ty) => {
        impl Serialize for $t {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.collect_str(self)
            }
        }

        impl<'de> Deserialize<'de> for $t {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = String::deserialize(d)?;
                s.parse().map_err(serde::de::Error::custom)
            }
        }
    };
}

serde_as_string!(Platform);
serde_as_string!(Variant);
serde_as_string!(BinaryPlatform);

/// Normalises `uname -s` and `uname -m` (`Linux`, `x86_64` → `linux/amd64`; `Linux`,
/// `armv7l` → `linux/arm/v7`). `uname` does not tell an x86-64 level or an ARMv8.x
/// version; the agent adds those from the CPU's features.
pub fn normalise_uname(sysname: &str, machine: &str) -> Result<Platform, PlatformError> {
    let os: Os = sysname.trim().parse()?;
    let (arch, variant) = Arch::normalise(machine.trim())?;
    Platform::new(os, arch, variant)
}

/// The raw `uname` values a node reported, kept for diagnosis.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Uname {
    pub sysname: String,
    pub release: String,
    pub machine: String,
}

/// Which C library a node has.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LibcKind {
    /// The GNU C library (glibc).
    Gnu,
    Musl,
    /// None was found or it was not recognised: only static binaries are placed there.
    Unknown,
}

impl fmt::Display for LibcKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            LibcKind::Gnu => "gnu",
            LibcKind::Musl => "musl",
            LibcKind::Unknown => "unknown",
        })
    }
}

/// A node's C library, with its version when known; written `gnu 2.36`, `musl`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Libc {
    pub kind: LibcKind,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
}

impl Libc {
    pub fn new(kind: LibcKind, version: Option<String>) -> Self {
        Libc { kind, version }
    }
}

impl fmt::Display for Libc {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.version {
            Some(v) => write!(f, "{} {v}", self.kind),
            None => write!(f, "{}", self.kind),
        }
    }
}

/// The C library a binary needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LibcNeed {
    /// None in particular: statically linked, or built for an OS that has only one C
    /// library (macOS, FreeBSD, Windows), which the os check already guarantees.
    Static,
    /// Dynamically linked against glibc.
    Gnu,
    /// Dynamically linked against musl.
    Musl,
}

impl LibcNeed {
    /// Whether a node with this C library runs such a binary: a static one runs on any,
    /// a glibc one never on musl and a musl one never on glibc.
    pub fn satisfied_by(self, node: LibcKind) -> bool {
        match self {
            LibcNeed::Static => true,
            LibcNeed::Gnu => node == LibcKind::Gnu,
            LibcNeed::Musl => node == LibcKind::Musl,
        }
    }
}

impl FromStr for LibcNeed {
    type Err = PlatformError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "static" => Ok(LibcNeed::Static),
            "gnu" | "glibc" => Ok(LibcNeed::Gnu),
            "musl" => Ok(LibcNeed::Musl),
            _ => Err(PlatformError::Libc(s.to_string())),
        }
    }
}

impl fmt::Display for LibcNeed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            LibcNeed::Static => "static",
            LibcNeed::Gnu => "gnu",
            LibcNeed::Musl => "musl",
        })
    }
}

/// What a binary (one variant of an artifact) runs on. Written `any`, or
/// `os/arch[/variant][+gnu|+musl]`; no suffix (or `+static`) means no particular libc.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum BinaryPlatform {
    /// Platform-independent: a script or data, which runs wherever its interpreter does.
    Any,
    Native {
        platform: Platform,
        libc: LibcNeed,
    },
}

impl BinaryPlatform {
    pub fn native(platform: Platform, libc: LibcNeed) -> Self {
        BinaryPlatform::Native { platform, libc }
    }
}

impl FromStr for BinaryPlatform {
    type Err = PlatformError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        if s.eq_ignore_ascii_case("any") {
            return Ok(BinaryPlatform::Any);
        }
        let (platform, libc) = match s.split_once('+') {
            Some((p, l)) => (p.parse::<Platform>()?, l.parse::<LibcNeed>()?),
            None => (s.parse::<Platform>()?, LibcNeed::Static),
        };
        if libc != LibcNeed::Static && platform.os != Os::Linux {
            return Err(PlatformError::LibcOs { platform, libc });
        }
        Ok(BinaryPlatform::Native { platform, libc })
    }
}

impl fmt::Display for BinaryPlatform {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BinaryPlatform::Any => f.write_str("any"),
            BinaryPlatform::Native { platform, libc } => match libc {
                LibcNeed::Static => write!(f, "{platform}"),
                _ => write!(f, "{platform}+{libc}"),
            },
        }
    }
}

/// What a node offers binaries: its platform (with variant) and its C library.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodePlatform {
    pub platform: Platform,
    pub libc: Libc,
}

/// How well a binary suits a node, best first.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Match {
    /// Built for the node's exact os, arch and variant.
    Exact,
    /// Built for a lower variant (or the unversioned architecture) that the node's CPU
    /// also runs, `steps` places down the node's [`Platform::fallbacks`].
    Compatible { steps: usize },
    /// Platform-independent.
    Any,
}

/// Whether a binary runs on a node, and how well. The os and arch must be the node's,
/// the variant the node's or one its CPU also runs, and the libc one the node has.
pub fn runs_on(binary: &BinaryPlatform, node: &NodePlatform) -> Option<Match> {
    match binary {
        BinaryPlatform::Any => Some(Match::Any),
        BinaryPlatform::Native { platform, libc } => {
            if !libc.satisfied_by(node.libc.kind) {
                return None;
            }
            match node
                .platform
                .fallbacks()
                .iter()
                .position(|p| p == platform)?
            {
                0 => Some(Match::Exact),
                steps => Some(Match::Compatible { steps }),
            }
        }
    }
}

/// The best binary for a node among those offered: an exact platform first, then the
/// highest compatible variant, then `any`. Between binaries for the same platform, one
/// built for the node's libc wins over a static one (it was built for this system), and
/// then the first offered wins.
pub fn select<'a>(
    offered: &'a [BinaryPlatform],
    node: &NodePlatform,
) -> Option<&'a BinaryPlatform> {
    offered
        .iter()
        .enumerate()
        .filter_map(|(i, b)| {
            let rank = match runs_on(b, node)? {
                Match::Exact => 0,
                Match::Compatible { steps } => steps,
                Match::Any => usize::MAX,
            };
            let generic = matches!(
                b,
                BinaryPlatform::Native {
                    libc: LibcNeed::Static,
                    ..
                }
            );
            Some(((rank, generic, i), b))
        })
        .min_by_key(|(key, _)| *key)
        .map(|(_, b)| b)
}

/// The node platform an emulated platform offers binaries. An emulator brings no C
/// library of the emulated machine with it, so only binaries that need none (static
/// ones) run under it.
fn emulated_node(platform: &Platform) -> NodePlatform {
    NodePlatform {
        platform: platform.clone(),
        libc: Libc::new(LibcKind::Unknown, None),
    }
}

/// The first of a node's emulated platforms that runs a binary, if any. A
/// platform-independent binary never needs an emulator, so it gives `None`.
pub fn runs_emulated<'a>(
    binary: &BinaryPlatform,
    emulated: &'a [Platform],
) -> Option<&'a Platform> {
    if matches!(binary, BinaryPlatform::Any) {
        return None;
    }
    emulated
        .iter()
        .find(|e| runs_on(binary, &emulated_node(e)).is_some())
}

/// The best binary for a node that runs none of those offered natively but emulates
/// other platforms: the best one (as [`select`] ranks them) for the first emulated
/// platform that runs any.
pub fn select_emulated<'a>(
    offered: &'a [BinaryPlatform],
    emulated: &[Platform],
) -> Option<&'a BinaryPlatform> {
    emulated.iter().find_map(|e| {
        select(offered, &emulated_node(e)).filter(|b| !matches!(b, BinaryPlatform::Any))
    })
}

// ---------------------------------------------------------------------------------------
// Executable format detection.
// ---------------------------------------------------------------------------------------

/// Why a file's first bytes do not say what it runs on.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum FormatError {
    #[error("the file is empty")]
    Empty,
    #[error("truncated {what}: needs {need} bytes, only {got} given")]
    Truncated {
        what: &'static str,
        need: u64,
        got: usize,
    },
    #[error(
        "not a native executable or script (it starts with {magic}); expected ELF, Mach-O, PE or #!"
    )]
    Unknown { magic: String },
    /// A recognised format that Drover cannot run: another machine, an object file...
    #[error("{0}")]
    Unsupported(String),
}

/// The container format of an executable.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExecutableFormat {
    Elf,
    MachO,
    /// A universal (fat) Mach-O holding one image per architecture.
    MachOFat,
    /// A Windows PE executable.
    Pe,
    /// A `#!` script.
    Script,
}

/// What [`detect_executable`] found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Executable {
    pub format: ExecutableFormat,
    /// The platforms the file runs on: one, one per image of a universal Mach-O, or
    /// [`BinaryPlatform::Any`] for a script.
    pub platforms: Vec<BinaryPlatform>,
    /// The ELF program interpreter (`PT_INTERP`) or the script's `#!` line, if any.
    pub interpreter: Option<String>,
}

/// Says which platforms an executable was built for, from its first bytes (64 KiB is
/// plenty: the headers this reads sit at the start of every real binary). Never panics,
/// whatever the bytes.
pub fn detect_executable(head: &[u8]) -> Result<Executable, FormatError> {
    if head.is_empty() {
        return Err(FormatError::Empty);
    }
    let be32 = head
        .get(..4)
        .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]));
    if head.starts_with(b"\x7fELF") {
        elf(head)
    } else if head.starts_with(b"#!") {
        Ok(script(head))
    } else if head.starts_with(b"MZ") {
        pe(head)
    } else if matches!(be32, Some(0xcafe_babe | 0xcafe_babf)) {
        macho_fat(head)
    } else if matches!(be32.map(u32::swap_bytes), Some(MH_MAGIC | MH_MAGIC_64)) {
        macho_thin(head)
    } else if matches!(be32, Some(MH_MAGIC | MH_MAGIC_64)) {
        Err(FormatError::Unsupported(
            "a big-endian (PowerPC) Mach-O executable, which Drover does not support".into(),
        ))
    } else {
        let magic: Vec<String> = head.iter().take(4).map(|b| format!("{b:02x}")).collect();
        Err(FormatError::Unknown {
            magic: magic.join(" "),
        })
    }
}

/// Bounds-checked reads of fixed-size integers at file offsets.
struct Reader<'a> {
    data: &'a [u8],
    big_endian: bool,
}

impl Reader<'_> {
    fn bytes<const N: usize>(&self, at: u64) -> Option<[u8; N]> {
        let start = usize::try_from(at).ok()?;
        let end = start.checked_add(N)?;
        self.data.get(start..end)?.try_into().ok()
    }

    fn u16(&self, at: u64) -> Option<u16> {
        let b = self.bytes::<2>(at)?;
        Some(if self.big_endian {
            u16::from_be_bytes(b)
        } else {
            u16::from_le_bytes(b)
        })
    }

    fn u32(&self, at: u64) -> Option<u32> {
        let b = self.bytes::<4>(at)?;
        Some(if self.big_endian {
            u32::from_be_bytes(b)
        } else {
            u32::from_le_bytes(b)
        })
    }

    fn u64(&self, at: u64) -> Option<u64> {
        let b = self.bytes::<8>(at)?;
        Some(if self.big_endian {
            u64::from_be_bytes(b)
        } else {
            u64::from_le_bytes(b)
        })
    }

    /// A read that must succeed for `what` to be parsed; its failure names the bytes needed.
    fn need<T>(
        &self,
        what: &'static str,
        at: u64,
        size: u64,
        v: Option<T>,
    ) -> Result<T, FormatError> {
        v.ok_or(FormatError::Truncated {
            what,
            need: at.saturating_add(size),
            got: self.data.len(),
        })
    }
}

fn unsupported(msg: impl Into<String>) -> FormatError {
    FormatError::Unsupported(msg.into())
}

/// A platform this module built from known-good parts; its variant is always valid.
fn known(os: Os, arch: Arch) -> Platform {
    Platform {
        os,
        arch,
        variant: match arch {
            Arch::Arm => arch.baseline(),
            _ => None,
        },
    }
}

const EM_386: u16 = 3;
const EM_PPC64: u16 = 21;
const EM_S390: u16 = 22;
const EM_ARM: u16 = 40;
const EM_X86_64: u16 = 62;
const EM_AARCH64: u16 = 183;
const EM_RISCV: u16 = 243;
const PT_INTERP: u32 = 3;

fn elf(head: &[u8]) -> Result<Executable, FormatError> {
    let ident = Reader {
        data: head,
        big_endian: false,
    };
    let id = ident.need("ELF identification", 0, 16, ident.bytes::<16>(0))?;
    let is64 = match id[4] {
        1 => false,
        2 => true,
        c => {
            return Err(unsupported(format!(
                "ELF class {c} is neither 32-bit (1) nor 64-bit (2)"
            )));
        }
    };
    let big_endian = match id[5] {
        1 => false,
        2 => true,
        d => {
            return Err(unsupported(format!(
                "ELF data encoding {d} is neither little- (1) nor big-endian (2)"
            )));
        }
    };
    let r = Reader {
        data: head,
        big_endian,
    };
    let header = if is64 { 64 } else { 52 };
    r.need("ELF header", 0, header, r.bytes::<1>(header - 1))?;
    let what = "ELF header";
    match r.need(what, 16, 2, r.u16(16))? {
        2 | 3 => {}
        1 => {
            return Err(unsupported(
                "an ELF relocatable object file, not an executable",
            ));
        }
        4 => return Err(unsupported("an ELF core dump, not an executable")),
        t => {
            return Err(unsupported(format!(
                "an ELF file of type {t}, not an executable"
            )));
        }
    }
    let machine = r.need(what, 18, 2, r.u16(18))?;
    let arch = match (machine, is64, big_endian) {
        (EM_X86_64, true, false) => Arch::Amd64,
        (EM_AARCH64, true, false) => Arch::Arm64,
        (EM_ARM, false, false) => Arch::Arm,
        (EM_386, false, false) => Arch::I386,
        (EM_RISCV, true, false) => Arch::Riscv64,
        (EM_PPC64, true, false) => Arch::Ppc64le,
        (EM_S390, true, true) => Arch::S390x,
        _ => {
            return Err(unsupported(format!(
                "an ELF executable for machine {machine} ({}-bit, {}-endian), which Drover does \
                 not support; supported: x86-64, AArch64, ARM, i386, RISC-V 64, PPC64 \
                 little-endian and s390x",
                if is64 { 64 } else { 32 },
                if big_endian { "big" } else { "little" },
            )));
        }
    };
    let os = match id[7] {
        // System V (most Linux binaries) and GNU/Linux.
        0 | 3 => Os::Linux,
        9 => Os::FreeBsd,
        abi => {
            return Err(unsupported(format!(
                "an ELF executable for OS ABI {abi}, which Drover does not support; \
                 supported: System V or GNU/Linux (0, 3) and FreeBSD (9)"
            )));
        }
    };
    let (phoff, phentsize, phnum, min_entry) = if is64 {
        (
            r.need(what, 32, 8, r.u64(32))?,
            r.need(what, 54, 2, r.u16(54))?,
            r.need(what, 56, 2, r.u16(56))?,
            56,
        )
    } else {
        (
            u64::from(r.need(what, 28, 4, r.u32(28))?),
            r.need(what, 42, 2, r.u16(42))?,
            r.need(what, 44, 2, r.u16(44))?,
            32,
        )
    };
    if phnum > 0 && phentsize < min_entry {
        return Err(unsupported(format!(
            "a malformed ELF file: program header entries of {phentsize} bytes, \
             at least {min_entry} expected"
        )));
    }
    let mut interpreter = None;
    for i in 0..u64::from(phnum) {
        let what = "ELF program headers";
        let at = u64::from(phentsize)
            .checked_mul(i)
            .and_then(|o| o.checked_add(phoff))
            .ok_or_else(|| unsupported("a malformed ELF file: program headers past 2^64"))?;
        if r.need(what, at, 4, r.u32(at))? != PT_INTERP {
            continue;
        }
        let off = |d: u64| at.saturating_add(d);
        let (offset, size) = if is64 {
            (
                r.need(what, off(8), 8, r.u64(off(8)))?,
                r.need(what, off(32), 8, r.u64(off(32)))?,
            )
        } else {
            (
                u64::from(r.need(what, off(4), 4, r.u32(off(4)))?),
                u64::from(r.need(what, off(16), 4, r.u32(off(16)))?),
            )
        };
        let end = offset.saturating_add(size);
        let bytes = usize::try_from(offset)
            .ok()
            .zip(usize::try_from(end).ok())
            .and_then(|(s, e)| head.get(s..e))
            .ok_or(FormatError::Truncated {
                what: "ELF program interpreter",
                need: end,
                got: head.len(),
            })?;
        let text = bytes.split(|b| *b == 0).next().unwrap_or_default();
        interpreter = Some(String::from_utf8_lossy(text).into_owned());
        break;
    }
    let libc = match &interpreter {
        None => LibcNeed::Static,
        Some(path) => {
            let name = path.rsplit('/').next().unwrap_or_default();
            if name.starts_with("ld-musl") {
                LibcNeed::Musl
            } else if name.starts_with("ld-linux") || name.starts_with("ld64.so") {
                // glibc's loader: `ld-linux-x86-64.so.2`, `ld-linux-aarch64.so.1`,
                // `ld-linux.so.2` (i386), and `ld64.so.2` / `ld64.so.1` on ppc64le / s390x.
                LibcNeed::Gnu
            } else if os != Os::Linux {
                // FreeBSD has one C library, found by its own loader.
                LibcNeed::Static
            } else {
                return Err(unsupported(format!(
                    "an ELF executable with program interpreter {path:?}; expected none (static), \
                     ld-linux*.so (glibc) or ld-musl-*.so (musl)"
                )));
            }
        }
    };
    Ok(Executable {
        format: ExecutableFormat::Elf,
        platforms: vec![BinaryPlatform::native(known(os, arch), libc)],
        interpreter,
    })
}

const MH_MAGIC: u32 = 0xfeed_face;
const MH_MAGIC_64: u32 = 0xfeed_facf;
const MH_EXECUTE: u32 = 2;
const CPU_TYPE_X86: u32 = 7;
const CPU_TYPE_X86_64: u32 = 0x0100_0007;
const CPU_TYPE_ARM64: u32 = 0x0100_000c;

fn macho_arch(cputype: u32) -> Option<Arch> {
    match cputype {
        CPU_TYPE_X86_64 => Some(Arch::Amd64),
        CPU_TYPE_ARM64 => Some(Arch::Arm64),
        CPU_TYPE_X86 => Some(Arch::I386),
        _ => None,
    }
}

fn macho_thin(head: &[u8]) -> Result<Executable, FormatError> {
    let r = Reader {
        data: head,
        big_endian: false,
    };
    let what = "Mach-O header";
    let cputype = r.need(what, 4, 4, r.u32(4))?;
    let filetype = r.need(what, 12, 4, r.u32(12))?;
    let arch = macho_arch(cputype).ok_or_else(|| {
        unsupported(format!(
            "a Mach-O executable for cputype {cputype:#x}, which Drover does not support; \
             supported: x86_64 ({CPU_TYPE_X86_64:#x}), arm64 ({CPU_TYPE_ARM64:#x}) and i386"
        ))
    })?;
    if filetype != MH_EXECUTE {
        return Err(unsupported(format!(
            "a Mach-O file of type {filetype} (a library or object file), not an executable"
        )));
    }
    Ok(Executable {
        format: ExecutableFormat::MachO,
        platforms: vec![BinaryPlatform::native(
            known(Os::Darwin, arch),
            LibcNeed::Static,
        )],
        interpreter: None,
    })
}

fn macho_fat(head: &[u8]) -> Result<Executable, FormatError> {
    let r = Reader {
        data: head,
        big_endian: true,
    };
    let what = "universal Mach-O header";
    let wide = r.need(what, 0, 4, r.u32(0))? == 0xcafe_babf;
    let count = r.need(what, 4, 4, r.u32(4))?;
    // Java class files share the 0xcafebabe magic; there the next word is the class
    // file version, 45 or more, while a universal binary holds a handful of images.
    if count >= 45 {
        return Err(unsupported(
            "a Java class file (magic 0xcafebabe), not a native executable",
        ));
    }
    if count == 0 || count > 30 {
        return Err(unsupported(format!(
            "a malformed universal Mach-O header: {count} architectures"
        )));
    }
    let entry: u64 = if wide { 32 } else { 20 };
    let mut platforms = Vec::new();
    let mut others = Vec::new();
    for i in 0..u64::from(count) {
        let at = 8 + i * entry;
        // Read the whole entry so a truncated table is reported as such.
        r.need(what, at, entry, r.bytes::<1>(at + entry - 1))?;
        let cputype = r.need(what, at, 4, r.u32(at))?;
        match macho_arch(cputype) {
            Some(arch) => {
                let p = BinaryPlatform::native(known(Os::Darwin, arch), LibcNeed::Static);
                if !platforms.contains(&p) {
                    platforms.push(p);
                }
            }
            None => others.push(format!("{cputype:#x}")),
        }
    }
    if platforms.is_empty() {
        return Err(unsupported(format!(
            "a universal Mach-O for cputypes {}, none of which Drover supports",
            others.join(", ")
        )));
    }
    Ok(Executable {
        format: ExecutableFormat::MachOFat,
        platforms,
        interpreter: None,
    })
}

fn pe(head: &[u8]) -> Result<Executable, FormatError> {
    let r = Reader {
        data: head,
        big_endian: false,
    };
    let lfanew = u64::from(r.need("DOS header", 0x3c, 4, r.u32(0x3c))?);
    let what = "PE header";
    let signature = r.need(what, lfanew, 4, r.bytes::<4>(lfanew))?;
    if &signature != b"PE\0\0" {
        return Err(unsupported(
            "a DOS executable (MZ) without a PE header, which Drover does not support",
        ));
    }
    let machine = r.need(what, lfanew + 4, 2, r.u16(lfanew + 4))?;
    let arch = match machine {
        0x8664 => Arch::Amd64,
        0xaa64 => Arch::Arm64,
        0x014c => Arch::I386,
        0x01c4 => Arch::Arm,
        m => {
            return Err(unsupported(format!(
                "a PE executable for machine {m:#06x}, which Drover does not support; \
                 supported: amd64, arm64, i386 and arm"
            )));
        }
    };
    Ok(Executable {
        format: ExecutableFormat::Pe,
        platforms: vec![BinaryPlatform::native(
            known(Os::Windows, arch),
            LibcNeed::Static,
        )],
        interpreter: None,
    })
}

fn script(head: &[u8]) -> Executable {
    let rest = head.strip_prefix(b"#!").unwrap_or(head);
    let line = rest.split(|b| *b == b'\n').next().unwrap_or_default();
    let line = String::from_utf8_lossy(line).trim().to_string();
    Executable {
        format: ExecutableFormat::Script,
        platforms: vec![BinaryPlatform::Any],
        interpreter: (!line.is_empty()).then_some(line),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> Platform {
        s.parse().unwrap()
    }

    fn b(s: &str) -> BinaryPlatform {
        s.parse().unwrap()
    }

    fn node(platform: &str, libc: LibcKind) -> NodePlatform {
        NodePlatform {
            platform: p(platform),
            libc: Libc::new(libc, None),
        }
    }

    #[test]
    fn platforms_parse_to_one_normal_form() {
        let cases = [
            ("linux/amd64", "linux/amd64"),
            ("linux/x86_64", "linux/amd64"),
            ("linux/x86-64/v3", "linux/amd64/v3"),
            ("Linux/AMD64/V2", "linux/amd64/v2"),
            ("linux/amd64/v1", "linux/amd64/v1"),
            ("linux/aarch64", "linux/arm64"),
            ("linux/arm64/v8", "linux/arm64/v8"),
            ("linux/arm64/v8.0", "linux/arm64/v8"),
            ("linux/arm64/8.2", "linux/arm64/v8.2"),
            ("linux/arm64/v9.1", "linux/arm64/v9.1"),
            ("linux/armv7l", "linux/arm/v7"),
            ("linux/armhf", "linux/arm/v7"),
            ("linux/armhf/v7", "linux/arm/v7"),
            ("linux/arm", "linux/arm/v7"),
            ("linux/arm/v6", "linux/arm/v6"),
            ("linux/armel", "linux/arm/v6"),
            ("linux/i386", "linux/386"),
            ("linux/i686", "linux/386"),
            ("linux/386", "linux/386"),
            ("linux/riscv64", "linux/riscv64"),
            ("linux/ppc64le", "linux/ppc64le"),
            ("linux/s390x", "linux/s390x"),
            ("darwin/arm64", "darwin/arm64"),
            ("macos/x86_64", "darwin/amd64"),
            ("windows/amd64", "windows/amd64"),
            ("freebsd/amd64", "freebsd/amd64"),
            (" linux/amd64 ", "linux/amd64"),
        ];
        for (input, want) in cases {
            let got = p(input);
            assert_eq!(got.to_string(), want, "{input}");
            // The normal form parses back to itself.
            assert_eq!(p(want), got, "{input}");
        }
    }

    #[test]
    fn bad_platforms_say_what_was_expected() {
        let cases = [
            ("", "expected os/arch[/variant]"),
            ("linux", "expected os/arch[/variant]"),
            ("linux/", "expected os/arch[/variant]"),
            ("linux/amd64/v3/x", "expected os/arch[/variant]"),
            (
                "plan9/amd64",
                "unknown os \"plan9\": expected linux, darwin",
            ),
            (
                "linux/mips",
                "unknown arch \"mips\": expected amd64 (x86_64)",
            ),
            (
                "linux/amd64/v5",
                "variant \"v5\" for amd64: expected v1, v2, v3 or v4",
            ),
            ("linux/amd64/v2.1", "variant \"v2.1\" for amd64"),
            ("linux/arm64/v7", "variant \"v7\" for arm64: expected v8"),
            ("linux/arm64/v10", "variant \"v10\" for arm64"),
            (
                "linux/arm/v9",
                "variant \"v9\" for arm: expected v5, v6, v7 or v8",
            ),
            (
                "linux/riscv64/v1",
                "variant \"v1\" for riscv64: expected no variant",
            ),
            ("linux/amd64/vx", "variant \"vx\": expected vN or vN.M"),
            ("linux/amd64/v", "variant \"v\": expected vN or vN.M"),
            ("linux/amd64/v999", "variant \"v999\": expected vN or vN.M"),
            ("linux/arm64/v8.", "variant \"v8.\": expected vN or vN.M"),
            (
                "linux/armv7l/v6",
                "armv7l means arm/v7, which contradicts the variant v6",
            ),
        ];
        for (input, want) in cases {
            let err = input.parse::<Platform>().unwrap_err().to_string();
            assert!(err.contains(want), "{input:?}: {err}");
        }
    }

    #[test]
    fn platforms_serialise_as_their_string() {
        let plat = p("linux/arm64/v8.2");
        let json = serde_json::to_string(&plat).unwrap();
        assert_eq!(json, "\"linux/arm64/v8.2\"");
        assert_eq!(serde_json::from_str::<Platform>(&json).unwrap(), plat);
        let err = serde_json::from_str::<Platform>("\"linux/vax\"").unwrap_err();
        assert!(err.to_string().contains("unknown arch"), "{err}");
        let bin = b("linux/amd64/v2+musl");
        let json = serde_json::to_string(&bin).unwrap();
        assert_eq!(json, "\"linux/amd64/v2+musl\"");
        assert_eq!(serde_json::from_str::<BinaryPlatform>(&json).unwrap(), bin);
        let libc = Libc::new(LibcKind::Gnu, Some("2.36".into()));
        assert_eq!(
            serde_json::to_value(&libc).unwrap(),
            serde_json::json!({"kind": "gnu", "version": "2.36"})
        );
        assert_eq!(libc.to_string(), "gnu 2.36");
        assert_eq!(Libc::new(LibcKind::Musl, None).to_string(), "musl");
    }

    #[test]
    fn binary_platforms_parse_with_their_libc() {
        let cases = [
            ("any", "any"),
            ("ANY", "any"),
            ("linux/amd64", "linux/amd64"),
            ("linux/amd64+static", "linux/amd64"),
            ("linux/x86_64/v3+gnu", "linux/amd64/v3+gnu"),
            ("linux/amd64+glibc", "linux/amd64+gnu"),
            ("linux/aarch64+musl", "linux/arm64+musl"),
            ("darwin/arm64", "darwin/arm64"),
        ];
        for (input, want) in cases {
            assert_eq!(b(input).to_string(), want, "{input}");
        }
        let err = "linux/amd64+uclibc".parse::<BinaryPlatform>().unwrap_err();
        assert!(
            err.to_string()
                .contains("expected gnu (glibc), musl or static"),
            "{err}"
        );
        let err = "darwin/arm64+gnu".parse::<BinaryPlatform>().unwrap_err();
        assert!(err.to_string().contains("applies only to linux"), "{err}");
    }

    #[test]
    fn uname_values_normalise() {
        let cases = [
            ("Linux", "x86_64", "linux/amd64"),
            ("Linux", "aarch64", "linux/arm64"),
            ("Linux", "armv7l", "linux/arm/v7"),
            ("Linux", "armv6l", "linux/arm/v6"),
            ("Linux", "i686", "linux/386"),
            ("Linux", "riscv64", "linux/riscv64"),
            ("Linux", "ppc64le", "linux/ppc64le"),
            ("Linux", "s390x", "linux/s390x"),
            ("Darwin", "arm64", "darwin/arm64"),
            ("Darwin", "x86_64", "darwin/amd64"),
            ("FreeBSD", "amd64", "freebsd/amd64"),
        ];
        for (sys, machine, want) in cases {
            assert_eq!(normalise_uname(sys, machine).unwrap().to_string(), want);
        }
        assert!(matches!(
            normalise_uname("SunOS", "i86pc"),
            Err(PlatformError::Os(_))
        ));
        assert!(matches!(
            normalise_uname("Linux", "mips64"),
            Err(PlatformError::Arch(_))
        ));
    }

    #[test]
    fn fallbacks_go_down_the_variants_then_to_unversioned() {
        let cases: &[(&str, &[&str])] = &[
            (
                "linux/amd64/v3",
                &[
                    "linux/amd64/v3",
                    "linux/amd64/v2",
                    "linux/amd64/v1",
                    "linux/amd64",
                ],
            ),
            ("linux/amd64/v1", &["linux/amd64/v1", "linux/amd64"]),
            ("linux/amd64", &["linux/amd64", "linux/amd64/v1"]),
            (
                "linux/arm64/v8.2",
                &[
                    "linux/arm64/v8.2",
                    "linux/arm64/v8.1",
                    "linux/arm64/v8",
                    "linux/arm64",
                ],
            ),
            ("linux/arm64/v8", &["linux/arm64/v8", "linux/arm64"]),
            ("linux/arm64", &["linux/arm64", "linux/arm64/v8"]),
            (
                "linux/arm64/v9.1",
                &[
                    "linux/arm64/v9.1",
                    "linux/arm64/v9",
                    "linux/arm64/v8.6",
                    "linux/arm64/v8.5",
                    "linux/arm64/v8.4",
                    "linux/arm64/v8.3",
                    "linux/arm64/v8.2",
                    "linux/arm64/v8.1",
                    "linux/arm64/v8",
                    "linux/arm64",
                ],
            ),
            (
                "linux/arm/v7",
                &["linux/arm/v7", "linux/arm/v6", "linux/arm/v5"],
            ),
            ("linux/arm/v6", &["linux/arm/v6", "linux/arm/v5"]),
            ("linux/riscv64", &["linux/riscv64"]),
            ("darwin/arm64", &["darwin/arm64", "darwin/arm64/v8"]),
        ];
        for (node, want) in cases {
            let got: Vec<String> = p(node).fallbacks().iter().map(|p| p.to_string()).collect();
            assert_eq!(got, *want, "{node}");
        }
    }

    #[test]
    fn which_binaries_run_on_which_nodes() {
        use LibcKind::*;
        use Match::*;
        let c = |steps| Some(Compatible { steps });
        let cases: &[(&str, LibcKind, &str, Option<Match>)] = &[
            // Exact platforms, whatever the libc flavour as long as it agrees.
            ("linux/amd64/v3", Gnu, "linux/amd64/v3+gnu", Some(Exact)),
            ("linux/amd64/v3", Gnu, "linux/amd64/v3", Some(Exact)),
            ("linux/amd64/v3", Musl, "linux/amd64/v3+musl", Some(Exact)),
            // Lower amd64 levels and the unversioned architecture run on a higher node.
            ("linux/amd64/v3", Gnu, "linux/amd64/v2+gnu", c(1)),
            ("linux/amd64/v3", Gnu, "linux/amd64/v1", c(2)),
            ("linux/amd64/v3", Gnu, "linux/amd64", c(3)),
            ("linux/amd64/v1", Gnu, "linux/amd64", c(1)),
            ("linux/amd64", Gnu, "linux/amd64/v1", c(1)),
            // Higher levels never do.
            ("linux/amd64/v3", Gnu, "linux/amd64/v4", None),
            ("linux/amd64/v1", Gnu, "linux/amd64/v2", None),
            ("linux/amd64", Gnu, "linux/amd64/v2", None),
            // arm64 versions, including v9.x running v8.{x+5}.
            ("linux/arm64/v8.2", Gnu, "linux/arm64/v8.1", c(1)),
            ("linux/arm64/v8.2", Gnu, "linux/arm64/v8", c(2)),
            ("linux/arm64/v8.2", Gnu, "linux/arm64", c(3)),
            ("linux/arm64/v8.2", Gnu, "linux/arm64/v8.3", None),
            ("linux/arm64/v8.2", Gnu, "linux/arm64/v9", None),
            ("linux/arm64/v8", Gnu, "linux/arm64", c(1)),
            ("linux/arm64/v9", Gnu, "linux/arm64/v8.5", c(1)),
            ("linux/arm64/v9", Gnu, "linux/arm64/v8.6", None),
            ("linux/arm/v7", Gnu, "linux/arm/v6", c(1)),
            ("linux/arm/v6", Gnu, "linux/arm/v7", None),
            // A static binary runs on either libc, or none known.
            ("linux/amd64/v2", Gnu, "linux/amd64", c(2)),
            ("linux/amd64/v2", Musl, "linux/amd64/v2", Some(Exact)),
            ("linux/amd64/v2", Unknown, "linux/amd64/v2", Some(Exact)),
            // A glibc binary never goes to musl or unknown, nor musl to glibc.
            ("linux/amd64/v2", Musl, "linux/amd64/v2+gnu", None),
            ("linux/amd64/v2", Unknown, "linux/amd64/v2+gnu", None),
            ("linux/amd64/v2", Gnu, "linux/amd64/v2+musl", None),
            ("linux/amd64/v2", Unknown, "linux/amd64/v2+musl", None),
            // Another os or architecture never matches.
            ("linux/amd64/v3", Gnu, "darwin/amd64", None),
            ("linux/amd64/v3", Gnu, "freebsd/amd64", None),
            ("darwin/arm64", Unknown, "linux/arm64", None),
            ("linux/amd64/v3", Gnu, "linux/386", None),
            ("linux/arm64/v8", Gnu, "linux/arm/v7", None),
            ("linux/arm64/v8", Gnu, "linux/amd64", None),
            // A script runs anywhere.
            ("linux/riscv64", Unknown, "any", Some(Any)),
            ("darwin/arm64", Unknown, "any", Some(Any)),
        ];
        for (n, libc, bin, want) in cases {
            assert_eq!(
                runs_on(&b(bin), &node(n, *libc)),
                *want,
                "{bin} on {n} ({libc})"
            );
        }
    }

    #[test]
    fn select_prefers_exact_then_the_highest_compatible_variant() {
        use LibcKind::*;
        let cases: &[(&str, LibcKind, &[&str], Option<&str>)] = &[
            (
                "linux/amd64/v3",
                Gnu,
                &["linux/amd64/v1", "linux/amd64/v3", "linux/amd64/v2"],
                Some("linux/amd64/v3"),
            ),
            (
                "linux/amd64/v3",
                Gnu,
                &["linux/amd64/v1", "linux/amd64/v4", "linux/amd64/v2"],
                Some("linux/amd64/v2"),
            ),
            (
                "linux/amd64/v3",
                Gnu,
                &["linux/amd64", "linux/amd64/v1"],
                Some("linux/amd64/v1"),
            ),
            (
                "linux/amd64/v3",
                Gnu,
                &["any", "linux/amd64"],
                Some("linux/amd64"),
            ),
            ("linux/amd64/v3", Gnu, &["linux/arm64", "any"], Some("any")),
            (
                "linux/amd64/v3",
                Gnu,
                &["linux/arm64", "darwin/amd64"],
                None,
            ),
            ("linux/amd64/v3", Gnu, &[], None),
            // The node's own libc beats static for the same platform; then first offered.
            (
                "linux/amd64/v2",
                Musl,
                &["linux/amd64/v2", "linux/amd64/v2+musl"],
                Some("linux/amd64/v2+musl"),
            ),
            (
                "linux/amd64/v2",
                Musl,
                &["linux/amd64/v2+gnu", "linux/amd64/v2"],
                Some("linux/amd64/v2"),
            ),
            (
                "linux/amd64/v2",
                Gnu,
                &["linux/amd64/v2+musl", "linux/amd64/v1+gnu"],
                Some("linux/amd64/v1+gnu"),
            ),
            // A higher compatible variant beats a better libc fit on a lower one.
            (
                "linux/amd64/v3",
                Gnu,
                &["linux/amd64/v1+gnu", "linux/amd64/v2"],
                Some("linux/amd64/v2"),
            ),
            (
                "linux/arm64/v9.1",
                Gnu,
                &["linux/arm64/v8.2", "linux/arm64/v8.6", "linux/arm64/v8.7"],
                Some("linux/arm64/v8.6"),
            ),
            (
                "linux/arm64/v8.2",
                Musl,
                &[
                    "linux/arm64",
                    "linux/arm64/v8.1+musl",
                    "linux/arm64/v8.2+gnu",
                ],
                Some("linux/arm64/v8.1+musl"),
            ),
        ];
        for (n, libc, offered, want) in cases {
            let offered: Vec<BinaryPlatform> = offered.iter().map(|s| b(s)).collect();
            let got = select(&offered, &node(n, *libc)).map(|b| b.to_string());
            assert_eq!(got.as_deref(), *want, "{n} ({libc}) from {offered:?}");
        }
    }

    #[test]
    fn select_order_is_the_fallback_order() {
        // Offering every fallback in reverse, then removing the winner each time, must
        // walk the node's fallbacks in order.
        for n in ["linux/amd64/v4", "linux/arm64/v9.2", "linux/arm/v8"] {
            let node = node(n, LibcKind::Gnu);
            let fallbacks = node.platform.fallbacks();
            let mut offered: Vec<BinaryPlatform> = fallbacks
                .iter()
                .rev()
                .map(|p| BinaryPlatform::native(p.clone(), LibcNeed::Static))
                .collect();
            for want in &fallbacks {
                let got = select(&offered, &node).cloned().unwrap();
                assert_eq!(
                    got,
                    BinaryPlatform::native(want.clone(), LibcNeed::Static),
                    "{n}"
                );
                offered.retain(|b| *b != got);
            }
            assert!(select(&offered, &node).is_none());
        }
    }

    // --- Executable detection -----------------------------------------------------------

    /// A minimal ELF file with one program header: PT_INTERP when `interp` is given,
    /// PT_LOAD otherwise.
    fn elf_file(
        is64: bool,
        be: bool,
        osabi: u8,
        machine: u16,
        e_type: u16,
        interp: Option<&str>,
    ) -> Vec<u8> {
        let (ehsize, phsize) = if is64 { (64usize, 56usize) } else { (52, 32) };
        let mut f = vec![0u8; ehsize + phsize];
        f[..4].copy_from_slice(b"\x7fELF");
        f[4] = if is64 { 2 } else { 1 };
        f[5] = if be { 2 } else { 1 };
        f[6] = 1;
        f[7] = osabi;
        let put16 = |f: &mut Vec<u8>, at: usize, v: u16| {
            let b = if be { v.to_be_bytes() } else { v.to_le_bytes() };
            f[at..at + 2].copy_from_slice(&b);
        };
        let put32 = |f: &mut Vec<u8>, at: usize, v: u32| {
            let b = if be { v.to_be_bytes() } else { v.to_le_bytes() };
            f[at..at + 4].copy_from_slice(&b);
        };
        let put64 = |f: &mut Vec<u8>, at: usize, v: u64| {
            let b = if be { v.to_be_bytes() } else { v.to_le_bytes() };
            f[at..at + 8].copy_from_slice(&b);
        };
        put16(&mut f, 16, e_type);
        put16(&mut f, 18, machine);
        let ptype = if interp.is_some() { PT_INTERP } else { 1 };
        let data_at = (ehsize + phsize) as u64;
        let len = interp.map(|s| s.len() as u64 + 1).unwrap_or(0);
        if is64 {
            put64(&mut f, 32, ehsize as u64);
            put16(&mut f, 54, phsize as u16);
            put16(&mut f, 56, 1);
            put32(&mut f, ehsize, ptype);
            put64(&mut f, ehsize + 8, data_at);
            put64(&mut f, ehsize + 32, len);
        } else {
            put32(&mut f, 28, ehsize as u32);
            put16(&mut f, 42, phsize as u16);
            put16(&mut f, 44, 1);
            put32(&mut f, ehsize, ptype);
            put32(&mut f, ehsize + 4, data_at as u32);
            put32(&mut f, ehsize + 16, len as u32);
        }
        if let Some(s) = interp {
            f.extend_from_slice(s.as_bytes());
            f.push(0);
        }
        f
    }

    fn detected(head: &[u8]) -> Vec<String> {
        detect_executable(head)
            .unwrap()
            .platforms
            .iter()
            .map(|p| p.to_string())
            .collect()
    }

    fn head_of(path: &str) -> Option<Vec<u8>> {
        let mut bytes = std::fs::read(path).ok()?;
        bytes.truncate(64 << 10);
        Some(bytes)
    }

    #[cfg(all(target_os = "linux", target_arch = "x86_64", target_env = "gnu"))]
    #[test]
    fn this_machines_true_is_a_glibc_amd64_binary() {
        let head = head_of("/bin/true").expect("/bin/true exists on Linux");
        let exe = detect_executable(&head).unwrap();
        assert_eq!(exe.format, ExecutableFormat::Elf);
        assert_eq!(exe.platforms, vec![b("linux/amd64+gnu")]);
        assert!(exe.interpreter.unwrap().contains("ld-linux-x86-64.so"));
    }

    #[cfg(all(target_os = "linux", target_arch = "x86_64"))]
    #[test]
    fn busybox_is_static_when_present() {
        // Debian's busybox is statically linked; skip where it is absent.
        let Some(head) = head_of("/bin/busybox") else {
            return;
        };
        let exe = detect_executable(&head).unwrap();
        if exe.interpreter.is_none() {
            assert_eq!(exe.platforms, vec![b("linux/amd64")]);
        }
    }

    /// 64-bit, big-endian, OS ABI, e_machine, interpreter, expected platform.
    type ElfCase = (bool, bool, u8, u16, Option<&'static str>, &'static str);

    #[test]
    fn hand_built_elf_headers() {
        let cases: &[ElfCase] = &[
            (
                true,
                false,
                0,
                EM_X86_64,
                Some("/lib64/ld-linux-x86-64.so.2"),
                "linux/amd64+gnu",
            ),
            (true, false, 3, EM_X86_64, None, "linux/amd64"),
            (
                true,
                false,
                0,
                EM_AARCH64,
                Some("/lib/ld-musl-aarch64.so.1"),
                "linux/arm64+musl",
            ),
            (
                true,
                false,
                0,
                EM_AARCH64,
                Some("/lib/ld-linux-aarch64.so.1"),
                "linux/arm64+gnu",
            ),
            (
                false,
                false,
                0,
                EM_ARM,
                Some("/lib/ld-linux-armhf.so.3"),
                "linux/arm/v7+gnu",
            ),
            (
                false,
                false,
                0,
                EM_386,
                Some("/lib/ld-linux.so.2"),
                "linux/386+gnu",
            ),
            (
                false,
                false,
                0,
                EM_386,
                Some("/lib/ld-musl-i386.so.1"),
                "linux/386+musl",
            ),
            (
                true,
                false,
                0,
                EM_RISCV,
                Some("/lib/ld-linux-riscv64-lp64d.so.1"),
                "linux/riscv64+gnu",
            ),
            (
                true,
                false,
                0,
                EM_PPC64,
                Some("/lib64/ld64.so.2"),
                "linux/ppc64le+gnu",
            ),
            (
                true,
                true,
                0,
                EM_S390,
                Some("/lib/ld64.so.1"),
                "linux/s390x+gnu",
            ),
            (true, true, 0, EM_S390, None, "linux/s390x"),
            (
                true,
                false,
                9,
                EM_X86_64,
                Some("/libexec/ld-elf.so.1"),
                "freebsd/amd64",
            ),
        ];
        for (is64, be, osabi, machine, interp, want) in cases {
            let f = elf_file(*is64, *be, *osabi, *machine, 3, *interp);
            assert_eq!(detected(&f), vec![want.to_string()], "{want}");
            let exe = detect_executable(&f).unwrap();
            assert_eq!(exe.interpreter.as_deref(), *interp);
        }
    }

    #[test]
    fn unsupported_elf_files_say_why() {
        let cases: &[(Vec<u8>, &str)] = &[
            (
                elf_file(true, false, 0, EM_X86_64, 1, None),
                "relocatable object",
            ),
            (elf_file(true, false, 0, EM_X86_64, 4, None), "core dump"),
            (
                elf_file(false, false, 0, EM_X86_64, 2, None),
                "machine 62 (32-bit, little-endian)",
            ),
            (
                elf_file(true, true, 0, EM_AARCH64, 2, None),
                "machine 183 (64-bit, big-endian)",
            ),
            (elf_file(true, true, 0, EM_PPC64, 2, None), "machine 21"),
            (elf_file(true, false, 0, 8, 2, None), "machine 8"),
            (elf_file(true, false, 6, EM_X86_64, 2, None), "OS ABI 6"),
            (
                elf_file(true, false, 0, EM_AARCH64, 2, Some("/system/bin/linker64")),
                "program interpreter \"/system/bin/linker64\"",
            ),
        ];
        for (f, want) in cases {
            let err = detect_executable(f).unwrap_err();
            assert!(matches!(err, FormatError::Unsupported(_)), "{err:?}");
            assert!(err.to_string().contains(want), "{err}");
        }
    }

    #[test]
    fn truncated_elf_files_say_how_much_is_missing() {
        let f = elf_file(
            true,
            false,
            0,
            EM_X86_64,
            3,
            Some("/lib64/ld-linux-x86-64.so.2"),
        );
        let err = detect_executable(&f[..10]).unwrap_err();
        assert_eq!(
            err,
            FormatError::Truncated {
                what: "ELF identification",
                need: 16,
                got: 10
            }
        );
        let err = detect_executable(&f[..40]).unwrap_err();
        assert_eq!(
            err,
            FormatError::Truncated {
                what: "ELF header",
                need: 64,
                got: 40
            }
        );
        let err = detect_executable(&f[..70]).unwrap_err();
        assert_eq!(
            err,
            FormatError::Truncated {
                what: "ELF program headers",
                need: 64 + 8 + 8,
                got: 70
            }
        );
        let err = detect_executable(&f[..130]).unwrap_err();
        assert!(
            matches!(
                err,
                FormatError::Truncated {
                    what: "ELF program interpreter",
                    ..
                }
            ),
            "{err:?}"
        );
        assert!(
            err.to_string()
                .starts_with("truncated ELF program interpreter: needs"),
            "{err}"
        );
        // Program headers said to lie far beyond the bytes given.
        let mut far = f.clone();
        far[32..40].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(matches!(
            detect_executable(&far),
            Err(FormatError::Truncated { .. }) | Err(FormatError::Unsupported(_))
        ));
    }

    /// A thin little-endian Mach-O header.
    fn macho(cputype: u32, filetype: u32) -> Vec<u8> {
        let mut f = Vec::new();
        f.extend_from_slice(&MH_MAGIC_64.to_le_bytes());
        f.extend_from_slice(&cputype.to_le_bytes());
        f.extend_from_slice(&0u32.to_le_bytes());
        f.extend_from_slice(&filetype.to_le_bytes());
        f.extend_from_slice(&[0; 16]);
        f
    }

    /// A universal Mach-O header listing these cputypes.
    fn fat(cputypes: &[u32], wide: bool) -> Vec<u8> {
        let mut f = Vec::new();
        f.extend_from_slice(&(if wide { 0xcafe_babfu32 } else { 0xcafe_babe }).to_be_bytes());
        f.extend_from_slice(&(cputypes.len() as u32).to_be_bytes());
        for (i, c) in cputypes.iter().enumerate() {
            f.extend_from_slice(&c.to_be_bytes());
            f.extend_from_slice(&0u32.to_be_bytes());
            let offset = (i as u64 + 1) << 14;
            if wide {
                f.extend_from_slice(&offset.to_be_bytes());
                f.extend_from_slice(&(1u64 << 14).to_be_bytes());
                f.extend_from_slice(&14u32.to_be_bytes());
                f.extend_from_slice(&0u32.to_be_bytes());
            } else {
                f.extend_from_slice(&(offset as u32).to_be_bytes());
                f.extend_from_slice(&(1u32 << 14).to_be_bytes());
                f.extend_from_slice(&14u32.to_be_bytes());
            }
        }
        f
    }

    #[test]
    fn mach_o_thin_and_universal() {
        assert_eq!(
            detected(&macho(CPU_TYPE_ARM64, MH_EXECUTE)),
            ["darwin/arm64"]
        );
        assert_eq!(
            detected(&macho(CPU_TYPE_X86_64, MH_EXECUTE)),
            ["darwin/amd64"]
        );
        let exe = detect_executable(&fat(&[CPU_TYPE_X86_64, CPU_TYPE_ARM64], false)).unwrap();
        assert_eq!(exe.format, ExecutableFormat::MachOFat);
        let got: Vec<String> = exe.platforms.iter().map(|p| p.to_string()).collect();
        assert_eq!(got, ["darwin/amd64", "darwin/arm64"]);
        // 64-bit fat headers, unknown slices skipped (PowerPC), duplicates merged.
        let got = detected(&fat(&[0x12, CPU_TYPE_ARM64, CPU_TYPE_ARM64], true));
        assert_eq!(got, ["darwin/arm64"]);

        let cases: &[(Vec<u8>, &str)] = &[
            (
                macho(CPU_TYPE_ARM64, 6),
                "type 6 (a library or object file)",
            ),
            (macho(0x12, MH_EXECUTE), "cputype 0x12"),
            (fat(&[0x12], false), "cputypes 0x12, none of which"),
            (fat(&[], false), "0 architectures"),
            (
                {
                    let mut j = 0xcafe_babeu32.to_be_bytes().to_vec();
                    j.extend_from_slice(&[0, 0, 0, 52]);
                    j
                },
                "Java class file",
            ),
            (
                MH_MAGIC_64.to_be_bytes().to_vec(),
                "big-endian (PowerPC) Mach-O",
            ),
        ];
        for (f, want) in cases {
            let err = detect_executable(f).unwrap_err();
            assert!(err.to_string().contains(want), "{err}");
        }
        let err =
            detect_executable(&fat(&[CPU_TYPE_X86_64, CPU_TYPE_ARM64], false)[..30]).unwrap_err();
        assert!(
            matches!(
                err,
                FormatError::Truncated {
                    what: "universal Mach-O header",
                    ..
                }
            ),
            "{err:?}"
        );
        let err = detect_executable(&macho(CPU_TYPE_ARM64, MH_EXECUTE)[..8]).unwrap_err();
        assert!(
            matches!(
                err,
                FormatError::Truncated {
                    what: "Mach-O header",
                    ..
                }
            ),
            "{err:?}"
        );
    }

    #[test]
    fn pe_executables_are_windows() {
        let pe = |machine: u16| {
            let mut f = vec![0u8; 0x80];
            f[..2].copy_from_slice(b"MZ");
            f[0x3c..0x40].copy_from_slice(&0x40u32.to_le_bytes());
            f[0x40..0x44].copy_from_slice(b"PE\0\0");
            f[0x44..0x46].copy_from_slice(&machine.to_le_bytes());
            f
        };
        assert_eq!(detected(&pe(0x8664)), ["windows/amd64"]);
        assert_eq!(detected(&pe(0xaa64)), ["windows/arm64"]);
        assert!(
            detect_executable(&pe(0x0200))
                .unwrap_err()
                .to_string()
                .contains("0x0200")
        );
        let mut dos = pe(0x8664);
        dos[0x40] = b'X';
        assert!(
            detect_executable(&dos)
                .unwrap_err()
                .to_string()
                .contains("without a PE header")
        );
    }

    #[test]
    fn scripts_run_anywhere_and_other_files_are_unknown() {
        let exe = detect_executable(b"#!/bin/sh -e\necho hi\n").unwrap();
        assert_eq!(exe.format, ExecutableFormat::Script);
        assert_eq!(exe.platforms, vec![BinaryPlatform::Any]);
        assert_eq!(exe.interpreter.as_deref(), Some("/bin/sh -e"));
        assert_eq!(detect_executable(b"#!").unwrap().interpreter, None);
        assert_eq!(detect_executable(b"").unwrap_err(), FormatError::Empty);
        let err = detect_executable(b"hello world").unwrap_err();
        assert_eq!(
            err.to_string(),
            "not a native executable or script (it starts with 68 65 6c 6c); expected ELF, Mach-O, PE or #!"
        );
        assert!(matches!(
            detect_executable(b"\x7fEL"),
            Err(FormatError::Unknown { .. })
        ));
    }

    #[test]
    fn arbitrary_bytes_never_panic() {
        // A small xorshift generator: deterministic, and no dependency for the tests.
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let prefixes: [&[u8]; 7] = [
            b"",
            b"\x7fELF\x02\x01\x01\x00",
            b"\x7fELF\x01\x02\x01\x00",
            b"\xca\xfe\xba\xbe\x00\x00\x00\x02",
            b"\xcf\xfa\xed\xfe",
            b"MZ",
            b"#!",
        ];
        for round in 0..20_000 {
            let prefix = prefixes[round % prefixes.len()];
            let len = (next() % 300) as usize;
            let mut buf = prefix.to_vec();
            buf.extend((0..len).map(|_| next() as u8));
            let _ = detect_executable(&buf);
        }
        // Every prefix of real and hand-built headers: truncation anywhere is an error or
        // a result, never a panic.
        let mut samples = vec![
            elf_file(
                true,
                false,
                0,
                EM_X86_64,
                3,
                Some("/lib64/ld-linux-x86-64.so.2"),
            ),
            elf_file(false, true, 0, EM_ARM, 2, Some("/lib/ld-linux-armhf.so.3")),
            fat(&[CPU_TYPE_X86_64, CPU_TYPE_ARM64], true),
        ];
        samples.extend(head_of("/bin/true").map(|mut h| {
            h.truncate(8192);
            h
        }));
        for s in &samples {
            for n in 0..=s.len() {
                let _ = detect_executable(&s[..n]);
            }
        }
        // Hostile sizes and offsets in an otherwise valid ELF header.
        for (at, value) in [
            (32usize, u64::MAX),
            (32, u64::MAX - 8),
            (54, 0xffff),
            (56, 0xffff),
        ] {
            let mut f = elf_file(true, false, 0, EM_X86_64, 3, Some("/lib/ld-linux.so.2"));
            let bytes = value.to_le_bytes();
            let width = if at == 32 { 8 } else { 2 };
            f[at..at + width].copy_from_slice(&bytes[..width]);
            let _ = detect_executable(&f);
        }
        for v in [u64::MAX, u64::MAX / 2, 1 << 40] {
            let mut f = elf_file(true, false, 0, EM_X86_64, 3, Some("/lib/ld-linux.so.2"));
            f[64 + 8..64 + 16].copy_from_slice(&v.to_le_bytes());
            f[64 + 32..64 + 40].copy_from_slice(&v.to_le_bytes());
            assert!(detect_executable(&f).is_err());
        }
    }
}
