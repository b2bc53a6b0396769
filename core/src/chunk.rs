//! Large-message chunking (spec §3): splitting an outgoing package into `message_cache`
//! calls, and reassembling the chunks a peer sends us.
//!
//! hypha-rpc has no transport-level fragmentation. A package bigger than
//! [`CHUNK_THRESHOLD`] is instead sent as a handful of ordinary RPC calls to the *target's*
//! built-in service (`services.built-in.message_cache.*`, spec §7.4): `create`, one `set`
//! (or legacy `append`) per chunk, then `process`, which makes the receiver concatenate the
//! chunks and dispatch the result as if it had arrived in one frame.
//!
//! This module is sans-IO and knows nothing about sessions or msgpack:
//!
//! * **Sender side**: [`needs_chunking`] decides, [`split`] cuts the package into
//!   zero-copy slices, and [`ChunkPlan`] lists the `message_cache` calls (method name
//!   and positional [`Value`] arguments) that the driver sends with its normal call
//!   machinery ([`CacheCall`]).
//! * **Receiver side**: [`Reassembler`] is the `message_cache` state of one client. It
//!   copies each chunk into the growing message as soon as it continues what is already
//!   contiguous (while the chunk is still in cache), so `process` has nothing left to
//!   copy. It enforces [`ChunkLimits`] so that whatever a peer sends, the memory it holds
//!   stays bounded, and it evicts idle entries by the `now` the driver passes in.
//!
//! What the driver still does around a [`Reassembler`] (it needs the session table):
//! when a `create`/`set`/`append`/`process` call carries `heartbeat = true`, look up the
//! session named by `key` and reset its timer (spec §4.4). If there is no such session,
//! reject the call with upstream's text `"session does not exist anymore: <key>"`
//! ([`session_gone_message`]) *before* touching the cache. After [`Reassembler::process`]
//! the driver decodes the package, overwrites `from`/`to`/`ws`/`user` with the `process`
//! call's own trusted context and dispatches it (spec §3, receiver step 3).

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use bytes::Bytes;

use crate::growbuf::{GrowBuf, GrowError};
use crate::msgpack::Rope;
use crate::value::Value;

// ---------------------------------------------------------------------------------------
// Constants
// ---------------------------------------------------------------------------------------

/// Bytes per chunk: 256 KiB, the default `long_message_chunk_size` of both the Python and
/// the JS client (spec §3). Python peers size their msgpack read buffer from it
/// (`max(512000, 2 * chunk_size)`, spec §2.1), so a chunk call built from this size always
/// fits in one segment a Python peer will accept.
pub const CHUNK_SIZE: usize = 262_144;

/// Largest package sent as one frame: `CHUNK_SIZE + 1024` (spec §3). Upstream compares
/// `len(package) <= CHUNK_SIZE + 1024`; the 1 KiB slack means a `set` call carrying one
/// full chunk (about 262 400 bytes with its envelope) is itself never chunked again.
pub const CHUNK_THRESHOLD: usize = CHUNK_SIZE + 1024;

/// Most `message_cache.set` calls one sender keeps in flight: 30, the Python default of
/// `HYPHA_CONCURRENCY_LIMIT` and the constant hard-coded in the JS client (spec §3). It
/// also keeps a burst well inside the server's rate limit (200 msg/s, burst 2000, §11.5).
pub const MAX_CONCURRENT_SETS: usize = 30;

/// The one method that is never chunked, whatever its size (spec §3): the legacy
/// `append` carries a chunk already, and chunking it would recurse.
pub const APPEND_METHOD_PATH: &str = "services.built-in.message_cache.append";

/// Prefix of every `message_cache` method path on a peer (its built-in service, §7.4).
pub const MESSAGE_CACHE_PATH_PREFIX: &str = "services.built-in.";

/// Id of the service that hosts `message_cache` on every client (spec §7.4); a sender
/// fetches it with `get_remote_service("<target>:built-in")`.
pub const BUILTIN_SERVICE_ID: &str = "built-in";

/// `message_cache.create(key, heartbeat)`, relative to the built-in service.
pub const METHOD_CREATE: &str = "message_cache.create";
/// `message_cache.set(key, index, data, heartbeat)`, relative to the built-in service.
pub const METHOD_SET: &str = "message_cache.set";
/// `message_cache.append(key, data, heartbeat)`, relative to the built-in service.
pub const METHOD_APPEND: &str = "message_cache.append";
/// `message_cache.process(key, heartbeat)`, relative to the built-in service.
pub const METHOD_PROCESS: &str = "message_cache.process";
/// `message_cache.remove(key)`, relative to the built-in service.
pub const METHOD_REMOVE: &str = "message_cache.remove";

/// The built-in service's `config.api_version` from which senders use indexed, concurrent
/// `set` calls instead of in-order `append` calls (spec §3 step 3). We advertise it.
pub const INDEXED_API_VERSION: i64 = 3;

/// The error text upstream uses when a `heartbeat = true` cache call names a session the
/// caller no longer has (spec §3, receiver `create`). The driver raises it, not the
/// [`Reassembler`], because only the session table knows the sessions.
pub fn session_gone_message(key: &str) -> String {
    format!("session does not exist anymore: {key}")
}

// ---------------------------------------------------------------------------------------
// Errors
// ---------------------------------------------------------------------------------------

