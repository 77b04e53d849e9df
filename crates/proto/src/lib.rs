//! Internal protocols of ScaiBunker, serde types only.
//!
//! - [`agent`]: worker ↔ guest agent, a framed, multiplexed protocol over one byte stream.
//! - [`worker`]: controller ↔ worker, JSON over HTTP authenticated by the worker token.
//! - [`worker_auth`]: worker credentials and peer tokens (HMAC, no lookups).
//! - [`agent_binary`]: whether a file can be the guest agent (static ELF, this protocol).
//!
//! Both are versioned: a peer that sees another major version refuses to talk rather than guess.

pub mod agent;
pub mod agent_binary;
pub mod egress;
pub mod worker;
pub mod worker_auth;
