//! Where the CLI finds its server and token: flags, then `DROVER_SERVER` and
//! `DROVER_TOKEN`, then a context of the config file, kubeconfig-style: each `drover up`
//! and `drover token create --save` adds one, and `--context`, `DROVER_CONTEXT` or the
//! file's `current_context` picks one.

use anyhow::{Context as _, Result, bail};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::PathBuf;

/// One cluster (and project, and token) the CLI can talk to.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Context {
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

/// The config file: named contexts and the one in use.
///
/// A file written before contexts existed held one context's fields at the top level;
/// it is read as a single context named [`LEGACY_CONTEXT`], and written back in the
/// new form the next time the file changes.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CliConfig {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub current_context: Option<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub contexts: BTreeMap<String, Context>,
    #[serde(flatten, default, skip_serializing)]
    legacy: Context,
}

/// The name an old, context-less config file's settings get.
pub const LEGACY_CONTEXT: &str = "default";

impl CliConfig {
    /// Folds an old file's top-level settings into a context of their own.
    fn upgrade(mut self) -> CliConfig {
        let legacy = std::mem::take(&mut self.legacy);
        if legacy != Context::default() && !self.contexts.contains_key(LEGACY_CONTEXT) {
            self.contexts.insert(LEGACY_CONTEXT.to_string(), legacy);
            self.current_context
                .get_or_insert_with(|| LEGACY_CONTEXT.to_string());
        }
        self
    }

    /// The context to use: the one named (by `--context` or `DROVER_CONTEXT`), else the
    /// current one, else none. A name that is not in the file is an error that lists
    /// the names that are.
    pub fn pick(&self, named: Option<&str>) -> Result<Option<(&str, &Context)>> {
        let Some(name) = named.or(self.current_context.as_deref()) else {
            return Ok(None);
        };
        match self.contexts.get_key_value(name) {
            Some((k, c)) => Ok(Some((k.as_str(), c))),
            None if named.is_none() => bail!(
                "the config file's current_context is {name:?}, which it does not define; pick one with `drover context use NAME` ({})",
                self.names()
            ),
            None => bail!(
                "no context named {name:?} in the CLI config ({})",
                self.names()
            ),
        }
    }

    fn names(&self) -> String {
        if self.contexts.is_empty() {
            return "it has none; `drover up` or `drover token create --save NAME` adds one"
                .to_string();
        }
        let names: Vec<&str> = self.contexts.keys().map(String::as_str).collect();
        format!("it has: {}", names.join(", "))
    }

    /// Adds or replaces a context and makes it the current one.
    pub fn put(&mut self, name: &str, context: Context) {
        self.contexts.insert(name.to_string(), context);
        self.current_context = Some(name.to_string());
    }
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
    serde_saphyr::from_str::<CliConfig>(&text)
        .map(CliConfig::upgrade)
        .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))
}

/// Loads the config file, lets `change` edit it, and saves it; nothing is written when
/// `change` fails.
pub fn update<T>(change: impl FnOnce(&mut CliConfig) -> Result<T>) -> Result<(T, PathBuf)> {
    let mut cfg = load()?;
    let out = change(&mut cfg)?;
    let path = save(&cfg)?;
    Ok((out, path))
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
    f.write_all(b"# Written by drover (`drover up`, `drover context`, `drover token create --save`).\n# --context or DROVER_CONTEXT picks a context; DROVER_SERVER, DROVER_TOKEN and flags\n# override its settings.\n")?;
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

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(yaml: &str) -> CliConfig {
        serde_saphyr::from_str::<CliConfig>(yaml).unwrap().upgrade()
    }

    #[test]
    fn an_old_flat_file_reads_as_one_current_context() {
        let cfg = parse("server: http://127.0.0.1:7700\ntoken: drv_x\n");
        let (name, ctx) = cfg.pick(None).unwrap().unwrap();
        assert_eq!(name, LEGACY_CONTEXT);
        assert_eq!(ctx.server.as_deref(), Some("http://127.0.0.1:7700"));
        assert_eq!(ctx.token.as_deref(), Some("drv_x"));
        // Written back in the new form only.
        let text = serde_saphyr::to_string(&cfg).unwrap();
        assert_eq!(parse(&text), cfg);
        assert!(text.contains("contexts:"), "{text}");
    }

    #[test]
    fn a_context_is_picked_by_name_or_as_the_current_one() {
        let mut cfg = CliConfig::default();
        assert!(cfg.pick(None).unwrap().is_none());
        let ctx = |s: &str| Context {
            server: Some(s.into()),
            ..Context::default()
        };
        cfg.put("a", ctx("http://a"));
        cfg.put("b", ctx("http://b"));
        assert_eq!(cfg.pick(None).unwrap().unwrap().0, "b");
        assert_eq!(cfg.pick(Some("a")).unwrap().unwrap().0, "a");
        let err = cfg.pick(Some("c")).unwrap_err().to_string();
        assert!(
            err.contains("\"c\"") && err.contains("it has: a, b"),
            "{err}"
        );
        cfg.current_context = Some("gone".into());
        let err = cfg.pick(None).unwrap_err().to_string();
        assert!(err.contains("current_context is \"gone\""), "{err}");
    }
}
