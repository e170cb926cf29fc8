//! Fuzzing of every decoder that reads bytes another process wrote: the transport's frame header
//! and the receive path behind it, the rendezvous store's requests (server side) and responses
//! (client side), the job-secret handshake (both sides), the shared-memory inbox description, the
//! flight record file the launcher reads and the launcher's control lines. The inputs are arbitrary
//! bytes and valid messages with a few mutations (bit flips, cut or inserted bytes, a length field
//! set to the edge of a limit), fed through the public path: a real socket, a real store server.
//!
//! What is checked, case by case: no panic, in the test's thread or in the server's; a bad input is
//! refused with an error, promptly (long before any deadline), and the server keeps serving a
//! well-behaved client; no allocation beyond the configured limits. For the last, a counting
//! allocator records the largest single allocation: a decoder that sized a buffer from a hostile
//! length would be caught even though the kernel grants such (lazily zeroed) memory without a fault.

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Once};
use std::time::{Duration, Instant};

use burnrun::auth::{client_handshake, server_handshake, AuthError, Channel, JobSecret, MAGIC};
use burnrun::flight;
use burnrun::names::{ControlLine, CONTROL_PREFIX};
use burnrun::rendezvous::{Store, StoreError, TcpStore, TcpStoreServer, MAX_KEY_BYTES, MAX_VALUE_BYTES, MAX_WAIT_KEYS};
use burnrun::transport::{
    DataListener, FrameHeader, Inbox, Mesh, Op, Pair, Reduction, ShmLink, Tag, TransportError, HEADER_BYTES,
    MAX_FRAME_BYTES, MIN_SHM_RING_BYTES,
};
use proptest::prelude::*;
use proptest::sample::Index;
use proptest::test_runner::{TestCaseResult, TestRunner};

#[global_allocator]
static ALLOCATOR: allocations::Watch = allocations::Watch;

/// Records the largest single allocation: per thread while that thread measures itself
/// ([`allocations::measure`]), and over every other thread (the store server's included).
mod allocations {
    use std::alloc::{GlobalAlloc, Layout, System};
    use std::cell::Cell;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// The system allocator, noting the size of every request.
    pub(crate) struct Watch;

    static LARGEST_UNMEASURED: AtomicUsize = AtomicUsize::new(0);

    thread_local! {
        /// `Some(largest so far)` while this thread measures its own allocations.
        static OWN: Cell<Option<usize>> = const { Cell::new(None) };
    }

    fn note(bytes: usize) {
        // A const-initialised thread local without a destructor: reading it never allocates.
        let measured = OWN
            .try_with(|own| own.get().map(|largest| own.set(Some(largest.max(bytes)))))
            .ok()
            .flatten();
        if measured.is_none() {
            LARGEST_UNMEASURED.fetch_max(bytes, Ordering::Relaxed);
        }
    }

    // SAFETY: every call goes to `System` with the caller's arguments unchanged; `note` touches
    // only an atomic and a thread local, and allocates nothing.
    unsafe impl GlobalAlloc for Watch {
        unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
            note(layout.size());
            // SAFETY: forwarded with the caller's guarantees.
            unsafe { System.alloc(layout) }
        }

        unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
            note(layout.size());
            // SAFETY: forwarded with the caller's guarantees.
            unsafe { System.alloc_zeroed(layout) }
        }

        unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
            note(new_size);
            // SAFETY: forwarded with the caller's guarantees.
            unsafe { System.realloc(ptr, layout, new_size) }
        }

        unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
            // SAFETY: forwarded with the caller's guarantees.
            unsafe { System.dealloc(ptr, layout) }
        }
    }

    /// Runs `f` on this thread and returns its result with the largest allocation it made.
    pub(crate) fn measure<T>(f: impl FnOnce() -> T) -> (T, usize) {
        OWN.with(|own| own.set(Some(0)));
        let out = f();
        let largest = OWN.with(|own| own.replace(None)).unwrap_or(0);
        (out, largest)
    }

    /// The largest allocation so far of every thread that was not measuring itself.
    pub(crate) fn largest_unmeasured() -> usize {
        LARGEST_UNMEASURED.load(Ordering::Relaxed)
    }
}

/// Allowance for what a decoder allocates besides the buffer a length announced (error messages,
/// the reader's own structures): far below any hostile length under test.
const SLACK_BYTES: usize = 1 << 20;

/// How soon a bad input must be refused. Every one here ends in a bad field or in the end of the
/// stream, which the code under test sees at once; this leaves room for a loaded 2-core machine
/// and is still half the shortest deadline the code could otherwise wait out (10 s).
const PROMPTLY: Duration = Duration::from_secs(5);

/// Runs `test` on `cases` inputs drawn from `strategy`; no failure file is written anywhere.
fn check<S: Strategy>(cases: u32, strategy: S, test: impl Fn(S::Value) -> TestCaseResult) {
    let config = ProptestConfig {
        cases,
        failure_persistence: None,
        ..ProptestConfig::default()
    };
    if let Err(e) = TestRunner::new(config).run(&strategy, test) {
        panic!("{e}");
    }
}

fn bytes(max_len: usize) -> impl Strategy<Value = Vec<u8>> {
    prop::collection::vec(any::<u8>(), 0..max_len)
}

/// A few edits of a valid message, each at a position drawn over the bytes as they are then.
#[derive(Debug, Clone)]
enum Mutation {
    Flip {
        at: Index,
        bit: u8,
    },
    Set {
        at: Index,
        byte: u8,
    },
    /// Overwrites `width` bytes with a value at the edge of a limit (a length, a count, an index).
    Edge {
        at: Index,
        value: u64,
        width: usize,
    },
    Insert {
        at: Index,
        bytes: Vec<u8>,
    },
    Remove {
        at: Index,
        len: usize,
    },
    Truncate {
        at: Index,
    },
}

fn mutation(edges: &'static [u64]) -> impl Strategy<Value = Mutation> {
    prop_oneof![
        (any::<Index>(), 0u8..8).prop_map(|(at, bit)| Mutation::Flip { at, bit }),
        (any::<Index>(), any::<u8>()).prop_map(|(at, byte)| Mutation::Set { at, byte }),
        (
            any::<Index>(),
            prop::sample::select(edges),
            prop_oneof![Just(4usize), Just(8)]
        )
            .prop_map(|(at, value, width)| Mutation::Edge { at, value, width }),
        (any::<Index>(), prop::collection::vec(any::<u8>(), 1..16))
            .prop_map(|(at, bytes)| Mutation::Insert { at, bytes }),
        (any::<Index>(), 1usize..16).prop_map(|(at, len)| Mutation::Remove { at, len }),
        any::<Index>().prop_map(|at| Mutation::Truncate { at }),
    ]
}

fn mutations(edges: &'static [u64]) -> impl Strategy<Value = Vec<Mutation>> {
    prop::collection::vec(mutation(edges), 0..4)
}