/// Everything that can go wrong in a `message_cache` operation. Each variant maps to one
/// misbehaviour (or limit) so that drivers and tests can tell them apart; the `Display`
/// text is what the driver puts in the `reject` sent back to the peer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChunkError {
    /// `create` for a key that is open, without `overwrite`. Upstream's exact text: two
    /// large messages for the same `remote_parent` collide like this (spec §3 quirks).
    #[error("Message with the same key ({0}) already exists")]
    AlreadyExists(String),
    /// `set`/`append`/`process`/`remove` for a key that was never created, was already
    /// processed or removed, or was evicted as idle. The text is upstream's, typo
    /// included (`KeyError` in hypha-rpc 0.21.47's message cache).
    #[error("Message with key {0} does not exists.")]
    UnknownKey(String),
    /// A `set` for an index that already holds a chunk. Upstream silently overwrites; we
    /// refuse, because a conforming sender sends each index exactly once, and a replaced
    /// chunk would otherwise corrupt the reassembled package without any trace. The
    /// stored chunk is kept, so the entry stays usable.
    #[error("Duplicate chunk index {index} for message {key}")]
    DuplicateIndex {
        /// The cache key.
        key: String,
        /// The repeated index.
        index: usize,
    },
    /// A chunk index at or beyond [`ChunkLimits::max_chunks`] (for `append`: the entry
    /// already holds a chunk at the last allowed index).
    #[error("Chunk index {index} for message {key} is out of range (max {max})")]
    IndexOutOfRange {
        /// The cache key.
        key: String,
        /// The rejected index.
        index: u64,
        /// The largest index allowed.
        max: usize,
    },
    /// An index argument that is not a non-negative integer.
    #[error("Chunk index must be a non-negative integer, got {0}")]
    InvalidIndex(String),
    /// `process` found a gap: chunk `index` (the lowest missing one) was never stored,
    /// although a chunk with a higher index was (or, for `index == 0`, no chunk at all).
    /// The entry is dropped: the sender sends `process` only after every `set` succeeded,
    /// so the gap cannot be filled any more.
    #[error("Chunk {index} of message {key} is missing ({count} chunks expected)")]
    MissingChunk {
        /// The cache key.
        key: String,
        /// The lowest missing index.
        index: usize,
        /// Number of chunks implied by the highest stored index.
        count: usize,
    },
    /// Storing this chunk would make the message bigger than
    /// [`ChunkLimits::max_message_bytes`].
    #[error("Message {key} would grow to {size} bytes, over the limit of {max}")]
    MessageTooLarge {
        /// The cache key.
        key: String,
        /// The size the message would have had with this chunk.
        size: usize,
        /// The limit.
        max: usize,
    },
    /// Storing this entry or chunk would make all open entries together hold more than
    /// [`ChunkLimits::max_total_bytes`].
    #[error("Message cache full: {needed} bytes needed, limit {max}")]
    CacheFull {
        /// Accounted bytes the cache would hold.
        needed: usize,
        /// The limit.
        max: usize,
    },
    /// `create` while [`ChunkLimits::max_entries`] entries are open (after evicting idle ones).
    #[error("Too many open messages in the message cache (max {max})")]
    TooManyEntries {
        /// The limit.
        max: usize,
    },
    /// One chunk bigger than [`ChunkLimits::max_chunk_bytes`].
    #[error("Chunk of {len} bytes is larger than the limit of {max}")]
    ChunkTooLarge {
        /// The chunk's size.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// A key longer than [`ChunkLimits::max_key_len`].
    #[error("Message cache key of {len} bytes is longer than the limit of {max}")]
    KeyTooLong {
        /// The key's length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// `data` that is not a msgpack bin. Python asserts `bytes`, JS an `ArrayBufferView`.
    #[error("Chunk data must be bytes, got {0}")]
    NotBytes(&'static str),
    /// The system refused the memory to grow the reassembled message (the allocator, or
    /// `mmap`/`mremap`, failed). The chunk is not stored (or, at `process`, the entry is
    /// dropped).
    #[error("Out of memory reassembling message {key}: could not reserve {size} bytes")]
    OutOfMemory {
        /// The cache key.
        key: String,
        /// The buffer capacity that was refused.
        size: usize,
    },
}

/// Extracts the `data` argument of `set`/`append`. Only [`Value::Bytes`] is accepted: both
/// upstream clients send chunks as msgpack bin, and the Python receiver asserts `bytes`.
pub fn chunk_data_from_value(value: &Value) -> Result<Bytes, ChunkError> {
    match value {
        Value::Bytes(b) => Ok(b.clone()),
        other => Err(ChunkError::NotBytes(other.kind())),
    }
}

/// Extracts the `index` argument of `set`: a non-negative integer. Range checks against
/// the limits happen in [`Reassembler::set`].
pub fn chunk_index_from_value(value: &Value) -> Result<u64, ChunkError> {
    match value {
        Value::Int(i) => u64::try_from(*i).map_err(|_| ChunkError::InvalidIndex(i.to_string())),
        Value::UInt(u) => Ok(*u),
        other => Err(ChunkError::InvalidIndex(other.kind().to_string())),
    }
}

// ---------------------------------------------------------------------------------------
// Sender side
// ---------------------------------------------------------------------------------------

/// Whether a packed package of `package_len` bytes, about to be sent as a call to
/// `method`, must go through `message_cache` instead of one frame (spec §3).
///
/// Upstream exempts only `services.built-in.message_cache.append`. We exempt every
/// `services.built-in.message_cache.*` call: with the default [`CHUNK_SIZE`] they are all
/// below the threshold anyway, and with a misconfigured chunk size this turns infinite
/// recursion (a `set` chunked into `set`s) into one oversized frame the peer rejects.
/// `rpc.emit()` events never chunk; drivers do not call this for them.
pub fn needs_chunking(package_len: usize, method: &str) -> bool {
    package_len > CHUNK_THRESHOLD
        && method != APPEND_METHOD_PATH
        && !method
            .strip_prefix(MESSAGE_CACHE_PATH_PREFIX)
            .is_some_and(|rest| rest.starts_with("message_cache."))
}

/// Splits `package` into consecutive zero-copy slices of `chunk_size` bytes (the last one
/// shorter), covering the whole two-segment package in order (spec §3: the first chunk
/// starts with the bytes of `msgpack(main)`).
///
/// Each item is a [`Bytes::slice`] of `package`, so splitting allocates nothing and the
/// chunks keep the package buffer alive until the last `set` is written. A `chunk_size`
/// of 0 is treated as 1 rather than looping forever. An empty package yields no chunks.
pub fn split(package: &Bytes, chunk_size: usize) -> Chunks {
    Chunks { package: package.clone(), chunk_size: chunk_size.max(1), offset: 0 }
}

/// Number of chunks [`split`] yields for a package of `len` bytes.
pub fn chunk_count(len: usize, chunk_size: usize) -> usize {
    len.div_ceil(chunk_size.max(1))
}

/// Iterator returned by [`split`].
#[derive(Clone, Debug)]
pub struct Chunks {
    /// The package (a cheap reference-counted handle, not a copy).
    package: Bytes,
    /// Bytes per chunk, at least 1.
    chunk_size: usize,
    /// Start of the next chunk.
    offset: usize,
}

impl Iterator for Chunks {
    type Item = Bytes;

    fn next(&mut self) -> Option<Bytes> {
        if self.offset >= self.package.len() {
            return None;
        }
        let end = self.offset.saturating_add(self.chunk_size).min(self.package.len());
        let chunk = self.package.slice(self.offset..end);
        self.offset = end;
        Some(chunk)
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        let n = chunk_count(self.package.len().saturating_sub(self.offset), self.chunk_size);
        (n, Some(n))
    }
}

impl ExactSizeIterator for Chunks {}

/// Which `message_cache` protocol the receiver speaks, from its built-in service's
/// `config.api_version` (spec §3 step 3).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UploadMode {
    /// `api_version >= 3`: `set(key, i, chunk, hb)` per chunk, up to
    /// [`MAX_CONCURRENT_SETS`] in flight, in any order.
    Indexed,
    /// Older receivers: `append(key, chunk, hb)` one at a time, strictly in order (the
    /// receiver assigns indices by arrival).
    Append,
}

impl UploadMode {
    /// The mode for a receiver whose built-in `config.api_version` is `api_version`.
    ///
    /// A missing version selects [`UploadMode::Append`], which every receiver version
    /// understands. (Python senders fail outright on a missing version; JS, comparing
    /// `undefined >= 3`, also falls back to `append`.)
    pub fn for_api_version(api_version: Option<i64>) -> Self {
        match api_version {
            Some(v) if v >= INDEXED_API_VERSION => UploadMode::Indexed,
            _ => UploadMode::Append,
        }
    }

    /// How many chunk calls the driver may have in flight at once in this mode.
    pub fn max_in_flight(self) -> usize {
        match self {
            UploadMode::Indexed => MAX_CONCURRENT_SETS,
            UploadMode::Append => 1,
        }
    }
}

/// One `message_cache` call a sender makes: the method relative to the target's built-in
/// service and its positional arguments. The driver sends it like any other remote call
/// (its own session, `promise: "*"`, heartbeat and timeout, spec §3); no msgpack here.
#[derive(Clone, Debug, PartialEq)]
pub struct CacheCall {
    /// For example [`METHOD_SET`] (`"message_cache.set"`).
    pub method: &'static str,
    /// Positional arguments, in upstream's order (see the `METHOD_*` constants).
    pub args: Vec<Value>,
}

impl CacheCall {
    /// The method path inside the target's object store, for the `method` field of the
    /// main segment: `"services.built-in." + method`.
    pub fn method_path(&self) -> String {
        format!("{MESSAGE_CACHE_PATH_PREFIX}{}", self.method)
    }
}

/// The `message_cache` calls that carry one large package to its target (spec §3 steps
/// 2-4).
///
/// Driver algorithm:
/// 1. Fetch `<target>:built-in` (a normal get-service round trip) and read its
///    `config.api_version` into [`ChunkPlan::new`].
/// 2. Await [`create_call`](Self::create_call).
/// 3. Send the [`chunk_calls`](Self::chunk_calls), keeping at most
///    [`max_in_flight`](Self::max_in_flight) outstanding. In [`UploadMode::Append`] mode
///    that is one at a time, in the order given.
/// 4. If any chunk call fails, send [`remove_call`](Self::remove_call) (ignore its
///    outcome) and fail the original call. Otherwise await
///    [`process_call`](Self::process_call).
/// 5. Only then start the original call's timer (spec §4.4 / §11.3).
#[derive(Clone, Debug)]
pub struct ChunkPlan {
    /// The cache key: the call's remote parent (a session id of the receiver) when it has
    /// one, so the chunk calls double as heartbeats for that session; else a fresh id.
    key: String,
    /// `true` exactly when `key` is the remote parent (spec §3 step 2).
    heartbeat: bool,
    /// Set vs append protocol.
    mode: UploadMode,
    /// The package cut by [`split`].
    chunks: Vec<Bytes>,
}

impl ChunkPlan {
    /// Plans the upload of `package` cut into `chunk_size` pieces ([`CHUNK_SIZE`] unless
    /// the user configured `long_message_chunk_size`).
    ///
    /// `remote_parent` is the called descriptor's parent (spec §4.7); like upstream's
    /// `bool(remote_parent)`, an empty string counts as absent. `api_version` is the
    /// target's built-in `config.api_version`.
    pub fn new(
        package: &Bytes,
        chunk_size: usize,
        remote_parent: Option<&str>,
        api_version: Option<i64>,
    ) -> Self {
        Self::from_chunks(split(package, chunk_size).collect(), remote_parent, api_version)
    }

    /// [`ChunkPlan::new`] for a package encoded as a [`Rope`]: the chunks of its large
    /// payloads are slices of the caller's buffers ([`Rope::split`]).
    pub fn from_rope(
        package: Rope,
        chunk_size: usize,
        remote_parent: Option<&str>,
        api_version: Option<i64>,
    ) -> Self {
        Self::from_chunks(package.split(chunk_size), remote_parent, api_version)
    }

    fn from_chunks(chunks: Vec<Bytes>, remote_parent: Option<&str>, api_version: Option<i64>) -> Self {
        let (key, heartbeat) = match remote_parent {
            Some(parent) if !parent.is_empty() => (parent.to_owned(), true),
            _ => (crate::ids::random_id(), false),
        };
        ChunkPlan { key, heartbeat, mode: UploadMode::for_api_version(api_version), chunks }
    }

    /// The cache key all calls use.
    pub fn key(&self) -> &str {
        &self.key
    }

    /// The `heartbeat` flag all calls carry.
    pub fn heartbeat(&self) -> bool {
        self.heartbeat
    }

    /// Set vs append protocol.
    pub fn mode(&self) -> UploadMode {
        self.mode
    }

    /// The chunks, in order.
    pub fn chunks(&self) -> &[Bytes] {
        &self.chunks
    }

    /// How many chunk calls may be outstanding at once.
    pub fn max_in_flight(&self) -> usize {
        self.mode.max_in_flight()
    }

    /// `message_cache.create(key, heartbeat)`.
    pub fn create_call(&self) -> CacheCall {
        CacheCall {
            method: METHOD_CREATE,
            args: vec![Value::Str(self.key.clone()), Value::Bool(self.heartbeat)],
        }
    }

    /// The call that uploads chunk `index`: `set(key, index, chunk, heartbeat)` or
    /// `append(key, chunk, heartbeat)`. `None` past the last chunk. Useful to a driver
    /// that issues chunk calls one by one as slots free up.
    pub fn chunk_call(&self, index: usize) -> Option<CacheCall> {
        self.chunks.get(index).map(|chunk| self.make_chunk_call(index, chunk))
    }

    /// Every chunk call, in index order.
    pub fn chunk_calls(&self) -> impl ExactSizeIterator<Item = CacheCall> + '_ {
        self.chunks.iter().enumerate().map(|(i, chunk)| self.make_chunk_call(i, chunk))
    }

    /// Builds the `set`/`append` call for chunk `index`.
    fn make_chunk_call(&self, index: usize, chunk: &Bytes) -> CacheCall {
        let key = Value::Str(self.key.clone());
        let hb = Value::Bool(self.heartbeat);
        let data = Value::Bytes(chunk.clone());
        match self.mode {
            UploadMode::Indexed => {
                CacheCall { method: METHOD_SET, args: vec![key, Value::from(index), data, hb] }
            }
            UploadMode::Append => CacheCall { method: METHOD_APPEND, args: vec![key, data, hb] },
        }
    }

    /// `message_cache.process(key, heartbeat)`: makes the receiver reassemble and dispatch.
    pub fn process_call(&self) -> CacheCall {
        CacheCall {
            method: METHOD_PROCESS,
            args: vec![Value::Str(self.key.clone()), Value::Bool(self.heartbeat)],
        }
    }

    /// `message_cache.remove(key)`: frees the receiver's half-built entry after a failed
    /// chunk call (upstream does this on the indexed path; it is harmless on the append
    /// path too, and saves the receiver from holding the entry until it times out).
    pub fn remove_call(&self) -> CacheCall {
        CacheCall { method: METHOD_REMOVE, args: vec![Value::Str(self.key.clone())] }
    }
}

// ---------------------------------------------------------------------------------------
// Receiver side
// ---------------------------------------------------------------------------------------

/// Bookkeeping bytes charged per stored chunk on top of its data (map node, `Bytes`
/// handle). Charging it makes a flood of tiny or empty chunks run into
/// [`ChunkLimits::max_total_bytes`] instead of growing unaccounted overhead.
pub const CHUNK_OVERHEAD: usize = 64;

