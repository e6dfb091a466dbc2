//! kvstore: a replicated key-value store that speaks the Redis protocol.
//!
//! The library is the same code the `kvstore` binary runs: embed a durable [`Store`]
//! directly, or start a [`server::Server`] in-process.
//!
//! ```no_run
//! use kvstore::{Store, store::Options};
//! let store = Store::open("data", Options::default())?;
//! store.set(b"greeting", b"hello")?;
//! assert_eq!(store.get(b"greeting").as_deref(), Some(&b"hello"[..]));
//! # Ok::<(), kvstore::store::StoreError>(())
//! ```
pub mod admin;
pub mod auth;
pub mod bully;
pub mod client;
pub mod cluster;
pub mod commands;
pub mod config;
pub mod db;
pub mod docs;
pub mod driver;
pub mod float;
pub mod glob;
pub mod http;
pub mod info;
pub mod keyspace;
pub mod local_cluster;
pub mod log;
pub mod message;
pub mod metrics;
pub mod multi;
pub mod node;
pub mod peer;
pub mod protocol;
pub mod ratelog;
pub mod repl;
pub mod replication;
pub mod sdnotify;
pub mod server;
pub mod snapshot_transfer;
pub mod store;
pub mod strings;
pub mod wal;
pub mod watch;

pub use store::Store;