fn mutate(mut bytes: Vec<u8>, mutations: &[Mutation]) -> Vec<u8> {
    for m in mutations {
        let len = bytes.len();
        match m {
            Mutation::Insert { at, bytes: extra } => {
                let i = at.index(len + 1);
                bytes.splice(i..i, extra.iter().copied());
            }
            _ if len == 0 => {}
            Mutation::Flip { at, bit } => bytes[at.index(len)] ^= 1 << bit,
            Mutation::Set { at, byte } => bytes[at.index(len)] = *byte,
            Mutation::Edge { at, value, width } => {
                let i = at.index(len);
                let end = (i + width).min(len);
                bytes[i..end].copy_from_slice(&value.to_le_bytes()[..end - i]);
            }
            Mutation::Remove { at, len: n } => {
                let i = at.index(len);
                bytes.drain(i..(i + n).min(len));
            }
            Mutation::Truncate { at } => bytes.truncate(at.index(len)),
        }
    }
    bytes
}

/// One listener for the connections of one test: `pair()` returns both ends of a fresh one.
struct Loopback(TcpListener);

impl Loopback {
    fn new() -> Self {
        Self(TcpListener::bind("127.0.0.1:0").unwrap())
    }

    fn addr(&self) -> SocketAddr {
        self.0.local_addr().unwrap()
    }

    /// (connecting end, accepted end).
    fn pair(&self) -> (TcpStream, TcpStream) {
        let client = TcpStream::connect(self.addr()).unwrap();
        let (server, _) = self.0.accept().unwrap();
        (client, server)
    }
}

/// Writes `bytes` (the peer may already have closed), ends the writing half, and returns what the
/// peer sent until it closed; `Err` if it still had not closed after `limit`.
fn send_and_wait_for_close(stream: &mut TcpStream, bytes: &[u8], limit: Duration) -> Result<Vec<u8>, String> {
    let _ = stream.write_all(bytes);
    let _ = stream.shutdown(Shutdown::Write);
    read_until_closed(stream, limit)
}