/// Bookkeeping bytes charged per open entry on top of its key (hash-map slot, entry).
pub const ENTRY_OVERHEAD: usize = 128;

/// Limits that bound what one peer connection can make a [`Reassembler`] hold.
///
/// Upstream has none (Python reassembles any size and keeps half-built entries forever,
/// spec §3 quirks); the defaults are chosen to never refuse what a conforming Python or
/// JS client sends in practice, while capping what a broken or hostile one can pin.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChunkLimits {
    /// Largest reassembled package. Default 1 GiB: a 64 MB float64 array (the size the
    /// upstream tests push) is 1/16 of it. Chunks arriving in order are copied into the
    /// message at once and their frames freed, so a package needs about its own size in
    /// memory (up to twice that in address space while the buffer doubles), plus the
    /// chunks that arrived ahead of a gap.
    pub max_message_bytes: usize,
    /// Accounted bytes (data plus [`CHUNK_OVERHEAD`]/[`ENTRY_OVERHEAD`] and keys) over all
    /// open entries. Default 2 GiB: one maximal message and smaller ones can be in flight
    /// at once, but a peer cannot open many maximal messages.
    pub max_total_bytes: usize,
    /// Open entries at once. Default 256, the count at which the JS client starts evicting.
    /// Each in-flight large message of a peer uses one; a Python peer has at most a few.
    pub max_entries: usize,
    /// Largest single chunk. Default `2 * CHUNK_SIZE` (524 288): the segment limit of a
    /// Python receiver (`max(512000, 2 * chunk_size)`, spec §2.1), so anything a Python
    /// peer would accept, including senders configured with a larger chunk size, passes.
    pub max_chunk_bytes: usize,
    /// Chunks per message: indices must be below this. Default 65 536, enough for a
    /// maximal message cut into 16 KiB chunks (a default-sized sender needs 4096).
    /// Bounds the per-entry index map whatever indices a peer sends.
    pub max_chunks: usize,
    /// Longest key. Default 256: keys are 22-char random ids or (dotted) session ids.
    pub max_key_len: usize,
    /// Entries idle (no `create`/`set`/`append`) for this long are evicted. Default
    /// 5 minutes like the JS client, but measured from the last chunk rather than from
    /// `create`, so a slow but live upload of a large message is never cut off.
    pub entry_ttl: Duration,
    /// Chunks shorter than this are copied into their own buffer instead of kept as a
    /// slice of the received frame. A short slice could otherwise pin a whole frame while
    /// being charged only its own length. Default `CHUNK_SIZE / 2`: full-size chunks
    /// (the common case) stay zero-copy; only a message's short last chunk is copied.
    /// A chunk that goes straight into the message's contiguous prefix is copied there
    /// instead, whatever its size.
    pub copy_chunks_below: usize,
}

impl Default for ChunkLimits {
    fn default() -> Self {
        ChunkLimits {
            max_message_bytes: 1 << 30,
            max_total_bytes: usize::try_from(2u64 << 30).unwrap_or(usize::MAX),
            max_entries: 256,
            max_chunk_bytes: 2 * CHUNK_SIZE,
            max_chunks: 65_536,
            max_key_len: 256,
            entry_ttl: Duration::from_secs(300),
            copy_chunks_below: CHUNK_SIZE / 2,
        }
    }
}

/// One half-built message.
///
/// Chunks `0..prefix_chunks` are already concatenated in `prefix`; the others wait in
/// `chunks`. As soon as the entry holds two chunks, every chunk that continues the prefix
/// is moved into it, so `chunks` never holds index `prefix_chunks` then. The exception
/// is a lone chunk 0: a one-chunk package is handed over as it arrived, without a copy.
#[derive(Debug)]
struct Entry {
    /// Chunks not (yet) in the prefix, by index: those that arrived ahead of a gap, or a
    /// lone chunk 0. A `BTreeMap` because indices arrive in any order and may be sparse;
    /// memory follows the chunks actually stored, not the indices claimed. All keys are
    /// `>= prefix_chunks`.
    chunks: BTreeMap<usize, Bytes>,
    /// Chunks `0..prefix_chunks`, concatenated. Allocates nothing while `prefix_chunks == 0`.
    prefix: GrowBuf,
    /// How many chunks `prefix` holds.
    prefix_chunks: usize,
    /// Bytes stored, in the prefix and in `chunks` (the package size so far).
    data_bytes: usize,
    /// What this entry counts against [`ChunkLimits::max_total_bytes`]: data plus
    /// [`CHUNK_OVERHEAD`] per chunk received, whether copied into the prefix or not. The
    /// prefix's spare capacity is not charged: it is bounded (below 2 MiB one heap block,
    /// above it address space the kernel backs only as it is written).
    charged: usize,
    /// Last `create`/`set`/`append`: the idle-eviction clock.
    last_touch: Instant,
}

impl Entry {
    fn new(charged: usize, now: Instant) -> Self {
        Entry {
            chunks: BTreeMap::new(),
            prefix: GrowBuf::new(),
            prefix_chunks: 0,
            data_bytes: 0,
            charged,
            last_touch: now,
        }
    }

    /// Index `append` writes to: right after the highest stored chunk.
    fn next_append_index(&self) -> usize {
        self.chunks.last_key_value().map_or(self.prefix_chunks, |(i, _)| i.saturating_add(1))
    }

    /// Whether chunk `index` was stored (copied into the prefix or waiting).
    fn holds(&self, index: usize) -> bool {
        index < self.prefix_chunks || self.chunks.contains_key(&index)
    }

    /// Chunks received so far.
    fn chunk_count(&self) -> usize {
        self.prefix_chunks.saturating_add(self.chunks.len())
    }

    /// Whether chunks continuing the prefix are copied into it: once the entry holds two
    /// chunks (a lone chunk 0 stays as it came, for the one-chunk package).
    fn assembling(&self) -> bool {
        self.chunk_count() >= 2
    }

    /// The lowest index missing below the highest stored one, if any.
    fn lowest_missing(&self) -> Option<usize> {
        self.chunks.keys().zip(self.prefix_chunks..).find(|(idx, want)| *idx != want).map(|(_, want)| want)
    }

    /// What storing chunk `index` of `len` bytes now makes the prefix hold: the index it
    /// then ends at (exclusive) and the bytes it grows by, for the run of chunks that
    /// would continue it.
    fn prefix_run_with(&self, index: usize, len: usize) -> (usize, usize) {
        // After storing, the entry holds `chunk_count() + 1` chunks: it assembles from two.
        let mut end = self.prefix_chunks;
        let mut bytes = 0usize;
        if self.chunk_count() == 0 {
            return (end, bytes);
        }
        loop {
            let chunk_len = match self.chunks.get(&end) {
                Some(c) => c.len(),
                None if end == index => len,
                None => return (end, bytes),
            };
            bytes = bytes.saturating_add(chunk_len);
            end += 1;
        }
    }

    /// Moves the chunks that continue the prefix into it. Callers reserve the room first
    /// ([`prefix_run_with`](Self::prefix_run_with)); on an error the chunk that did not fit
    /// stays in `chunks`, so the entry is consistent either way.
    fn drain_into_prefix(&mut self) -> Result<(), GrowError> {
        if !self.assembling() {
            return Ok(());
        }
        while let Some(next) = self.chunks.first_entry() {
            if *next.key() != self.prefix_chunks {
                break;
            }
            self.prefix.extend_from_slice(next.get())?;
            next.remove();
            self.prefix_chunks += 1;
        }
        Ok(())
    }

    /// Bytes still held as separate chunks, not yet copied into the prefix.
    #[cfg(test)]
    fn separate_bytes(&self) -> usize {
        self.chunks.values().map(Bytes::len).sum()
    }
}

/// The `message_cache` of one client (spec §7.4): half-built large messages by key.
///
/// Operations mirror the built-in service's `create/set/append/process/remove`. Every
/// failing operation leaves the cache unchanged (except [`process`](Self::process), which
/// drops an entry it cannot complete). Memory is bounded by [`ChunkLimits`] regardless of
/// what arrives; see [`Reassembler::apply`] for driving it from a fuzzer.
#[derive(Debug)]
pub struct Reassembler {
    /// The limits in force.
    limits: ChunkLimits,
    /// Open entries by key.
    entries: HashMap<String, Entry>,
    /// Sum of `Entry::charged`.
    total_charged: usize,
}

impl Default for Reassembler {
    fn default() -> Self {
        Reassembler::new(ChunkLimits::default())
    }
}

impl Reassembler {
    /// An empty cache with the given limits.
    pub fn new(limits: ChunkLimits) -> Self {
        Reassembler { limits, entries: HashMap::new(), total_charged: 0 }
    }

    // ----- getters -----

    /// The limits in force.
    pub fn limits(&self) -> &ChunkLimits {
        &self.limits
    }

    /// Number of open entries.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether no entry is open.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Whether `key` is open.
    pub fn contains(&self, key: &str) -> bool {
        self.entries.contains_key(key)
    }

    /// Accounted bytes held (data, keys and bookkeeping), what
    /// [`ChunkLimits::max_total_bytes`] caps.
    pub fn total_bytes(&self) -> usize {
        self.total_charged
    }

    /// When the next idle entry expires, for the driver's timer: call
    /// [`evict_expired`](Self::evict_expired) then.
    pub fn next_expiry(&self) -> Option<Instant> {
        self.entries.values().filter_map(|e| e.last_touch.checked_add(self.limits.entry_ttl)).min()
    }

    // ----- commands -----

    /// Drops entries idle for [`ChunkLimits::entry_ttl`] or longer; returns how many.
    /// Also runs at every [`create`](Self::create).
    pub fn evict_expired(&mut self, now: Instant) -> usize {
        let ttl = self.limits.entry_ttl;
        let before = self.entries.len();
        let mut freed = 0usize;
        self.entries.retain(|_, e| {
            let keep = now.saturating_duration_since(e.last_touch) < ttl;
            if !keep {
                freed = freed.saturating_add(e.charged);
            }
            keep
        });
        self.total_charged = self.total_charged.saturating_sub(freed);
        before - self.entries.len()
    }

