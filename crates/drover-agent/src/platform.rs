//! What machine the agent runs on, as it reports at registration: the normalised
//! platform with its variant, the C library, the raw `uname` values and the architecture
//! of the agent binary itself.
//!
//! The variant is the most a binary built for this machine may assume:
//! - amd64: the x86-64 microarchitecture level (`v1` to `v4`), from the CPU features the
//!   standard library detects (which include the OS's support for saving AVX state).
//! - arm64: the ARMv8.x / v9.x version, from the kernel's HWCAP bits. It is conservative:
//!   a version is claimed only when every feature user-space code built for it may use is
//!   reported, so a CPU with part of a version counts as the version below. Without
//!   HWCAPs (not Linux, or an agent that is not itself arm64) it is `v8`, as containerd
//!   writes the arm64 default.
//! - arm: from `uname -m` (`armv7l` → `v7`).
//!
//! The C library is found by this rule, first match wins:
//! 1. an agent built against glibc reports `gnu` with the version of the glibc it was
//!    loaded with (`gnu_get_libc_version`), which is the machine's;
//! 2. `musl` when a musl loader `/lib/ld-musl-*.so.1` exists;
//! 3. `gnu` without a version when a glibc loader (`ld-linux*.so.*`, or `ld64.so.*` on
//!    ppc64le and s390x) exists in `/lib` or `/lib64`;
//! 4. otherwise `unknown`, where only static binaries are placed.
//!
//! A machine with both loaders (Debian with the musl package) is reported by rule 1 or 2
//! only, so a statically linked musl agent there reports `musl`.

use drover_core::platform::{Arch, Libc, LibcKind, Platform, Uname, Variant, normalise_uname};

/// What the agent found about its machine.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodePlatformInfo {
    /// `os/arch[/variant]`, normalised (`linux/amd64/v3`); the raw `os/arch` when the
    /// machine is one Drover does not know, so the node still registers.
    pub platform: String,
    pub libc: Libc,
    pub uname: Option<Uname>,
    /// The agent binary's own architecture, normalised (`amd64`).
    pub agent_arch: String,
}

/// Detects everything the agent reports about its machine.
pub fn detect() -> NodePlatformInfo {
    let uname = uname();
    NodePlatformInfo {
        platform: node_platform(uname.as_ref()),
        libc: libc_from(glibc_version(), &loaders()),
        uname,
        agent_arch: agent_arch(),
    }
}

/// The machine's platform: from `uname` when it can be read and is known, else from the
/// OS and architecture the agent was built for; then with the CPU's variant.
fn node_platform(uname: Option<&Uname>) -> String {
    let from_uname = uname.and_then(|u| normalise_uname(&u.sysname, &u.machine).ok());
    let from_build = || {
        let (arch, variant) = Arch::normalise(&agent_arch()).ok()?;
        Platform::new(std::env::consts::OS.parse().ok()?, arch, variant).ok()
    };
    match from_uname.or_else(from_build) {
        Some(p) => with_variant(p).to_string(),
        None => format!("{}/{}", std::env::consts::OS, agent_arch()),
    }
}

/// Adds the variant the CPU supports. The probes describe the CPU the agent runs on, so
/// they are used only when the agent is built for the machine's architecture.
fn with_variant(p: Platform) -> Platform {
    let variant = match p.arch {
        Arch::Amd64 => this_amd64_level().map(|level| Variant::new(level, 0)),
        Arch::Arm64 => Some(this_arm64_variant()),
        _ => p.variant,
    };
    Platform { variant, ..p }
}

/// The agent binary's architecture in containerd's spelling; Rust's name when unknown.
pub fn agent_arch() -> String {
    let raw = match std::env::consts::ARCH {
        // Rust's name does not say the byte order; containerd's names it.
        "powerpc64" if cfg!(target_endian = "little") => "ppc64le",
        other => other,
    };
    Arch::normalise(raw)
        .map(|(arch, _)| arch.to_string())
        .unwrap_or_else(|_| raw.to_string())
}