fn read_until_closed(stream: &mut TcpStream, limit: Duration) -> Result<Vec<u8>, String> {
    let start = Instant::now();
    let mut received = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let left = limit.saturating_sub(start.elapsed());
        if left.is_zero() {
            return Err(format!("the peer did not close the connection within {limit:?}"));
        }
        stream.set_read_timeout(Some(left)).unwrap();
        match stream.read(&mut buf) {
            Ok(0) => return Ok(received),
            Ok(n) => received.extend_from_slice(&buf[..n]),
            // Closed with bytes of ours unread: the kernel answers with a reset.
            Err(e) if e.kind() == ErrorKind::ConnectionReset => return Ok(received),
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(e) => return Err(format!("reading from the peer failed: {e}")),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Transport frames
// ---------------------------------------------------------------------------------------------

/// Lengths at the edges of the frame limit and of the integer widths. `MAX_FRAME_BYTES` itself
/// is left to the pure decoder property: through a socket it would make the receiver reserve
/// (lazily) a whole GiB for a stray frame, which is allowed but pointless here.
const FRAME_EDGES: &[u64] = &[
    0,
    1,
    8,
    32,
    MAX_FRAME_BYTES + 1,
    u32::MAX as u64,
    1 << 32,
    1 << 63,
    u64::MAX,
];

fn header_bytes(key: u64, step: u32, reserved: u32, fingerprint: u64, len: u64) -> [u8; HEADER_BYTES] {
    let mut out = [0u8; HEADER_BYTES];
    out[0..8].copy_from_slice(&key.to_le_bytes());
    out[8..12].copy_from_slice(&step.to_le_bytes());
    out[12..16].copy_from_slice(&reserved.to_le_bytes());
    out[16..24].copy_from_slice(&fingerprint.to_le_bytes());
    out[24..32].copy_from_slice(&len.to_le_bytes());
    out
}

#[test]
fn a_frame_header_decodes_exactly_when_its_reserved_field_is_zero_and_its_length_within_the_limit() {
    let structured = (
        any::<u64>(),
        any::<u32>(),
        prop_oneof![Just(0u32), any::<u32>()],
        any::<u64>(),
        prop_oneof![
            0..=MAX_FRAME_BYTES,
            MAX_FRAME_BYTES + 1..=u64::MAX,
            prop::sample::select(FRAME_EDGES),
            Just(MAX_FRAME_BYTES),
        ],
    )
        .prop_map(|(key, step, reserved, fingerprint, len)| header_bytes(key, step, reserved, fingerprint, len));
    check(20_000, prop_oneof![structured, any::<[u8; HEADER_BYTES]>()], |bytes| {
        let reserved = u32::from_le_bytes(bytes[12..16].try_into().unwrap());
        let len = u64::from_le_bytes(bytes[24..32].try_into().unwrap());
        match FrameHeader::decode(&bytes) {
            Ok(header) => {
                prop_assert!(reserved == 0 && len <= MAX_FRAME_BYTES);
                prop_assert_eq!(header.len, len);
                prop_assert_eq!(header.encode(), bytes);
            }
            Err(reason) => {
                prop_assert!(
                    reserved != 0 || len > MAX_FRAME_BYTES,
                    "refused a valid header: {}",
                    reason
                );
                prop_assert!(!reason.is_empty());
            }
        }
        Ok(())
    });
}

/// A mesh of two ranks seen from rank 0, whose pair with rank 1 is `stream`.
fn receiver(stream: TcpStream) -> Mesh {
    Mesh::new(0, 2, vec![None, Some(Pair::new(0, 1, stream).unwrap())])
}

/// What rank 0 waits for in the receive properties.
#[derive(Debug, Clone)]
struct Expected {
    tag: Tag,
    fingerprint: u64,
    len: usize,
    segment_bytes: usize,
    reduce: bool,
}

fn expected() -> impl Strategy<Value = Expected> {
    (
        any::<u64>(),
        any::<u32>(),
        any::<u64>(),
        0usize..300,
        1usize..100,
        any::<bool>(),
    )
        .prop_map(|(key, step, fingerprint, len, segment_bytes, reduce)| Expected {
            tag: Tag { key, step },
            fingerprint,
            len,
            segment_bytes,
            reduce,
        })
}

fn add_bytes(dst: &mut [u8], src: &[u8]) {
    for (d, s) in dst.iter_mut().zip(src) {
        *d = d.wrapping_add(*s);
    }
}

/// Feeds `wire` to rank 0's receive of `want` from peer 1, which then closes its writing half.
/// Returns the result, the received buffer, how long it took and the largest allocation the
/// receiving thread made meanwhile.
fn receive(
    loopback: &Loopback,
    want: &Expected,
    wire: &[u8],
    close: bool,
) -> (Result<(), TransportError>, Vec<u8>, Duration, usize) {
    let (mut peer, ours) = loopback.pair();
    let mesh = receiver(ours);
    // The peer's bytes wait in the socket buffers (a few KiB at most) before the receive starts.
    peer.write_all(wire).unwrap();
    if close {
        peer.shutdown(Shutdown::Write).unwrap();
    }
    let mut data = vec![1u8; want.len];
    let add = add_bytes;
    let start = Instant::now();
    let (result, largest) = allocations::measure(|| {
        let op = Op::Recv {
            peer: 1,
            tag: want.tag,
            fingerprint: want.fingerprint,
            data: &mut data,
            segment_bytes: want.segment_bytes,
            reduce: want.reduce.then_some(Reduction {
                combine: &add,
                elem_bytes: 1,
            }),
        };
        let timeout = 2 * PROMPTLY;
        mesh.exchange(vec![op], Instant::now() + timeout, timeout)
    });
    // Kept open until here, so that our bytes are never discarded by a reset.
    drop(peer);
    (result, data, start.elapsed(), largest)
}

fn assert_refused_promptly(result: &Result<(), TransportError>, elapsed: Duration) -> TestCaseResult {
    prop_assert!(elapsed < PROMPTLY, "took {:?}", elapsed);
    if let Err(e) = result {
        prop_assert!(
            !matches!(e, TransportError::Timeout { .. }),
            "waited for the deadline instead of seeing the bad stream: {}",
            e
        );
    }
    Ok(())
}

#[test]
fn a_receiver_fed_arbitrary_bytes_fails_promptly_without_panicking_or_allocating_beyond_the_frame_limit() {
    let loopback = Loopback::new();
    let wire = prop_oneof![
        bytes(512),
        // A header's worth of noise, then more: the decoder's first bytes are the frame header.
        prop::collection::vec(any::<u8>(), HEADER_BYTES..HEADER_BYTES + 64),
    ];
    check(1_500, (expected(), wire), |(want, wire)| {
        let (result, _, elapsed, largest) = receive(&loopback, &want, &wire, true);
        assert_refused_promptly(&result, elapsed)?;
        prop_assert!(
            largest <= MAX_FRAME_BYTES as usize + SLACK_BYTES,
            "allocated {} bytes",
            largest
        );
        Ok(())
    });
}

/// The frames a correct peer sends for `want`, after `strays` frames under other keys (which the
/// receiver stashes for later operations), and the payload they carry.
fn valid_frames(want: &Expected, strays: &[(u64, Vec<u8>)], payload_seed: u8) -> (Vec<u8>, Vec<u8>) {
    let mut wire = Vec::new();
    for (key, stray) in strays {
        let key = if *key == want.tag.key { key ^ 1 } else { *key };
        wire.extend_from_slice(&header_bytes(key, 0, 0, 7, stray.len() as u64));
        wire.extend_from_slice(stray);
    }
    let payload: Vec<u8> = (0..want.len)
        .map(|i| (i as u8).wrapping_mul(31) ^ payload_seed)
        .collect();
    let segments = want.len.div_ceil(want.segment_bytes).max(1);
    for s in 0..segments {
        let start = (s * want.segment_bytes).min(want.len);
        let segment = &payload[start..(start + want.segment_bytes).min(want.len)];
        wire.extend_from_slice(&header_bytes(
            want.tag.key,
            want.tag.step,
            0,
            want.fingerprint,
            segment.len() as u64,
        ));
        wire.extend_from_slice(segment);
    }
    (wire, payload)
}

#[test]
fn a_receiver_fed_mutated_frames_fails_promptly_or_receives_them_and_never_allocates_beyond_the_frame_limit() {
    let loopback = Loopback::new();
    let strays = prop::collection::vec((any::<u64>(), bytes(40)), 0..3);
    check(
        2_000,
        (expected(), strays, any::<u8>(), mutations(FRAME_EDGES)),
        |(want, strays, seed, edits)| {
            let (valid, payload) = valid_frames(&want, &strays, seed);
            let wire = mutate(valid, &edits);
            let (result, data, elapsed, largest) = receive(&loopback, &want, &wire, true);
            assert_refused_promptly(&result, elapsed)?;
            prop_assert!(
                largest <= MAX_FRAME_BYTES as usize + SLACK_BYTES,
                "allocated {} bytes",
                largest
            );
            if edits.is_empty() {
                // The unmutated stream is the control: it must be received, stray frames and all.
                prop_assert!(result.is_ok(), "{:?}", result);
                let expected: Vec<u8> = match want.reduce {
                    true => payload.iter().map(|b| b.wrapping_add(1)).collect(),
                    false => payload,
                };
                prop_assert_eq!(data, expected);
            }
            Ok(())
        },
    );
}

#[test]
fn a_header_announcing_more_than_the_frame_limit_is_refused_before_its_payload_is_read_or_allocated() {
    let loopback = Loopback::new();
    let stray_or_ours = any::<bool>();
    check(
        300,
        (expected(), stray_or_ours, MAX_FRAME_BYTES + 1..=u64::MAX),
        |(want, ours, len)| {
            let key = if ours { want.tag.key } else { !want.tag.key };
            let header = header_bytes(key, want.tag.step, 0, want.fingerprint, len);
            // The peer stays connected and silent after the header: a receiver that went on to
            // read the payload would wait for the deadline.
            let (result, _, elapsed, largest) = receive(&loopback, &want, &header, false);
            prop_assert!(elapsed < PROMPTLY, "took {:?}", elapsed);
            prop_assert!(
                matches!(
                    &result,
                    Err(TransportError::Protocol { reason, .. }) if reason.contains("limit")
                ),
                "{:?}",
                result
            );
            prop_assert!(largest < SLACK_BYTES, "allocated {} bytes for a refused frame", largest);
            Ok(())
        },
    );
}

#[test]
fn a_data_listener_refuses_garbage_connections_and_still_accepts_the_real_peer() {
    let secret = JobSecret::generate().unwrap();
    let hello = |channel: u8, tail: Vec<u8>| {
        let mut out = MAGIC.to_vec();
        out.push(channel);
        out.extend(tail);
        out
    };
    let garbage = prop_oneof![
        bytes(100),
        (prop_oneof![Just(Channel::Data as u8), any::<u8>()], bytes(60)).prop_map(move |(c, t)| hello(c, t)),
    ];
    check(32, garbage, |garbage| {
        let listener = DataListener::bind(0, "127.0.0.1".parse().unwrap()).unwrap();
        let addr = listener.local_addr().unwrap();
        let deadline = Instant::now() + 2 * PROMPTLY;
        let start = Instant::now();
        let accepted = std::thread::scope(|scope| {
            let peer = scope.spawn(|| {
                let mut stranger = TcpStream::connect(addr).unwrap();
                // The listener refuses it (and closes it) before it serves the next connection.
                send_and_wait_for_close(&mut stranger, &garbage, PROMPTLY).unwrap();
                burnrun::transport::connect(1, 0, addr, &secret, deadline).unwrap()
            });
            let accepted = listener.accept(&secret, deadline);
            let _peer_stream = peer.join().unwrap();
            accepted.map(|(rank, _)| rank)
        });
        prop_assert_eq!(accepted.ok(), Some(1));
        prop_assert!(start.elapsed() < PROMPTLY);
        Ok(())
    });
}

// ---------------------------------------------------------------------------------------------
// The rendezvous store's wire protocol (src/rendezvous/wire.rs)
// ---------------------------------------------------------------------------------------------

// Opcodes and statuses of the store's protocol.
const OP_SET: u8 = 1;
const OP_GET: u8 = 2;
const OP_TRY_GET: u8 = 3;
const OP_WAIT: u8 = 4;
const OP_ADD: u8 = 5;
const OP_COMPARE_SET: u8 = 6;
const OP_DELETE: u8 = 7;
const STATUS_OK: u8 = 0;
const STATUS_TIMEOUT: u8 = 1;
const STATUS_NOT_AN_INTEGER: u8 = 2;
const STATUS_OVERFLOW: u8 = 3;
const STATUS_CLOSED: u8 = 4;
const STATUS_PROTOCOL: u8 = 5;

/// Lengths and counts at the edges of the store's limits.
const STORE_EDGES: &[u64] = &[
    0,
    1,
    MAX_KEY_BYTES as u64,
    MAX_KEY_BYTES as u64 + 1,
    MAX_WAIT_KEYS as u64,
    MAX_WAIT_KEYS as u64 + 1,
    MAX_VALUE_BYTES as u64,
    MAX_VALUE_BYTES as u64 + 1,
    0x8000_0000,
    u32::MAX as u64,
];

/// Panics of the store server's threads (named `store-...`), counted by a panic hook.
static SERVER_PANICS: AtomicUsize = AtomicUsize::new(0);

fn count_server_panics() {
    static HOOK: Once = Once::new();
    HOOK.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if std::thread::current().name().is_some_and(|n| n.starts_with("store-")) {
                SERVER_PANICS.fetch_add(1, Ordering::SeqCst);
            }
            previous(info);
        }));
    });
}

