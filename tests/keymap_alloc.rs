//! What the key table keeps on the heap per key, counted by a global allocator of this
//! test binary's own (so it has its own file: every test in a binary shares the
//! allocator). A short key lives in its node (`kvstore::db::keymap::Key`): one allocation a
//! key besides the value's, where a boxed key took two.

use kvstore::db::Item;
use kvstore::db::keymap::KeyMap;
use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

thread_local! {
    /// Blocks allocated and not yet freed by this thread: per thread, so that the test
    /// harness's own threads (output capture, a busy machine's late bookkeeping) never
    /// count. A const-initialised `Cell` needs no allocation and no destructor.
    static LIVE: Cell<isize> = const { Cell::new(0) };
}

fn live() -> isize {
    LIVE.with(Cell::get)
}

fn count(delta: isize) {
    // `try_with`: an allocation while this thread's locals are torn down is not ours.
    let _ = LIVE.try_with(|c| c.set(c.get() + delta));
}

struct Counting;

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        count(1);
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        count(-1);
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

/// Live blocks held by a map of `n` keys made by `key` (empty values: no allocation of
/// their own), the keys given as the boxes the server's SET path hands over.
fn blocks_held(n: usize, key: impl Fn(usize) -> Vec<u8>) -> isize {
    let before = live();
    let mut m = KeyMap::default();
    for i in 0..n {
        let k: Box<[u8]> = key(i).into_boxed_slice();
        let item = Item {
            value: Box::new([]),
            expire_at: 0,
        };
        m.insert(k, item);
    }
    let held = live() - before;
    // Every key is there, whatever its length.
    for i in 0..n {
        assert!(m.get(&key(i)).is_some(), "key {i}");
    }
    drop(m);
    assert_eq!(live(), before, "the map frees everything");
    held
}

/// The only test in this binary: others would allocate concurrently and skew the count.
#[test]
fn a_short_key_takes_no_allocation_of_its_own() {
    let n = 10_000;
    // The bucket arrays: the table and, mid-resize, its successor.
    let tables = 2;
    // redis-benchmark's keys (16 bytes) and the longest kept in the node (22).
    for (what, key) in [
        (
            "16-byte keys",
            Box::new(|i| format!("key:{i:012}").into_bytes()) as Box<dyn Fn(usize) -> Vec<u8>>,
        ),
        (
            "22-byte keys",
            Box::new(|i| format!("key:{i:018}").into_bytes()),
        ),
    ] {
        let held = blocks_held(n, key);
        assert!(
            held <= n as isize + tables,
            "{what}: {held} blocks for {n} keys: one node a key, the key inside it"
        );
    }
    // A longer key keeps its own box (node plus key).
    let held = blocks_held(n, |i| {
        format!("a-longer-key-of-more-than-22-bytes:{i}").into_bytes()
    });
    assert!(
        held >= 2 * n as isize && held <= 2 * n as isize + tables,
        "long keys: {held} blocks for {n} keys"
    );
}
