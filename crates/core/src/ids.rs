//! Prefixed ids (`bnk_…`, `wrk_…`, …). An id is its prefix plus 1–64 characters of
//! `[a-z0-9]`; anything else does not parse. Generation takes the random bytes from the caller,
//! so the core stays free of I/O.

use std::fmt;

/// Error from parsing an id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InvalidId {
    pub expected_prefix: &'static str,
}

impl fmt::Display for InvalidId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "not a valid id with prefix `{}`", self.expected_prefix)
    }
}

impl std::error::Error for InvalidId {}

const ALPHABET: &[u8; 32] = b"0123456789abcdefghjkmnpqrstvwxyz";

fn is_valid_body(body: &str) -> bool {
    !body.is_empty()
        && body.len() <= 64
        && body
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
}

/// Encodes 16 random bytes as 26 characters of Crockford-style base32 (lowercase).
pub fn encode_random(bytes: [u8; 16]) -> String {
    let mut n = u128::from_be_bytes(bytes);
    let mut out = [0u8; 26];
    for slot in out.iter_mut().rev() {
        *slot = ALPHABET[(n & 31) as usize];
        n >>= 5;
    }
    String::from_utf8(out.to_vec()).expect("alphabet is ascii")
}

macro_rules! prefixed_id {
    ($(#[$doc:meta])* $name:ident, $prefix:literal) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name(String);

        impl $name {
            pub const PREFIX: &'static str = $prefix;

            /// A new id from 16 random bytes.
            pub fn from_random(bytes: [u8; 16]) -> Self {
                Self(format!("{}{}", $prefix, encode_random(bytes)))
            }

            pub fn parse(s: &str) -> Result<Self, InvalidId> {
                match s.strip_prefix($prefix) {
                    Some(body) if is_valid_body(body) => Ok(Self(s.to_owned())),
                    _ => Err(InvalidId { expected_prefix: $prefix }),
                }
            }

            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }
    };
}

prefixed_id!(/// A bunker.
    BunkerId, "bnk_");
prefixed_id!(/// A tenant.
    TenantId, "tnt_");
prefixed_id!(/// A user.
    UserId, "usr_");
prefixed_id!(/// A worker.
    WorkerId, "wrk_");
prefixed_id!(/// An image.
    ImageId, "img_");
prefixed_id!(/// One exec call.
    ExecId, "exe_");
prefixed_id!(/// One interactive shell session.
    ShellId, "shl_");
prefixed_id!(/// An API key.
    ApiKeyId, "key_");
prefixed_id!(/// A snapshot.
    SnapshotId, "snp_");
prefixed_id!(/// A group of users.
    GroupId, "grp_");
prefixed_id!(/// An audit event.
    AuditId, "aud_");
prefixed_id!(/// A quota profile.
    QuotaProfileId, "qp_");
prefixed_id!(/// The assignment of a quota profile to a user or group.
    QuotaAssignmentId, "qpa_");
prefixed_id!(/// An availability group (workers and the images warmed on them).
    AvailabilityGroupId, "ag_");
prefixed_id!(/// A host bridge a worker offers to `transit` bunkers.
    BridgeId, "brg_");

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_ids_parse_back() {
        let id = BunkerId::from_random([7; 16]);
        assert!(id.as_str().starts_with("bnk_"));
        assert_eq!(id.as_str().len(), 4 + 26);
        assert_eq!(BunkerId::parse(id.as_str()), Ok(id));
    }

    #[test]
    fn rejects_wrong_prefix_and_bad_bodies() {
        for bad in [
            "", "bnk_", "wrk_abc", "bnk_ABC", "bnk_a-b", "bnk_../x", "bnk_a b",
        ] {
            assert!(BunkerId::parse(bad).is_err(), "{bad:?} should not parse");
        }
        let long = format!("bnk_{}", "a".repeat(65));
        assert!(BunkerId::parse(&long).is_err());
    }

    #[test]
    fn distinct_random_bytes_give_distinct_ids() {
        assert_ne!(encode_random([0; 16]), encode_random([1; 16]));
        assert_eq!(encode_random([0; 16]), "0".repeat(26));
    }
}