/// The raw `uname` values, or `None` if the call fails.
pub fn uname() -> Option<Uname> {
    // SAFETY: `utsname` is arrays of `c_char`, for which all zeroes is a valid value.
    let mut u: libc::utsname = unsafe { std::mem::zeroed() };
    // SAFETY: `uname` only writes into the struct it is given, which outlives the call.
    if unsafe { libc::uname(&mut u) } != 0 {
        return None;
    }
    // The kernel NUL-terminates each field; reading stops there or at the array's end.
    let text = |field: &[libc::c_char]| {
        let bytes: Vec<u8> = field
            .iter()
            .take_while(|c| **c != 0)
            .map(|c| u8::from_ne_bytes(c.to_ne_bytes()))
            .collect();
        String::from_utf8_lossy(&bytes).into_owned()
    };
    Some(Uname {
        sysname: text(&u.sysname),
        release: text(&u.release),
        machine: text(&u.machine),
    })
}

/// The CPU features each x86-64 microarchitecture level adds to the one below, as the
/// x86-64 psABI defines them (in the standard library's feature names).
const AMD64_LEVELS: [(u8, &[&str]); 3] = [
    (
        2,
        &["cmpxchg16b", "popcnt", "sse3", "sse4.1", "sse4.2", "ssse3"],
    ),
    (
        3,
        &[
            "avx", "avx2", "bmi1", "bmi2", "f16c", "fma", "lzcnt", "movbe", "xsave",
        ],
    ),
    (
        4,
        &["avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl"],
    ),
];

/// The highest x86-64 level whose features, and every lower level's, the CPU has.
fn amd64_level(has: impl Fn(&str) -> bool) -> u8 {
    let mut level = 1;
    for (next, features) in AMD64_LEVELS {
        if !features.iter().all(|f| has(f)) {
            break;
        }
        level = next;
    }
    level
}

#[cfg(target_arch = "x86_64")]
fn this_amd64_level() -> Option<u8> {
    // The detection macro takes literal names only, hence one probe per feature.
    let mut found: Vec<&str> = Vec::new();
    macro_rules! probe {
        ($($f:tt),*) => {
            $(if std::arch::is_x86_feature_detected!($f) {
                found.push($f);
            })*
        };
    }
    probe!(
        "cmpxchg16b",
        "popcnt",
        "sse3",
        "sse4.1",
        "sse4.2",
        "ssse3",
        "avx",
        "avx2",
        "bmi1",
        "bmi2",
        "f16c",
        "fma",
        "lzcnt",
        "movbe",
        "xsave",
        "avx512f",
        "avx512bw",
        "avx512cd",
        "avx512dq",
        "avx512vl"
    );
    Some(amd64_level(|f| found.contains(&f)))
}

#[cfg(not(target_arch = "x86_64"))]
fn this_amd64_level() -> Option<u8> {
    // The machine is amd64 but the agent is not (a 32-bit or emulated build), so its CPU
    // probes would not describe the machine: report the architecture unversioned.
    None
}

/// Linux's arm64 `AT_HWCAP` bits (arch/arm64/include/uapi/asm/hwcap.h).
mod hwcap {
    pub const CRC32: u64 = 1 << 7;
    pub const ATOMICS: u64 = 1 << 8;
    pub const ASIMDRDM: u64 = 1 << 12;
    pub const JSCVT: u64 = 1 << 13;
    pub const FCMA: u64 = 1 << 14;
    pub const LRCPC: u64 = 1 << 15;
    pub const DCPOP: u64 = 1 << 16;
    pub const DIT: u64 = 1 << 24;
    pub const USCAT: u64 = 1 << 25;
    pub const ILRCPC: u64 = 1 << 26;
    pub const FLAGM: u64 = 1 << 27;
    pub const SB: u64 = 1 << 29;
    pub const PACA: u64 = 1 << 30;
}

/// Linux's arm64 `AT_HWCAP2` bits.
mod hwcap2 {
    pub const DCPODP: u64 = 1 << 0;
    pub const SVE2: u64 = 1 << 1;
    pub const FLAGM2: u64 = 1 << 7;
    pub const FRINT: u64 = 1 << 8;
    pub const I8MM: u64 = 1 << 13;
    pub const BF16: u64 = 1 << 14;
}

/// The features each ARMv8.x version makes mandatory and a compiler targeting it may use
/// outside the hint space (BTI and the basic pointer-authentication instructions are
/// no-ops on older CPUs, so they are not required), as (minor, HWCAP, HWCAP2).
const ARM64_LEVELS: [(u8, u64, u64); 6] = [
    (1, hwcap::ATOMICS | hwcap::ASIMDRDM | hwcap::CRC32, 0),
    (2, hwcap::DCPOP, 0),
    (
        3,
        hwcap::JSCVT | hwcap::FCMA | hwcap::LRCPC | hwcap::PACA,
        0,
    ),
    (
        4,
        hwcap::DIT | hwcap::USCAT | hwcap::ILRCPC | hwcap::FLAGM,
        0,
    ),
    (
        5,
        hwcap::SB,
        hwcap2::DCPODP | hwcap2::FLAGM2 | hwcap2::FRINT,
    ),
    (6, 0, hwcap2::I8MM | hwcap2::BF16),
];

