//! Where the CLI finds its server and token: flags, then `DROVER_SERVER` and
//! `DROVER_TOKEN`, then the config file `drover up` writes.

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use std::path::PathBuf;

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CliConfig {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
    /// The project commands act in, as `--project` would set it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub project: Option<String>,
    /// A PEM file of the CA (or the server's own certificate) to trust for an
    /// `https://` server, as `--ca` would give it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca: Option<std::path::PathBuf>,
    /// The SHA-256 fingerprint an `https://` server's certificate must have, as
    /// `--server-fingerprint` would give it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server_fingerprint: Option<String>,
}

/// `$XDG_CONFIG_HOME/drover/config.yaml`, or `~/.config/drover/config.yaml`.
pub fn config_path() -> Option<PathBuf> {
    let base = std::env::var_os("XDG_CONFIG_HOME")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(|| dirs::home_dir().map(|h| h.join(".config")))?;
    Some(base.join("drover").join("config.yaml"))
}

/// `$XDG_DATA_HOME/drover`, or `~/.local/share/drover`: the default data dir of `drover up`.
pub fn default_data_dir() -> PathBuf {
    std::env::var_os("XDG_DATA_HOME")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(|| dirs::home_dir().map(|h| h.join(".local").join("share")))
        .unwrap_or_else(|| PathBuf::from("."))
        .join("drover")
}

pub fn load() -> Result<CliConfig> {
    let Some(path) = config_path() else {
        return Ok(CliConfig::default());
    };
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(CliConfig::default()),
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    serde_saphyr::from_str(&text).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))
}

/// Writes the config file atomically, readable only by its owner (it holds a token).
pub fn save(cfg: &CliConfig) -> Result<PathBuf> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let path = config_path()
        .context("no home directory to keep the CLI config in; set XDG_CONFIG_HOME")?;
    let dir = path.parent().context("config path has no parent")?;
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let text = serde_saphyr::to_string(cfg).context("encoding the CLI config")?;
    let tmp = path.with_extension("yaml.tmp");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .with_context(|| format!("writing {}", tmp.display()))?;
    f.write_all(b"# Written by `drover up`. DROVER_SERVER, DROVER_TOKEN and flags override it.\n")?;
    f.write_all(text.as_bytes())?;
    f.sync_all()?;
    std::fs::rename(&tmp, &path).with_context(|| format!("writing {}", path.display()))?;
    Ok(path)
}

/// A new random secret with a recognisable prefix.
pub fn new_secret(prefix: &str) -> String {
    let bytes: [u8; 24] = rand::random();
    format!("{prefix}_{}", hex::encode(bytes))
}

/// Reads a secret kept in the data dir, or makes and keeps a new one.
pub fn secret_in(dir: &std::path::Path, file: &str, prefix: &str) -> Result<String> {
    let path = dir.join(file);
    if let Ok(s) = std::fs::read_to_string(&path)
        && !s.trim().is_empty()
    {
        return Ok(s.trim().to_string());
    }
    let secret = new_secret(prefix);
    write_secret(&path, &secret)?;
    Ok(secret)
}

/// Writes a secret to `path`, readable only by its owner. The file is replaced whole
/// (written beside it, then renamed), so a reader never sees half a secret and a
/// failure leaves the old one in place.
pub fn write_secret(path: &std::path::Path, secret: &str) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let name = path
        .file_name()
        .with_context(|| format!("{}: expected a file name", path.display()))?;
    let mut tmp_name = name.to_os_string();
    tmp_name.push(".tmp");
    let tmp = path.with_file_name(tmp_name);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .with_context(|| format!("writing {}", tmp.display()))?;
    let written = f
        .write_all(secret.as_bytes())
        .and_then(|()| f.sync_all())
        .and_then(|()| std::fs::rename(&tmp, path));
    if let Err(e) = written {
        // The temporary file may hold the secret; it must not be left lying about.
        if let Err(e2) = std::fs::remove_file(&tmp) {
            tracing::warn!("removing {} after a failed write: {e2}", tmp.display());
        }
        return Err(e).with_context(|| format!("writing {}", path.display()));
    }
    Ok(())
}
