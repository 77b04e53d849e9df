//! Stable error codes. Clients branch on these, never on messages.

pub const AUTH_TOKEN_MISSING: &str = "AUTH_TOKEN_MISSING";
pub const AUTH_TOKEN_INVALID: &str = "AUTH_TOKEN_INVALID";
pub const AUTHZ_PERMISSION_DENIED: &str = "AUTHZ_PERMISSION_DENIED";
pub const VALIDATION_ERROR: &str = "VALIDATION_ERROR";
pub const NOT_FOUND: &str = "NOT_FOUND";
pub const METHOD_NOT_ALLOWED: &str = "METHOD_NOT_ALLOWED";
pub const PAYLOAD_TOO_LARGE: &str = "PAYLOAD_TOO_LARGE";
pub const INTERNAL: &str = "INTERNAL";
pub const RATE_LIMITED: &str = "RATE_LIMITED";

pub const BUNKER_NOT_FOUND: &str = "BUNKER_NOT_FOUND";
pub const BUNKER_NOT_RUNNING: &str = "BUNKER_NOT_RUNNING";
pub const BUNKER_INVALID_TRANSITION: &str = "BUNKER_INVALID_TRANSITION";
pub const BUNKER_QUOTA_EXCEEDED: &str = "BUNKER_QUOTA_EXCEEDED";
/// `POST …/exec` with `stream: true` while the controller's stream resume buffers (in total or
/// the tenant's) are taken by running streamed execs; nothing was started. See `Retry-After`.
pub const STREAM_BUDGET_EXCEEDED: &str = "STREAM_BUDGET_EXCEEDED";
/// A snapshot or image upload the tenant's storage cap (`max_storage_mb`) has no room for;
/// `details` name the profile, bucket (`tenant:{id}`) and resource (`storage_mb`).
pub const STORAGE_QUOTA_EXCEEDED: &str = "STORAGE_QUOTA_EXCEEDED";
pub const IMAGE_NOT_FOUND: &str = "IMAGE_NOT_FOUND";
/// `PUT /images/{id}/content` on an image that is not waiting for content (baking, ready,
/// failed or inactive), or a warm of an image that is not ready.
pub const IMAGE_NOT_PENDING: &str = "IMAGE_NOT_PENDING";
/// The image's source kind is not accepted here (`oci`).
pub const IMAGE_SOURCE_UNSUPPORTED: &str = "IMAGE_SOURCE_UNSUPPORTED";
/// The uploaded content is not what the source kind says (not a tarball, not ext4, an entry
/// with an absolute or `..` path) or does not fit `size_mib`; nothing was kept.
pub const IMAGE_CONTENT_INVALID: &str = "IMAGE_CONTENT_INVALID";
/// The uploaded content is larger than the image upload cap.
pub const IMAGE_TOO_LARGE: &str = "IMAGE_TOO_LARGE";
/// An image or availability group name already taken in its scope.
pub const NAME_TAKEN: &str = "NAME_TAKEN";
pub const TENANT_HAS_NO_PARTNER: &str = "TENANT_HAS_NO_PARTNER";
pub const AVAILABILITY_GROUP_NOT_FOUND: &str = "AVAILABILITY_GROUP_NOT_FOUND";
pub const WORKER_NOT_FOUND: &str = "WORKER_NOT_FOUND";
/// A worker request whose credential belongs to another worker than the one it names.
pub const WORKER_MISMATCH: &str = "WORKER_MISMATCH";
/// A registration with the join token for a worker name that holds a credential.
pub const WORKER_CREDENTIAL_REQUIRED: &str = "WORKER_CREDENTIAL_REQUIRED";
/// The storage proxy: a worker credential used on an object workers have no business with.
pub const WORKER_STORAGE_DENIED: &str = "WORKER_STORAGE_DENIED";
/// The storage proxy: a worker writing the egress audit of a bunker that does not run (and did
/// not last run) on it, or that ended over an hour ago.
pub const EGRESS_AUDIT_DENIED: &str = "EGRESS_AUDIT_DENIED";
/// A storage proxy without a database (`SCAIGRID_MODE=bunker_proxy`) cannot tell which worker
/// runs a bunker, so it takes no egress audit: workers write it to a controller's proxy.
pub const EGRESS_AUDIT_NEEDS_CONTROLLER: &str = "EGRESS_AUDIT_NEEDS_CONTROLLER";
pub const BRIDGE_NOT_FOUND: &str = "BRIDGE_NOT_FOUND";
pub const SNAPSHOT_NOT_FOUND: &str = "SNAPSHOT_NOT_FOUND";
pub const SNAPSHOT_NOT_READY: &str = "SNAPSHOT_NOT_READY";
/// `DELETE /snapshots/{id}` on the snapshot a passivated bunker comes back from.
pub const SNAPSHOT_IN_USE: &str = "SNAPSHOT_IN_USE";
pub const QUOTA_PROFILE_NOT_FOUND: &str = "QUOTA_PROFILE_NOT_FOUND";
pub const QUOTA_ASSIGNMENT_NOT_FOUND: &str = "QUOTA_ASSIGNMENT_NOT_FOUND";
pub const CONFLICT: &str = "CONFLICT";
/// `DELETE /v1/api-keys/{id}` on the last live key that holds every platform power (a
/// `super_admin`'s key not narrowed below `admin` and `admin:platform`): refused so the
/// platform cannot lock itself out; mint another first, or `scaibunker admin recover-key`.
pub const LAST_SUPER_ADMIN_KEY: &str = "LAST_SUPER_ADMIN_KEY";
pub const WORKER_UNAVAILABLE: &str = "WORKER_UNAVAILABLE";
pub const NO_SUITABLE_WORKER: &str = "NO_SUITABLE_WORKER";
pub const LIFECYCLE_MODE_DENIED: &str = "LIFECYCLE_MODE_DENIED";
pub const NETWORK_PROFILE_DENIED: &str = "NETWORK_PROFILE_DENIED";
pub const INTERFACES_NOT_ALLOWED: &str = "INTERFACES_NOT_ALLOWED";
pub const TRANSIT_MISSING_INTERFACES: &str = "TRANSIT_MISSING_INTERFACES";
/// The bunker's worker could not be reached or failed the operation.
pub const WORKER_ERROR: &str = "WORKER_ERROR";