    /// `create(key, heartbeat, overwrite)`: opens an empty entry. With `overwrite`, an
    /// existing entry of that key is discarded first; without, it is an
    /// [`ChunkError::AlreadyExists`] error (upstream's text).
    pub fn create(&mut self, now: Instant, key: &str, overwrite: bool) -> Result<(), ChunkError> {
        self.evict_expired(now);
        if key.len() > self.limits.max_key_len {
            return Err(ChunkError::KeyTooLong { len: key.len(), max: self.limits.max_key_len });
        }
        let replaced = match self.entries.get(key) {
            Some(_) if !overwrite => return Err(ChunkError::AlreadyExists(key.to_owned())),
            Some(old) => old.charged,
            None => {
                if self.entries.len() >= self.limits.max_entries {
                    return Err(ChunkError::TooManyEntries { max: self.limits.max_entries });
                }
                0
            }
        };
        let charged = ENTRY_OVERHEAD.saturating_add(key.len());
        let needed = self.total_charged.saturating_sub(replaced).saturating_add(charged);
        if needed > self.limits.max_total_bytes {
            return Err(ChunkError::CacheFull { needed, max: self.limits.max_total_bytes });
        }
        self.total_charged = needed;
        self.entries.insert(key.to_owned(), Entry::new(charged, now));
        Ok(())
    }

    /// `set(key, index, data, heartbeat)`: stores chunk `index`. Chunks may arrive in any
    /// order (senders run up to [`MAX_CONCURRENT_SETS`] concurrently). A second chunk for
    /// the same index is a [`ChunkError::DuplicateIndex`] error.
    ///
    /// A chunk that continues the contiguous prefix (and any waiting chunks that then
    /// follow it) is copied into the message right away, while its bytes are still in
    /// cache; the others wait for the gap before them to fill.
    pub fn set(&mut self, now: Instant, key: &str, index: u64, data: Bytes) -> Result<(), ChunkError> {
        let max = self.limits.max_chunks;
        let idx = match usize::try_from(index) {
            Ok(i) if i < max => i,
            _ => {
                // Unknown key takes precedence, like every other operation.
                if !self.entries.contains_key(key) {
                    return Err(ChunkError::UnknownKey(key.to_owned()));
                }
                return Err(ChunkError::IndexOutOfRange {
                    key: key.to_owned(),
                    index,
                    max: max.saturating_sub(1),
                });
            }
        };
        self.store(now, key, Some(idx), data)
    }

    /// `append(key, data, heartbeat)`: stores `data` right after the highest stored chunk
    /// (index 0 for a fresh entry), which is arrival order for an append-only sender.
    pub fn append(&mut self, now: Instant, key: &str, data: Bytes) -> Result<(), ChunkError> {
        self.store(now, key, None, data)
    }

    /// Shared body of `set` (`index` given) and `append` (`index` None). Checks every limit,
    /// and reserves the room to copy into the prefix, before changing anything.
    fn store(
        &mut self,
        now: Instant,
        key: &str,
        index: Option<usize>,
        data: Bytes,
    ) -> Result<(), ChunkError> {
        let limits = &self.limits;
        let entry = self.entries.get_mut(key).ok_or_else(|| ChunkError::UnknownKey(key.to_owned()))?;
        if data.len() > limits.max_chunk_bytes {
            return Err(ChunkError::ChunkTooLarge { len: data.len(), max: limits.max_chunk_bytes });
        }
        let index = match index {
            Some(i) => i,
            None => entry.next_append_index(),
        };
        if index >= limits.max_chunks {
            return Err(ChunkError::IndexOutOfRange {
                key: key.to_owned(),
                index: index as u64,
                max: limits.max_chunks.saturating_sub(1),
            });
        }
        if entry.holds(index) {
            return Err(ChunkError::DuplicateIndex { key: key.to_owned(), index });
        }
        let size = entry.data_bytes.saturating_add(data.len());
        if size > limits.max_message_bytes {
            return Err(ChunkError::MessageTooLarge {
                key: key.to_owned(),
                size,
                max: limits.max_message_bytes,
            });
        }
        let charge = data.len().saturating_add(CHUNK_OVERHEAD);
        let needed = self.total_charged.saturating_add(charge);
        if needed > limits.max_total_bytes {
            return Err(ChunkError::CacheFull { needed, max: limits.max_total_bytes });
        }
        let (run_end, run_bytes) = entry.prefix_run_with(index, data.len());
        entry
            .prefix
            .reserve(run_bytes)
            .map_err(|e| ChunkError::OutOfMemory { key: key.to_owned(), size: e.size })?;
        // A chunk about to be copied into the prefix needs no copy of its own.
        let joins_prefix = index < run_end;
        let data = if !joins_prefix && data.len() < limits.copy_chunks_below {
            Bytes::copy_from_slice(&data)
        } else {
            data
        };
        entry.data_bytes = size;
        entry.charged = entry.charged.saturating_add(charge);
        entry.last_touch = now;
        entry.chunks.insert(index, data);
        self.total_charged = needed;
        // Within the room reserved above, so this cannot fail; if it did, the chunks that
        // did not fit would stay stored separately and `process` would retry.
        entry.drain_into_prefix().map_err(|e| ChunkError::OutOfMemory { key: key.to_owned(), size: e.size })
    }

    /// `process(key, heartbeat)`: removes the entry and returns chunks `0..n-1` as one
    /// buffer (`n - 1` is the highest stored index). The chunks were copied into it as they
    /// arrived, so this only checks for gaps and hands the buffer over; a package of one
    /// chunk is that chunk, not a copy. A gap is [`ChunkError::MissingChunk`] naming the
    /// lowest missing index, and also drops the entry, since the sender will not fill it
    /// after asking to process.
    pub fn process(&mut self, key: &str) -> Result<Bytes, ChunkError> {
        let mut entry = self.entries.remove(key).ok_or_else(|| ChunkError::UnknownKey(key.to_owned()))?;
        self.total_charged = self.total_charged.saturating_sub(entry.charged);
        let count = entry.next_append_index();
        if let Some(missing) = entry.lowest_missing() {
            return Err(ChunkError::MissingChunk { key: key.to_owned(), index: missing, count });
        }
        if entry.chunk_count() == 0 {
            return Err(ChunkError::MissingChunk { key: key.to_owned(), index: 0, count: 0 });
        }
        if entry.prefix_chunks == 0 && entry.chunks.len() == 1 {
            // A single chunk is already the package: hand it over without copying.
            return Ok(entry.chunks.into_values().next().unwrap_or_default());
        }
        // No gap, and `set` moved every chunk continuing the prefix into it: `chunks` is
        // empty. Draining again keeps this correct even if it were not.
        entry
            .drain_into_prefix()
            .map_err(|e| ChunkError::OutOfMemory { key: key.to_owned(), size: e.size })?;
        Ok(entry.prefix.freeze())
    }

    /// `remove(key)`: discards an entry (the sender gave up). Unknown keys are an error,
    /// as upstream raises.
    pub fn remove(&mut self, key: &str) -> Result<(), ChunkError> {
        let entry = self.entries.remove(key).ok_or_else(|| ChunkError::UnknownKey(key.to_owned()))?;
        self.total_charged = self.total_charged.saturating_sub(entry.charged);
        Ok(())
    }

    /// Runs one [`ReassemblerOp`]; the result of `process` comes back as `Some(bytes)`.
    /// This is the single entry point for fuzzing and model-based tests, e.g. a cargo-fuzz
    /// target:
    ///
    /// ```
    /// use hypha_core::chunk::{Reassembler, ReassemblerOp, ChunkLimits};
    /// # let fuzz_input: &[u8] = &[0, 1, 0, 1, 1, 0, 0, 3, 0xaa, 0xbb, 0xcc, 3, 1];
    /// let mut cache = Reassembler::new(ChunkLimits { max_total_bytes: 1 << 20, ..Default::default() });
    /// let mut now = std::time::Instant::now();
    /// for op in ReassemblerOp::parse_all(fuzz_input) {
    ///     if let ReassemblerOp::Advance(d) = op { now += d; }
    ///     let _ = cache.apply(now, op);
    ///     cache.check_invariants().expect("reassembler invariant broken");
    /// }
    /// ```
    pub fn apply(&mut self, now: Instant, op: ReassemblerOp) -> Result<Option<Bytes>, ChunkError> {
        match op {
            ReassemblerOp::Create { key, overwrite } => self.create(now, &key, overwrite).map(|()| None),
            ReassemblerOp::Set { key, index, data } => self.set(now, &key, index, data).map(|()| None),
            ReassemblerOp::Append { key, data } => self.append(now, &key, data).map(|()| None),
            ReassemblerOp::Process { key } => self.process(&key).map(Some),
            ReassemblerOp::Remove { key } => self.remove(&key).map(|()| None),
            ReassemblerOp::Advance(_) => {
                self.evict_expired(now);
                Ok(None)
            }
        }
    }

    /// Recomputes the accounting from scratch and checks it against the limits. For
    /// fuzzers and tests: an `Err` is a bug in this module, never a peer's fault.
    pub fn check_invariants(&self) -> Result<(), String> {
        let l = &self.limits;
        if self.entries.len() > l.max_entries {
            return Err(format!("{} entries > max {}", self.entries.len(), l.max_entries));
        }
        let mut total = 0usize;
        for (key, e) in &self.entries {
            let data: usize = e.prefix.len() + e.chunks.values().map(Bytes::len).sum::<usize>();
            if data != e.data_bytes {
                return Err(format!("entry {key}: data_bytes {} != stored {data}", e.data_bytes));
            }
            let charged = ENTRY_OVERHEAD + key.len() + data + e.chunk_count() * CHUNK_OVERHEAD;
            if charged != e.charged {
                return Err(format!("entry {key}: charged {} != recomputed {charged}", e.charged));
            }
            if data > l.max_message_bytes {
                return Err(format!("entry {key}: {data} bytes > max {}", l.max_message_bytes));
            }
            if e.next_append_index() > l.max_chunks {
                return Err(format!(
                    "entry {key}: index {} >= max {}",
                    e.next_append_index() - 1,
                    l.max_chunks
                ));
            }
            if let Some(c) = e.chunks.values().find(|c| c.len() > l.max_chunk_bytes) {
                return Err(format!("entry {key}: chunk of {} > max {}", c.len(), l.max_chunk_bytes));
            }
            // The prefix: chunks 0..prefix_chunks, nothing mapped before it starts, and every
            // chunk that continues it already moved in once the entry holds two chunks.
            if e.prefix.len() > e.prefix_chunks.saturating_mul(l.max_chunk_bytes) {
                return Err(format!(
                    "entry {key}: prefix of {} bytes in {} chunks",
                    e.prefix.len(),
                    e.prefix_chunks
                ));
            }
            if e.prefix_chunks == 0 && e.prefix.capacity() != 0 {
                return Err(format!("entry {key}: prefix buffer mapped before its first chunk"));
            }
            if e.chunks.keys().next().is_some_and(|&first| first < e.prefix_chunks) {
                return Err(format!("entry {key}: a stored chunk overlaps the prefix"));
            }
            if e.assembling() && e.chunks.contains_key(&e.prefix_chunks) {
                return Err(format!(
                    "entry {key}: chunk {} continues the prefix but was not copied",
                    e.prefix_chunks
                ));
            }
            total += e.charged;
        }
        if total != self.total_charged {
            return Err(format!("total_charged {} != recomputed {total}", self.total_charged));
        }
        if total > l.max_total_bytes {
            return Err(format!("total {total} > max {}", l.max_total_bytes));
        }
        Ok(())
    }
}

