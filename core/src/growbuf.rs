//! A byte buffer that grows without copying what it already holds, and becomes a
//! [`Bytes`] without a copy either.
//!
//! The [`Reassembler`](crate::chunk::Reassembler) appends the chunks of a large message
//! to one of these as they arrive, without knowing the final size (the `message_cache`
//! protocol carries none). A `Vec` doubling would copy the whole prefix at every
//! doubling, and allocating the final buffer only at `process` makes the receiver zero
//! and fill tens of megabytes in one go while the whole pipeline waits.
//!
//! On Linux the first [`HEAP_UP_TO`] bytes live in a `Vec` (the allocator's warm,
//! reused memory is cheapest for small messages); past that the buffer becomes an
//! anonymous mapping that `mremap(MREMAP_MAYMOVE)` grows by moving page-table entries,
//! never bytes. Elsewhere it stays a doubling `Vec` (correct, just with the copies).
//!
//! [`GrowBuf::freeze`] hands the bytes over without a copy, a mapping through
//! [`Bytes::from_owner`]: every slice of the result keeps the mapping alive, and the last
//! one to drop unmaps it. That is what lets the msgpack decoder slice binary values out
//! of a reassembled package zero-copy.

use bytes::Bytes;

/// A reservation the system refused (`mmap`/`mremap` or the allocator failed, or the size
/// overflowed): the buffer is unchanged.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("could not reserve {size} bytes")]
pub(crate) struct GrowError {
    /// The capacity that was asked for.
    pub(crate) size: usize,
}

/// Smallest capacity a buffer starts with once it holds anything: eight default chunks, so
/// a message of a few chunks never remaps, and a large one doubles from here. On Linux
/// this is address space only: pages are populated as bytes are written.
const MIN_CAPACITY: usize = 8 * crate::chunk::CHUNK_SIZE;

/// The capacity to grow to so that `needed` bytes fit: at least double the current one,
/// so that growing by appends costs amortised O(1) remaps.
fn grown_capacity(cap: usize, needed: usize) -> usize {
    needed.max(cap.saturating_mul(2)).max(MIN_CAPACITY)
}

/// Capacities up to this stay on the heap, in a `Vec` from the global allocator, which
/// hands out recently freed blocks again: warm pages, no fault, nothing to zero. A
/// fresh mapping costs a page fault (or a populate) and a zeroed page per page, which
/// for a message of a few chunks is more than the copy itself (measured: filling 1 MiB
/// took 0.03 ms here against 0.14 ms in a fresh mapping). The first growth past it
/// copies the (at most this many) bytes into a mapping once; from there on nothing moves.
#[cfg(target_os = "linux")]
const HEAP_UP_TO: usize = MIN_CAPACITY;

/// An append-only byte buffer; see the module docs.
#[derive(Debug)]
pub(crate) struct GrowBuf {
    repr: Repr,
}

#[derive(Debug)]
enum Repr {
    /// Small, or not on Linux.
    Heap(Vec<u8>),
    /// Past [`HEAP_UP_TO`].
    #[cfg(target_os = "linux")]
    Mapped(imp::Buf),
}

impl Default for GrowBuf {
    fn default() -> Self {
        GrowBuf { repr: Repr::Heap(Vec::new()) }
    }
}

impl GrowBuf {
    /// An empty buffer. Allocates nothing until the first byte is reserved.
    pub(crate) fn new() -> Self {
        Self::default()
    }

    /// Bytes written.
    pub(crate) fn len(&self) -> usize {
        self.as_slice().len()
    }

    /// Bytes that fit without growing (0 while nothing was ever reserved).
    pub(crate) fn capacity(&self) -> usize {
        match &self.repr {
            Repr::Heap(v) => v.capacity(),
            #[cfg(target_os = "linux")]
            Repr::Mapped(m) => m.capacity(),
        }
    }

