//! Public HTTP request, response and error types of the ScaiBunker API (`/v1/modules/scaibunker`).
//! Serde only: this crate is the contract shared by the controller, the SDK and the CLI.
//! Field names, codes and defaults follow `API.md`.

pub mod audit;
pub mod bunkers;
pub mod codes;
pub mod egress;
pub mod envelope;
pub mod exec;
pub mod files;
pub mod images;
pub mod platform;
pub mod quotas;
pub mod shell;
pub mod snapshots;
pub mod storage;
pub mod workers;

/// Prefix of every module route.
pub const MODULE_PREFIX: &str = "/v1/modules/scaibunker";