/// The arm64 variant the HWCAP bits show: the highest v8.x whose features, and every
/// lower version's, are all present; v9.x when SVE2 is present on top of v8.(x+5).
fn arm64_variant(hwcap: u64, hwcap2: u64) -> Variant {
    let mut minor = 0;
    for (next, h1, h2) in ARM64_LEVELS {
        if hwcap & h1 != h1 || hwcap2 & h2 != h2 {
            break;
        }
        minor = next;
    }
    // ARMv9.0 is ARMv8.5 plus SVE2; v9.x corresponds to v8.(x+5).
    if hwcap2 & hwcap2::SVE2 != 0 && minor >= 5 {
        Variant::new(9, minor - 5)
    } else {
        Variant::new(8, minor)
    }
}

#[cfg(all(target_os = "linux", target_pointer_width = "64"))]
fn this_arm64_variant() -> Variant {
    if !cfg!(target_arch = "aarch64") {
        // The HWCAP bits describe the agent's own architecture, not arm64's.
        return Variant::new(8, 0);
    }
    // SAFETY: `getauxval` only reads the process's auxiliary vector and returns 0 for an
    // entry the kernel did not supply.
    let (h1, h2) = unsafe {
        (
            libc::getauxval(libc::AT_HWCAP),
            libc::getauxval(libc::AT_HWCAP2),
        )
    };
    arm64_variant(h1, h2)
}

