//! Worker credentials and peer tokens: how controllers and workers authenticate each other
//! once a worker has registered (decision record 0010).
//!
//! - A **credential** `swc_{generation}_{mac}_{worker_id}` belongs to one worker: the
//!   controllers mint it at registration (and at a rotation) as
//!   `HMAC-SHA256(secret, "scaibunker worker credential\0{worker_id}\0{generation}")` with
//!   the storage secret they share, so any controller verifies it without a lookup and
//!   derives it again to call that worker. Heartbeats, peer lookups and the storage proxy take
//!   it from the worker; the worker's API takes it from the controllers. A controller checks
//!   the generation against its database, so a rotated or reset credential stops working.
//! - A **peer token** `swp_{expires_s}_{mac}_{requester_id}` lets worker `requester_id` fetch
//!   one image from one peer until `expires_s`: the controller names the peer in a peers
//!   answer with `HMAC-SHA256(peer's credential, "scaibunker peer image\0{sha256}\0{requester}\0{expires_s}")`,
//!   and the peer verifies it with its own credential. No worker can reach another worker's
//!   API with anything of its own.

use hmac::{Hmac, Mac};
use sha2::Sha256;

/// Prefix of a worker credential.
pub const CREDENTIAL_PREFIX: &str = "swc_";
/// Prefix of a peer token.
pub const PEER_TOKEN_PREFIX: &str = "swp_";

type HmacSha256 = Hmac<Sha256>;

fn mac_hex(key: &[u8], parts: &[&[u8]]) -> String {
    let mut mac = HmacSha256::new_from_slice(key).expect("HMAC takes a key of any length");
    for (i, part) in parts.iter().enumerate() {
        if i > 0 {
            mac.update(b"\0");
        }
        mac.update(part);
    }
    hex::encode(mac.finalize().into_bytes())
}

/// Whether `a` and `b` are equal, in a time that depends on their lengths only.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Whose credential a token is, once its MAC checked out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CredentialClaims {
    pub worker_id: String,
    pub generation: u64,
}

/// The credential of `worker_id` at `generation`.
pub fn credential(secret: &[u8], worker_id: &str, generation: u64) -> String {
    let generation_s = generation.to_string();
    let mac = mac_hex(
        secret,
        &[
            b"scaibunker worker credential",
            worker_id.as_bytes(),
            generation_s.as_bytes(),
        ],
    );
    format!("{CREDENTIAL_PREFIX}{generation}_{mac}_{worker_id}")
}

/// The claims of `token` if it is a credential minted with `secret`.
pub fn verify_credential(secret: &[u8], token: &str) -> Option<CredentialClaims> {
    let rest = token.strip_prefix(CREDENTIAL_PREFIX)?;
    let (generation, rest) = rest.split_once('_')?;
    let (_, worker_id) = rest.split_once('_')?;
    let generation: u64 = generation.parse().ok()?;
    if worker_id.is_empty() {
        return None;
    }
    let expected = credential(secret, worker_id, generation);
    constant_time_eq(expected.as_bytes(), token.as_bytes()).then(|| CredentialClaims {
        worker_id: worker_id.to_owned(),
        generation,
    })
}

/// A token letting `requester` fetch image `sha256` from the peer whose credential is
/// `peer_credential`, until `expires_s` (Unix seconds).
pub fn peer_token(peer_credential: &str, sha256: &str, requester: &str, expires_s: u64) -> String {
    let expires = expires_s.to_string();
    let mac = mac_hex(
        peer_credential.as_bytes(),
        &[
            b"scaibunker peer image",
            sha256.as_bytes(),
            requester.as_bytes(),
            expires.as_bytes(),
        ],
    );
    format!("{PEER_TOKEN_PREFIX}{expires_s}_{mac}_{requester}")
}

/// Whether `token` lets its requester fetch `sha256` now from the peer holding one of
/// `own_credentials` (its current one, and during a rotation its previous one).
pub fn verify_peer_token(own_credentials: &[&str], token: &str, sha256: &str, now_s: u64) -> bool {
    let parsed = (|| {
        let rest = token.strip_prefix(PEER_TOKEN_PREFIX)?;
        let (expires, rest) = rest.split_once('_')?;
        let (_, requester) = rest.split_once('_')?;
        Some((expires.parse::<u64>().ok()?, requester))
    })();
    let Some((expires_s, requester)) = parsed else {
        return false;
    };
    expires_s > now_s
        && own_credentials.iter().any(|c| {
            let expected = peer_token(c, sha256, requester, expires_s);
            constant_time_eq(expected.as_bytes(), token.as_bytes())
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_credential_names_its_worker_and_only_verifies_with_its_secret() {
        let c = credential(b"secret", "wrk_a_b", 3);
        assert!(c.starts_with("swc_3_"));
        let claims = verify_credential(b"secret", &c).expect("verifies");
        assert_eq!(claims.worker_id, "wrk_a_b");
        assert_eq!(claims.generation, 3);
        assert_eq!(verify_credential(b"other", &c), None);
        // Another worker id or generation under the same MAC does not verify.
        let forged = c.replace("wrk_a_b", "wrk_c");
        assert_eq!(verify_credential(b"secret", &forged), None);
        let bumped = c.replacen("swc_3_", "swc_4_", 1);
        assert_eq!(verify_credential(b"secret", &bumped), None);
        assert_eq!(verify_credential(b"secret", "swt_join"), None);
        assert_eq!(verify_credential(b"secret", "swc_x_y_z"), None);
    }

    #[test]
    fn a_peer_token_is_for_one_image_one_peer_and_a_while() {
        let peer = credential(b"s", "wrk_peer", 1);
        let other = credential(b"s", "wrk_other", 1);
        let sha = "a".repeat(64);
        let t = peer_token(&peer, &sha, "wrk_me", 1000);
        assert!(verify_peer_token(&[&peer], &t, &sha, 999));
        assert!(verify_peer_token(&[&other, &peer], &t, &sha, 999));
        assert!(!verify_peer_token(&[&peer], &t, &sha, 1000), "expired");
        assert!(!verify_peer_token(&[&other], &t, &sha, 999), "another peer");
        assert!(
            !verify_peer_token(&[&peer], &t, &"b".repeat(64), 999),
            "another image"
        );
        let longer = t.replacen("swp_1000_", "swp_9999_", 1);
        assert!(
            !verify_peer_token(&[&peer], &longer, &sha, 999),
            "a longer expiry"
        );
        assert!(
            !verify_peer_token(&[&peer], &peer, &sha, 999),
            "a credential is no token"
        );
    }
}