    /// The bytes written so far.
    pub(crate) fn as_slice(&self) -> &[u8] {
        match &self.repr {
            Repr::Heap(v) => v,
            #[cfg(target_os = "linux")]
            Repr::Mapped(m) => m.as_slice(),
        }
    }

    /// Makes room for `additional` more bytes, growing to at least twice the current
    /// capacity if it has to grow. On error the buffer is unchanged.
    pub(crate) fn reserve(&mut self, additional: usize) -> Result<(), GrowError> {
        match &mut self.repr {
            Repr::Heap(v) => {
                let needed = v.len().checked_add(additional).ok_or(GrowError { size: usize::MAX })?;
                if needed <= v.capacity() {
                    return Ok(());
                }
                let new_cap = grown_capacity(v.capacity(), needed);
                #[cfg(target_os = "linux")]
                if new_cap > HEAP_UP_TO {
                    let mut mapped = imp::Buf::default();
                    mapped.reserve(new_cap)?;
                    mapped.extend_from_slice(v)?;
                    self.repr = Repr::Mapped(mapped);
                    return Ok(());
                }
                v.try_reserve_exact(new_cap - v.len()).map_err(|_| GrowError { size: new_cap })
            }
            #[cfg(target_os = "linux")]
            Repr::Mapped(m) => m.reserve(additional),
        }
    }

    /// Appends `data`, growing if needed; after a successful
    /// [`reserve`](Self::reserve) covering it this cannot fail.
    pub(crate) fn extend_from_slice(&mut self, data: &[u8]) -> Result<(), GrowError> {
        self.reserve(data.len())?;
        match &mut self.repr {
            Repr::Heap(v) => {
                v.extend_from_slice(data);
                Ok(())
            }
            #[cfg(target_os = "linux")]
            Repr::Mapped(m) => m.extend_from_slice(data),
        }
    }

    /// Hands the bytes over without copying; the returned [`Bytes`] (and every slice of it)
    /// owns the buffer's memory.
    pub(crate) fn freeze(self) -> Bytes {
        match self.repr {
            Repr::Heap(v) => Bytes::from(v),
            #[cfg(target_os = "linux")]
            Repr::Mapped(m) => Bytes::from_owner(m),
        }
    }
}

#[cfg(target_os = "linux")]
mod imp {
    //! The anonymous-mapping buffer. All the unsafe code of the module is here.

    use std::ptr::NonNull;

    use super::{grown_capacity, GrowError};

    /// Capacities from this size on (messages over 2 MiB) get `MADV_HUGEPAGE`: 2 MiB
    /// pages mean 512 times fewer page faults (each zeroing a fresh page) while a large
    /// message fills the buffer, and cheaper moves. Measured on a 2-vCPU VM with THP in
    /// `madvise` mode, copying 64 MiB of chunks in took about 6 ms with it and 22 ms
    /// without. The cost is at most one partly used huge page at the end, which is why
    /// small messages stay on normal pages.
    const HUGE_PAGE_FROM: usize = 4 << 20;

    /// `ptr..ptr + cap` is a private anonymous read-write mapping owned by this value when
    /// `cap > 0` (no mapping and a dangling `ptr` when `cap == 0`); `len <= cap` bytes of
    /// it have been written.
    #[derive(Debug)]
    pub(super) struct Buf {
        ptr: NonNull<u8>,
        len: usize,
        cap: usize,
    }

    // SAFETY: `Buf` owns its mapping exclusively (like a `Box<[u8]>`); nothing about it is
    // tied to the thread that created it, and `munmap` may run on any thread.
    unsafe impl Send for Buf {}
    // SAFETY: `&Buf` only gives read access to the mapping (`as_slice`); all writes go
    // through `&mut Buf`.
    unsafe impl Sync for Buf {}

    impl Default for Buf {
        fn default() -> Self {
            Buf { ptr: NonNull::dangling(), len: 0, cap: 0 }
        }
    }