/// `GET …/exec/{exec_id}/output`: nothing stored for that exec and stream (its output fit
/// inline, or the exec is unknown).
pub const OUTPUT_NOT_FOUND: &str = "OUTPUT_NOT_FOUND";
/// A WebSocket route was called without a WebSocket upgrade.
pub const UPGRADE_REQUIRED: &str = "UPGRADE_REQUIRED";

pub const INVALID_PATH: &str = "INVALID_PATH";
/// An uploaded archive is not tar, or one of its entries escapes the target directory.
pub const INVALID_ARCHIVE: &str = "INVALID_ARCHIVE";
pub const FILE_NOT_FOUND: &str = "FILE_NOT_FOUND";
pub const FILE_TOO_LARGE: &str = "FILE_TOO_LARGE";
pub const IS_A_DIRECTORY: &str = "IS_A_DIRECTORY";
pub const NOT_A_DIRECTORY: &str = "NOT_A_DIRECTORY";
pub const DIRECTORY_NOT_EMPTY: &str = "DIRECTORY_NOT_EMPTY";
/// A file operation the guest user (or root) may not do in the guest.
pub const FILE_PERMISSION_DENIED: &str = "FILE_PERMISSION_DENIED";

/// Storage proxy: no object under that key.
pub const OBJECT_NOT_FOUND: &str = "OBJECT_NOT_FOUND";
/// Storage proxy: the key is not a valid object key (see docs/api.md).
pub const OBJECT_KEY_INVALID: &str = "OBJECT_KEY_INVALID";
/// Storage proxy: the body is larger than the configured object cap.
pub const OBJECT_TOO_LARGE: &str = "OBJECT_TOO_LARGE";
/// Storage proxy: the upload's body broke off (client error); nothing was stored.
pub const OBJECT_UPLOAD_INCOMPLETE: &str = "OBJECT_UPLOAD_INCOMPLETE";
/// Storage proxy: the object store (S3) failed the operation.
pub const STORAGE_BACKEND_ERROR: &str = "STORAGE_BACKEND_ERROR";
/// A capability token that is malformed or whose signature does not verify.
pub const CAPABILITY_INVALID: &str = "CAPABILITY_INVALID";
/// A capability token past its `expires_at`.
pub const CAPABILITY_EXPIRED: &str = "CAPABILITY_EXPIRED";
/// A capability token used on a key outside its prefix.
pub const CAPABILITY_OUT_OF_SCOPE: &str = "CAPABILITY_OUT_OF_SCOPE";
/// A capability token used for a verb it does not carry.
pub const CAPABILITY_VERB_DENIED: &str = "CAPABILITY_VERB_DENIED";
pub const CAPABILITY_REVOKED: &str = "CAPABILITY_REVOKED";
pub const CAPABILITY_NOT_FOUND: &str = "CAPABILITY_NOT_FOUND";
