//! TLS for Drover: the controller's certificate, and how its clients trust it.
//!
//! The controller serves a certificate it is given, or one it generates once and keeps
//! in its data dir. A client (the CLI, an agent) trusts the server's certificate in one
//! of three ways: against the CAs in a PEM file it is given (which may be the server's
//! own certificate), by a pin on the certificate's SHA-256 fingerprint, which suits a
//! generated certificate that no CA signed, or, given neither, against the system's
//! roots. A refusal is remembered with a message saying why, so a caller can tell its
//! user what to change rather than pass on a bare handshake error.
//!
//! Everything uses the aws-lc-rs provider, the one reqwest already builds rustls with.

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{CertificateError, DigitallySignedStruct, OtherError, SignatureScheme};
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

pub use rustls;
pub use tokio_rustls;

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file named by `what` (a flag, or what the file is for) could not be read.
    #[error("{what} {}: {error}", path.display())]
    Read {
        what: String,
        path: PathBuf,
        error: std::io::Error,
    },
    /// A file was read but does not hold what it should.
    #[error("{what} {}: {why}", path.display())]
    Content {
        what: String,
        path: PathBuf,
        why: String,
    },
    /// The certificate and key do not make a usable TLS configuration.
    #[error("{0}")]
    Config(String),
}

/// The crypto provider for every configuration made here.
fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

/// The SHA-256 of a certificate's DER encoding: what `drover server` prints and
/// `--server-fingerprint` pins, written `sha256:` and 64 lowercase hex digits.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Fingerprint([u8; 32]);

impl Fingerprint {
    pub fn of(cert_der: &[u8]) -> Fingerprint {
        use sha2::Digest;
        Fingerprint(sha2::Sha256::digest(cert_der).into())
    }
}

impl fmt::Display for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sha256:{}", hex::encode(self.0))
    }
}

impl fmt::Debug for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl std::str::FromStr for Fingerprint {
    type Err = String;

    /// Reads `sha256:HEX`. The digits may be upper case and separated by colons, as
    /// `openssl x509 -fingerprint -sha256` prints them, so either tool's output pastes.
    fn from_str(s: &str) -> Result<Fingerprint, String> {
        let expected = "expected sha256: and 64 hex digits, as `drover server` prints it";
        let t = s.trim();
        let Some(digits) = t
            .get(..7)
            .filter(|p| p.eq_ignore_ascii_case("sha256:"))
            .map(|_| &t[7..])
        else {
            return Err(format!("{s:?}: {expected}"));
        };
        let digits: String = digits.chars().filter(|c| *c != ':').collect();
        let mut out = [0u8; 32];
        hex::decode_to_slice(&digits, &mut out).map_err(|_| format!("{s:?}: {expected}"))?;
        Ok(Fingerprint(out))
    }
}

fn read(what: &str, path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|error| TlsError::Read {
        what: what.to_string(),
        path: path.to_path_buf(),
        error,
    })
}

/// The certificates in a PEM file; `what` names the flag it came from in errors.
pub fn load_certs(what: &str, path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let bytes = read(what, path)?;
    let bad = |why: String| TlsError::Content {
        what: what.to_string(),
        path: path.to_path_buf(),
        why,
    };
    let certs = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| bad(format!("not a PEM certificate file: {e}")))?;
    if certs.is_empty() {
        return Err(bad(
            "no certificate in it; expected PEM blocks of -----BEGIN CERTIFICATE-----".into(),
        ));
    }
    Ok(certs)
}

/// The private key in a PEM file (PKCS#8, PKCS#1 or SEC1).
pub fn load_key(what: &str, path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let bytes = read(what, path)?;
    PrivateKeyDer::from_pem_slice(&bytes).map_err(|e| TlsError::Content {
        what: what.to_string(),
        path: path.to_path_buf(),
        why: format!(
            "expected a PEM private key (-----BEGIN PRIVATE KEY-----, RSA PRIVATE KEY or EC PRIVATE KEY): {e}"
        ),
    })
}

