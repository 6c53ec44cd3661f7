//! API keys: making them, and checking the ones callers present.
//!
//! A key is `<id>:<secret>`. The id is public (it appears in history and listings); the
//! secret is 256 random bits and only its SHA-256 is stored. A fast hash is right here:
//! the secret is random, not a password, so there is nothing to brute-force.

use std::future::Future;
use std::pin::Pin;

use gateway::{Authenticator, KeyOwner};
use model::records::Key;
use model::revision::KeyScope;
use rand::Rng;
use sha2::{Digest, Sha256};
use store::{Store, StoreError};

/// A freshly made key: what to store, and the one-time full key to show its owner.
pub(crate) struct NewKey {
    pub(crate) id: String,
    pub(crate) secret_hash: String,
    pub(crate) full: String,
}

pub(crate) fn generate_key() -> NewKey {
    const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";
    let mut rng = rand::rng();
    let id: String = (0..16).map(|_| ALPHABET[rng.random_range(0..ALPHABET.len())] as char).collect();
    let secret = hex::encode(rng.random::<[u8; 32]>());
    NewKey { secret_hash: hash_secret(&secret), full: format!("{id}:{secret}"), id }
}

pub(crate) fn hash_secret(secret: &str) -> String {
    hex::encode(Sha256::digest(secret.as_bytes()))
}

/// Splits an `Authorization` header (`Key <id>:<secret>` or `Bearer <id>:<secret>`)
/// into id and secret.
pub(crate) fn parse_authorization(header: &str) -> Option<(&str, &str)> {
    let (scheme, credential) = header.trim().split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("key") && !scheme.eq_ignore_ascii_case("bearer") {
        return None;
    }
    let (id, secret) = credential.trim().split_once(':')?;
    (!id.is_empty() && !secret.is_empty()).then_some((id, secret))
}

/// The key an `Authorization` header presents, if it is well-formed, known, not
/// revoked and its secret matches.
pub(crate) async fn verify(store: &Store, authorization: &str) -> Result<Option<Key>, StoreError> {
    let Some((id, secret)) = parse_authorization(authorization) else { return Ok(None) };
    let stored = store.key_by_id(id).await?;
    Ok(stored
        .filter(|k| k.key.revoked_at.is_none() && hashes_match(&k.secret_hash, &hash_secret(secret)))
        .map(|k| k.key))
}

/// Whether two secret hashes are the same, in a time that does not depend on where they
/// first differ.
fn hashes_match(stored: &str, presented: &str) -> bool {
    use subtle::ConstantTimeEq;
    stored.as_bytes().ct_eq(presented.as_bytes()).into()
}

/// Checks the keys of calls through the gateway.
pub(crate) struct GatewayKeys {
    pub(crate) store: Store,
}

impl Authenticator for GatewayKeys {
    fn owner<'a>(&'a self, authorization: &'a str) -> Pin<Box<dyn Future<Output = Option<KeyOwner>> + Send + 'a>> {
        Box::pin(async move {
            match verify(&self.store, authorization).await {
                Ok(key) => key.map(|k| KeyOwner { team_id: k.team_id, root: k.scope == KeyScope::Root }),
                Err(e) => {
                    tracing::error!(error = %e, "cannot check a key");
                    None
                }
            }
        })
    }
}

/// Whether a key of this scope may manage apps (as opposed to only calling them).
pub(crate) fn may_manage(scope: KeyScope) -> bool {
    match scope {
        KeyScope::Root | KeyScope::Admin => true,
        KeyScope::Api => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_keys_parse_and_verify() {
        let key = generate_key();
        let header = format!("Key {}", key.full);
        let (id, secret) = parse_authorization(&header).unwrap();
        assert_eq!(id, key.id);
        assert_eq!(hash_secret(secret), key.secret_hash);
        assert!(!key.secret_hash.contains(secret));
        assert_eq!(parse_authorization(&format!("Bearer {}", key.full)).map(|p| p.0), Some(key.id.as_str()));
    }

    #[test]
    fn malformed_headers_are_refused() {
        for header in ["", "Key", "Key abc", "Key :secret", "Key id:", "Basic id:secret", "idsecret"] {
            assert_eq!(parse_authorization(header), None, "{header:?}");
        }
    }
}
