//! The reassembler turns a refused memory reservation into a typed error, never a panic
//! or an abort, and leaves the entry usable. Its own test binary: it lowers this
//! process's address-space limit (RLIMIT_AS), which would disturb tests running beside it.

#![cfg(target_os = "linux")]

use std::time::Instant;

use bytes::Bytes;
use hypha_core::chunk::{ChunkError, ChunkLimits, Reassembler, CHUNK_SIZE};

/// Chunk data that needs no allocation: the test must not allocate much while the limit
/// is low (an allocation failure aborts the process).
static CHUNK: [u8; CHUNK_SIZE] = [7; CHUNK_SIZE];

fn vm_size_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let line = status.lines().find(|l| l.starts_with("VmSize:")).unwrap_or_default();
    line.split_whitespace().nth(1).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0) * 1024
}

#[test]
fn refused_growth_is_out_of_memory_and_keeps_the_entry() {
    let now = Instant::now();
    let mut r = Reassembler::new(ChunkLimits { max_chunks: 1 << 20, ..Default::default() });
    r.create(now, "k", false).unwrap();
    let mut errors = Vec::with_capacity(4);
    let mut stored = 0usize;

    let mut old = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit writes into the struct we pass.
    assert_eq!(unsafe { libc::getrlimit(libc::RLIMIT_AS, &mut old) }, 0);
    // 48 MiB of address space beyond what the process maps now: the doubling prefix
    // buffer (1, 2, 4, ... MiB) runs into it well before 4096 chunks (1 GiB).
    let low = libc::rlimit { rlim_cur: vm_size_bytes() + (48 << 20), rlim_max: old.rlim_max };
    // SAFETY: setrlimit reads the struct we pass; lowering the soft limit is always allowed.
    assert_eq!(unsafe { libc::setrlimit(libc::RLIMIT_AS, &low) }, 0);
    for i in 0..4096u64 {
        match r.set(now, "k", i, Bytes::from_static(&CHUNK)) {
            Ok(()) => stored += 1,
            Err(e) => {
                errors.push(e);
                break;
            }
        }
    }
    // SAFETY: as above; raising the soft limit back up to the hard limit is allowed.
    assert_eq!(unsafe { libc::setrlimit(libc::RLIMIT_AS, &old) }, 0);

    assert!(stored > 4 && stored < 4096, "stored {stored}");
    match errors.as_slice() {
        [ChunkError::OutOfMemory { key, size }] => {
            assert_eq!(key, "k");
            assert!(*size > stored * CHUNK_SIZE, "refused size {size}");
        }
        other => panic!("expected one OutOfMemory, got {other:?}"),
    }
    // The refused chunk was not stored; the entry is intact and can still complete.
    r.check_invariants().unwrap();
    let out = r.process("k").unwrap();
    assert_eq!(out.len(), stored * CHUNK_SIZE);
    assert!(out.iter().all(|&b| b == 7));
    assert_eq!(r.total_bytes(), 0);
}
