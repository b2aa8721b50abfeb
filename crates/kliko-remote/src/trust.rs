//! Trust in a shared tier: a cache many people write is a place to poison, so every result
//! record a machine publishes is signed (ed25519) with its user's key, and a reader
//! configured with trusted public keys uses only records signed by one of them.
//!
//! - A signing key is a file (`$KLIKO_SIGNING_KEY`, else `$XDG_CONFIG_HOME/kliko/signing-key`,
//!   else `~/.config/kliko/signing-key`), private to its owner (mode 0600; a key others can
//!   read is refused, as ssh refuses one). [`SigningKey::create`] makes one and never replaces
//!   an existing one.
//! - Trusted keys: `$KLIKO_TRUSTED_KEYS`, public keys (`ed25519:` and 64 hex characters)
//!   separated by commas or spaces, or the path of a file with one per line (`#` comments).
//!   Without any, every record is used (signed or not) and only a bad signature is refused.
//!   The reader's own public key is always trusted.
//!
//! What is signed: the bytes `kliko-remote-v1 record\n` followed by the record's `result`
//! exactly as it is stored (the result names its key, so a signed record cannot be moved to
//! another key). Objects need no signature: they are named by their content and checked
//! against it as they arrive.

use std::fmt;
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::str::FromStr;

use ed25519_dalek::{Signer, Verifier};

/// What a signature covers, before the result's bytes.
const DOMAIN: &[u8] = b"kliko-remote-v1 record\n";
/// What a signature of an image's kliko.yml covers, before the image ID and the file.
const IMAGE_DOMAIN: &[u8] = b"kliko-remote-v1 image file\n";
/// The first word of a signing-key file.
const KEY_FILE_TAG: &str = "kliko-signing-key-v1";

#[derive(Debug, thiserror::Error)]
pub enum TrustError {
    #[error("`{}`: {reason}", path.display())]
    KeyFile { path: PathBuf, reason: String },
    #[error("a signing key already exists at `{}` (public key {public}); kliko never replaces one", path.display())]
    KeyExists { path: PathBuf, public: String },
    #[error("cannot {action} `{}`", path.display())]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "`{0}` is not a public key (expected `ed25519:` and 64 hex characters, as `kliko remote key show` prints)"
    )]
    BadPublicKey(String),
    #[error("no place for a signing key: set `KLIKO_SIGNING_KEY`, `XDG_CONFIG_HOME` or `HOME`")]
    NoKeyPlace,
}

/// An ed25519 public key, written `ed25519:` and 64 hex characters.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct PublicKey(ed25519_dalek::VerifyingKey);

impl fmt::Display for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ed25519:{}", hex::encode(self.0.as_bytes()))
    }
}

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl FromStr for PublicKey {
    type Err = TrustError;
    fn from_str(s: &str) -> Result<Self, TrustError> {
        let bad = || TrustError::BadPublicKey(s.to_string());
        let h = s.trim().strip_prefix("ed25519:").ok_or_else(bad)?;
        let mut bytes = [0u8; 32];
        hex::decode_to_slice(h, &mut bytes).map_err(|_| bad())?;
        ed25519_dalek::VerifyingKey::from_bytes(&bytes).map(PublicKey).map_err(|_| bad())
    }
}

/// A signing key, read from its file.
pub struct SigningKey {
    key: ed25519_dalek::SigningKey,
    path: PathBuf,
}

impl fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SigningKey").field("path", &self.path).field("public", &self.public()).finish()
    }
}

impl SigningKey {
    /// Where this user's key is (or would be) kept.
    pub fn default_path() -> Result<PathBuf, TrustError> {
        let var = |k: &str| std::env::var_os(k).filter(|v| !v.is_empty()).map(PathBuf::from);
        if let Some(p) = var("KLIKO_SIGNING_KEY") {
            return Ok(p);
        }
        let config = var("XDG_CONFIG_HOME").or_else(|| var("HOME").map(|h| h.join(".config")));
        config.map(|c| c.join("kliko").join("signing-key")).ok_or(TrustError::NoKeyPlace)
    }