/// A request as the protocol defines it.
#[derive(Debug, Clone)]
enum Request {
    Set(String, Vec<u8>),
    Get(u64, String),
    TryGet(String),
    Wait(u64, Vec<String>),
    Add(String, i64),
    CompareSet(String, Option<Vec<u8>>, Vec<u8>),
    Delete(String),
}

fn put_bytes(out: &mut Vec<u8>, bytes: &[u8]) {
    out.extend_from_slice(&(bytes.len() as u32).to_le_bytes());
    out.extend_from_slice(bytes);
}

impl Request {
    fn encode(&self, out: &mut Vec<u8>) {
        match self {
            Request::Set(key, value) => {
                out.push(OP_SET);
                put_bytes(out, key.as_bytes());
                put_bytes(out, value);
            }
            Request::Get(timeout_ms, key) => {
                out.push(OP_GET);
                out.extend_from_slice(&timeout_ms.to_le_bytes());
                put_bytes(out, key.as_bytes());
            }
            Request::TryGet(key) => {
                out.push(OP_TRY_GET);
                put_bytes(out, key.as_bytes());
            }
            Request::Wait(timeout_ms, keys) => {
                out.push(OP_WAIT);
                out.extend_from_slice(&timeout_ms.to_le_bytes());
                out.extend_from_slice(&(keys.len() as u32).to_le_bytes());
                keys.iter().for_each(|key| put_bytes(out, key.as_bytes()));
            }
            Request::Add(key, delta) => {
                out.push(OP_ADD);
                put_bytes(out, key.as_bytes());
                out.extend_from_slice(&delta.to_le_bytes());
            }
            Request::CompareSet(key, expected, desired) => {
                out.push(OP_COMPARE_SET);
                put_bytes(out, key.as_bytes());
                match expected {
                    Some(expected) => {
                        out.push(1);
                        put_bytes(out, expected);
                    }
                    None => out.push(0),
                }
                put_bytes(out, desired);
            }
            Request::Delete(key) => {
                out.push(OP_DELETE);
                put_bytes(out, key.as_bytes());
            }
        }
    }
}

fn request() -> impl Strategy<Value = Request> {
    let key = || "[a-z0-9/]{0,12}";
    // Short timeouts: an unmutated request never keeps the server waiting.
    let timeout_ms = || 0u64..5;
    prop_oneof![
        (key(), bytes(24)).prop_map(|(k, v)| Request::Set(k, v)),
        (timeout_ms(), key()).prop_map(|(t, k)| Request::Get(t, k)),
        key().prop_map(Request::TryGet),
        (timeout_ms(), prop::collection::vec(key(), 0..3)).prop_map(|(t, k)| Request::Wait(t, k)),
        (key(), any::<i64>()).prop_map(|(k, d)| Request::Add(k, d)),
        (key(), prop::option::of(bytes(16)), bytes(16)).prop_map(|(k, e, d)| Request::CompareSet(k, e, d)),
        key().prop_map(Request::Delete),
    ]
}

fn encode_requests(requests: &[Request]) -> Vec<u8> {
    let mut out = Vec::new();
    requests.iter().for_each(|r| r.encode(&mut out));
    out
}

/// A model of the request decoder, independent of the server's, that tells how long the server
/// may legitimately keep a connection sending `bytes`: the sum of the timeouts of the `GET` and
/// `WAIT` requests that parse before the first bad or cut one (a mutation may have made a timeout
/// huge). Only then may a connection stay open after its client finished sending.
fn longest_wait_ms(mut bytes: &[u8]) -> u64 {
    fn take<'a>(bytes: &mut &'a [u8], n: usize) -> Option<&'a [u8]> {
        let (head, rest) = (bytes.len() >= n).then(|| bytes.split_at(n))?;
        *bytes = rest;
        Some(head)
    }
    fn u32_at(bytes: &mut &[u8]) -> Option<usize> {
        Some(u32::from_le_bytes(take(bytes, 4)?.try_into().ok()?) as usize)
    }
    fn u64_at(bytes: &mut &[u8]) -> Option<u64> {
        Some(u64::from_le_bytes(take(bytes, 8)?.try_into().ok()?))
    }
    fn field(bytes: &mut &[u8], max: usize) -> Option<()> {
        let len = u32_at(bytes)?;
        (len <= max).then_some(())?;
        take(bytes, len).map(drop)
    }
    fn key(bytes: &mut &[u8]) -> Option<()> {
        let len = u32_at(bytes)?;
        (len <= MAX_KEY_BYTES).then_some(())?;
        std::str::from_utf8(take(bytes, len)?).ok().map(drop)
    }
    /// The wait one request may cause, or `None` where the server stops reading.
    fn request(bytes: &mut &[u8]) -> Option<u64> {
        Some(match take(bytes, 1)?[0] {
            OP_SET => {
                key(bytes)?;
                field(bytes, MAX_VALUE_BYTES)?;
                0
            }
            OP_GET => {
                let timeout_ms = u64_at(bytes)?;
                key(bytes)?;
                timeout_ms
            }
            OP_TRY_GET | OP_DELETE => key(bytes).map(|()| 0)?,
            OP_WAIT => {
                let timeout_ms = u64_at(bytes)?;
                let count = u32_at(bytes)?;
                (count <= MAX_WAIT_KEYS).then_some(())?;
                (0..count).try_for_each(|_| key(bytes))?;
                timeout_ms
            }
            OP_ADD => {
                key(bytes)?;
                u64_at(bytes)?;
                0
            }
            OP_COMPARE_SET => {
                key(bytes)?;
                match take(bytes, 1)?[0] {
                    0 => {}
                    1 => field(bytes, MAX_VALUE_BYTES)?,
                    _ => return None,
                }
                field(bytes, MAX_VALUE_BYTES)?;
                0
            }
            _ => return None,
        })
    }
    let mut total = 0u64;
    while let Some(wait) = request(&mut bytes) {
        total = total.saturating_add(wait);
    }
    total
}

