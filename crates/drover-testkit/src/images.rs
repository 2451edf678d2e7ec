//! Container images for the Docker runtime's tests, built locally without any registry.
//!
//! The test machines cannot pull images, so the one image the tests need is made from
//! Debian's statically linked busybox (package `busybox-static`): a `FROM scratch` root
//! file system holding `/bin/busybox`, a symlink for each of its applets (so `sh -c`,
//! `sleep`, `httpd` and the rest work) and a page for `httpd` to serve.

use anyhow::{Context, Result, bail};
use std::fs::{File, OpenOptions};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Mutex;

/// The tag of the busybox test image. Bump the version when its content changes, so a
/// machine that has an older build gets the new one instead of reusing it.
pub const BUSYBOX_IMAGE: &str = "drover-test/busybox:1";

/// Where Debian's `busybox-static` package installs the static binary.
const BUSYBOX_BINARY: &str = "/bin/busybox";

/// The lock that serialises building across test processes (nextest runs each test in
/// its own process, so an in-process lock alone is not enough).
const LOCK_FILE: &str = "/tmp/drover-test-busybox-image.lock";

/// The page `httpd -h /www` serves at `/`.
pub const BUSYBOX_INDEX_HTML: &str = "<html><body>drover test page</body></html>\n";

/// Remembers, per process, that the image is known to exist, so repeated calls cost
/// nothing after the first.
static READY: Mutex<bool> = Mutex::new(false);

/// Makes sure the local image [`BUSYBOX_IMAGE`] exists, building it if needed, and
/// returns its tag. Safe to call from many tests and processes at once.
pub fn busybox_image() -> Result<String> {
    // A poisoned lock only means another test panicked while holding it; the flag it
    // guards is still meaningful.
    let mut ready = READY.lock().unwrap_or_else(|e| e.into_inner());
    if *ready {
        return Ok(BUSYBOX_IMAGE.to_string());
    }
    let lock = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(LOCK_FILE)
        .with_context(|| format!("cannot open the image build lock {LOCK_FILE}"))?;
    lock.lock()
        .with_context(|| format!("cannot take the image build lock {LOCK_FILE}"))?;
    // Checked under the lock: another process may have just built it.
    if !image_exists(BUSYBOX_IMAGE)? {
        build_busybox_image()?;
    }
    // Dropping the file releases the lock; done explicitly to show where it ends.
    drop(lock);
    *ready = true;
    Ok(BUSYBOX_IMAGE.to_string())
}

/// Whether the engine has an image with this reference.
fn image_exists(reference: &str) -> Result<bool> {
    let status = Command::new("docker")
        .args(["image", "inspect", "--format", "{{.Id}}", reference])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .context("cannot run the docker CLI (is Docker installed?)")?;
    Ok(status.success())
}

fn build_busybox_image() -> Result<()> {
    let busybox = Path::new(BUSYBOX_BINARY);
    if !busybox.is_file() {
        bail!(
            "{BUSYBOX_BINARY} is missing: the Docker runtime tests build their image from \
             Debian's static busybox; install it with `apt-get install busybox-static` \
             (scripts/test.sh does this)"
        );
    }
    if is_dynamically_linked(busybox)? {
        bail!(
            "{BUSYBOX_BINARY} is dynamically linked (Debian's busybox package), so it cannot \
             run in an image without a libc; install the static one with \
             `apt-get install busybox-static`"
        );
    }
    let work = tempfile::tempdir().context("cannot create a temporary build directory")?;
    let root = work.path().join("rootfs");
    for dir in ["bin", "www", "tmp", "etc"] {
        std::fs::create_dir_all(root.join(dir))
            .with_context(|| format!("cannot create {dir} in the image's root"))?;
    }
    std::fs::copy(busybox, root.join("bin/busybox"))
        .with_context(|| format!("cannot copy {BUSYBOX_BINARY} into the image's root"))?;
    for applet in applets(busybox)? {
        // `busybox --list` names plain applets; skip anything that could escape `bin`.
        if applet == "busybox" || applet.contains('/') || applet.is_empty() {
            continue;
        }
        std::os::unix::fs::symlink("busybox", root.join("bin").join(&applet))
            .with_context(|| format!("cannot link applet {applet}"))?;
    }
    std::fs::write(root.join("www/index.html"), BUSYBOX_INDEX_HTML)
        .context("cannot write the httpd page")?;
    // Some applets (id, whoami, httpd's user lookups) read these.
    std::fs::write(root.join("etc/passwd"), "root:x:0:0:root:/:/bin/sh\n")
        .context("cannot write /etc/passwd")?;
    std::fs::write(root.join("etc/group"), "root:x:0:\n").context("cannot write /etc/group")?;

    let tarball = work.path().join("rootfs.tar");
    pack(&root, &tarball).context("packing the image's root")?;
    // `docker import` needs no builder and no registry, unlike `docker build FROM ...`.
    let import = Command::new("docker")
        .args([
            "import",
            "--change",
            "ENV PATH=/bin",
            "--change",
            r#"CMD ["sh"]"#,
        ])
        .arg(&tarball)
        .arg(BUSYBOX_IMAGE)
        .stdin(Stdio::null())
        .output()
        .context("cannot run the docker CLI (is Docker installed?)")?;
    if !import.status.success() {
        bail!(
            "docker import of {BUSYBOX_IMAGE} failed: {}",
            String::from_utf8_lossy(&import.stderr).trim()
        );
    }
    Ok(())
}