    /// This user's key, if they have made one.
    pub fn load_default() -> Result<Option<SigningKey>, TrustError> {
        let path = SigningKey::default_path()?;
        match std::fs::symlink_metadata(&path) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            _ => SigningKey::load(&path).map(Some),
        }
    }

    /// The key in `path`, refused when anyone but its owner may read it.
    pub fn load(path: &Path) -> Result<SigningKey, TrustError> {
        let io = |source| TrustError::Io { action: "read the signing key", path: path.to_path_buf(), source };
        let meta = std::fs::metadata(path).map_err(io)?;
        let bad = |reason: String| TrustError::KeyFile { path: path.to_path_buf(), reason };
        if meta.permissions().mode() & 0o077 != 0 {
            return Err(bad(format!(
                "the signing key may be read by others (mode {:o}): make it private with `chmod 600`, or make a new one",
                meta.permissions().mode() & 0o777
            )));
        }
        let text = std::fs::read_to_string(path).map_err(io)?;
        let mut words = text.split_whitespace();
        if words.next() != Some(KEY_FILE_TAG) {
            return Err(bad(format!("not a kliko signing key (it must start with `{KEY_FILE_TAG}`)")));
        }
        let seed = words.next().and_then(|w| w.strip_prefix("ed25519-secret:")).unwrap_or("");
        let mut bytes = [0u8; 32];
        hex::decode_to_slice(seed, &mut bytes).map_err(|_| bad("its secret is not 64 hex characters".into()))?;
        Ok(SigningKey { key: ed25519_dalek::SigningKey::from_bytes(&bytes), path: path.to_path_buf() })
    }

    /// Make a new key at `path` (its folder created private), never replacing one.
    pub fn create(path: &Path) -> Result<SigningKey, TrustError> {
        if let Ok(existing) = SigningKey::load(path) {
            return Err(TrustError::KeyExists { path: path.to_path_buf(), public: existing.public().to_string() });
        }
        let io = |action| move |source| TrustError::Io { action, path: path.to_path_buf(), source };
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir).map_err(io("make the folder of"))?;
        }
        let mut seed = [0u8; 32];
        getrandom::fill(&mut seed).map_err(|e| io("make random bytes for")(std::io::Error::other(e.to_string())))?;
        // `create_new`: an existing file (even one that is no key) is never overwritten.
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
            .map_err(io("create the signing key"))?;
        let text = format!("{KEY_FILE_TAG} ed25519-secret:{}\n", hex::encode(seed));
        f.write_all(text.as_bytes()).and_then(|()| f.sync_all()).map_err(io("write the signing key"))?;
        Ok(SigningKey { key: ed25519_dalek::SigningKey::from_bytes(&seed), path: path.to_path_buf() })
    }

    pub fn public(&self) -> PublicKey {
        PublicKey(self.key.verifying_key())
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The signature of a record whose result is stored as `result`.
    pub fn sign(&self, result: &[u8]) -> String {
        self.sign_message(&message(result))
    }

    /// The signature of an image's kliko.yml, as the tier keeps it.
    pub fn sign_image_file(&self, image_id: &str, bytes: &[u8]) -> String {
        self.sign_message(&image_message(image_id, bytes))
    }

    fn sign_message(&self, message: &[u8]) -> String {
        hex::encode(self.key.sign(message).to_bytes())
    }
}

fn message(result: &[u8]) -> Vec<u8> {
    [DOMAIN, result].concat()
}

/// What a signature of an image's file covers: the image's ID names the file too.
fn image_message(image_id: &str, bytes: &[u8]) -> Vec<u8> {
    [IMAGE_DOMAIN, image_id.as_bytes(), b"\n", bytes].concat()
}

/// Which records a reader uses.
#[derive(Clone, Debug, Default)]
pub struct Trust {
    /// Empty: every record whose signature (if any) is good.
    keys: Vec<PublicKey>,
}

/// Whether a record may be used.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Usable; signed by this key, if signed.
    Trusted(Option<PublicKey>),
    /// Not used, for this reason (in words for a person).
    Ignored(String),
}

impl Trust {
    /// Trust records signed by `keys` only (and no others, nor unsigned ones).
    pub fn only(keys: Vec<PublicKey>) -> Trust {
        Trust { keys }
    }

    /// `$KLIKO_TRUSTED_KEYS` (keys, or the path of a file of keys), plus `own` if given.
    pub fn from_env(own: Option<PublicKey>) -> Result<Trust, TrustError> {
        let Some(v) = std::env::var("KLIKO_TRUSTED_KEYS").ok().filter(|v| !v.trim().is_empty()) else {
            return Ok(Trust::default());
        };
        let mut keys = Trust::parse(&v)?;
        keys.extend(own);
        Ok(Trust { keys })
    }

    /// Keys given inline (`ed25519:...`, separated by commas or spaces) or as a file path.
    pub fn parse(spec: &str) -> Result<Vec<PublicKey>, TrustError> {
        let spec = spec.trim();
        let text = if spec.starts_with("ed25519:") {
            spec.replace(',', " ")
        } else {
            let path = Path::new(spec);
            std::fs::read_to_string(path).map_err(|source| TrustError::Io {
                action: "read the trusted keys in",
                path: path.to_path_buf(),
                source,
            })?
        };
        text.lines()
            .map(|l| l.split('#').next().unwrap_or(""))
            .flat_map(str::split_whitespace)
            .map(PublicKey::from_str)
            .collect()
    }

    /// Whether any keys are configured (then unsigned records are ignored).
    pub fn is_restricted(&self) -> bool {
        !self.keys.is_empty()
    }

    pub fn keys(&self) -> &[PublicKey] {
        &self.keys
    }

    /// The verdict on a record whose result is stored as `result`, signed as given.
    pub fn judge(&self, result: &[u8], signed_by: Option<&str>, signature: Option<&str>) -> Verdict {
        self.judge_message(&message(result), signed_by, signature)
    }