/// A store server, and a well-behaved client of it that must be served after every bad case.
struct ServerUnderTest {
    server: TcpStoreServer,
    secret: JobSecret,
    client: TcpStore,
}

impl ServerUnderTest {
    fn start() -> Self {
        count_server_panics();
        let secret = JobSecret::generate().unwrap();
        let server = TcpStoreServer::bind("127.0.0.1:0".parse().unwrap(), secret.clone()).unwrap();
        let client = TcpStore::connect(&server.local_addr().to_string(), &secret, PROMPTLY).unwrap();
        Self { server, secret, client }
    }

    fn connect_raw(&self) -> TcpStream {
        TcpStream::connect(self.server.local_addr()).unwrap()
    }

    fn authenticated(&self) -> TcpStream {
        let mut stream = self.connect_raw();
        client_handshake(&mut stream, &self.secret, Channel::Store, PROMPTLY).unwrap();
        stream
    }

    /// No server thread panicked, nothing was allocated beyond the largest value, and the
    /// well-behaved client (and a new one) is still served.
    fn still_serving(&self) -> TestCaseResult {
        prop_assert_eq!(SERVER_PANICS.load(Ordering::SeqCst), 0, "a server thread panicked");
        let largest = allocations::largest_unmeasured();
        prop_assert!(
            largest <= MAX_VALUE_BYTES + SLACK_BYTES,
            "{} bytes allocated at once, more than the largest value the store accepts",
            largest
        );
        let served = self.client.add("served", 1);
        prop_assert!(
            served.is_ok(),
            "the well-behaved client is no longer served: {:?}",
            served
        );
        Ok(())
    }
}

impl Drop for ServerUnderTest {
    fn drop(&mut self) {
        // A new client is served too (the handshake slots were all given back).
        let late = TcpStore::connect(&self.server.local_addr().to_string(), &self.secret, PROMPTLY);
        if !std::thread::panicking() {
            late.unwrap().set("late", b"yes").unwrap();
        }
    }
}

#[test]
fn the_store_server_refuses_arbitrary_bytes_in_place_of_the_handshake_and_keeps_serving() {
    let under_test = ServerUnderTest::start();
    let hello_then = |channel: u8, nonce_and_proof: Vec<u8>| {
        let mut out = MAGIC.to_vec();
        out.push(channel);
        out.extend(nonce_and_proof);
        out
    };
    let garbage = prop_oneof![
        bytes(128),
        // A hello of the right shape, then a proof of the right length (or not) that is wrong.
        (
            prop_oneof![Just(Channel::Store as u8), Just(Channel::Data as u8), any::<u8>()],
            prop_oneof![prop::collection::vec(any::<u8>(), 48), bytes(80)],
        )
            .prop_map(move |(channel, tail)| hello_then(channel, tail)),
    ];
    check(1_000, garbage, |garbage| {
        let mut stream = under_test.connect_raw();
        let answer = send_and_wait_for_close(&mut stream, &garbage, PROMPTLY);
        let answer = answer.map_err(TestCaseError::fail)?;
        // At most the server's half of the handshake (magic, nonce, proof), never its acceptance.
        prop_assert!(answer.len() <= MAGIC.len() + 16 + 32, "{:?}", answer);
        if !answer.is_empty() {
            prop_assert!(answer.starts_with(&MAGIC[..answer.len().min(MAGIC.len())]));
        }
        under_test.still_serving()
    });
}

fn assert_protocol_answer(answer: &[u8]) -> TestCaseResult {
    if let Some(&status) = answer.first() {
        prop_assert!(status <= STATUS_PROTOCOL, "unknown status {} in {:?}", status, answer);
    }
    Ok(())
}

#[test]
fn the_store_server_answers_arbitrary_requests_with_an_error_or_closes_and_keeps_serving() {
    let under_test = ServerUnderTest::start();
    let garbage = (prop_oneof![OP_SET..=OP_DELETE, any::<u8>()], bytes(256)).prop_map(|(opcode, mut tail)| {
        tail.insert(0, opcode);
        tail
    });
    check(1_000, garbage, |garbage| {
        // Arbitrary bytes practically never form a request that waits (a key length would have
        // to come out below 4 KiB): the server must close once the client stops sending.
        let mut stream = under_test.authenticated();
        let answer = send_and_wait_for_close(&mut stream, &garbage, PROMPTLY).map_err(TestCaseError::fail)?;
        assert_protocol_answer(&answer)?;
        under_test.still_serving()
    });
}

#[test]
fn the_store_server_survives_mutated_requests_and_closes_each_bad_connection_promptly() {
    let under_test = ServerUnderTest::start();
    let requests = prop::collection::vec(request(), 1..4);
    check(1_500, (requests, mutations(STORE_EDGES)), |(requests, edits)| {
        let wire = mutate(encode_requests(&requests), &edits);
        let mut stream = under_test.authenticated();
        if longest_wait_ms(&wire) > PROMPTLY.as_millis() as u64 / 4 {
            // A mutation made a valid GET or WAIT with a long timeout: the server may wait it
            // out (until it shuts down); only its survival is checked.
            let _ = stream.write_all(&wire);
        } else {
            let answer = send_and_wait_for_close(&mut stream, &wire, PROMPTLY).map_err(TestCaseError::fail)?;
            assert_protocol_answer(&answer)?;
            if edits.is_empty() {
                prop_assert!(!answer.is_empty(), "valid requests were not answered");
            }
        }
        under_test.still_serving()
    });
}

/// Where a length or count above the store's limits can sit in a request.
#[derive(Debug, Clone, Copy)]
enum Oversized {
    SetKey,
    SetValue,
    GetKey,
    TryGetKey,
    WaitCount,
    WaitKey,
    AddKey,
    CompareSetKey,
    CompareSetExpected,
    CompareSetDesired,
    DeleteKey,
}

impl Oversized {
    const ALL: [Oversized; 11] = [
        Oversized::SetKey,
        Oversized::SetValue,
        Oversized::GetKey,
        Oversized::TryGetKey,
        Oversized::WaitCount,
        Oversized::WaitKey,
        Oversized::AddKey,
        Oversized::CompareSetKey,
        Oversized::CompareSetExpected,
        Oversized::CompareSetDesired,
        Oversized::DeleteKey,
    ];

    fn limit(self) -> usize {
        match self {
            Oversized::SetValue | Oversized::CompareSetExpected | Oversized::CompareSetDesired => MAX_VALUE_BYTES,
            Oversized::WaitCount => MAX_WAIT_KEYS,
            _ => MAX_KEY_BYTES,
        }
    }