/// One `message_cache` operation as data, for [`Reassembler::apply`]: lets fuzzers and
/// property tests generate operation sequences without depending on `arbitrary`.
#[derive(Clone, Debug, PartialEq)]
pub enum ReassemblerOp {
    /// [`Reassembler::create`].
    Create {
        /// Cache key.
        key: String,
        /// Replace an existing entry.
        overwrite: bool,
    },
    /// [`Reassembler::set`].
    Set {
        /// Cache key.
        key: String,
        /// Chunk index as the peer sent it.
        index: u64,
        /// Chunk data.
        data: Bytes,
    },
    /// [`Reassembler::append`].
    Append {
        /// Cache key.
        key: String,
        /// Chunk data.
        data: Bytes,
    },
    /// [`Reassembler::process`].
    Process {
        /// Cache key.
        key: String,
    },
    /// [`Reassembler::remove`].
    Remove {
        /// Cache key.
        key: String,
    },
    /// Time passes: the caller moves its clock forward by this much, then `apply` runs
    /// [`Reassembler::evict_expired`].
    Advance(Duration),
}

impl ReassemblerOp {
    /// Decodes one op from the front of `input`, returning it and the rest; `None` when
    /// the input is exhausted. Total over all byte strings (never panics), so a fuzz target
    /// can feed raw fuzzer bytes. Format: a tag byte (mod 6) picks the op; a key byte picks
    /// one of 8 keys (`"k0"`..`"k7"`, so collisions are common); indices are one byte,
    /// or `0xff` followed by 8 big-endian bytes for huge values; data is a length byte
    /// (times 1..=4 KiB scale from the next byte) of a repeated fill byte.
    pub fn parse(input: &[u8]) -> Option<(ReassemblerOp, &[u8])> {
        let (&tag, rest) = input.split_first()?;
        let (key_byte, rest) = take(rest, 1);
        let key = format!("k{}", key_byte.first().copied().unwrap_or(0) % 8);
        Some(match tag % 6 {
            0 => {
                let (b, rest) = take(rest, 1);
                (ReassemblerOp::Create { key, overwrite: b.first().is_some_and(|b| b & 1 == 1) }, rest)
            }
            1 => {
                let (index, rest) = parse_index(rest);
                let (data, rest) = parse_data(rest);
                (ReassemblerOp::Set { key, index, data }, rest)
            }
            2 => {
                let (data, rest) = parse_data(rest);
                (ReassemblerOp::Append { key, data }, rest)
            }
            3 => (ReassemblerOp::Process { key }, rest),
            4 => (ReassemblerOp::Remove { key }, rest),
            _ => {
                let secs = u64::from(key_byte.first().copied().unwrap_or(0));
                (ReassemblerOp::Advance(Duration::from_secs(secs * 4)), rest)
            }
        })
    }

    /// Decodes a whole op sequence with [`parse`](Self::parse).
    pub fn parse_all(mut input: &[u8]) -> Vec<ReassemblerOp> {
        let mut ops = Vec::new();
        while let Some((op, rest)) = ReassemblerOp::parse(input) {
            ops.push(op);
            input = rest;
        }
        ops
    }
}

/// Splits off up to `n` bytes.
fn take(input: &[u8], n: usize) -> (&[u8], &[u8]) {
    input.split_at(n.min(input.len()))
}

/// Fuzz format of an index: one byte, or `0xff` + 8 big-endian bytes.
fn parse_index(input: &[u8]) -> (u64, &[u8]) {
    let (b, rest) = take(input, 1);
    match b.first() {
        Some(0xff) => {
            let (raw, rest) = take(rest, 8);
            let mut buf = [0u8; 8];
            buf[8 - raw.len()..].copy_from_slice(raw);
            (u64::from_be_bytes(buf), rest)
        }
        Some(&i) => (u64::from(i), rest),
        None => (0, rest),
    }
}

/// Fuzz format of chunk data: `len`, `scale`, `fill` bytes give `len` bytes (scale < 128),
/// `len` KiB (scale < 192) or `len * 4` KiB (otherwise) of `fill`, so sequences reach the
/// byte and chunk-size limits as well as the empty chunk.
fn parse_data(input: &[u8]) -> (Bytes, &[u8]) {
    let (h, rest) = take(input, 3);
    let len = usize::from(h.first().copied().unwrap_or(0));
    let scale = h.get(1).copied().unwrap_or(0);
    let fill = h.get(2).copied().unwrap_or(0);
    let n = match scale {
        0..128 => len,
        128..192 => len * 1024,
        _ => len * 4096,
    };
    (Bytes::from(vec![fill; n]), rest)
}