    /// The system page size (mapping lengths are multiples of it).
    fn page_size() -> usize {
        static PAGE: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
        *PAGE.get_or_init(|| {
            // SAFETY: sysconf has no preconditions; it only reads a system constant.
            let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
            usize::try_from(page).ok().filter(|p| p.is_power_of_two()).unwrap_or(4096)
        })
    }

    impl Buf {
        pub(super) fn capacity(&self) -> usize {
            self.cap
        }

        pub(super) fn as_slice(&self) -> &[u8] {
            // SAFETY: by the type invariant `ptr` is valid for reads of `len` bytes (a live
            // mapping of `cap >= len` bytes, or dangling-but-aligned with `len == 0`), the
            // bytes are initialised (anonymous mappings are zero-filled, and we wrote them),
            // and they cannot be mutated while `&self` is borrowed.
            unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
        }

        pub(super) fn reserve(&mut self, additional: usize) -> Result<(), GrowError> {
            let needed = self.len.checked_add(additional).ok_or(GrowError { size: usize::MAX })?;
            if needed <= self.cap {
                return Ok(());
            }
            let page = page_size();
            let new_cap = grown_capacity(self.cap, needed)
                .checked_next_multiple_of(page)
                .ok_or(GrowError { size: usize::MAX })?;
            let new = if self.cap == 0 {
                // SAFETY: a fresh anonymous private mapping; no existing memory is touched.
                unsafe {
                    libc::mmap(
                        std::ptr::null_mut(),
                        new_cap,
                        libc::PROT_READ | libc::PROT_WRITE,
                        libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                        -1,
                        0,
                    )
                }
            } else {
                // SAFETY: `ptr..ptr + cap` is our own mapping (type invariant) and no
                // reference into it outlives this `&mut self` call. On success the old range
                // is gone and the returned one holds its contents; on failure the old
                // mapping is left as it was.
                unsafe { libc::mremap(self.ptr.as_ptr().cast(), self.cap, new_cap, libc::MREMAP_MAYMOVE) }
            };
            if new == libc::MAP_FAILED {
                return Err(GrowError { size: new_cap });
            }
            let Some(ptr) = NonNull::new(new.cast::<u8>()) else {
                return Err(GrowError { size: new_cap });
            };
            if new_cap >= HUGE_PAGE_FROM && self.cap < HUGE_PAGE_FROM {
                // SAFETY: advisory only, on the mapping just created or grown. The flag sticks
                // to the mapping across later `mremap`s, so it is set once. A failure (THP
                // disabled, old kernel) changes nothing, so its result is ignored.
                unsafe { libc::madvise(new, new_cap, libc::MADV_HUGEPAGE) };
            }
            self.ptr = ptr;
            self.cap = new_cap;
            Ok(())
        }

        pub(super) fn extend_from_slice(&mut self, data: &[u8]) -> Result<(), GrowError> {
            self.reserve(data.len())?;
            if data.is_empty() {
                return Ok(());
            }
            self.populate(data.len());
            // SAFETY: the successful `reserve` just above made `len + data.len() <= cap`, so
            // the destination lies inside our mapping, and nothing else refers to it
            // (`&mut self`); `data` cannot overlap it, since no reference into the spare
            // capacity is ever handed out.
            unsafe {
                std::ptr::copy_nonoverlapping(data.as_ptr(), self.ptr.as_ptr().add(self.len), data.len())
            };
            self.len += data.len();
            Ok(())
        }
    }

    impl Buf {
        /// Faults in the fresh pages the next `additional` bytes will be written to, with one
        /// `MADV_POPULATE_WRITE` call instead of a page fault per page: measured, that
        /// halves the cost of filling a 1 MiB buffer (0.33 to 0.15 ms) and saves a fifth
        /// at 64 MiB. Only pages about to be written are populated, never spare capacity.
        /// Advisory: where it fails (kernels before 5.14), the copy faults the pages in.
        /// Callers have reserved `additional` bytes.
        fn populate(&mut self, additional: usize) {
            let page = page_size();
            // The page holding `len` (when `len` is not page-aligned) was written already.
            let start = self.len.next_multiple_of(page);
            let end = self.len.saturating_add(additional).next_multiple_of(page).min(self.cap);
            if end > start {
                // SAFETY: `start..end` lies inside our mapping (`end <= cap`, both page
                // multiples, so the address is page-aligned as madvise requires). Populating
                // does not change the contents: the pages are fresh, so they stay zero.
                unsafe {
                    libc::madvise(self.ptr.as_ptr().add(start).cast(), end - start, libc::MADV_POPULATE_WRITE)
                };
            }
        }
    }