#[cfg(not(all(target_os = "linux", target_pointer_width = "64")))]
fn this_arm64_variant() -> Variant {
    // No HWCAPs to read here; containerd's default for arm64.
    Variant::new(8, 0)
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn glibc_version() -> Option<String> {
    // SAFETY: `gnu_get_libc_version` takes nothing and returns a pointer to a static
    // NUL-terminated string owned by glibc.
    let version = unsafe { libc::gnu_get_libc_version() };
    if version.is_null() {
        return None;
    }
    // SAFETY: checked non-null above; glibc's string lives as long as the process.
    let version = unsafe { std::ffi::CStr::from_ptr(version) };
    Some(version.to_string_lossy().into_owned())
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn glibc_version() -> Option<String> {
    None
}

/// The file names in `/lib` and `/lib64`, where the dynamic loaders live.
fn loaders() -> Vec<String> {
    ["/lib", "/lib64"]
        .iter()
        .filter_map(|dir| std::fs::read_dir(dir).ok())
        .flatten()
        .filter_map(|entry| entry.ok()?.file_name().into_string().ok())
        .filter(|name| name.starts_with("ld"))
        .collect()
}

/// The module's libc rule applied to what was found.
fn libc_from(glibc_version: Option<String>, loaders: &[String]) -> Libc {
    if let Some(version) = glibc_version {
        return Libc::new(LibcKind::Gnu, Some(version));
    }
    let any = |f: &dyn Fn(&str) -> bool| loaders.iter().any(|n| f(n));
    if any(&|n| n.starts_with("ld-musl-") && n.ends_with(".so.1")) {
        Libc::new(LibcKind::Musl, None)
    } else if any(&|n| n.starts_with("ld-linux") || n.starts_with("ld64.so.")) {
        Libc::new(LibcKind::Gnu, None)
    } else {
        Libc::new(LibcKind::Unknown, None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn amd64_levels_need_every_feature_of_every_lower_level() {
        let all: Vec<&str> = AMD64_LEVELS
            .iter()
            .flat_map(|(_, f)| f.iter().copied())
            .collect();
        let without = |missing: &'static str| move |f: &str| f != missing;
        type Has<'a> = &'a dyn Fn(&str) -> bool;
        let cases: &[(Has, u8)] = &[
            (&|_| false, 1),
            (&|f| all.contains(&f), 4),
            (&without("avx512vl"), 3),
            (&without("movbe"), 2),
            (&without("sse4.2"), 1),
            (&without("cmpxchg16b"), 1),
            // AVX-512 without the v3 features does not make v4.
            (
                &|f| f.starts_with("avx512") || AMD64_LEVELS[0].1.contains(&f),
                2,
            ),
        ];
        for (i, (has, want)) in cases.iter().enumerate() {
            assert_eq!(amd64_level(has), *want, "case {i}");
        }
    }

    #[test]
    fn arm64_variants_from_hwcaps() {
        let levels = |upto: usize| {
            ARM64_LEVELS[..upto]
                .iter()
                .fold((0, 0), |(a, b), (_, h1, h2)| (a | h1, b | h2))
        };
        let v = |major, minor| Variant::new(major, minor).to_string();
        let (all1, all2) = levels(6);
        let (v85_1, v85_2) = levels(5);
        let cases: &[(u64, u64, String)] = &[
            (0, 0, v(8, 0)),
            // Linux on a Cortex-A53: fp, asimd, aes, pmull, sha1, sha2, crc32 only.
            (0xff, 0, v(8, 0)),
            (levels(1).0, 0, v(8, 1)),
            (levels(2).0, 0, v(8, 2)),
            // A Neoverse N1 (v8.2 plus LRCPC) is not v8.3 without JSCVT, FCMA and PAC.
            (levels(2).0 | hwcap::LRCPC, 0, v(8, 2)),
            (levels(4).0, 0, v(8, 4)),
            (v85_1, v85_2, v(8, 5)),
            (all1, all2, v(8, 6)),
            // A gap at v8.2 caps the version whatever comes above it.
            (all1 & !hwcap::DCPOP, all2, v(8, 1)),
            // SVE2 on top of v8.5 is v9.0, on top of v8.6 v9.1; below v8.5 it is ignored.
            (v85_1, v85_2 | hwcap2::SVE2, v(9, 0)),
            (all1, all2 | hwcap2::SVE2, v(9, 1)),
            (levels(4).0, hwcap2::SVE2, v(8, 4)),
        ];
        for (h1, h2, want) in cases {
            assert_eq!(
                arm64_variant(*h1, *h2).to_string(),
                *want,
                "{h1:#x} {h2:#x}"
            );
        }
    }

    #[test]
    fn libc_follows_the_documented_rule() {
        let names = |n: &[&str]| n.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let cases: &[(Option<&str>, Vec<String>, &str)] = &[
            (Some("2.36"), names(&["ld-musl-x86_64.so.1"]), "gnu 2.36"),
            (None, names(&["ld-musl-x86_64.so.1"]), "musl"),
            (
                None,
                names(&["ld-musl-aarch64.so.1", "ld-linux-aarch64.so.1"]),
                "musl",
            ),
            (None, names(&["ld-linux-x86-64.so.2"]), "gnu"),
            (None, names(&["ld-linux.so.2"]), "gnu"),
            (None, names(&["ld64.so.2"]), "gnu"),
            (None, names(&["ld-musl-x86_64.so.2", "ldconfig"]), "unknown"),
            (None, vec![], "unknown"),
        ];
        for (glibc, loaders, want) in cases {
            let got = libc_from(glibc.map(String::from), loaders);
            assert_eq!(got.to_string(), *want, "{glibc:?} {loaders:?}");
        }
    }

    #[cfg(all(target_os = "linux", target_arch = "x86_64"))]
    #[test]
    fn this_machine_is_linux_amd64_with_a_level() {
        let found = detect();
        let level = found
            .platform
            .strip_prefix("linux/amd64/v")
            .and_then(|l| l.parse::<u8>().ok());
        assert!(level.is_some_and(|l| (1..=4).contains(&l)), "{found:?}");
        assert_eq!(found.agent_arch, "amd64");
        let uname = found.uname.unwrap();
        assert_eq!(
            (uname.sysname.as_str(), uname.machine.as_str()),
            ("Linux", "x86_64")
        );
        assert!(!uname.release.is_empty());
        if cfg!(target_env = "gnu") {
            assert_eq!(found.libc.kind, LibcKind::Gnu);
            assert!(found.libc.version.is_some_and(|v| v.starts_with("2.")));
        }
    }

    #[test]
    fn an_unknown_uname_falls_back_to_the_build_target() {
        let odd = Uname {
            sysname: "Plan9".into(),
            release: "4".into(),
            machine: "mips".into(),
        };
        let from_odd = node_platform(Some(&odd));
        assert_eq!(from_odd, node_platform(None));
        assert!(from_odd.starts_with(std::env::consts::OS), "{from_odd}");
    }
}
