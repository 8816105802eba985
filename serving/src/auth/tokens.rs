//! The token file: identities, their roles, and the SHA-256 of their bearer tokens (never the
//! tokens themselves, so the file is no secret worth stealing).
//!
//! ```toml
//! [[token]]
//! identity = "runtime-0"
//! roles = ["holder"]
//! token_sha256 = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"
//!
//! # No hash: the roles of a client certificate whose subject common name is "ops".
//! [[token]]
//! identity = "ops"
//! roles = ["admin"]
//! ```

use std::{collections::HashMap, path::Path, sync::Arc};

use serde::Deserialize;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use super::Caller;
use crate::config::ConfigError;

/// Most entries in a token file; far more than any deployment needs, and each costs a hash
/// comparison per call.
pub const MAX_ENTRIES: usize = 1024;

/// One `[[token]]` entry as written.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenEntry {
    /// Who presents it: 1–128 printable characters.
    pub identity: String,
    /// Roles granted.
    pub roles: Vec<String>,
    /// Lowercase hex SHA-256 of the token. Absent: the entry only grants roles to a client
    /// certificate with this identity.
    pub token_sha256: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    #[serde(default)]
    token: Vec<TokenEntry>,
}

/// A validated token file.
#[derive(Debug, Clone)]
pub struct TokenFile {
    hashes: Vec<([u8; 32], Caller)>,
    by_identity: HashMap<Arc<str>, Caller>,
}

/// Hex SHA-256 of `token`, as the file stores it (`printf %s "$TOKEN" | sha256sum`).
pub fn sha256_hex(token: &str) -> String {
    Sha256::digest(token.as_bytes()).iter().map(|b| format!("{b:02x}")).collect()
}

impl TokenFile {
    /// Reads and validates the file at `path`; every role must be one of `known_roles`.
    pub fn load(path: &Path, known_roles: &[&str]) -> Result<Self, ConfigError> {
        let file: File = crate::config::read_toml(path)?;
        Self::from_entries(file.token, known_roles)
            .map_err(|e| ConfigError::Invalid(format!("token file {}: {e}", path.display())))
    }

    /// Validates `entries`. Every problem is listed, not only the first.
    pub fn from_entries(entries: Vec<TokenEntry>, known_roles: &[&str]) -> Result<Self, String> {
        let mut problems = Vec::new();
        if entries.is_empty() {
            problems.push("no [[token]] entries: every call would be refused".to_owned());
        }
        if entries.len() > MAX_ENTRIES {
            problems.push(format!("{} entries; at most {MAX_ENTRIES}", entries.len()));
        }
        let mut hashes = Vec::new();
        let mut by_identity = HashMap::new();
        for (i, entry) in entries.into_iter().enumerate() {
            let at = format!("token[{i}] ({:?})", crate::echo::echo(&entry.identity));
            let id = &entry.identity;
            if id.is_empty() || id.chars().count() > 128 || id.chars().any(char::is_control) {
                problems.push(format!(
                    "{at}: identity must be 1 to 128 characters, none of them control characters"
                ));
            }
            for role in &entry.roles {
                if !known_roles.contains(&role.as_str()) {
                    problems.push(format!(
                        "{at}: unknown role {:?}; this service knows {}",
                        crate::echo::echo(role),
                        known_roles.join(", ")
                    ));
                }
            }
            let caller = Caller {
                identity: Arc::from(entry.identity.as_str()),
                roles: entry.roles.iter().map(|r| Arc::from(r.as_str())).collect(),
            };
            if let Some(hex) = &entry.token_sha256 {
                match parse_hash(hex) {
                    Some(hash) if hashes.iter().any(|(h, _)| *h == hash) => {
                        problems.push(format!("{at}: the same token hash appears twice"));
                    }
                    Some(hash) => hashes.push((hash, caller.clone())),
                    None => problems.push(format!("{at}: token_sha256 must be 64 lowercase hex characters")),
                }
            }
            if by_identity.insert(caller.identity.clone(), caller).is_some() {
                problems.push(format!("{at}: identity listed twice"));
            }
        }
        if problems.is_empty() { Ok(TokenFile { hashes, by_identity }) } else { Err(problems.join("; ")) }
    }

    /// The caller presenting bearer `token`, if any. Every entry is compared, in constant time
    /// each, so the time taken says nothing about which entry (or how much of one) matched.
    pub fn caller_for_token(&self, token: &str) -> Option<Caller> {
        let digest: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        let mut found = None;
        for (hash, caller) in &self.hashes {
            if bool::from(hash.ct_eq(&digest)) {
                found = Some(caller);
            }
        }
        found.cloned()
    }

    /// The roles given to identity `identity` (a client certificate's), if listed.
    pub fn caller_for_identity(&self, identity: &str) -> Option<Caller> {
        self.by_identity.get(identity).cloned()
    }
}

fn parse_hash(hex: &str) -> Option<[u8; 32]> {
    if hex.len() != 64 || !hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(identity: &str, roles: &[&str], token: Option<&str>) -> TokenEntry {
        TokenEntry {
            identity: identity.into(),
            roles: roles.iter().map(|r| (*r).to_owned()).collect(),
            token_sha256: token.map(sha256_hex),
        }
    }

    #[test]
    fn tokens_map_to_their_identity_and_roles() {
        let file = TokenFile::from_entries(
            vec![entry("a", &["holder"], Some("secret-a")), entry("ops", &["admin"], None)],
            &["admin", "holder"],
        )
        .unwrap();
        let a = file.caller_for_token("secret-a").unwrap();
        assert_eq!(&*a.identity, "a");
        assert!(a.has("holder") && !a.has("admin"));
        assert_eq!(file.caller_for_token("secret-b"), None);
        assert_eq!(file.caller_for_token(""), None);
        assert!(file.caller_for_identity("ops").unwrap().has("admin"));
    }

    #[test]
    fn every_problem_is_listed() {
        let bad = vec![
            entry("", &["root"], Some("x")),
            TokenEntry { identity: "b".into(), roles: vec![], token_sha256: Some("ABC".into()) },
            entry("b", &[], Some("x")),
        ];
        let err = TokenFile::from_entries(bad, &["admin"]).unwrap_err();
        for expected in
            ["identity must be", "unknown role \"root\"", "64 lowercase hex", "appears twice", "listed twice"]
        {
            assert!(err.contains(expected), "{expected:?} missing from {err}");
        }
        assert!(TokenFile::from_entries(vec![], &["admin"]).is_err());
    }

    #[test]
    fn the_hash_is_the_usual_hex_sha256() {
        assert_eq!(sha256_hex("test"), "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08");
    }
}