    /// The request up to and including the oversized `len`, with nothing after it.
    fn prefix(self, len: u32) -> Vec<u8> {
        let mut out = Vec::new();
        let key = |out: &mut Vec<u8>| put_bytes(out, b"k");
        match self {
            Oversized::SetKey => out.push(OP_SET),
            Oversized::SetValue => {
                out.push(OP_SET);
                key(&mut out);
            }
            Oversized::GetKey => {
                out.push(OP_GET);
                out.extend_from_slice(&1u64.to_le_bytes());
            }
            Oversized::TryGetKey => out.push(OP_TRY_GET),
            Oversized::WaitCount => {
                out.push(OP_WAIT);
                out.extend_from_slice(&1u64.to_le_bytes());
            }
            Oversized::WaitKey => {
                out.push(OP_WAIT);
                out.extend_from_slice(&1u64.to_le_bytes());
                out.extend_from_slice(&2u32.to_le_bytes());
                key(&mut out);
            }
            Oversized::AddKey => out.push(OP_ADD),
            Oversized::CompareSetKey => out.push(OP_COMPARE_SET),
            Oversized::CompareSetExpected => {
                out.push(OP_COMPARE_SET);
                key(&mut out);
                out.push(1);
            }
            Oversized::CompareSetDesired => {
                out.push(OP_COMPARE_SET);
                key(&mut out);
                out.push(0);
            }
            Oversized::DeleteKey => out.push(OP_DELETE),
        }
        out.extend_from_slice(&len.to_le_bytes());
        out
    }
}

fn oversized() -> impl Strategy<Value = (Oversized, u32)> {
    prop::sample::select(Oversized::ALL.to_vec()).prop_flat_map(|field| {
        let above = field.limit() as u32 + 1;
        (Just(field), prop_oneof![Just(above), Just(u32::MAX), above..=u32::MAX])
    })
}

#[test]
fn a_request_announcing_more_than_a_store_limit_is_refused_before_its_payload_is_read_or_allocated() {
    let under_test = ServerUnderTest::start();
    check(400, oversized(), |(field, len)| {
        let mut stream = under_test.authenticated();
        // The client keeps its writing half open and sends nothing after the length: a server
        // that went on to read what the length announced would wait, not answer.
        stream.write_all(&field.prefix(len)).unwrap();
        let answer = read_until_closed(&mut stream, PROMPTLY).map_err(TestCaseError::fail)?;
        prop_assert_eq!(answer.first(), Some(&STATUS_PROTOCOL), "{:?}", answer);
        let reason = String::from_utf8_lossy(answer.get(5..).unwrap_or_default());
        prop_assert!(reason.contains("exceeds the limit"), "{}", reason);
        under_test.still_serving()
    });
}

/// A response as the protocol defines it, for the client's decoder.
fn response() -> impl Strategy<Value = Vec<u8>> {
    let with = |status: u8, fields: Vec<u8>| {
        let mut out = vec![status];
        out.extend(fields);
        out
    };
    let value = || {
        bytes(32).prop_map(|v| {
            let mut out = Vec::new();
            put_bytes(&mut out, &v);
            out
        })
    };
    prop_oneof![
        Just(vec![STATUS_OK]),
        value().prop_map(move |v| with(STATUS_OK, v)),
        (0u8..3, value()).prop_map(move |(flag, v)| with(STATUS_OK, [vec![flag], v].concat())),
        any::<i64>().prop_map(move |n| with(STATUS_OK, n.to_le_bytes().to_vec())),
        prop::collection::vec("[a-z]{0,8}", 0..3).prop_map(move |keys| {
            let mut fields = (keys.len() as u32).to_le_bytes().to_vec();
            keys.iter().for_each(|k| put_bytes(&mut fields, k.as_bytes()));
            with(STATUS_TIMEOUT, fields)
        }),
        Just(vec![STATUS_NOT_AN_INTEGER]),
        Just(vec![STATUS_OVERFLOW]),
        Just(vec![STATUS_CLOSED]),
        value().prop_map(move |v| with(STATUS_PROTOCOL, v)),
    ]
}

/// One call of every operation of a client.
fn call(client: &TcpStore, op: u8) -> Result<(), StoreError> {
    let short = Duration::from_millis(100);
    match op % 7 {
        0 => client.set("k", b"v"),
        1 => client.get("k", short).map(drop),
        2 => client.try_get("k").map(drop),
        3 => client.wait(&["k", "l"], short),
        4 => client.add("k", 1).map(drop),
        5 => client.compare_set("k", Some(&b"v"[..]), b"w").map(drop),
        _ => client.delete("k").map(drop),
    }
}

/// Serves one connection from `listener` as a store server that answers with `response`
/// (then ends its writing half if `close`), and reads until the client leaves.
fn fake_server(listener: &TcpListener, secret: &JobSecret, response: &[u8], close: bool) {
    let (mut stream, _) = listener.accept().unwrap();
    server_handshake(&mut stream, secret, Channel::Store, PROMPTLY).unwrap();
    let _ = stream.write_all(response);
    if close {
        let _ = stream.shutdown(Shutdown::Write);
    }
    let mut sink = Vec::new();
    stream.set_read_timeout(Some(2 * PROMPTLY)).unwrap();
    let _ = stream.read_to_end(&mut sink);
}

/// Connects a client to a fake server answering `response`, makes call `op`, and returns its
/// result, how long it took and the largest allocation the client made meanwhile.
fn call_fake_server(
    loopback: &Loopback,
    secret: &JobSecret,
    response: &[u8],
    close: bool,
    op: u8,
) -> (Result<(), StoreError>, Duration, usize) {
    std::thread::scope(|scope| {
        scope.spawn(|| fake_server(&loopback.0, secret, response, close));
        let client = TcpStore::connect(&loopback.addr().to_string(), secret, PROMPTLY).unwrap();
        let start = Instant::now();
        let (result, largest) = allocations::measure(|| call(&client, op));
        (result, start.elapsed(), largest)
    })
}

#[test]
fn a_store_client_fed_arbitrary_or_mutated_responses_fails_promptly_without_panicking() {
    let loopback = Loopback::new();
    let secret = JobSecret::generate().unwrap();
    let answer = prop_oneof![
        bytes(64),
        (response(), mutations(STORE_EDGES)).prop_map(|(r, edits)| mutate(r, &edits)),
    ];
    check(800, (answer, any::<u8>()), |(answer, op)| {
        let (result, elapsed, largest) = call_fake_server(&loopback, &secret, &answer, true, op);
        prop_assert!(elapsed < PROMPTLY, "took {:?}: {:?}", elapsed, result);
        prop_assert!(largest <= MAX_VALUE_BYTES + SLACK_BYTES, "allocated {} bytes", largest);
        Ok(())
    });
}

