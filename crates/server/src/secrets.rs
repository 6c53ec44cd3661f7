//! Secrets at rest: every value is sealed with ChaCha20-Poly1305 under the server's
//! master key before it reaches the store, bound to its team and name (as associated
//! data) so that a sealed value cannot be moved to another name or team. The master key
//! comes from `HANGAR_SECRET_KEY` (64 hex digits) or from `<data-dir>/secret.key`
//! (mode 0600), which is made on first start.

use anyhow::{Context, bail};
use chacha20poly1305::aead::{Aead, AeadCore, KeyInit, OsRng, Payload};
use chacha20poly1305::{ChaCha20Poly1305, Key, Nonce};
use uuid::Uuid;

use crate::layout::Layout;

pub(crate) struct SecretBox {
    cipher: ChaCha20Poly1305,
}

impl SecretBox {
    pub(crate) fn load(layout: &Layout) -> anyhow::Result<SecretBox> {
        let hex_key = match std::env::var("HANGAR_SECRET_KEY") {
            Ok(key) => key,
            Err(_) => {
                let path = layout.root().join("secret.key");
                match std::fs::read_to_string(&path) {
                    Ok(key) => key,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                        let key = hex::encode(ChaCha20Poly1305::generate_key(&mut OsRng));
                        crate::write_private(&path, &format!("{key}\n"))?;
                        key
                    }
                    Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
                }
            }
        };
        let bytes = hex::decode(hex_key.trim()).context("the secret key is not hex")?;
        if bytes.len() != 32 {
            bail!("the secret key must be 32 bytes (64 hex digits), got {}", bytes.len());
        }
        Ok(SecretBox { cipher: ChaCha20Poly1305::new(Key::from_slice(&bytes)) })
    }

    /// Seals a value; returns the nonce and the ciphertext.
    pub(crate) fn seal(&self, team: Uuid, name: &str, value: &str) -> anyhow::Result<(Vec<u8>, Vec<u8>)> {
        let nonce = ChaCha20Poly1305::generate_nonce(&mut OsRng);
        let aad = associated(team, name);
        let sealed = self
            .cipher
            .encrypt(&nonce, Payload { msg: value.as_bytes(), aad: &aad })
            .map_err(|_| anyhow::anyhow!("cannot seal secret {name}"))?;
        Ok((nonce.to_vec(), sealed))
    }

    /// Opens a sealed value.
    pub(crate) fn open(&self, team: Uuid, name: &str, nonce: &[u8], sealed: &[u8]) -> anyhow::Result<String> {
        if nonce.len() != 12 {
            bail!("secret {name} has a damaged nonce");
        }
        let aad = associated(team, name);
        let plain = self
            .cipher
            .decrypt(Nonce::from_slice(nonce), Payload { msg: sealed, aad: &aad })
            .map_err(|_| anyhow::anyhow!("secret {name} cannot be opened with this server's secret key"))?;
        String::from_utf8(plain).context("a secret is not UTF-8")
    }
}

fn associated(team: Uuid, name: &str) -> Vec<u8> {
    let mut aad = team.as_bytes().to_vec();
    aad.extend_from_slice(name.as_bytes());
    aad
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sealed_values_open_only_for_their_team_and_name() {
        let dir = tempfile::tempdir().unwrap();
        let layout = Layout::new(dir.path().to_owned());
        let secrets = SecretBox::load(&layout).unwrap();
        let team = Uuid::new_v4();
        let (nonce, sealed) = secrets.seal(team, "TOKEN", "hunter2").unwrap();
        assert!(!sealed.windows(7).any(|w| w == b"hunter2"));
        assert_eq!(secrets.open(team, "TOKEN", &nonce, &sealed).unwrap(), "hunter2");
        assert!(secrets.open(team, "OTHER", &nonce, &sealed).is_err());
        assert!(secrets.open(Uuid::new_v4(), "TOKEN", &nonce, &sealed).is_err());
        // The same key file opens it again after a restart.
        let again = SecretBox::load(&layout).unwrap();
        assert_eq!(again.open(team, "TOKEN", &nonce, &sealed).unwrap(), "hunter2");
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.path().join("secret.key")).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }
}