    impl AsRef<[u8]> for Buf {
        fn as_ref(&self) -> &[u8] {
            self.as_slice()
        }
    }

    impl Drop for Buf {
        fn drop(&mut self) {
            if self.cap > 0 {
                // SAFETY: the mapping is ours (type invariant) and this is the last use of it:
                // every `Bytes` handed out keeps the owning `GrowBuf` alive.
                unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.cap) };
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Deterministic bytes that differ at every offset of a page, so a misplaced page shows.
    fn pattern(n: usize, seed: u64) -> Vec<u8> {
        (0..n as u64).map(|i| (i.wrapping_mul(2_654_435_761).wrapping_add(seed) >> 7) as u8).collect()
    }

    #[test]
    fn empty_buffer_maps_nothing_and_freezes_empty() {
        let b = GrowBuf::new();
        assert_eq!((b.len(), b.capacity()), (0, 0));
        assert!(b.as_slice().is_empty());
        assert!(b.freeze().is_empty());
        let mut b = GrowBuf::new();
        b.extend_from_slice(&[]).unwrap();
        b.reserve(0).unwrap();
        assert_eq!(b.capacity(), 0);
    }

    #[test]
    fn growth_across_page_boundaries_preserves_contents() {
        // Odd piece sizes straddle pages and force several moves (1 MiB -> 2 -> 4 -> ...).
        for piece in [1usize, 7, 4095, 4096, 4097, 65_537, 262_144, 1_000_003] {
            let total = 9_000_000usize.min(piece * 4000);
            let want = pattern(total, piece as u64);
            let mut b = GrowBuf::new();
            let mut caps = Vec::new();
            for part in want.chunks(piece) {
                b.extend_from_slice(part).unwrap();
                assert!(b.len() <= b.capacity());
                if caps.last() != Some(&b.capacity()) {
                    caps.push(b.capacity());
                }
            }
            assert_eq!(b.len(), total);
            assert!(b.as_slice() == want.as_slice(), "piece {piece}");
            // Doubling: few reservations, each at least twice the previous.
            assert!(caps.windows(2).all(|w| w[1] >= 2 * w[0]), "{caps:?}");
            assert_eq!(b.freeze(), want);
        }
    }

    #[test]
    fn small_buffers_stay_on_the_heap_and_large_ones_map() {
        let mut b = GrowBuf::new();
        b.extend_from_slice(&pattern(1000, 3)).unwrap();
        assert!(matches!(b.repr, Repr::Heap(_)));
        assert_eq!(b.capacity(), MIN_CAPACITY);
        let before = b.as_slice().as_ptr();
        b.extend_from_slice(&pattern(MIN_CAPACITY - 1000, 4)).unwrap();
        assert_eq!(b.as_slice().as_ptr(), before, "filling the heap block does not move it");
        b.extend_from_slice(b"x").unwrap();
        #[cfg(target_os = "linux")]
        assert!(matches!(b.repr, Repr::Mapped(_)));
        assert!(b.capacity() >= 2 * MIN_CAPACITY);
        let mut want = pattern(1000, 3);
        want.extend(pattern(MIN_CAPACITY - 1000, 4));
        want.push(b'x');
        assert!(b.as_slice() == want.as_slice());
        assert_eq!(b.freeze(), want);
    }