/// The applet names the busybox binary provides.
fn applets(busybox: &Path) -> Result<Vec<String>> {
    let out = Command::new(busybox)
        .arg("--list")
        .stdin(File::open("/dev/null").context("cannot open /dev/null")?)
        .output()
        .with_context(|| format!("cannot run {} --list", busybox.display()))?;
    if !out.status.success() {
        bail!(
            "{} --list failed: {}",
            busybox.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::trim)
        .map(str::to_string)
        .collect())
}

/// Whether an ELF executable asks for a dynamic loader (has a `PT_INTERP` program
/// header), read from its 64-bit little-endian headers.
fn is_dynamically_linked(path: &Path) -> Result<bool> {
    const PT_INTERP: u32 = 3;
    let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    let u16_at = |at: usize| {
        bytes
            .get(at..at + 2)
            .map(|b| u16::from_le_bytes([b[0], b[1]]))
    };
    let u32_at = |at: usize| {
        bytes
            .get(at..at + 4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    };
    let u64_at = |at: usize| {
        bytes.get(at..at + 8).map(|b| {
            let mut a = [0u8; 8];
            a.copy_from_slice(b);
            u64::from_le_bytes(a)
        })
    };
    // Magic, 64-bit class (2) and little-endian data (1): anything else is not the
    // binary this helper expects.
    if bytes.get(..6) != Some(b"\x7fELF\x02\x01".as_slice()) {
        bail!(
            "{} is not a 64-bit little-endian ELF executable",
            path.display()
        );
    }
    let headers = (|| {
        let phoff = usize::try_from(u64_at(0x20)?).ok()?;
        let phentsize = usize::from(u16_at(0x36)?);
        let phnum = usize::from(u16_at(0x38)?);
        (0..phnum)
            .map(|i| u32_at(phoff + i * phentsize))
            .collect::<Option<Vec<u32>>>()
    })();
    match headers {
        Some(types) => Ok(types.contains(&PT_INTERP)),
        None => bail!("{} has truncated ELF program headers", path.display()),
    }
}

/// Makes sure an image that claims to be built for `os`/`arch` exists and returns its
/// tag. It holds one text file and would not run anywhere; it exists to be refused by
/// the platform check. Made with `docker load` of a hand-written image archive, since
/// this engine's `docker import --platform` ignores the platform.
pub fn foreign_image(os: &str, arch: &str) -> Result<String> {
    use sha2::{Digest, Sha256};
    let tag = format!("drover-test/foreign-{os}-{arch}:1");
    if image_exists(&tag)? {
        return Ok(tag);
    }
    let work = tempfile::tempdir().context("cannot create a temporary build directory")?;
    let layer_root = work.path().join("layer");
    std::fs::create_dir_all(&layer_root)?;
    std::fs::write(
        layer_root.join("README"),
        format!("an image for {os}/{arch}\n"),
    )?;
    let archive = work.path().join("archive");
    std::fs::create_dir_all(&archive)?;
    let layer_tar = work.path().join("layer.tar");
    pack(&layer_root, &layer_tar)?;
    let layer = std::fs::read(&layer_tar)?;
    let layer_digest = format!("{:x}", Sha256::digest(&layer));
    std::fs::create_dir_all(archive.join(&layer_digest))?;
    std::fs::write(archive.join(&layer_digest).join("layer.tar"), &layer)?;
    let config = serde_json::json!({
        "os": os,
        "architecture": arch,
        "config": { "Cmd": ["/README"] },
        "rootfs": { "type": "layers", "diff_ids": [format!("sha256:{layer_digest}")] },
    })
    .to_string();
    let config_digest = format!("{:x}", Sha256::digest(config.as_bytes()));
    std::fs::write(archive.join(format!("{config_digest}.json")), &config)?;
    let manifest = serde_json::json!([{
        "Config": format!("{config_digest}.json"),
        "RepoTags": [tag],
        "Layers": [format!("{layer_digest}/layer.tar")],
    }])
    .to_string();
    std::fs::write(archive.join("manifest.json"), manifest)?;
    let image_tar = work.path().join("image.tar");
    pack(&archive, &image_tar)?;
    let load = Command::new("docker")
        .arg("load")
        .arg("-i")
        .arg(&image_tar)
        .stdin(Stdio::null())
        .output()
        .context("cannot run the docker CLI (is Docker installed?)")?;
    if !load.status.success() {
        bail!(
            "docker load of {tag} failed: {}",
            String::from_utf8_lossy(&load.stderr).trim()
        );
    }
    Ok(tag)
}

/// Packs the contents of `dir` into the tar file `out`.
fn pack(dir: &Path, out: &Path) -> Result<()> {
    let tar = Command::new("tar")
        .arg("-C")
        .arg(dir)
        .arg("-cf")
        .arg(out)
        .arg(".")
        .output()
        .context("cannot run tar")?;
    if !tar.status.success() {
        bail!(
            "tar failed to pack {}: {}",
            dir.display(),
            String::from_utf8_lossy(&tar.stderr).trim()
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn static_and_dynamic_executables_are_told_apart() {
        // The test binary itself is dynamically linked, as Rust builds are by default.
        let me = std::env::current_exe().unwrap();
        assert!(is_dynamically_linked(&me).unwrap());
        if Path::new(BUSYBOX_BINARY).is_file() {
            // Whatever is installed, the answer must agree with the kernel's view:
            // only a static binary has no interpreter.
            let dynamic = is_dynamically_linked(Path::new(BUSYBOX_BINARY)).unwrap();
            let ldd_ok = Command::new("ldd")
                .arg(BUSYBOX_BINARY)
                .output()
                .map(|o| o.status.success())
                .unwrap_or(dynamic);
            assert_eq!(dynamic, ldd_ok);
        }
    }
}