/// What the controller serves TLS with.
#[derive(Clone)]
pub struct ServerIdentity {
    pub config: Arc<rustls::ServerConfig>,
    /// The fingerprint of the certificate it presents (the first in the chain).
    pub fingerprint: Fingerprint,
}

impl ServerIdentity {
    /// Loads a certificate chain and its key from PEM files; `cert_what` and `key_what`
    /// name them in errors (the flags that gave them).
    pub fn load(
        cert: &Path,
        key: &Path,
        cert_what: &str,
        key_what: &str,
    ) -> Result<ServerIdentity, TlsError> {
        let chain = load_certs(cert_what, cert)?;
        let key_der = load_key(key_what, key)?;
        let fingerprint = Fingerprint::of(&chain[0]);
        let mut config = rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsError::Config(format!("TLS versions: {e}")))?
            .with_no_client_auth()
            .with_single_cert(chain, key_der)
            .map_err(|e| {
                TlsError::Config(format!(
                    "{cert_what} {} with {key_what} {}: {e}; expected the key that belongs to the first certificate",
                    cert.display(),
                    key.display()
                ))
            })?;
        // Every Drover client speaks HTTP/1.1 (agents upgrade it to a WebSocket).
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(ServerIdentity {
            config: Arc::new(config),
            fingerprint,
        })
    }
}

/// Makes a self-signed certificate valid for `names` (host names or IP addresses) and
/// writes it to `cert` and its key to `key`, unless both files exist already. Returns
/// whether it made them. The key is readable by its owner only; each file is written
/// beside its final name and renamed into place, so a crash leaves no half file.
pub fn ensure_self_signed(cert: &Path, key: &Path, names: &[String]) -> Result<bool, TlsError> {
    match (cert.exists(), key.exists()) {
        (true, true) => return Ok(false),
        (false, false) => {}
        (true, false) | (false, true) => {
            let (have, missing) = if cert.exists() {
                (cert, key)
            } else {
                (key, cert)
            };
            return Err(TlsError::Config(format!(
                "{} exists but {} does not; restore it, or remove {} to have a new certificate generated",
                have.display(),
                missing.display(),
                have.display()
            )));
        }
    }
    let mut params = rcgen::CertificateParams::new(names.to_vec())
        .map_err(|e| TlsError::Config(format!("certificate names {names:?}: {e}")))?;
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "drover controller");
    params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
    let signing_key = rcgen::KeyPair::generate()
        .map_err(|e| TlsError::Config(format!("generating a key: {e}")))?;
    let made = params
        .self_signed(&signing_key)
        .map_err(|e| TlsError::Config(format!("signing the certificate: {e}")))?;
    write_new(key, signing_key.serialize_pem().as_bytes(), 0o600)?;
    write_new(cert, made.pem().as_bytes(), 0o644)?;
    Ok(true)
}

/// Writes a file whole with `mode`, through a temporary file renamed into place.
fn write_new(path: &Path, bytes: &[u8], mode: u32) -> Result<(), TlsError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let fail = |error| TlsError::Read {
        what: "writing".into(),
        path: path.to_path_buf(),
        error,
    };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(fail)?;
    }
    let mut tmp_name = path.file_name().unwrap_or_default().to_os_string();
    tmp_name.push(".tmp");
    let tmp = path.with_file_name(tmp_name);
    let written = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(&tmp)
        .and_then(|mut f| f.write_all(bytes).and_then(|()| f.sync_all()))
        .and_then(|()| std::fs::rename(&tmp, path));
    if let Err(e) = written {
        // The temporary file may hold the private key; it must not be left behind.
        if let Err(e2) = std::fs::remove_file(&tmp)
            && e2.kind() != std::io::ErrorKind::NotFound
        {
            tracing::warn!("removing {} after a failed write: {e2}", tmp.display());
        }
        return Err(fail(e));
    }
    Ok(())
}

/// How a client decides to trust the server's certificate.
#[derive(Clone)]
pub struct ClientTls {
    config: Arc<rustls::ClientConfig>,
    verifier: Arc<Verifier>,
}

impl fmt::Debug for ClientTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientTls")
            .field("verifier", &self.verifier)
            .finish()
    }
}