    /// The verdict on an image's kliko.yml kept on the tier, signed as given.
    pub fn judge_image_file(
        &self,
        image_id: &str,
        bytes: &[u8],
        signed_by: Option<&str>,
        signature: Option<&str>,
    ) -> Verdict {
        self.judge_message(&image_message(image_id, bytes), signed_by, signature)
    }

    fn judge_message(&self, message: &[u8], signed_by: Option<&str>, signature: Option<&str>) -> Verdict {
        let (signer, sig) = match (signed_by, signature) {
            (None, None) if self.is_restricted() => {
                return Verdict::Ignored("it is not signed, and only signed records are trusted".into())
            }
            (None, None) => return Verdict::Trusted(None),
            (Some(k), Some(s)) => (k, s),
            _ => return Verdict::Ignored("its signature is incomplete".into()),
        };
        let Ok(signer) = PublicKey::from_str(signer) else {
            return Verdict::Ignored(format!("it names a signer that is no public key (`{signer}`)"));
        };
        let mut bytes = [0u8; 64];
        if hex::decode_to_slice(sig, &mut bytes).is_err() {
            return Verdict::Ignored("its signature is malformed".into());
        }
        if signer.0.verify(message, &ed25519_dalek::Signature::from_bytes(&bytes)).is_err() {
            return Verdict::Ignored(format!("its signature by {signer} does not match its contents"));
        }
        if self.is_restricted() && !self.keys.contains(&signer) {
            return Verdict::Ignored(format!("it is signed by {signer}, which is not a trusted key"));
        }
        Verdict::Trusted(Some(signer))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(dir: &Path, name: &str) -> SigningKey {
        SigningKey::create(&dir.join(name)).unwrap()
    }

    #[test]
    fn a_signed_record_is_trusted_only_by_those_who_trust_its_signer() {
        let t = tempfile::tempdir().unwrap();
        let (alice, mallory) = (key(t.path(), "a"), key(t.path(), "m"));
        let result = br#"{"key":"00"}"#;
        let sig = alice.sign(result);
        let by = alice.public().to_string();
        assert_eq!(Trust::default().judge(result, Some(&by), Some(&sig)), Verdict::Trusted(Some(alice.public())));
        let trust_alice = Trust::only(vec![alice.public()]);
        assert_eq!(trust_alice.judge(result, Some(&by), Some(&sig)), Verdict::Trusted(Some(alice.public())));
        let trust_other = Trust::only(vec![mallory.public()]);
        let Verdict::Ignored(why) = trust_other.judge(result, Some(&by), Some(&sig)) else { panic!() };
        assert!(why.contains("not a trusted key"), "{why}");
        // Mallory claims Alice's name, or edits what Alice signed: the signature fails.
        let forged = mallory.sign(result);
        let Verdict::Ignored(why) = trust_alice.judge(result, Some(&by), Some(&forged)) else { panic!() };
        assert!(why.contains("does not match"), "{why}");
        let Verdict::Ignored(_) = Trust::default().judge(br#"{"key":"01"}"#, Some(&by), Some(&sig)) else { panic!() };
        // Unsigned: used by an open reader, ignored by one with trusted keys.
        assert_eq!(Trust::default().judge(result, None, None), Verdict::Trusted(None));
        let Verdict::Ignored(why) = trust_alice.judge(result, None, None) else { panic!() };
        assert!(why.contains("not signed"), "{why}");
    }

    #[test]
    fn keys_are_private_and_never_replaced() {
        let t = tempfile::tempdir().unwrap();
        let path = t.path().join("cfg/kliko/signing-key");
        let k = SigningKey::create(&path).unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        assert_eq!(SigningKey::load(&path).unwrap().public(), k.public());
        let again = SigningKey::create(&path).unwrap_err();
        assert!(matches!(&again, TrustError::KeyExists { public, .. } if *public == k.public().to_string()), "{again}");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = SigningKey::load(&path).unwrap_err().to_string();
        assert!(e.contains("chmod 600"), "{e}");
        // A file that is not a key is not overwritten either.
        let other = t.path().join("notes.txt");
        std::fs::write(&other, "mine").unwrap();
        assert!(SigningKey::create(&other).is_err());
        assert_eq!(std::fs::read_to_string(&other).unwrap(), "mine");
    }

    #[test]
    fn trusted_keys_are_read_inline_or_from_a_file() {
        let t = tempfile::tempdir().unwrap();
        let (a, b) = (key(t.path(), "a").public(), key(t.path(), "b").public());
        assert_eq!(Trust::parse(&format!("{a},{b}")).unwrap(), vec![a, b]);
        let file = t.path().join("trusted");
        std::fs::write(&file, format!("# the group\n{a}  # alice\n\n{b}\n")).unwrap();
        assert_eq!(Trust::parse(file.to_str().unwrap()).unwrap(), vec![a, b]);
        let e = Trust::parse("ed25519:zz").unwrap_err().to_string();
        assert!(e.contains("not a public key"), "{e}");
        assert!(Trust::parse("/no/such/file").unwrap_err().to_string().contains("/no/such/file"));
    }
}