    #[test]
    fn reserve_then_push_does_not_move_and_reserve_is_exact_enough() {
        let mut b = GrowBuf::new();
        b.reserve(10 * MIN_CAPACITY + 3).unwrap();
        let cap = b.capacity();
        assert!(cap >= 10 * MIN_CAPACITY + 3);
        let data = pattern(cap, 1);
        b.extend_from_slice(&data).unwrap();
        assert_eq!(b.capacity(), cap, "a covered append must not grow");
        b.extend_from_slice(&[1]).unwrap();
        assert!(b.capacity() >= 2 * cap);
        assert_eq!(&b.as_slice()[..cap], &data[..]);
        assert_eq!(b.as_slice()[cap], 1);
    }

    #[test]
    fn overflowing_reservation_is_an_error_and_leaves_the_buffer() {
        let mut b = GrowBuf::new();
        b.extend_from_slice(b"abc").unwrap();
        let cap = b.capacity();
        assert_eq!(b.reserve(usize::MAX).unwrap_err(), GrowError { size: usize::MAX });
        // A size no system can map.
        assert!(b.reserve(usize::MAX / 2).is_err());
        assert_eq!((b.as_slice(), b.capacity()), (&b"abc"[..], cap));
        b.extend_from_slice(b"d").unwrap();
        assert_eq!(b.freeze(), &b"abcd"[..]);
    }

    #[test]
    fn slices_outlive_the_frozen_buffer_and_other_slices() {
        let want = pattern(3_000_000, 5);
        let mut b = GrowBuf::new();
        for part in want.chunks(100_000) {
            b.extend_from_slice(part).unwrap();
        }
        let frozen = b.freeze();
        let start = frozen.as_ptr();
        let mid = frozen.slice(1_000_000..1_000_100);
        let tail = frozen.slice(2_999_000..);
        drop(frozen);
        assert_eq!(mid.as_ptr(), start.wrapping_add(1_000_000), "slices are zero-copy");
        assert_eq!(&mid[..], &want[1_000_000..1_000_100]);
        drop(mid);
        // Dropping the others must not have unmapped what `tail` still points at.
        assert_eq!(&tail[..], &want[2_999_000..]);
        let clone = tail.clone();
        drop(tail);
        assert_eq!(&clone[..], &want[2_999_000..]);
    }

    #[test]
    fn frozen_buffers_can_cross_threads() {
        let mut b = GrowBuf::new();
        b.extend_from_slice(&pattern(5_000_000, 9)).unwrap();
        let frozen = b.freeze();
        let part = frozen.slice(4_000_000..);
        let sum = std::thread::spawn(move || part.iter().map(|&x| u64::from(x)).sum::<u64>()).join().unwrap();
        assert_eq!(sum, pattern(5_000_000, 9)[4_000_000..].iter().map(|&x| u64::from(x)).sum::<u64>());
    }

    /// Many buffers created, grown and dropped: each drop must unmap. A leak of these
    /// (4 GiB of address space in all, none of it touched beyond a page) shows in VmSize.
    #[cfg(target_os = "linux")]
    #[test]
    fn dropped_buffers_are_unmapped() {
        fn vm_size_kib() -> usize {
            let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
            let line = status.lines().find(|l| l.starts_with("VmSize:")).unwrap_or_default();
            line.split_whitespace().nth(1).and_then(|v| v.parse().ok()).unwrap_or(0)
        }
        let before = vm_size_kib();
        for i in 0..1000 {
            let mut b = GrowBuf::new();
            b.reserve(2 * MIN_CAPACITY).unwrap();
            b.extend_from_slice(&[i as u8; 10]).unwrap();
            b.reserve(4 * MIN_CAPACITY).unwrap(); // moves or grows in place
            if i % 2 == 0 {
                let frozen = b.freeze();
                let s = frozen.slice(5..10);
                drop(frozen);
                assert_eq!(s[0], i as u8);
            }
        }
        // Other test threads allocate concurrently: allow 1 GiB of slack.
        let after = vm_size_kib();
        assert!(after < before + (1 << 20), "VmSize grew from {before} KiB to {after} KiB");
    }
}