impl ClientTls {
    /// Trusts the certificates in the PEM file `ca` (a CA's, or the server's own) when
    /// given, else the system's roots; with `pin`, the server's certificate must also
    /// have that fingerprint, and with a pin and no `ca` the pin alone decides (the
    /// handshake's signature is still checked against the pinned certificate's key).
    pub fn new(ca: Option<&Path>, pin: Option<Fingerprint>) -> Result<ClientTls, TlsError> {
        let provider = provider();
        let chain = match (ca, pin) {
            (Some(path), _) => {
                let mut roots = rustls::RootCertStore::empty();
                for cert in load_certs("--ca", path)? {
                    roots.add(cert).map_err(|e| TlsError::Content {
                        what: "--ca".into(),
                        path: path.to_path_buf(),
                        why: format!("a certificate in it cannot be a trust anchor: {e}"),
                    })?;
                }
                let v = rustls::client::WebPkiServerVerifier::builder_with_provider(
                    Arc::new(roots),
                    provider.clone(),
                )
                .build()
                .map_err(|e| TlsError::Config(format!("--ca {}: {e}", path.display())))?;
                Chain::Verify(v, format!("the CA file {}", path.display()))
            }
            (None, Some(_)) => Chain::PinOnly,
            (None, None) => {
                let v = rustls_platform_verifier::Verifier::new(provider.clone()).map_err(|e| {
                    TlsError::Config(format!("loading the system's trusted certificates: {e}"))
                })?;
                Chain::Verify(Arc::new(v), "the system's trusted roots".into())
            }
        };
        let verifier = Arc::new(Verifier {
            pin,
            chain,
            provider: provider.clone(),
            failure: Mutex::new(None),
        });
        let config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsError::Config(format!("TLS versions: {e}")))?
            .dangerous()
            .with_custom_certificate_verifier(verifier.clone())
            .with_no_client_auth();
        Ok(ClientTls {
            config: Arc::new(config),
            verifier,
        })
    }

    /// The configuration to connect with.
    pub fn config(&self) -> Arc<rustls::ClientConfig> {
        self.config.clone()
    }

    /// Why the server's certificate was last refused, if it was since the last call:
    /// a sentence naming the fingerprints or the trust anchors involved.
    pub fn take_refusal(&self) -> Option<String> {
        self.verifier.lock().take()
    }
}

/// Where trust in the certificate's chain comes from, besides a pin.
enum Chain {
    /// Only the pin decides.
    PinOnly,
    /// A chain to these roots (described for messages) must verify.
    Verify(Arc<dyn ServerCertVerifier>, String),
}

struct Verifier {
    pin: Option<Fingerprint>,
    chain: Chain,
    provider: Arc<CryptoProvider>,
    failure: Mutex<Option<String>>,
}

impl fmt::Debug for Verifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let chain = match &self.chain {
            Chain::PinOnly => "none",
            Chain::Verify(_, source) => source.as_str(),
        };
        f.debug_struct("Verifier")
            .field("pin", &self.pin)
            .field("chain", &chain)
            .finish()
    }
}

/// A refused certificate, as the error rustls passes up through the handshake.
#[derive(Debug)]
struct Refused(String);

impl fmt::Display for Refused {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Refused {}

impl Verifier {
    fn lock(&self) -> std::sync::MutexGuard<'_, Option<String>> {
        // The guarded value is replaced whole, so a poisoned lock still holds a message.
        self.failure.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn refuse(&self, why: String) -> rustls::Error {
        *self.lock() = Some(why.clone());
        rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(Refused(
            why,
        )))))
    }
}

