//! kvstore: a replicated key-value store that speaks the Redis protocol.
pub mod client;
pub mod commands;
pub mod protocol;
