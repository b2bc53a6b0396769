//! Drives a `Reassembler` with an arbitrary sequence of message_cache operations (create,
//! set, append, process, remove, clock advances) and checks after every step that its
//! bookkeeping is consistent and within the configured limits: a peer can make calls
//! fail, never make the cache panic or grow past its bounds.
#![no_main]

use hypha_core::chunk::{ChunkLimits, Reassembler, ReassemblerOp};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // Small limits so the fuzzer reaches the limit paths quickly.
    let limits = ChunkLimits {
        max_total_bytes: 1 << 20,
        max_message_bytes: 256 << 10,
        max_entries: 8,
        max_chunks: 64,
        ..Default::default()
    };
    let mut cache = Reassembler::new(limits);
    let mut now = std::time::Instant::now();
    for op in ReassemblerOp::parse_all(data) {
        if let ReassemblerOp::Advance(d) = op {
            now += d;
        }
        let _ = cache.apply(now, op);
        cache.check_invariants().expect("reassembler invariant broken");
    }
});