#[test]
fn a_response_announcing_more_than_a_store_limit_is_refused_before_its_payload_is_read_or_allocated() {
    let loopback = Loopback::new();
    let secret = JobSecret::generate().unwrap();
    // (op, response up to its length field, the limit on that length)
    let shapes: Vec<(u8, Vec<u8>, usize)> = vec![
        (1, vec![STATUS_OK], MAX_VALUE_BYTES),
        (2, vec![STATUS_OK, 1], MAX_VALUE_BYTES),
        (5, vec![STATUS_OK], MAX_VALUE_BYTES),
        (3, vec![STATUS_TIMEOUT], MAX_WAIT_KEYS),
        (3, [&[STATUS_TIMEOUT][..], &1u32.to_le_bytes()].concat(), MAX_KEY_BYTES),
        (0, vec![STATUS_PROTOCOL], MAX_KEY_BYTES),
    ];
    let case = prop::sample::select(shapes).prop_flat_map(|(op, head, limit)| {
        let above = limit as u32 + 1;
        (Just(op), Just(head), prop_oneof![Just(above), above..=u32::MAX])
    });
    check(200, case, |(op, head, len)| {
        let answer = [head, len.to_le_bytes().to_vec()].concat();
        // The fake server keeps the connection open and sends nothing after the length.
        let (result, elapsed, largest) = call_fake_server(&loopback, &secret, &answer, false, op);
        prop_assert!(elapsed < PROMPTLY, "took {:?}", elapsed);
        prop_assert!(
            matches!(&result, Err(StoreError::Protocol { reason, .. }) if reason.contains("exceeds the limit")),
            "{:?}",
            result
        );
        prop_assert!(
            largest < SLACK_BYTES,
            "allocated {} bytes for a refused response",
            largest
        );
        Ok(())
    });
}

// ---------------------------------------------------------------------------------------------
// The handshake (src/auth.rs)
// ---------------------------------------------------------------------------------------------

/// Deadline of the handshakes under test: long enough for a loaded machine to answer at once,
/// short enough that waiting it out costs little.
const HANDSHAKE_DEADLINE: Duration = Duration::from_millis(500);
/// How far past its deadline a handshake may return (scheduling on a loaded machine).
const DEADLINE_SLACK: Duration = Duration::from_millis(1500);

fn client_hello() -> impl Strategy<Value = Vec<u8>> {
    // Right magic and channel with a nonce and a proof of the right length (which is wrong), of
    // the wrong channel, cut short, or noise.
    let shaped = (prop_oneof![Just(Channel::Store as u8), any::<u8>()], bytes(60)).prop_map(|(channel, tail)| {
        let mut out = MAGIC.to_vec();
        out.push(channel);
        out.extend(tail);
        out
    });
    let right_length = prop::collection::vec(any::<u8>(), 16 + 32).prop_map(|tail| {
        let mut out = MAGIC.to_vec();
        out.push(Channel::Store as u8);
        out.extend(tail);
        out
    });
    prop_oneof![bytes(100), shaped, right_length]
}

#[test]
fn a_server_handshake_fed_arbitrary_bytes_is_refused_with_an_error_within_its_deadline() {
    let loopback = Loopback::new();
    let secret = JobSecret::generate().unwrap();
    check(1_500, client_hello(), |hello| {
        let (mut peer, mut ours) = loopback.pair();
        peer.write_all(&hello).unwrap();
        peer.shutdown(Shutdown::Write).unwrap();
        let start = Instant::now();
        let result = server_handshake(&mut ours, &secret, Channel::Store, HANDSHAKE_DEADLINE);
        let elapsed = start.elapsed();
        prop_assert!(result.is_err(), "a stranger was accepted");
        prop_assert!(
            elapsed < HANDSHAKE_DEADLINE + DEADLINE_SLACK,
            "took {:?}: {:?}",
            elapsed,
            result
        );
        let well_shaped = hello.len() >= 9 + 16 + 32 && hello.starts_with(&MAGIC) && hello[8] == Channel::Store as u8;
        if well_shaped {
            prop_assert!(matches!(result, Err(AuthError::BadProof { .. })), "{:?}", result);
        }
        Ok(())
    })
}

#[test]
fn a_client_handshake_fed_arbitrary_bytes_is_refused_with_an_error_within_its_deadline() {
    let loopback = Loopback::new();
    let secret = JobSecret::generate().unwrap();
    let server_reply = prop_oneof![
        bytes(100),
        (bytes(16 + 32 + 1), any::<bool>()).prop_map(|(tail, magic)| {
            let mut out = if magic { MAGIC.to_vec() } else { b"BURNRUN0".to_vec() };
            out.extend(tail);
            out
        }),
    ];
    check(1_500, server_reply, |reply| {
        let (mut ours, mut peer) = loopback.pair();
        peer.write_all(&reply).unwrap();
        peer.shutdown(Shutdown::Write).unwrap();
        let start = Instant::now();
        let result = client_handshake(&mut ours, &secret, Channel::Store, HANDSHAKE_DEADLINE);
        let elapsed = start.elapsed();
        prop_assert!(result.is_err(), "an impostor server was trusted");
        prop_assert!(
            elapsed < HANDSHAKE_DEADLINE + DEADLINE_SLACK,
            "took {:?}: {:?}",
            elapsed,
            result
        );
        if reply.len() >= 8 + 16 + 32 && reply.starts_with(&MAGIC) {
            prop_assert!(matches!(result, Err(AuthError::BadProof { .. })), "{:?}", result);
        }
        Ok(())
    })
}

#[test]
fn a_peer_that_sends_part_of_its_handshake_and_goes_silent_is_refused_at_the_deadline() {
    let loopback = Loopback::new();
    let secret = JobSecret::generate().unwrap();
    let mut hello = MAGIC.to_vec();
    hello.push(Channel::Store as u8);
    hello.extend([7u8; 16 + 32]);
    let reply = [&MAGIC[..], &[7u8; 16 + 32][..]].concat();
    // Either side's message, cut anywhere before its end; the peer stays connected.
    check(12, (any::<bool>(), any::<Index>()), |(server_side, cut)| {
        let (client, server) = loopback.pair();
        let (mut peer, mut ours, message) = match server_side {
            true => (client, server, &hello),
            false => (server, client, &reply),
        };
        peer.write_all(&message[..cut.index(message.len())]).unwrap();
        let start = Instant::now();
        let result = match server_side {
            true => server_handshake(&mut ours, &secret, Channel::Store, HANDSHAKE_DEADLINE),
            false => client_handshake(&mut ours, &secret, Channel::Store, HANDSHAKE_DEADLINE),
        };
        let elapsed = start.elapsed();
        prop_assert!(matches!(result, Err(AuthError::Io { .. })), "{:?}", result);
        prop_assert!(
            elapsed >= HANDSHAKE_DEADLINE.mul_f32(0.9),
            "gave up early, after {:?}",
            elapsed
        );
        prop_assert!(elapsed < HANDSHAKE_DEADLINE + DEADLINE_SLACK, "took {:?}", elapsed);
        Ok(())
    });
}

/// Writes `bytes` one at a time, `period` apart, until done or the other side is gone.
fn trickle(mut stream: TcpStream, bytes: Vec<u8>, period: Duration) {
    for byte in bytes {
        std::thread::sleep(period);
        if stream.write_all(&[byte]).is_err() {
            return;
        }
    }
}

