//! Embedding kvstore as a library: a durable map in a directory, no network.
//!
//! Run with `cargo run --example embedded -- /tmp/kv-example`; run it twice to see the
//! counter survive the restart.

use kvstore::Store;
use kvstore::store::Options;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dir = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "kvstore-example-data".into());
    let store = Store::open(&dir, Options::default())?;
    store.set(b"greeting", b"hello")?;
    let runs = store.incr_by(b"runs", 1)?.map_err(|e| e.to_string())?;
    println!(
        "greeting = {:?}, this program has run {runs} time(s) against {dir}",
        store
            .get(b"greeting")
            .map(|v| String::from_utf8_lossy(&v).into_owned())
    );
    // Store::del takes several keys and says how many existed.
    let removed = store.del(&[b"nothing-here", b"greeting"])?;
    println!("removed {removed} key(s); {} key(s) left", store.len());
    Ok(())
}