impl ServerCertVerifier for Verifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        if let Some(pin) = self.pin {
            let seen = Fingerprint::of(end_entity);
            if seen != pin {
                return Err(self.refuse(format!(
                    "the server's certificate has fingerprint {seen}, not the pinned {pin} (--server-fingerprint); \
                     if the server's certificate was replaced, pin the fingerprint `drover server` prints now, \
                     otherwise something between here and the server is posing as it"
                )));
            }
        }
        match &self.chain {
            Chain::PinOnly => Ok(ServerCertVerified::assertion()),
            Chain::Verify(v, source) => v
                .verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
                .map_err(|e| {
                    self.refuse(format!(
                        "the server's certificate ({}) is not trusted by {source}: {e}",
                        Fingerprint::of(end_entity)
                    ))
                }),
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        match &self.chain {
            // The pin vouches for the certificate; the server must still prove it holds
            // the certificate's key, or anyone who saw the certificate could present it.
            Chain::PinOnly => rustls::crypto::verify_tls12_signature(
                message,
                cert,
                dss,
                &self.provider.signature_verification_algorithms,
            ),
            Chain::Verify(v, _) => v.verify_tls12_signature(message, cert, dss),
        }
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        match &self.chain {
            Chain::PinOnly => rustls::crypto::verify_tls13_signature(
                message,
                cert,
                dss,
                &self.provider.signature_verification_algorithms,
            ),
            Chain::Verify(v, _) => v.verify_tls13_signature(message, cert, dss),
        }
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        match &self.chain {
            Chain::PinOnly => self
                .provider
                .signature_verification_algorithms
                .supported_schemes(),
            Chain::Verify(v, _) => v.supported_verify_schemes(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprints_read_back_as_printed_and_as_openssl_prints_them() {
        let fp = Fingerprint::of(b"a certificate");
        let printed = fp.to_string();
        assert!(
            printed.starts_with("sha256:") && printed.len() == 7 + 64,
            "{printed}"
        );
        assert_eq!(printed.parse::<Fingerprint>().unwrap(), fp);
        let openssl = format!(
            "SHA256:{}",
            hex::encode_upper(fp.0)
                .as_bytes()
                .chunks(2)
                .map(|c| std::str::from_utf8(c).unwrap())
                .collect::<Vec<_>>()
                .join(":")
        );
        assert_eq!(openssl.parse::<Fingerprint>().unwrap(), fp);
        for bad in ["", "abcd", "sha256:abcd", "md5:00", &printed[7..]] {
            let e = bad.parse::<Fingerprint>().unwrap_err();
            assert!(e.contains("64 hex digits"), "{bad}: {e}");
        }
    }

    #[test]
    fn a_generated_certificate_is_kept_with_an_owner_only_key_and_not_remade() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = (
            dir.path().join("tls/cert.pem"),
            dir.path().join("tls/key.pem"),
        );
        let names = vec!["localhost".to_string(), "127.0.0.1".to_string()];
        assert!(ensure_self_signed(&cert, &key, &names).unwrap());
        let mode = std::fs::metadata(&key).unwrap().permissions().mode();
        assert_eq!(mode & 0o077, 0, "{mode:o}");
        let first = ServerIdentity::load(&cert, &key, "cert", "key")
            .unwrap()
            .fingerprint;
        assert!(!ensure_self_signed(&cert, &key, &names).unwrap());
        let again = ServerIdentity::load(&cert, &key, "cert", "key")
            .unwrap()
            .fingerprint;
        assert_eq!(first, again);
        std::fs::remove_file(&key).unwrap();
        let e = ensure_self_signed(&cert, &key, &names)
            .unwrap_err()
            .to_string();
        assert!(e.contains("key.pem") && e.contains("does not"), "{e}");
    }

    #[test]
    fn files_that_are_not_pem_are_refused_naming_the_flag() {
        let dir = tempfile::tempdir().unwrap();
        let junk = dir.path().join("junk.pem");
        std::fs::write(&junk, "not a certificate\n").unwrap();
        let e = load_certs("--tls-cert", &junk).unwrap_err().to_string();
        assert!(
            e.starts_with("--tls-cert ") && e.contains("BEGIN CERTIFICATE"),
            "{e}"
        );
        let e = load_key("--tls-key", &junk).unwrap_err().to_string();
        assert!(
            e.starts_with("--tls-key ") && e.contains("PRIVATE KEY"),
            "{e}"
        );
        let e = load_certs("--ca", &dir.path().join("missing.pem"))
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("--ca ") && e.contains("missing.pem"), "{e}");
    }
}