#[test]
fn a_peer_that_trickles_its_handshake_one_byte_at_a_time_is_cut_off_at_the_deadline() {
    // Each byte arrives before a per-read timeout would fire; only a deadline over the whole
    // handshake stops it. Sent in full, these bytes would take 5.7 s (57 bytes, 100 ms apart).
    let period = Duration::from_millis(100);
    let loopback = Loopback::new();
    let secret = JobSecret::generate().unwrap();

    let (peer, mut ours) = loopback.pair();
    let mut hello = MAGIC.to_vec();
    hello.push(Channel::Store as u8);
    hello.extend([7u8; 16 + 32]);
    let writer = std::thread::spawn(move || trickle(peer, hello, period));
    let start = Instant::now();
    let result = server_handshake(&mut ours, &secret, Channel::Store, HANDSHAKE_DEADLINE);
    let elapsed = start.elapsed();
    drop(ours);
    writer.join().unwrap();
    assert!(matches!(result, Err(AuthError::Io { .. })), "{result:?}");
    assert!(
        elapsed < HANDSHAKE_DEADLINE + DEADLINE_SLACK,
        "server side took {elapsed:?}"
    );

    let (mut ours, peer) = loopback.pair();
    let mut reply = MAGIC.to_vec();
    reply.extend([7u8; 16 + 32 + 1]);
    let writer = std::thread::spawn(move || trickle(peer, reply, period));
    let start = Instant::now();
    let result = client_handshake(&mut ours, &secret, Channel::Store, HANDSHAKE_DEADLINE);
    let elapsed = start.elapsed();
    drop(ours);
    writer.join().unwrap();
    assert!(matches!(result, Err(AuthError::Io { .. })), "{result:?}");
    assert!(
        elapsed < HANDSHAKE_DEADLINE + DEADLINE_SLACK,
        "client side took {elapsed:?}"
    );
}

// ---------------------------------------------------------------------------------------------
// Text and files written by other processes
// ---------------------------------------------------------------------------------------------

/// A scratch directory removed on drop.
struct Scratch(PathBuf);

impl Scratch {
    fn new(what: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("burnrun-fuzz-{what}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[test]
fn opening_a_shared_memory_peer_from_an_arbitrary_or_mutated_description_never_panics() {
    let scratch = Scratch::new("shm");
    let ring = MIN_SHM_RING_BYTES;
    let ours = Arc::new(Inbox::create(&scratch.0, "fuzz-", 0, &[1], ring).unwrap());
    let theirs = Inbox::create(&scratch.0, "fuzz-", 1, &[0], ring).unwrap();
    let valid = theirs.describe();
    // The control: the real description opens.
    ShmLink::open(&ours, 1, &valid).unwrap();
    let numbers = [0u64, 1, 2, ring as u64, ring as u64 * 2, u64::MAX];
    let text = prop_oneof![
        ".{0,64}",
        prop::collection::vec(prop::sample::select(numbers.to_vec()), 0..6).prop_map(|n| {
            let n: Vec<String> = n.iter().map(u64::to_string).collect();
            format!("v1\n/nonexistent\n/nonexistent.bell\n{}", n.join(","))
        }),
        (Just(valid.clone().into_bytes()), mutations(&[0, 1, 10, 44, 48, 57]))
            .prop_map(|(v, edits)| String::from_utf8_lossy(&mutate(v, &edits)).into_owned()),
    ];
    check(2_000, (text, 0usize..3), |(text, peer)| {
        // Ok only for a description of a real inbox that has a ring for us; anything else is
        // an error. Either way, no panic.
        let _ = ShmLink::open(&ours, peer, &text);
        Ok(())
    });
    ours.unlink();
    theirs.unlink();
}

/// Values at the edges of the flight record's words: counts and indices around the ring of 64
/// entries, states, phases, `x + 1` encodings of optional numbers.
const FLIGHT_EDGES: &[u64] = &[
    0,
    1,
    2,
    3,
    4,
    6,
    7,
    63,
    64,
    65,
    1 << 32,
    1 << 63,
    u64::MAX - 1,
    u64::MAX,
];

#[test]
fn a_flight_record_of_arbitrary_or_mutated_bytes_parses_or_is_refused_and_reports_without_panicking() {
    let scratch = Scratch::new("flight");
    let file = scratch.0.join("flight");
    let recorder = flight::Recorder::create(&file, 3).unwrap();
    recorder.step(41);
    recorder.phase(flight::Phase::Backward);
    for seq in 0..70 {
        let slot = recorder.begin(
            seq % 3,
            seq,
            "all_reduce",
            "f32",
            1 << seq.min(40),
            Some(seq as usize % 2),
        );
        if seq % 5 != 0 {
            recorder.end(slot, seq % 7 != 0);
        }
    }
    let valid = std::fs::read(&file).unwrap();
    let control = flight::parse(&valid).expect("the recorder's own file parses");
    let magic = valid[..8].to_vec();
    let with_magic = move |mut noise: Vec<u8>| {
        noise[..8].copy_from_slice(&magic);
        noise
    };
    // Whole words set to edge values, half of them in the header (rank, step, phase, next entry).
    let word = prop_oneof![0usize..8, 0..flight::FILE_BYTES / 8];
    let word_edits = prop::collection::vec((word, prop::sample::select(FLIGHT_EDGES)), 1..6);
    let valid_too = valid.clone();
    let record = prop_oneof![
        bytes(64),
        prop::collection::vec(any::<u8>(), flight::FILE_BYTES - 8..flight::FILE_BYTES + 64),
        prop::collection::vec(any::<u8>(), flight::FILE_BYTES..flight::FILE_BYTES + 8).prop_map(with_magic),
        mutations(FLIGHT_EDGES).prop_map(move |edits| mutate(valid.clone(), &edits)),
        word_edits.prop_map(move |edits| {
            let mut record = valid_too.clone();
            for (word, value) in edits {
                record[8 * word..8 * word + 8].copy_from_slice(&value.to_le_bytes());
            }
            record
        }),
    ];
    check(3_000, (record, any::<u64>()), |(bytes, now_ns)| {
        if let Some(record) = flight::parse(&bytes) {
            prop_assert!(record.calls.len() <= flight::ENTRIES);
            // What the launcher does with the records of every rank (two files may claim the
            // same rank).
            let records = [record.clone(), record, control.clone()];
            let verdict = flight::verdict(&records, now_ns);
            let _ = flight::behind(&records);
            let _ = flight::report(&records, verdict.as_deref(), now_ns);
            let ranks: Vec<u64> = records.iter().map(|r| r.rank).collect();
            let _ = flight::ranks_text(&ranks);
        }
        Ok(())
    });
}

#[test]
fn a_control_line_of_arbitrary_bytes_decodes_or_is_refused_without_panicking() {
    let prefix = CONTROL_PREFIX.as_bytes().to_vec();
    let valid = ControlLine::Step {
        step: 3,
        total: 30,
        text: "loss 1.0".into(),
    }
    .encode()
    .into_bytes();
    let line = prop_oneof![
        bytes(64),
        bytes(64).prop_map(move |tail| [prefix.clone(), tail].concat()),
        mutations(STORE_EDGES).prop_map(move |edits| mutate(valid.clone(), &edits)),
    ];
    check(2_000, line, |line| {
        let _ = ControlLine::decode(&line);
        Ok(())
    });
}