// ---------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn t0() -> Instant {
        Instant::now()
    }

    fn data(n: usize, seed: u8) -> Bytes {
        (0..n).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed)).collect::<Vec<u8>>().into()
    }

    // ----- sender side -----

    #[test]
    fn threshold_rule() {
        let m = "services.demo.add";
        assert!(!needs_chunking(CHUNK_THRESHOLD, m));
        assert!(needs_chunking(CHUNK_THRESHOLD + 1, m));
        assert!(!needs_chunking(10 * CHUNK_SIZE, APPEND_METHOD_PATH));
        assert!(!needs_chunking(10 * CHUNK_SIZE, "services.built-in.message_cache.set"));
        assert!(needs_chunking(10 * CHUNK_SIZE, "services.built-in.get_service"));
        assert!(needs_chunking(10 * CHUNK_SIZE, "abc.resolve"));
        assert_eq!(CHUNK_THRESHOLD, 263_168);
    }

    #[test]
    fn split_is_zero_copy_and_covers_the_package() {
        let pkg = data(CHUNK_SIZE * 2 + 100, 7);
        let chunks: Vec<Bytes> = split(&pkg, CHUNK_SIZE).collect();
        assert_eq!(chunks.iter().map(Bytes::len).collect::<Vec<_>>(), vec![CHUNK_SIZE, CHUNK_SIZE, 100]);
        assert_eq!(split(&pkg, CHUNK_SIZE).len(), 3);
        assert_eq!(chunk_count(pkg.len(), CHUNK_SIZE), 3);
        // Zero-copy: each chunk points into the package buffer.
        let mut off = 0;
        for c in &chunks {
            assert_eq!(c.as_ptr(), pkg[off..].as_ptr());
            off += c.len();
        }
        assert_eq!(chunks.concat(), pkg.to_vec());
        assert_eq!(split(&Bytes::new(), 10).count(), 0);
        assert_eq!(split(&Bytes::from_static(b"abc"), 0).count(), 3);
        assert_eq!(split(&Bytes::from_static(b"abcd"), 2).count(), 2);
    }

    #[test]
    fn plan_indexed_with_parent_heartbeats() {
        let pkg = data(CHUNK_SIZE + 2000, 1);
        let plan = ChunkPlan::new(&pkg, CHUNK_SIZE, Some("sess1"), Some(3));
        assert_eq!(plan.key(), "sess1");
        assert!(plan.heartbeat());
        assert_eq!(plan.mode(), UploadMode::Indexed);
        assert_eq!(plan.max_in_flight(), MAX_CONCURRENT_SETS);
        let create = plan.create_call();
        assert_eq!(create.method, "message_cache.create");
        assert_eq!(create.method_path(), "services.built-in.message_cache.create");
        assert_eq!(create.args, vec![Value::from("sess1"), Value::Bool(true)]);
        let sets: Vec<CacheCall> = plan.chunk_calls().collect();
        assert_eq!(sets.len(), 2);
        assert_eq!(sets[1].method, METHOD_SET);
        assert_eq!(
            sets[1].args,
            vec![
                Value::from("sess1"),
                Value::Int(1),
                Value::Bytes(pkg.slice(CHUNK_SIZE..)),
                Value::Bool(true)
            ]
        );
        assert_eq!(plan.process_call().args, vec![Value::from("sess1"), Value::Bool(true)]);
        assert_eq!(plan.process_call().method, METHOD_PROCESS);
        assert_eq!(plan.remove_call(), CacheCall { method: METHOD_REMOVE, args: vec![Value::from("sess1")] });
        assert!(plan.chunk_call(2).is_none());
    }

    #[test]
    fn plan_legacy_without_parent_uses_random_key() {
        let pkg = data(1000, 2);
        for parent in [None, Some("")] {
            let plan = ChunkPlan::new(&pkg, 300, parent, Some(2));
            assert!(!plan.heartbeat());
            assert_eq!(plan.key().len(), crate::ids::RANDOM_ID_LEN);
            assert_eq!(plan.mode(), UploadMode::Append);
            assert_eq!(plan.max_in_flight(), 1);
            let calls: Vec<CacheCall> = plan.chunk_calls().collect();
            assert_eq!(calls.len(), 4);
            assert!(calls.iter().all(|c| c.method == METHOD_APPEND && c.args.len() == 3));
            assert_eq!(calls[3].args[1], Value::Bytes(pkg.slice(900..)));
            assert_eq!(calls[3].args[2], Value::Bool(false));
        }
        assert_eq!(UploadMode::for_api_version(None), UploadMode::Append);
        assert_eq!(UploadMode::for_api_version(Some(4)), UploadMode::Indexed);
        assert_ne!(ChunkPlan::new(&pkg, 300, None, None).key(), ChunkPlan::new(&pkg, 300, None, None).key());
    }

    #[test]
    fn plan_round_trips_through_reassembler_via_values() {
        let pkg = data(5 * CHUNK_SIZE + 17, 3);
        for api in [Some(3), None] {
            let plan = ChunkPlan::new(&pkg, CHUNK_SIZE, None, api);
            let mut r = Reassembler::default();
            let now = t0();
            r.create(now, plan.key(), false).unwrap();
            // Run calls in reverse for the indexed path (any order is legal there).
            let mut calls: Vec<CacheCall> = plan.chunk_calls().collect();
            if plan.mode() == UploadMode::Indexed {
                calls.reverse();
            }
            for c in calls {
                let key = c.args[0].as_str().unwrap();
                match c.method {
                    METHOD_SET => {
                        let i = chunk_index_from_value(&c.args[1]).unwrap();
                        r.set(now, key, i, chunk_data_from_value(&c.args[2]).unwrap()).unwrap();
                    }
                    METHOD_APPEND => r.append(now, key, chunk_data_from_value(&c.args[1]).unwrap()).unwrap(),
                    m => panic!("unexpected {m}"),
                }
            }
            assert_eq!(r.process(plan.key()).unwrap(), pkg);
            assert!(r.is_empty());
            assert_eq!(r.total_bytes(), 0);
        }
    }

    // ----- receiver errors, one per variant -----

    #[test]
    fn duplicate_create() {
        let mut r = Reassembler::default();
        let now = t0();
        r.create(now, "k", false).unwrap();
        r.set(now, "k", 0, data(10, 0)).unwrap();
        let e = r.create(now, "k", false).unwrap_err();
        assert_eq!(e, ChunkError::AlreadyExists("k".into()));
        assert_eq!(e.to_string(), "Message with the same key (k) already exists");
        // overwrite resets the entry and releases its bytes
        r.create(now, "k", true).unwrap();
        assert_eq!(
            r.process("k").unwrap_err(),
            ChunkError::MissingChunk { key: "k".into(), index: 0, count: 0 }
        );
        assert_eq!(r.total_bytes(), 0);
    }

    #[test]
    fn unknown_key_everywhere() {
        let mut r = Reassembler::default();
        let now = t0();
        let unk = ChunkError::UnknownKey("nope".into());
        assert_eq!(r.set(now, "nope", 0, data(1, 0)).unwrap_err(), unk);
        assert_eq!(r.set(now, "nope", u64::MAX, data(1, 0)).unwrap_err(), unk);
        assert_eq!(r.append(now, "nope", data(1, 0)).unwrap_err(), unk);
        assert_eq!(r.process("nope").unwrap_err(), unk);
        assert_eq!(r.remove("nope").unwrap_err(), unk);
        r.create(now, "k", false).unwrap();
        r.remove("k").unwrap();
        assert_eq!(r.remove("k").unwrap_err(), ChunkError::UnknownKey("k".into()));
        assert_eq!(r.total_bytes(), 0);
    }

    #[test]
    fn duplicate_index_is_an_error_and_keeps_the_first() {
        let mut r = Reassembler::default();
        let now = t0();
        r.create(now, "k", false).unwrap();
        r.set(now, "k", 0, Bytes::from_static(b"ab")).unwrap();
        let before = r.total_bytes();
        for dup in [Bytes::from_static(b"ab"), Bytes::from_static(b"XY")] {
            assert_eq!(
                r.set(now, "k", 0, dup).unwrap_err(),
                ChunkError::DuplicateIndex { key: "k".into(), index: 0 }
            );
        }
        assert_eq!(r.total_bytes(), before);
        r.append(now, "k", Bytes::from_static(b"cd")).unwrap();
        assert_eq!(r.process("k").unwrap(), Bytes::from_static(b"abcd"));
    }

    #[test]
    fn index_limits() {
        let mut r = Reassembler::new(ChunkLimits { max_chunks: 4, ..Default::default() });
        let now = t0();
        r.create(now, "k", false).unwrap();
        r.set(now, "k", 3, data(1, 0)).unwrap();
        assert_eq!(
            r.set(now, "k", 4, data(1, 0)).unwrap_err(),
            ChunkError::IndexOutOfRange { key: "k".into(), index: 4, max: 3 }
        );
        assert!(matches!(r.set(now, "k", u64::MAX, data(1, 0)), Err(ChunkError::IndexOutOfRange { .. })));
        // append after index 3 would be index 4
        assert!(matches!(r.append(now, "k", data(1, 0)), Err(ChunkError::IndexOutOfRange { index: 4, .. })));
        assert_eq!(
            chunk_index_from_value(&Value::Int(-1)).unwrap_err(),
            ChunkError::InvalidIndex("-1".into())
        );
        assert_eq!(
            chunk_index_from_value(&Value::from("1")).unwrap_err(),
            ChunkError::InvalidIndex("str".into())
        );
        assert_eq!(chunk_index_from_value(&Value::UInt(u64::MAX)).unwrap(), u64::MAX);
        assert_eq!(chunk_index_from_value(&Value::Int(7)).unwrap(), 7);
    }

    #[test]
    fn missing_chunk_reports_lowest_gap_and_drops_entry() {
        let mut r = Reassembler::default();
        let now = t0();
        r.create(now, "k", false).unwrap();
        for i in [0u64, 1, 3, 5] {
            r.set(now, "k", i, data(4, i as u8)).unwrap();
        }
        assert_eq!(
            r.process("k").unwrap_err(),
            ChunkError::MissingChunk { key: "k".into(), index: 2, count: 6 }
        );
        assert!(!r.contains("k"));
        assert_eq!(r.total_bytes(), 0);
        r.create(now, "k", false).unwrap();
        r.set(now, "k", 1, data(4, 0)).unwrap();
        assert!(matches!(r.process("k"), Err(ChunkError::MissingChunk { index: 0, count: 2, .. })));
    }

    #[test]
    fn message_and_total_size_limits() {
        let limits = ChunkLimits {
            max_message_bytes: 100,
            max_total_bytes: 2 * (ENTRY_OVERHEAD + 1) + 150 + 3 * CHUNK_OVERHEAD,
            ..Default::default()
        };
        let mut r = Reassembler::new(limits);
        let now = t0();
        r.create(now, "a", false).unwrap();
        r.set(now, "a", 0, data(60, 0)).unwrap();
        assert_eq!(
            r.set(now, "a", 1, data(41, 0)).unwrap_err(),
            ChunkError::MessageTooLarge { key: "a".into(), size: 101, max: 100 }
        );
        r.set(now, "a", 1, data(40, 0)).unwrap();
        r.create(now, "b", false).unwrap();
        r.append(now, "b", data(50, 0)).unwrap();
        assert!(matches!(r.append(now, "b", data(1, 0)), Err(ChunkError::CacheFull { .. })));
        r.check_invariants().unwrap();
        assert_eq!(r.process("a").unwrap().len(), 100);
        r.append(now, "b", data(50, 0)).unwrap();
        r.check_invariants().unwrap();
    }

    #[test]
    fn chunk_and_key_size_limits() {
        let mut r = Reassembler::default();
        let now = t0();
        r.create(now, "k", false).unwrap();
        let max = 2 * CHUNK_SIZE;
        assert_eq!(
            r.set(now, "k", 0, Bytes::from(vec![0; max + 1])).unwrap_err(),
            ChunkError::ChunkTooLarge { len: max + 1, max }
        );
        r.set(now, "k", 0, Bytes::from(vec![0; max])).unwrap();
        let long = "x".repeat(257);
        assert_eq!(r.create(now, &long, false).unwrap_err(), ChunkError::KeyTooLong { len: 257, max: 256 });
    }

    #[test]
    fn not_bytes() {
        assert_eq!(chunk_data_from_value(&Value::from("abc")).unwrap_err(), ChunkError::NotBytes("str"));
        assert_eq!(
            chunk_data_from_value(&Value::MemoryView(Bytes::new())).unwrap_err(),
            ChunkError::NotBytes("memoryview")
        );
        assert_eq!(chunk_data_from_value(&Value::Bytes(Bytes::from_static(b"x"))).unwrap(), &b"x"[..]);
    }

    #[test]
    fn too_many_entries_even_under_10k_creates() {
        let mut r = Reassembler::default();
        let now = t0();
        let mut refused = 0;
        for i in 0..10_000 {
            match r.create(now, &format!("key-{i}"), false) {
                Ok(()) => {}
                Err(ChunkError::TooManyEntries { max: 256 }) => refused += 1,
                Err(e) => panic!("unexpected {e}"),
            }
        }
        assert_eq!(r.len(), 256);
        assert_eq!(refused, 10_000 - 256);
        r.check_invariants().unwrap();
        // overwrite of an open key is still allowed at the cap
        r.create(now, "key-0", true).unwrap();
        assert_eq!(r.len(), 256);
    }

    #[test]
    fn small_waiting_chunks_are_copied_large_ones_are_not() {
        let mut r = Reassembler::default();
        let now = t0();
        let frame = data(2 * CHUNK_SIZE + 100, 9);
        r.create(now, "k", false).unwrap();
        // Chunk 0 is late, so 1 and 2 wait as separate chunks.
        r.set(now, "k", 1, frame.slice(CHUNK_SIZE..2 * CHUNK_SIZE)).unwrap();
        r.set(now, "k", 2, frame.slice(2 * CHUNK_SIZE..)).unwrap();
        let e = r.entries.get("k").unwrap();
        assert_eq!(e.chunks[&1].as_ptr(), frame[CHUNK_SIZE..].as_ptr());
        assert_ne!(e.chunks[&2].as_ptr(), frame[2 * CHUNK_SIZE..].as_ptr());
        r.set(now, "k", 0, frame.slice(0..CHUNK_SIZE)).unwrap();
        assert_eq!(r.entries["k"].separate_bytes(), 0);
        assert_eq!(r.process("k").unwrap(), frame);
    }

    // ----- incremental reassembly -----

    /// Sets `indices` of `pkg` cut into `chunk_size` pieces, checking the invariants and
    /// returning (prefix chunks, bytes held separately) after each.
    fn set_each(
        r: &mut Reassembler,
        pkg: &Bytes,
        chunk_size: usize,
        indices: &[usize],
    ) -> Vec<(usize, usize)> {
        let chunks: Vec<Bytes> = split(pkg, chunk_size).collect();
        let now = t0();
        indices
            .iter()
            .map(|&i| {
                r.set(now, "k", i as u64, chunks[i].clone()).unwrap();
                r.check_invariants().unwrap();
                let e = &r.entries["k"];
                (e.prefix_chunks, e.separate_bytes())
            })
            .collect()
    }

    #[test]
    fn in_order_chunks_are_copied_as_they_arrive() {
        let pkg = data(9 * CHUNK_SIZE + 5, 4);
        let mut r = Reassembler::default();
        r.create(t0(), "k", false).unwrap();
        let steps = set_each(&mut r, &pkg, CHUNK_SIZE, &(0..10).collect::<Vec<_>>());
        // A lone chunk 0 waits (it may be the whole package); from the second chunk on,
        // nothing is held separately.
        assert_eq!(steps[0], (0, CHUNK_SIZE));
        for (i, step) in steps.iter().enumerate().skip(1) {
            assert_eq!(*step, (i + 1, 0), "after chunk {i}");
        }
        let total = r.total_bytes();
        assert_eq!(total, ENTRY_OVERHEAD + 1 + pkg.len() + 10 * CHUNK_OVERHEAD);
        let out = r.process("k").unwrap();
        assert_eq!(out, pkg);
        assert_eq!(r.total_bytes(), 0);
        // Zero-copy slices of the result outlive it.
        let tail = out.slice(pkg.len() - 5..);
        drop(out);
        assert_eq!(tail, pkg.slice(pkg.len() - 5..));
    }

    #[test]
    fn out_of_order_chunks_wait_until_the_gap_fills() {
        let cs = 1000;
        let pkg = data(6 * cs, 5);
        let mut r = Reassembler::default();
        r.create(t0(), "k", false).unwrap();
        let steps = set_each(&mut r, &pkg, cs, &[3, 1, 0, 2, 5, 4]);
        assert_eq!(
            steps,
            vec![
                (0, cs),     // 3 waits
                (0, 2 * cs), // 1 waits: no chunk 0 yet
                (2, cs),     // 0 arrives: 0 and 1 copied, 3 waits
                (4, 0),      // 2 fills the gap: 2 and 3 copied
                (4, cs),     // 5 waits for 4
                (6, 0),      // 4 completes it
            ]
        );
        assert_eq!(r.process("k").unwrap(), pkg);
    }

    #[test]
    fn lone_chunk_zero_is_copied_when_a_later_chunk_comes() {
        let cs = 1000;
        let pkg = data(3 * cs, 6);
        let mut r = Reassembler::default();
        r.create(t0(), "k", false).unwrap();
        assert_eq!(set_each(&mut r, &pkg, cs, &[0, 2, 1]), vec![(0, cs), (1, cs), (3, 0)]);
        assert_eq!(r.process("k").unwrap(), pkg);
    }

    #[test]
    fn duplicate_of_a_copied_index_is_refused() {
        let pkg = data(3 * CHUNK_SIZE, 7);
        let chunks: Vec<Bytes> = split(&pkg, CHUNK_SIZE).collect();
        let mut r = Reassembler::default();
        let now = t0();
        r.create(now, "k", false).unwrap();
        set_each(&mut r, &pkg, CHUNK_SIZE, &[0, 1]);
        let before = r.total_bytes();
        for i in [0u64, 1] {
            assert_eq!(
                r.set(now, "k", i, Bytes::from(vec![0xEE; CHUNK_SIZE])).unwrap_err(),
                ChunkError::DuplicateIndex { key: "k".into(), index: i as usize }
            );
        }
        assert_eq!(r.total_bytes(), before);
        r.check_invariants().unwrap();
        // append continues after the prefix
        r.append(now, "k", chunks[2].clone()).unwrap();
        assert_eq!(r.process("k").unwrap(), pkg);
    }

    #[test]
    fn missing_chunk_after_a_copied_prefix() {
        let cs = 100;
        let pkg = data(6 * cs, 8);
        let mut r = Reassembler::default();
        r.create(t0(), "k", false).unwrap();
        assert_eq!(set_each(&mut r, &pkg, cs, &[0, 1, 2, 4, 5]).last(), Some(&(3, 2 * cs)));
        assert_eq!(
            r.process("k").unwrap_err(),
            ChunkError::MissingChunk { key: "k".into(), index: 3, count: 6 }
        );
        assert!(r.is_empty() && r.total_bytes() == 0);
    }

    #[test]
    fn single_chunk_is_handed_over_without_a_copy() {
        for len in [CHUNK_SIZE / 2, CHUNK_SIZE, 2 * CHUNK_SIZE] {
            let chunk = data(len, 9);
            let mut r = Reassembler::default();
            let now = t0();
            r.create(now, "k", false).unwrap();
            r.set(now, "k", 0, chunk.clone()).unwrap();
            assert_eq!(r.entries["k"].prefix.capacity(), 0, "no buffer for a lone chunk");
            let out = r.process("k").unwrap();
            assert_eq!(out.as_ptr(), chunk.as_ptr());
            assert_eq!(out.len(), len);
        }
        // The same through append.
        let chunk = data(CHUNK_SIZE, 1);
        let mut r = Reassembler::default();
        r.create(t0(), "k", false).unwrap();
        r.append(t0(), "k", chunk.clone()).unwrap();
        assert_eq!(r.process("k").unwrap().as_ptr(), chunk.as_ptr());
    }

    #[test]
    fn append_mode_assigns_indices_by_arrival_and_copies_incrementally() {
        let pkg = data(5 * CHUNK_SIZE + 77, 3);
        let mut r = Reassembler::default();
        let now = t0();
        r.create(now, "k", false).unwrap();
        for (i, chunk) in split(&pkg, CHUNK_SIZE).enumerate() {
            r.append(now, "k", chunk).unwrap();
            r.check_invariants().unwrap();
            let e = &r.entries["k"];
            assert_eq!(e.next_append_index(), i + 1);
            assert_eq!(e.separate_bytes(), if i == 0 { CHUNK_SIZE } else { 0 });
        }
        assert_eq!(r.process("k").unwrap(), pkg);
        // After an indexed set ahead of a gap, append goes after the highest index.
        r.create(now, "k", false).unwrap();
        r.append(now, "k", data(10, 0)).unwrap();
        r.set(now, "k", 3, data(10, 3)).unwrap();
        r.append(now, "k", data(10, 4)).unwrap();
        assert_eq!(r.entries["k"].next_append_index(), 5);
        assert!(matches!(r.process("k"), Err(ChunkError::MissingChunk { index: 1, count: 5, .. })));
    }

    #[test]
    fn out_of_memory_error_text() {
        let e = ChunkError::OutOfMemory { key: "k".into(), size: 1 << 30 };
        assert_eq!(e.to_string(), "Out of memory reassembling message k: could not reserve 1073741824 bytes");
    }

    // ----- eviction -----

    #[test]
    fn idle_entries_expire_by_now() {
        let ttl = Duration::from_secs(300);
        let mut r = Reassembler::default();
        let start = t0();
        r.create(start, "old", false).unwrap();
        r.create(start, "busy", false).unwrap();
        assert_eq!(r.next_expiry(), Some(start + ttl));
        r.set(start + Duration::from_secs(200), "busy", 0, data(10, 0)).unwrap();
        assert_eq!(r.evict_expired(start + ttl - Duration::from_millis(1)), 0);
        assert_eq!(r.evict_expired(start + ttl), 1);
        assert!(!r.contains("old") && r.contains("busy"));
        assert_eq!(r.next_expiry(), Some(start + Duration::from_secs(200) + ttl));
        // create evicts too, which frees a slot at the entry cap
        let mut small = Reassembler::new(ChunkLimits { max_entries: 1, ..Default::default() });
        small.create(start, "a", false).unwrap();
        assert_eq!(small.create(start, "b", false).unwrap_err(), ChunkError::TooManyEntries { max: 1 });
        small.create(start + ttl, "b", false).unwrap();
        assert!(!small.contains("a"));
        assert_eq!(
            small.set(start + ttl, "a", 0, data(1, 0)).unwrap_err(),
            ChunkError::UnknownKey("a".into())
        );
        small.check_invariants().unwrap();
        r.check_invariants().unwrap();
    }

    #[test]
    fn fuzz_parser_is_total_and_apply_keeps_invariants() {
        let mut seed = 0x1234_5678_9abc_def0u64;
        let mut r = Reassembler::new(ChunkLimits {
            max_total_bytes: 200_000,
            max_message_bytes: 100_000,
            max_entries: 4,
            max_chunks: 64,
            ..Default::default()
        });
        let mut now = t0();
        let mut ok_processes = 0;
        for _ in 0..200 {
            let bytes: Vec<u8> = (0..256)
                .map(|_| {
                    seed ^= seed << 13;
                    seed ^= seed >> 7;
                    seed ^= seed << 17;
                    (seed >> 24) as u8
                })
                .collect();
            for op in ReassemblerOp::parse_all(&bytes) {
                if let ReassemblerOp::Advance(d) = op {
                    now += d;
                }
                if let Ok(Some(_)) = r.apply(now, op) {
                    ok_processes += 1;
                }
                r.check_invariants().unwrap();
            }
        }
        assert!(ok_processes > 0, "the op mix should sometimes complete a message");
        assert!(ReassemblerOp::parse_all(&[]).is_empty());
        assert_eq!(
            ReassemblerOp::parse_all(&[1, 9, 0xff, 0, 0, 0, 0, 0, 0, 0, 9, 2, 0, 7]),
            vec![ReassemblerOp::Set { key: "k1".into(), index: 9, data: Bytes::from(vec![7; 2]) }]
        );
    }

    // ----- reference model -----

    /// The reassembler as specified, with no concern for how bytes are stored: chunks kept
    /// by index and concatenated at `process`. The real one must agree with it on every
    /// operation's outcome and on the accounting.
    struct Model {
        limits: ChunkLimits,
        /// key -> (chunks, charged, last touch)
        entries: HashMap<String, (BTreeMap<usize, Bytes>, usize, Instant)>,
        total: usize,
    }

    impl Model {
        fn new(limits: ChunkLimits) -> Self {
            Model { limits, entries: HashMap::new(), total: 0 }
        }

        fn evict(&mut self, now: Instant) {
            let ttl = self.limits.entry_ttl;
            let total = &mut self.total;
            self.entries.retain(|_, (_, charged, touch)| {
                let keep = now.saturating_duration_since(*touch) < ttl;
                if !keep {
                    *total -= *charged;
                }
                keep
            });
        }

        fn apply(&mut self, now: Instant, op: ReassemblerOp) -> Result<Option<Bytes>, ChunkError> {
            let l = self.limits.clone();
            let unknown = |k: &str| ChunkError::UnknownKey(k.to_owned());
            match op {
                ReassemblerOp::Create { key, overwrite } => {
                    self.evict(now);
                    if key.len() > l.max_key_len {
                        return Err(ChunkError::KeyTooLong { len: key.len(), max: l.max_key_len });
                    }
                    let replaced = match self.entries.get(&key) {
                        Some(_) if !overwrite => return Err(ChunkError::AlreadyExists(key)),
                        Some(old) => old.1,
                        None if self.entries.len() >= l.max_entries => {
                            return Err(ChunkError::TooManyEntries { max: l.max_entries })
                        }
                        None => 0,
                    };
                    let charged = ENTRY_OVERHEAD + key.len();
                    let needed = self.total - replaced + charged;
                    if needed > l.max_total_bytes {
                        return Err(ChunkError::CacheFull { needed, max: l.max_total_bytes });
                    }
                    self.total = needed;
                    self.entries.insert(key, (BTreeMap::new(), charged, now));
                    Ok(None)
                }
                ReassemblerOp::Set { key, index, data } => {
                    if !self.entries.contains_key(&key) {
                        return Err(unknown(&key));
                    }
                    match usize::try_from(index) {
                        Ok(i) if i < l.max_chunks => self.store(now, key, Some(i), data).map(|()| None),
                        _ => Err(ChunkError::IndexOutOfRange { key, index, max: l.max_chunks - 1 }),
                    }
                }
                ReassemblerOp::Append { key, data } => self.store(now, key, None, data).map(|()| None),
                ReassemblerOp::Process { key } => {
                    let (chunks, charged, _) = self.entries.remove(&key).ok_or_else(|| unknown(&key))?;
                    self.total -= charged;
                    let count = chunks.keys().next_back().map_or(0, |i| i + 1);
                    if let Some(index) = (0..count).find(|i| !chunks.contains_key(i)) {
                        return Err(ChunkError::MissingChunk { key, index, count });
                    }
                    if count == 0 {
                        return Err(ChunkError::MissingChunk { key, index: 0, count: 0 });
                    }
                    Ok(Some(chunks.values().flat_map(|c| c.iter().copied()).collect::<Vec<u8>>().into()))
                }
                ReassemblerOp::Remove { key } => {
                    let (_, charged, _) = self.entries.remove(&key).ok_or_else(|| unknown(&key))?;
                    self.total -= charged;
                    Ok(None)
                }
                ReassemblerOp::Advance(_) => {
                    self.evict(now);
                    Ok(None)
                }
            }
        }

        fn store(
            &mut self,
            now: Instant,
            key: String,
            index: Option<usize>,
            data: Bytes,
        ) -> Result<(), ChunkError> {
            let l = &self.limits;
            let (chunks, charged, touch) =
                self.entries.get_mut(&key).ok_or(ChunkError::UnknownKey(key.clone()))?;
            if data.len() > l.max_chunk_bytes {
                return Err(ChunkError::ChunkTooLarge { len: data.len(), max: l.max_chunk_bytes });
            }
            let index = index.unwrap_or_else(|| chunks.keys().next_back().map_or(0, |i| i + 1));
            if index >= l.max_chunks {
                return Err(ChunkError::IndexOutOfRange { key, index: index as u64, max: l.max_chunks - 1 });
            }
            if chunks.contains_key(&index) {
                return Err(ChunkError::DuplicateIndex { key, index });
            }
            let size = chunks.values().map(Bytes::len).sum::<usize>() + data.len();
            if size > l.max_message_bytes {
                return Err(ChunkError::MessageTooLarge { key, size, max: l.max_message_bytes });
            }
            let needed = self.total + data.len() + CHUNK_OVERHEAD;
            if needed > l.max_total_bytes {
                return Err(ChunkError::CacheFull { needed, max: l.max_total_bytes });
            }
            *charged += data.len() + CHUNK_OVERHEAD;
            *touch = now;
            chunks.insert(index, data);
            self.total = needed;
            Ok(())
        }
    }

    /// Operations over two keys and few indices, mostly chunk stores, so that entries
    /// often complete in and out of order and the limits are reached.
    fn model_op() -> impl Strategy<Value = ReassemblerOp> {
        (0u8..12, 0u8..2, 0u64..7, 0usize..50, any::<u8>()).prop_map(|(tag, k, index, len, fill)| {
            let key = format!("k{k}");
            let data = Bytes::from(vec![fill; len]);
            match tag {
                0 => ReassemblerOp::Create { key, overwrite: fill & 1 == 1 },
                1..=6 => ReassemblerOp::Set { key, index, data },
                7 | 8 => ReassemblerOp::Append { key, data },
                9 => ReassemblerOp::Process { key },
                10 => ReassemblerOp::Remove { key },
                _ => ReassemblerOp::Advance(Duration::from_secs(index * 60)),
            }
        })
    }

    // ----- properties -----

    /// Deterministic Fisher-Yates from a seed (keeps large cases cheap to generate).
    fn shuffled(n: usize, mut seed: u64) -> Vec<usize> {
        let mut v: Vec<usize> = (0..n).collect();
        for i in (1..n).rev() {
            seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            let j = ((seed >> 33) as usize) % (i + 1);
            v.swap(i, j);
        }
        v
    }

    fn roundtrip(pkg: &Bytes, chunk_size: usize, order: &[usize]) -> Result<Bytes, ChunkError> {
        let chunks: Vec<Bytes> = split(pkg, chunk_size).collect();
        let mut r = Reassembler::default();
        let now = t0();
        r.create(now, "key", false)?;
        for &i in order {
            r.set(now, "key", i as u64, chunks[i].clone())?;
        }
        let out = r.process("key");
        assert!(r.is_empty() && r.total_bytes() == 0);
        out
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(24))]

        #[test]
        fn shuffled_sets_reassemble_large(
            len in 1usize..3_000_000,
            chunk_size in 1024usize..=2 * CHUNK_SIZE,
            fill in any::<u8>(),
            seed in any::<u64>(),
        ) {
            let pkg = data(len, fill);
            let n = chunk_count(len, chunk_size);
            prop_assert_eq!(roundtrip(&pkg, chunk_size, &shuffled(n, seed)).unwrap(), pkg);
        }
    }

    proptest! {
        #[test]
        fn shuffled_sets_reassemble_small(
            pkg in proptest::collection::vec(any::<u8>(), 1..2000),
            chunk_size in 1usize..300,
            seed in any::<u64>(),
        ) {
            let pkg = Bytes::from(pkg);
            let n = chunk_count(pkg.len(), chunk_size);
            prop_assert_eq!(roundtrip(&pkg, chunk_size, &shuffled(n, seed)).unwrap(), pkg);
        }

        #[test]
        fn dropped_chunk_is_reported(
            len in 2usize..5000,
            chunk_size in 1usize..500,
            seed in any::<u64>(),
            drop_pick in any::<usize>(),
        ) {
            let pkg = data(len, 1);
            let n = chunk_count(len, chunk_size);
            prop_assume!(n >= 2);
            // Drop one chunk that is not the last (dropping the last one is undetectable
            // by design: the count is implied by the highest index).
            let dropped = drop_pick % (n - 1);
            let order: Vec<usize> = shuffled(n, seed).into_iter().filter(|&i| i != dropped).collect();
            match roundtrip(&pkg, chunk_size, &order) {
                Err(ChunkError::MissingChunk { index, count, .. }) => {
                    prop_assert_eq!(index, dropped);
                    prop_assert_eq!(count, n);
                }
                other => prop_assert!(false, "expected MissingChunk, got {:?}", other),
            }
        }

        #[test]
        fn duplicated_chunk_is_refused_and_harmless(
            len in 1usize..5000,
            chunk_size in 1usize..500,
            seed in any::<u64>(),
            dup_pick in any::<usize>(),
            dup_at in any::<usize>(),
        ) {
            let pkg = data(len, 2);
            let chunks: Vec<Bytes> = split(&pkg, chunk_size).collect();
            let n = chunks.len();
            let mut order = shuffled(n, seed);
            let dup = dup_pick % n;
            // Insert the duplicate after the original.
            let first = order.iter().position(|&i| i == dup).unwrap();
            let at = first + 1 + dup_at % (n - first);
            order.insert(at, dup);
            let mut r = Reassembler::default();
            let now = t0();
            r.create(now, "k", false).unwrap();
            let mut dups = 0;
            for &i in &order {
                // The replayed copy carries different bytes: it must not win.
                let payload = if dups == 0 && i == dup && r.entries["k"].holds(i) {
                    Bytes::from(vec![0xEE; chunks[i].len()])
                } else {
                    chunks[i].clone()
                };
                match r.set(now, "k", i as u64, payload) {
                    Ok(()) => {}
                    Err(ChunkError::DuplicateIndex { index, .. }) => { prop_assert_eq!(index, dup); dups += 1; }
                    Err(e) => prop_assert!(false, "unexpected {}", e),
                }
            }
            prop_assert_eq!(dups, 1);
            prop_assert_eq!(r.process("k").unwrap(), pkg);
        }

        #[test]
        fn reassembler_agrees_with_the_reference_model(
            ops in proptest::collection::vec(model_op(), 0..300),
            in_order in any::<bool>(),
        ) {
            let limits = ChunkLimits {
                max_total_bytes: 2 * ENTRY_OVERHEAD + 4 + 8 * CHUNK_OVERHEAD + 200,
                max_message_bytes: 150,
                max_chunk_bytes: 45,
                max_chunks: 6,
                copy_chunks_below: 10,
                ..Default::default()
            };
            let mut real = Reassembler::new(limits.clone());
            let mut model = Model::new(limits);
            let mut now = t0();
            let mut next_index = [0u64; 2];
            for mut op in ops {
                // Half the runs send indices in order per key, the way a real upload mostly
                // arrives, so long prefixes form; the others keep the random indices.
                if let (true, ReassemblerOp::Set { key, index, .. }) = (in_order, &mut op) {
                    let k = usize::from(key.ends_with('1'));
                    *index = next_index[k];
                    next_index[k] = (next_index[k] + 1) % 7;
                }
                if let ReassemblerOp::Advance(d) = op { now += d; }
                let want = model.apply(now, op.clone());
                let got = real.apply(now, op.clone());
                prop_assert_eq!(&got, &want, "{:?}", op);
                prop_assert_eq!(real.total_bytes(), model.total);
                prop_assert_eq!(real.len(), model.entries.len());
                prop_assert!(real.check_invariants().is_ok(), "{:?}", real.check_invariants());
            }
        }

        #[test]
        fn arbitrary_op_sequences_respect_limits(ops in proptest::collection::vec(any::<u8>(), 0..4096)) {
            let mut r = Reassembler::new(ChunkLimits {
                max_total_bytes: 300_000,
                max_message_bytes: 120_000,
                max_entries: 5,
                max_chunks: 100,
                ..Default::default()
            });
            let mut now = t0();
            for op in ReassemblerOp::parse_all(&ops) {
                if let ReassemblerOp::Advance(d) = op { now += d; }
                let _ = r.apply(now, op);
                prop_assert!(r.check_invariants().is_ok(), "{:?}", r.check_invariants());
            }
        }
    }
}
