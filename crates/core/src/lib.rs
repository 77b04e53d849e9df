//! The pure domain core of ScaiBunker: ids, the bunker lifecycle state machine, bunker spec
//! defaults and validation, placement and quota math. No async, no I/O, no serde, no SQL: everything here
//! is a function of its arguments, table-tested in place.

pub mod ids;
pub mod lifecycle;
pub mod placement;
pub mod quota;
pub mod spec;
