//! The pure domain core of ScaiBunker: ids, bunker states and their transitions.
//! No async, no I/O, no serde, no SQL.
