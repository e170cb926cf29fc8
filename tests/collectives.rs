//! Conformance suite of the collective engine (DESIGN.md, style rule 7): every collective, every
//! dtype, the awkward sizes `[0, 1, n-1, n+1, 1000, (1<<20)+3]`, both algorithm regimes, world sizes
//! 1 to 5, each rank on a thread with real TCP on 127.0.0.1 or real shared-memory rings, compared
//! with a sequential reference computed here.
//!
//! Inputs are small integers (or powers of two for products), so floating sums and products are
//! exact whatever order the algorithm combines them in: the reference is exact and f32/f64/integer
//! results must equal it bit for bit. Only f16/bf16 averages round (see the tolerances).

use std::any::Any;
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use burnrun::comm::{
    spawn_ranks, BufMut, BufRef, Element, HostBuffer, InitOptions, Memory, MemoryMut, ProcessGroup, ShmOptions, Tuning,
};
use burnrun::transport::{DEFAULT_SHM_RING_BYTES, MIN_SHM_RING_BYTES};
use burnrun::{DType, ReduceOp};
use half::{bf16, f16};
use proptest::prelude::*;

/// Deadline of every collective here. Generous: the machine is small and shared, and the suite's
/// test functions run in parallel. A hang still ends in a timeout error, never a stuck test.
const TIMEOUT: Duration = Duration::from_secs(30);

/// The large awkward size of DESIGN.md: not a multiple of any world size or segment.
const BIG: usize = (1 << 20) + 3;

/// f16 keeps 11 significant bits, so one rounding moves a value by at most 2^-11 of itself. The
/// engine reduces half types in f32 and rounds the average twice (the f32 quotient, then to f16):
/// allow two roundings. Sums and products of our inputs are exact and meet it trivially.
const F16_TOLERANCE: f64 = 2.0 / 2048.0;
/// bf16 keeps 8 significant bits; same reasoning as [`F16_TOLERANCE`].
const BF16_TOLERANCE: f64 = 2.0 / 256.0;

/// How the engine is tuned for one pass of the suite.
#[derive(Debug, Clone, Copy)]
struct Regime {
    name: &'static str,
    ring_threshold_bytes: usize,
    segment_bytes: usize,
    /// Runs the `BIG` size (on a subset of combinations) instead of the small sizes.
    big: bool,
    /// Same-host frames through shared-memory rings of this many bytes; `None`: loopback TCP.
    shm_ring_bytes: Option<usize>,
}

/// Threshold 0 selects the ring / scatter-all-gather paths, `usize::MAX` recursive doubling and the
/// binomial trees. 64-byte segments cut even 1000 bytes into 16 frames; the big size uses 4 KiB.
/// Both transports run every path: shared memory with the smallest ring (it fills and wraps all the
/// time) and with the default one, and loopback TCP.
const REGIMES: [Regime; 6] = [
    Regime {
        name: "ring",
        ring_threshold_bytes: 0,
        segment_bytes: 64,
        big: false,
        shm_ring_bytes: Some(MIN_SHM_RING_BYTES),
    },
    Regime {
        name: "tree",
        ring_threshold_bytes: usize::MAX,
        segment_bytes: 64,
        big: false,
        shm_ring_bytes: Some(DEFAULT_SHM_RING_BYTES),
    },
    Regime {
        name: "ring-tcp",
        ring_threshold_bytes: 0,
        segment_bytes: 64,
        big: false,
        shm_ring_bytes: None,
    },
    Regime {
        name: "tree-tcp",
        ring_threshold_bytes: usize::MAX,
        segment_bytes: 64,
        big: false,
        shm_ring_bytes: None,
    },
    Regime {
        name: "ring-big",
        ring_threshold_bytes: 0,
        segment_bytes: 4096,
        big: true,
        shm_ring_bytes: Some(DEFAULT_SHM_RING_BYTES),
    },
    Regime {
        name: "tree-big-tcp",
        ring_threshold_bytes: usize::MAX,
        segment_bytes: 4096,
        big: true,
        shm_ring_bytes: None,
    },
];

fn options(regime: &Regime) -> InitOptions {
    tuned(regime.ring_threshold_bytes, regime.segment_bytes, regime.shm_ring_bytes)
}

/// Options with these tunables; `shm_ring_bytes: None` keeps same-host ranks on TCP.
fn tuned(ring_threshold_bytes: usize, segment_bytes: usize, shm_ring_bytes: Option<usize>) -> InitOptions {
    InitOptions {
        tuning: Tuning {
            ring_threshold_bytes,
            segment_bytes,
            ..Default::default()
        },
        timeout: TIMEOUT,
        shm: ShmOptions {
            enabled: shm_ring_bytes.is_some(),
            ring_bytes: shm_ring_bytes.unwrap_or(DEFAULT_SHM_RING_BYTES),
            ..Default::default()
        },
        ..Default::default()
    }
}

/// Both transports, the shared-memory one with its smallest ring.
const TRANSPORTS: [Option<usize>; 2] = [Some(MIN_SHM_RING_BYTES), None];

/// One (world size, regime, element count) of the suite, seen by one rank.
#[derive(Debug, Clone, Copy)]
struct Case<'a> {
    n: usize,
    rank: usize,
    numel: usize,
    regime: Regime,
    references: &'a References,
}

impl Case<'_> {
    fn label(&self, what: &str, dtype: DType) -> String {
        format!(
            "{what} {dtype} x {} on {} ranks ({}), rank {}",
            self.numel, self.n, self.regime.name, self.rank
        )
    }

    /// The reference every rank compares with, computed by the first rank that asks for it.
    fn reference<R: Send + Sync + 'static>(&self, what: &str, dtype: DType, compute: impl FnOnce() -> R) -> Arc<R> {
        self.references
            .get(format!("{what} {dtype} x {}", self.numel), self.n, compute)
    }
}

/// References shared by the ranks of one spawn: computing a reference costs n x numel element
/// draws, which every rank would otherwise repeat (the big size made it most of the suite's time).
#[derive(Debug, Default)]
struct References {
    /// Each reference with the number of ranks that have not fetched it yet.
    map: Mutex<HashMap<String, SharedReference>>,
}

/// A reference result and the number of ranks that have not fetched it yet.
type SharedReference = (Arc<dyn Any + Send + Sync>, usize);

impl References {
    fn get<R: Send + Sync + 'static>(&self, key: String, n: usize, compute: impl FnOnce() -> R) -> Arc<R> {
        // Computed under the lock: the other ranks wait for this very reference anyway.
        let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((reference, left)) = map.get_mut(&key) {
            let reference = Arc::clone(reference);
            *left -= 1;
            if *left == 0 {
                map.remove(&key);
            }
            return reference
                .downcast()
                .unwrap_or_else(|_| panic!("reference {key} has another type"));
        }
        let reference = Arc::new(compute());
        if n > 1 {
            map.insert(key, (Arc::clone(&reference) as Arc<dyn Any + Send + Sync>, n - 1));
        }
        reference
    }
}

fn sizes(n: usize, big: bool) -> Vec<usize> {
    if big {
        return vec![BIG];
    }
    let mut out = Vec::new();
    for size in [0, 1, n - 1, n + 1, 1000] {
        if !out.contains(&size) {
            out.push(size);
        }
    }
    out
}

/// Runs `check` for every world size, regime and size; each rank pushes digests of results that
/// must be bit-identical on every rank (all-reduce replicas, broadcast copies), compared here.
fn conformance(check: impl Fn(&ProcessGroup, &Case<'_>, &mut Vec<(String, u64)>) + Sync) {
    for n in 1..=5 {
        for regime in &REGIMES {
            let references = References::default();
            let per_rank = spawn_ranks(n, &options(regime), |pg| {
                let mut digests = Vec::new();
                for numel in sizes(n, regime.big) {
                    let case = Case {
                        n,
                        rank: pg.rank(),
                        numel,
                        regime: *regime,
                        references: &references,
                    };
                    check(&pg, &case, &mut digests);
                }
                digests
            })
            .unwrap_or_else(|e| panic!("{n} ranks ({}) failed to join: {e}", regime.name));
            for (rank, digests) in per_rank.iter().enumerate() {
                assert_eq!(digests.len(), per_rank[0].len());
                for (mine, first) in digests.iter().zip(&per_rank[0]) {
                    assert_eq!(
                        mine.1, first.1,
                        "{}: rank {rank}'s result differs from rank 0's in its bits",
                        mine.0
                    );
                }
            }
        }
    }
}

/// Test-side view of an element type: conversions to and from the f64 reference.
trait Elem: Element {
    const INTEGER: bool;
    const UNSIGNED: bool;
    fn from_f64(x: f64) -> Self;
    fn to_f64(self) -> f64;
}

macro_rules! elem {
    ($t:ty, integer: $int:expr, unsigned: $uns:expr, from: |$x:ident| $from:expr, to: |$y:ident| $to:expr) => {
        impl Elem for $t {
            const INTEGER: bool = $int;
            const UNSIGNED: bool = $uns;
            fn from_f64($x: f64) -> Self {
                $from
            }
            fn to_f64(self) -> f64 {
                let $y = self;
                $to
            }
        }
    };
}
elem!(f32, integer: false, unsigned: false, from: |x| x as f32, to: |y| y as f64);
elem!(f64, integer: false, unsigned: false, from: |x| x, to: |y| y);
elem!(f16, integer: false, unsigned: false, from: |x| f16::from_f64(x), to: |y| y.to_f64());
elem!(bf16, integer: false, unsigned: false, from: |x| bf16::from_f64(x), to: |y| y.to_f64());
elem!(i32, integer: true, unsigned: false, from: |x| x as i32, to: |y| y as f64);
elem!(i64, integer: true, unsigned: false, from: |x| x as i64, to: |y| y as f64);
elem!(u8, integer: true, unsigned: true, from: |x| x as u8, to: |y| y as f64);

/// Calls `$f::<T>(args)` for every element type.
macro_rules! for_each_dtype {
    ($f:ident($($arg:expr),*)) => {{
        $f::<f32>($($arg),*);
        $f::<f64>($($arg),*);
        $f::<f16>($($arg),*);
        $f::<bf16>($($arg),*);
        $f::<i32>($($arg),*);
        $f::<i64>($($arg),*);
        $f::<u8>($($arg),*);
    }};
}

/// Which values an input draws, so that every reduction of them is exact.
#[derive(Debug, Clone, Copy)]
enum Domain {
    /// Sums of 5 stay small: [-5, 5] (signed) or [0, 50] (u8, no wrap-around).
    Sum,
    /// Products of 5 stay exact and in range: ±1, ±2, 0.5 (floats), ±1, ±2 (signed), 1..3 (u8).
    Prod,
    /// Anything the type holds exactly: [-100, 100] (signed, exact even in bf16) or [0, 255] (u8).
    Any,
}

fn domain(op: ReduceOp) -> Domain {
    match op {
        ReduceOp::Sum | ReduceOp::Avg => Domain::Sum,
        ReduceOp::Prod => Domain::Prod,
        ReduceOp::Max | ReduceOp::Min => Domain::Any,
    }
}

/// splitmix64: a cheap, well-mixed hash of (salt, rank, index).
fn mix(salt: u64, rank: usize, i: usize) -> u64 {
    let mut z = salt ^ ((rank as u64) << 48) ^ (i as u64);
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Input element `i` of `rank`, as the exact value it holds.
fn value<T: Elem>(domain: Domain, salt: u64, rank: usize, i: usize) -> f64 {
    let h = mix(salt, rank, i);
    match domain {
        Domain::Sum if T::UNSIGNED => (h % 51) as f64,
        Domain::Sum => (h % 11) as f64 - 5.0,
        Domain::Prod if T::UNSIGNED => [1.0, 2.0, 3.0][(h % 3) as usize],
        Domain::Prod if T::INTEGER => [-2.0, -1.0, 1.0, 2.0][(h % 4) as usize],
        Domain::Prod => [-2.0, -1.0, 0.5, 1.0, 2.0][(h % 5) as usize],
        Domain::Any if T::UNSIGNED => (h % 256) as f64,
        Domain::Any => (h % 201) as f64 - 100.0,
    }
}

fn inputs<T: Elem>(domain: Domain, salt: u64, rank: usize, range: std::ops::Range<usize>) -> Vec<T> {
    range.map(|i| T::from_f64(value::<T>(domain, salt, rank, i))).collect()
}

/// The sequential reference of reducing element `i` over ranks `0..n`.
fn reduce_ref<T: Elem>(op: ReduceOp, n: usize, salt: u64, i: usize) -> f64 {
    let d = domain(op);
    let mut acc = value::<T>(d, salt, 0, i);
    for rank in 1..n {
        let x = value::<T>(d, salt, rank, i);
        acc = match op {
            ReduceOp::Sum | ReduceOp::Avg => acc + x,
            ReduceOp::Prod => acc * x,
            ReduceOp::Max => acc.max(x),
            ReduceOp::Min => acc.min(x),
        };
    }
    if op == ReduceOp::Avg {
        acc /= n as f64;
        if T::INTEGER {
            // Integer averages truncate, like integer division.
            acc = acc.trunc();
        }
    }
    acc
}

/// Asserts `got` equals the reference: exactly, or within one or two roundings for f16/bf16.
fn assert_matches<T: Elem>(got: &[T], want: &[f64], label: &str) {
    assert_eq!(got.len(), want.len(), "{label}: length");
    let tolerance = match T::DTYPE {
        DType::F16 => F16_TOLERANCE,
        DType::BF16 => BF16_TOLERANCE,
        _ => 0.0,
    };
    let wrong = got.iter().zip(want).position(|(&g, &w)| {
        if tolerance > 0.0 {
            (g.to_f64() - w).abs() > tolerance * w.abs()
        } else {
            g != T::from_f64(w)
        }
    });
    if let Some(i) = wrong {
        let count = got.iter().zip(want).filter(|(&g, &w)| g != T::from_f64(w)).count();
        panic!(
            "{label}: element {i} is {:?}, expected {} ({count} of {} differ)",
            got[i],
            want[i],
            got.len()
        );
    }
}

/// Asserts two buffers hold the same bits (copies: broadcast, gathers, point to point).
fn assert_same_bits<T: Elem>(got: &[T], want: &[T], label: &str) {
    let (g, w): (&[u8], &[u8]) = (bytemuck::cast_slice(got), bytemuck::cast_slice(want));
    assert_eq!(got.len(), want.len(), "{label}: length");
    if let Some(i) = g.iter().zip(w).position(|(a, b)| a != b) {
        let e = i / T::DTYPE.size_bytes();
        panic!("{label}: element {e} is {:?}, expected {:?}", got[e], want[e]);
    }
}

/// FNV-1a of a buffer's bytes.
fn digest<T: Elem>(data: &[T]) -> u64 {
    bytemuck::cast_slice::<T, u8>(data)
        .iter()
        .fold(0xcbf2_9ce4_8422_2325, |h, &b| {
            (h ^ b as u64).wrapping_mul(0x0100_0000_01b3)
        })
}

fn salt_of(what: &str, op: Option<ReduceOp>, extra: usize) -> u64 {
    let text = format!("{what}/{op:?}/{extra}");
    text.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ b as u64).wrapping_mul(0x0100_0000_01b3)
    })
}

/// The big size runs a subset (the suite must stay well under two minutes on a small machine):
/// every dtype for sum, and bf16 for avg (the final division on each rank's chunk).
fn big_all_reduce(op: ReduceOp, dtype: DType) -> bool {
    match op {
        ReduceOp::Sum => true,
        ReduceOp::Avg => dtype == DType::BF16,
        ReduceOp::Max | ReduceOp::Min | ReduceOp::Prod => false,
    }
}

fn all_reduce_case<T: Elem>(pg: &ProcessGroup, case: &Case<'_>, digests: &mut Vec<(String, u64)>) {
    for op in ReduceOp::ALL {
        if case.regime.big && !big_all_reduce(op, T::DTYPE) {
            continue;
        }
        let label = case.label(&format!("all_reduce({op})"), T::DTYPE);
        let salt = salt_of("all_reduce", Some(op), 0);
        let mut data = inputs::<T>(domain(op), salt, case.rank, 0..case.numel);
        pg.all_reduce(&mut data, op).unwrap_or_else(|e| panic!("{label}: {e}"));
        let want = case.reference(&format!("all_reduce({op})"), T::DTYPE, || {
            (0..case.numel)
                .map(|i| reduce_ref::<T>(op, case.n, salt, i))
                .collect::<Vec<f64>>()
        });
        assert_matches(&data, &want, &label);
        digests.push((label, digest(&data)));
    }
}

#[test]
fn all_reduce_with_every_operator_matches_the_reference_and_replicas_are_bit_identical() {
    conformance(|pg, case, digests| for_each_dtype!(all_reduce_case(pg, case, digests)));
}

fn reduce_case<T: Elem>(pg: &ProcessGroup, case: &Case<'_>) {
    if case.regime.big && !matches!(T::DTYPE, DType::F32 | DType::I64) {
        return;
    }
    for root in 0..case.n {
        for op in ReduceOp::ALL {
            if case.regime.big && (op != ReduceOp::Sum || root != case.n - 1) {
                continue;
            }
            let label = case.label(&format!("reduce({op}, root {root})"), T::DTYPE);
            let salt = salt_of("reduce", Some(op), root);
            let mut data = inputs::<T>(domain(op), salt, case.rank, 0..case.numel);
            pg.reduce(&mut data, op, root)
                .unwrap_or_else(|e| panic!("{label}: {e}"));
            if case.rank == root {
                let want: Vec<f64> = (0..case.numel).map(|i| reduce_ref::<T>(op, case.n, salt, i)).collect();
                assert_matches(&data, &want, &label);
            }
        }
    }
}

#[test]
fn reduce_to_every_root_matches_the_reference() {
    conformance(|pg, case, _| for_each_dtype!(reduce_case(pg, case)));
}

fn broadcast_case<T: Elem>(pg: &ProcessGroup, case: &Case<'_>, digests: &mut Vec<(String, u64)>) {
    if case.regime.big && !matches!(T::DTYPE, DType::F64 | DType::U8) {
        return;
    }
    for root in 0..case.n {
        if case.regime.big && root != case.n / 2 {
            continue;
        }
        let label = case.label(&format!("broadcast(root {root})"), T::DTYPE);
        let salt = salt_of("broadcast", None, root);
        // Every rank starts with other data, so a rank the broadcast skipped shows.
        let mut data = inputs::<T>(Domain::Any, salt, case.rank + 100, 0..case.numel);
        if case.rank == root {
            data = inputs::<T>(Domain::Any, salt, root, 0..case.numel);
        }
        pg.broadcast(&mut data, root).unwrap_or_else(|e| panic!("{label}: {e}"));
        assert_same_bits(&data, &inputs::<T>(Domain::Any, salt, root, 0..case.numel), &label);
        digests.push((label, digest(&data)));
    }
}

#[test]
fn broadcast_from_every_root_copies_the_roots_buffer_to_every_rank() {
    conformance(|pg, case, digests| for_each_dtype!(broadcast_case(pg, case, digests)));
}

fn all_gather_case<T: Elem>(pg: &ProcessGroup, case: &Case<'_>, digests: &mut Vec<(String, u64)>) {
    if case.regime.big && T::DTYPE != DType::F32 {
        return;
    }
    let label = case.label("all_gather", T::DTYPE);
    let salt = salt_of("all_gather", None, 0);
    let input = inputs::<T>(Domain::Any, salt, case.rank, 0..case.numel);
    let mut output = vec![T::from_f64(7.0); case.numel * case.n];
    pg.all_gather(&input, &mut output)
        .unwrap_or_else(|e| panic!("{label}: {e}"));
    let want = case.reference("all_gather", T::DTYPE, || {
        (0..case.n)
            .flat_map(|r| inputs::<T>(Domain::Any, salt, r, 0..case.numel))
            .collect::<Vec<T>>()
    });
    assert_same_bits(&output, &want, &label);
    digests.push((label, digest(&output)));
}

#[test]
fn all_gather_concatenates_every_ranks_input_in_rank_order() {
    conformance(|pg, case, digests| for_each_dtype!(all_gather_case(pg, case, digests)));
}

fn reduce_scatter_case<T: Elem>(pg: &ProcessGroup, case: &Case<'_>) {
    if case.regime.big && T::DTYPE != DType::F32 {
        return;
    }
    for op in ReduceOp::ALL {
        if case.regime.big && op != ReduceOp::Sum {
            continue;
        }
        let label = case.label(&format!("reduce_scatter({op})"), T::DTYPE);
        let salt = salt_of("reduce_scatter", Some(op), 0);
        let input = inputs::<T>(domain(op), salt, case.rank, 0..case.numel * case.n);
        let mut output = vec![T::from_f64(7.0); case.numel];
        pg.reduce_scatter(&input, &mut output, op)
            .unwrap_or_else(|e| panic!("{label}: {e}"));
        let mine = case.rank * case.numel..(case.rank + 1) * case.numel;
        let want: Vec<f64> = mine.map(|i| reduce_ref::<T>(op, case.n, salt, i)).collect();
        assert_matches(&output, &want, &label);
    }
}

#[test]
fn reduce_scatter_leaves_each_rank_its_reduced_chunk() {
    conformance(|pg, case, _| for_each_dtype!(reduce_scatter_case(pg, case)));
}

fn all_to_all_case<T: Elem>(pg: &ProcessGroup, case: &Case<'_>) {
    if case.regime.big && T::DTYPE != DType::I32 {
        return;
    }
    // `numel` is the block each rank sends to each other rank.
    let (n, block) = (case.n, case.numel);
    let label = case.label("all_to_all", T::DTYPE);
    let salt = salt_of("all_to_all", None, 0);
    let input = inputs::<T>(Domain::Any, salt, case.rank, 0..block * n);
    let mut output = vec![T::from_f64(7.0); block * n];
    pg.all_to_all(&input, &mut output)
        .unwrap_or_else(|e| panic!("{label}: {e}"));
    // Block i of the output is block `rank` of rank i's input.
    let mine = case.rank * block..(case.rank + 1) * block;
    let want: Vec<T> = (0..n)
        .flat_map(|from| inputs::<T>(Domain::Any, salt, from, mine.clone()))
        .collect();
    assert_same_bits(&output, &want, &label);
}

#[test]
fn all_to_all_delivers_block_j_of_rank_i_to_block_i_of_rank_j() {
    conformance(|pg, case, _| for_each_dtype!(all_to_all_case(pg, case)));
}

fn send_recv_case<T: Elem>(pg: &ProcessGroup, case: &Case<'_>) {
    if case.regime.big && T::DTYPE != DType::U8 {
        return;
    }
    let n = case.n;
    let tag = |from: usize, to: usize| (1000 * T::DTYPE as usize + 10 * from + to) as u32;
    let salt = salt_of("send_recv", None, 0);
    let message = |from: usize, to: usize| inputs::<T>(Domain::Any, salt ^ tag(from, to) as u64, from, 0..case.numel);
    // Pairs in one global order, each exchange both ways, so blocking sends of large messages
    // cannot wait on each other in a cycle.
    for a in 0..n {
        for b in a + 1..n {
            let label = case.label(&format!("send/recv between ranks {a} and {b}"), T::DTYPE);
            let mut got = vec![T::from_f64(7.0); case.numel];
            if case.rank == a {
                pg.send(&message(a, b), b, tag(a, b))
                    .unwrap_or_else(|e| panic!("{label}: {e}"));
                pg.recv(&mut got, b, tag(b, a))
                    .unwrap_or_else(|e| panic!("{label}: {e}"));
                assert_same_bits(&got, &message(b, a), &label);
            } else if case.rank == b {
                pg.recv(&mut got, a, tag(a, b))
                    .unwrap_or_else(|e| panic!("{label}: {e}"));
                pg.send(&message(b, a), a, tag(b, a))
                    .unwrap_or_else(|e| panic!("{label}: {e}"));
                assert_same_bits(&got, &message(a, b), &label);
            }
        }
    }
}

#[test]
fn send_and_recv_deliver_tagged_messages_between_every_pair_of_ranks() {
    conformance(|pg, case, _| for_each_dtype!(send_recv_case(pg, case)));
}

#[test]
fn two_ranks_that_send_large_buffers_to_each_other_before_receiving_do_not_deadlock() {
    // Far more than the sockets' buffers hold: each blocking send completes only because the
    // transport reads the peer's frames into its stash while the send waits.
    let numel = 8 << 20;
    for shm in TRANSPORTS {
        let got = spawn_ranks(2, &tuned(0, 64 << 10, shm), |pg| {
            let peer = 1 - pg.rank();
            pg.send(&vec![pg.rank() as f32 + 1.0; numel], peer, 7).unwrap();
            let mut got = vec![0f32; numel];
            pg.recv(&mut got, peer, 7).unwrap();
            assert!(got.iter().all(|&x| x == got[0]));
            got[0]
        })
        .unwrap();
        assert_eq!(got, vec![2.0, 1.0], "shm ring {shm:?}");
    }
}

/// Well over what the sockets' buffers on 127.0.0.1 hold, so a send completes only once the
/// peer reads.
const OVER_SOCKET_BUFFERS: usize = 12 << 20;

#[test]
fn ranks_that_each_send_to_the_next_before_receiving_do_not_deadlock() {
    // A ring shift with blocking sends: rank r waits for r+1 to read, which is itself sending.
    for (n, shm) in [(3, TRANSPORTS[0]), (4, TRANSPORTS[1])] {
        spawn_ranks(n, &tuned(0, 64 << 10, shm), |pg| {
            let rank = pg.rank();
            let (right, left) = ((rank + 1) % n, (rank + n - 1) % n);
            pg.send(&vec![rank as u8; OVER_SOCKET_BUFFERS], right, 6).unwrap();
            let mut got = vec![0u8; OVER_SOCKET_BUFFERS];
            pg.recv(&mut got, left, 6).unwrap();
            assert!(got.iter().all(|&x| x as usize == left), "rank {rank} from rank {left}");
        })
        .unwrap();
    }
}

#[test]
fn async_sends_to_every_peer_posted_before_the_receives_complete() {
    for (n, shm) in [(3, TRANSPORTS[1]), (4, TRANSPORTS[0])] {
        spawn_ranks(n, &tuned(0, 64 << 10, shm), |pg| {
            let rank = pg.rank();
            let sent: Vec<_> = (1..n)
                .map(|k| pg.send_async(vec![rank as u8; OVER_SOCKET_BUFFERS], (rank + k) % n, 8))
                .collect();
            // Receives queued behind the sends, in the opposite rotation.
            for k in 1..n {
                let peer = (rank + n - k) % n;
                let got = pg.recv_async(vec![0u8; OVER_SOCKET_BUFFERS], peer, 8).wait().unwrap();
                assert!(got.iter().all(|&x| x as usize == peer), "rank {rank} from rank {peer}");
            }
            for work in sent {
                assert_eq!(work.wait().unwrap().len(), OVER_SOCKET_BUFFERS);
            }
        })
        .unwrap();
    }
}

#[test]
fn messages_are_matched_by_tag_not_by_arrival_order() {
    for regime in &REGIMES[..4] {
        spawn_ranks(2, &options(regime), |pg| {
            let message =
                |tag: u32, len: usize| (0..len).map(|i| (tag as usize * 10_000 + i) as i64).collect::<Vec<_>>();
            if pg.rank() == 0 {
                for tag in [1, 2, 3] {
                    pg.send(&message(tag, 100 * tag as usize), 1, tag).unwrap();
                }
                // Two messages under one tag arrive in the order they were sent.
                pg.send(&[1i64, 1], 1, 9).unwrap();
                pg.send(&[2i64, 2], 1, 9).unwrap();
            } else {
                for tag in [3, 1, 2] {
                    let mut got = vec![0i64; 100 * tag as usize];
                    pg.recv(&mut got, 0, tag).unwrap();
                    assert_eq!(got, message(tag, 100 * tag as usize), "tag {tag} ({})", regime.name);
                }
                let mut got = [0i64; 2];
                pg.recv(&mut got, 0, 9).unwrap();
                assert_eq!(got, [1, 1]);
                pg.recv(&mut got, 0, 9).unwrap();
                assert_eq!(got, [2, 2]);
            }
            // Collectives after point-to-point traffic keep their own numbering.
            let mut x = [pg.rank() as i32 + 1];
            pg.all_reduce(&mut x, ReduceOp::Sum).unwrap();
            assert_eq!(x, [3]);
        })
        .unwrap();
    }
}

#[test]
fn barrier_returns_only_after_every_rank_entered_it() {
    for n in 1..=5 {
        for regime in &REGIMES[..4] {
            let arrived: Vec<AtomicBool> = (0..n).map(|_| AtomicBool::new(false)).collect();
            spawn_ranks(n, &options(regime), |pg| {
                for round in 0..3 {
                    // Late ranks arrive late; nobody may leave before the last one arrived.
                    std::thread::sleep(Duration::from_millis((pg.rank() * 20) as u64));
                    arrived[pg.rank()].store(true, Ordering::SeqCst);
                    pg.barrier().unwrap();
                    assert!(
                        arrived.iter().all(|a| a.load(Ordering::SeqCst)),
                        "round {round}: rank {} left the barrier before every rank entered it",
                        pg.rank()
                    );
                    // A second barrier so the flags are reset only after everyone checked them.
                    pg.barrier().unwrap();
                    arrived[pg.rank()].store(false, Ordering::SeqCst);
                    pg.barrier().unwrap();
                }
            })
            .unwrap();
        }
    }
}

/// Fills a run-time typed buffer through its typed view.
fn filled<T: Elem>(numel: usize, rank: usize, salt: u64) -> HostBuffer {
    HostBuffer::from_slice(&inputs::<T>(Domain::Sum, salt, rank, 0..numel))
}

fn expect_reduced<T: Elem>(got: &HostBuffer, n: usize, salt: u64, label: &str) {
    let want: Vec<f64> = (0..got.numel())
        .map(|i| reduce_ref::<T>(ReduceOp::Sum, n, salt, i))
        .collect();
    assert_matches(got.as_slice::<T>(), &want, label);
}

fn expect_gathered<T: Elem>(got: &HostBuffer, n: usize, numel: usize, salt: u64, label: &str) {
    let want: Vec<T> = (0..n)
        .flat_map(|r| inputs::<T>(Domain::Sum, salt, r, 0..numel))
        .collect();
    assert_same_bits(got.as_slice::<T>(), &want, label);
}

/// Dispatches a run-time dtype to a generic function.
macro_rules! with_dtype {
    ($dtype:expr, $f:ident($($arg:expr),*)) => {
        match $dtype {
            DType::F32 => $f::<f32>($($arg),*),
            DType::F64 => $f::<f64>($($arg),*),
            DType::F16 => $f::<f16>($($arg),*),
            DType::BF16 => $f::<bf16>($($arg),*),
            DType::I32 => $f::<i32>($($arg),*),
            DType::I64 => $f::<i64>($($arg),*),
            DType::U8 => $f::<u8>($($arg),*),
        }
    };
}

#[test]
fn buffers_of_a_run_time_dtype_go_through_the_communicator_trait() {
    for regime in &REGIMES[..4] {
        spawn_ranks(3, &options(regime), |pg| {
            let (n, rank, numel) = (pg.world_size(), pg.rank(), 301);
            for dtype in DType::ALL {
                let label = format!("{dtype} ({}), rank {rank}", regime.name);
                let salt = dtype as u64;
                let mut buf = with_dtype!(dtype, filled(numel, rank, salt));
                assert_eq!((buf.dtype(), buf.numel()), (dtype, numel));
                pg.communicator().all_reduce(buf.view_mut(), ReduceOp::Sum).unwrap();
                with_dtype!(dtype, expect_reduced(&buf, n, salt, &label));

                let mut buf = with_dtype!(dtype, filled(numel, rank, salt));
                pg.all_reduce_buffer(&mut buf, ReduceOp::Sum).unwrap();
                with_dtype!(dtype, expect_reduced(&buf, n, salt, &label));

                let buf = with_dtype!(dtype, filled(numel, rank, salt));
                let buf = pg.all_reduce_buffer_async(buf, ReduceOp::Sum).wait().unwrap();
                with_dtype!(dtype, expect_reduced(&buf, n, salt, &label));

                let input = with_dtype!(dtype, filled(numel, rank, salt));
                let mut output = HostBuffer::zeros(dtype, numel * n);
                pg.communicator().all_gather(input.view(), output.view_mut()).unwrap();
                with_dtype!(dtype, expect_gathered(&output, n, numel, salt, &label));

                let mut root_data = with_dtype!(dtype, filled(numel, 2, salt));
                if rank != 2 {
                    root_data = HostBuffer::zeros(dtype, numel);
                }
                let comm = pg.communicator();
                // Raw bytes with a dtype tag, as a caller holding untyped memory builds them.
                let raw = BufMut {
                    dtype,
                    numel,
                    memory: MemoryMut::Host(root_data.bytes_mut()),
                };
                comm.broadcast(raw, 2).unwrap();
                assert_eq!(
                    root_data,
                    with_dtype!(dtype, filled(numel, 2, salt)),
                    "{label}: broadcast"
                );

                let message = with_dtype!(dtype, filled(numel, rank, salt));
                let mut got = HostBuffer::zeros(dtype, numel);
                let (right, left) = ((rank + 1) % n, (rank + n - 1) % n);
                if rank == 0 {
                    let raw = BufRef {
                        dtype,
                        numel,
                        memory: Memory::Host(message.bytes()),
                    };
                    comm.send(raw, right, 5).unwrap();
                    comm.recv(got.view_mut(), left, 5).unwrap();
                } else {
                    comm.recv(got.view_mut(), left, 5).unwrap();
                    comm.send(message.view(), right, 5).unwrap();
                }
                assert_eq!(got, with_dtype!(dtype, filled(numel, left, salt)), "{label}: send/recv");
            }
        })
        .unwrap();
    }
}

/// Unit roundoff of a float dtype: one rounding moves a value by at most this much of itself.
fn unit_roundoff(dtype: DType) -> f64 {
    match dtype {
        DType::F64 => f64::EPSILON / 2.0,
        DType::F32 => f32::EPSILON as f64 / 2.0,
        DType::F16 => 1.0 / 2048.0,
        DType::BF16 => 1.0 / 256.0,
        _ => 0.0,
    }
}

fn random_floats_case<T: Elem>(pg: &ProcessGroup, regime: &str, results: &mut Vec<(String, u64)>) {
    let (n, rank, numel) = (pg.world_size(), pg.rank(), 4099);
    // Values in [-1, 1) with full mantissas: the order of the additions changes the rounding, so
    // only an engine that combines in the same order on every rank leaves identical replicas.
    let draw = |r: usize, i: usize| T::from_f64((mix(77, r, i) >> 11) as f64 / (1u64 << 52) as f64 - 1.0);
    for op in [ReduceOp::Sum, ReduceOp::Avg] {
        let label = format!(
            "all_reduce({op}) of random {} x {numel} on {n} ranks ({regime})",
            T::DTYPE
        );
        let mut data: Vec<T> = (0..numel).map(|i| draw(rank, i)).collect();
        pg.all_reduce(&mut data, op).unwrap();
        // Each of the n-1 combining steps rounds once (in f32 for half types, then to the type),
        // so |error| <= n * u * sum(|x_r|), plus one rounding of the average's quotient.
        let u = unit_roundoff(T::DTYPE);
        for (i, got) in data.iter().enumerate() {
            let terms: Vec<f64> = (0..n).map(|r| draw(r, i).to_f64()).collect();
            let scale = if op == ReduceOp::Avg { n as f64 } else { 1.0 };
            let want = terms.iter().sum::<f64>() / scale;
            let bound = (n as f64 + 1.0) * u * terms.iter().map(|x| x.abs()).sum::<f64>() / scale;
            assert!(
                (got.to_f64() - want).abs() <= bound,
                "{label}: element {i} is {got:?}, expected {want}"
            );
        }
        results.push((label, digest(&data)));
    }
}

#[test]
fn all_reduce_of_random_floats_leaves_bit_identical_replicas() {
    for n in [2, 3, 4, 5] {
        for regime in &REGIMES[..4] {
            let per_rank = spawn_ranks(n, &options(regime), |pg| {
                let mut results = Vec::new();
                random_floats_case::<f32>(&pg, regime.name, &mut results);
                random_floats_case::<f64>(&pg, regime.name, &mut results);
                random_floats_case::<f16>(&pg, regime.name, &mut results);
                random_floats_case::<bf16>(&pg, regime.name, &mut results);
                results
            })
            .unwrap();
            for (rank, results) in per_rank.iter().enumerate() {
                for (mine, first) in results.iter().zip(&per_rank[0]) {
                    assert_eq!(mine.1, first.1, "{}: rank {rank} holds other bits than rank 0", mine.0);
                }
            }
        }
    }
}

#[test]
fn a_subgroup_of_some_ranks_runs_collectives_in_its_own_numbering() {
    for regime in &REGIMES[..4] {
        spawn_ranks(5, &options(regime), |pg| {
            let rank = pg.rank();
            let members = [4, 1, 3];
            let group = pg.new_group(&members).unwrap();
            let Some(group) = group else {
                assert!(!members.contains(&rank), "rank {rank} is a member but got no group");
                // Non-members keep using the world group meanwhile.
                let mut x = [rank as i64];
                pg.all_reduce(&mut x, ReduceOp::Sum).unwrap();
                assert_eq!(x, [10]);
                return;
            };
            let me = members.iter().position(|&r| r == rank).unwrap();
            assert_eq!((group.rank(), group.world_size()), (me, 3));
            assert_eq!(group.global_ranks(), &members);

            let numel = 777;
            let mut data: Vec<f32> = (0..numel).map(|i| (rank * 10 + i % 5) as f32).collect();
            group.all_reduce(&mut data, ReduceOp::Sum).unwrap();
            let want: Vec<f32> = (0..numel).map(|i| (80 + 3 * (i % 5)) as f32).collect();
            assert_eq!(data, want, "sub-group all_reduce ({})", regime.name);

            // Group rank 0 is global rank 4.
            let mut data = vec![rank as u8; numel];
            group.broadcast(&mut data, 0).unwrap();
            assert!(data.iter().all(|&x| x == 4), "sub-group broadcast ({})", regime.name);

            let mut gathered = vec![0u8; 3 * numel];
            group.all_gather(&vec![rank as u8; numel], &mut gathered).unwrap();
            let want: Vec<u8> = members.iter().flat_map(|&r| vec![r as u8; numel]).collect();
            assert_eq!(gathered, want, "sub-group all_gather follows the group order");

            // Point to point in group ranks: group rank 0 (global 4) to group rank 2 (global 3).
            if me == 0 {
                group.send(&[42i32; 9], 2, 1).unwrap();
            } else if me == 2 {
                let mut got = [0i32; 9];
                group.recv(&mut got, 0, 1).unwrap();
                assert_eq!(got, [42; 9]);
            }
            group.barrier().unwrap();

            // The world group is unaffected by the sub-group's traffic.
            let mut x = [rank as i64];
            pg.all_reduce(&mut x, ReduceOp::Sum).unwrap();
            assert_eq!(x, [10]);
        })
        .unwrap();
    }
}

#[test]
fn split_into_rows_and_columns_of_a_2x2_mesh_runs_both_axes_concurrently() {
    for regime in &REGIMES[..4] {
        spawn_ranks(4, &options(regime), |pg| {
            let rank = pg.rank();
            // Rank r sits at row r / 2, column r % 2.
            let rows = pg.split(&[0, 0, 1, 1]).unwrap();
            let cols = pg.split(&[0, 1, 0, 1]).unwrap();
            assert_eq!(rows.global_ranks(), if rank < 2 { &[0, 1] } else { &[2, 3] });
            assert_eq!(cols.global_ranks(), if rank % 2 == 0 { &[0, 2] } else { &[1, 3] });
            assert_eq!((rows.rank(), cols.rank()), (rank % 2, rank / 2));
            let numel = 3001;
            let input = |r: usize| (0..numel).map(|i| (r * 1000 + i % 97) as f64).collect::<Vec<_>>();
            let sum_of = |a: usize, b: usize| (0..numel).map(|i| ((a + b) * 1000 + 2 * (i % 97)) as f64).collect();
            let row_want: Vec<f64> = if rank < 2 { sum_of(0, 1) } else { sum_of(2, 3) };
            let col_want: Vec<f64> = if rank % 2 == 0 { sum_of(0, 2) } else { sum_of(1, 3) };
            std::thread::scope(|s| {
                let row_thread = s.spawn(|| {
                    for _ in 0..20 {
                        let mut data = input(rank);
                        rows.all_reduce(&mut data, ReduceOp::Sum).unwrap();
                        assert_eq!(data, row_want, "row all_reduce ({})", regime.name);
                    }
                });
                for _ in 0..20 {
                    let mut data = input(rank);
                    cols.all_reduce(&mut data, ReduceOp::Sum).unwrap();
                    assert_eq!(data, col_want, "column all_reduce ({})", regime.name);
                }
                row_thread.join().unwrap();
            });
        })
        .unwrap();
    }
}

#[test]
fn two_groups_over_the_same_ranks_share_connections_concurrently() {
    for regime in &REGIMES[..4] {
        spawn_ranks(3, &options(regime), |pg| {
            let rank = pg.rank();
            let forward = pg.new_group(&[0, 1, 2]).unwrap().unwrap();
            let backward = pg.new_group(&[2, 1, 0]).unwrap().unwrap();
            assert_eq!(backward.rank(), 2 - rank);
            let numel = 2500;
            std::thread::scope(|s| {
                let other = s.spawn(|| {
                    for round in 0..15 {
                        let mut data: Vec<i32> = (0..numel).map(|i| (rank * round + i) as i32).collect();
                        backward.all_reduce(&mut data, ReduceOp::Max).unwrap();
                        let want: Vec<i32> = (0..numel).map(|i| (2 * round + i) as i32).collect();
                        assert_eq!(data, want, "backward group, round {round} ({})", regime.name);
                        let mut bcast = vec![rank as f32; numel];
                        backward.broadcast(&mut bcast, 0).unwrap();
                        assert!(bcast.iter().all(|&x| x == 2.0), "backward broadcast from global rank 2");
                    }
                });
                for round in 0..15 {
                    let mut data: Vec<i32> = (0..numel).map(|i| (rank + round + i) as i32).collect();
                    forward.all_reduce(&mut data, ReduceOp::Sum).unwrap();
                    let want: Vec<i32> = (0..numel).map(|i| (3 + 3 * (round + i)) as i32).collect();
                    assert_eq!(data, want, "forward group, round {round} ({})", regime.name);
                    let mut gathered = vec![0u8; 3 * numel];
                    forward.all_gather(&vec![rank as u8; numel], &mut gathered).unwrap();
                    assert!(gathered
                        .chunks(numel)
                        .enumerate()
                        .all(|(r, c)| c.iter().all(|&x| x == r as u8)));
                }
                other.join().unwrap();
            });
        })
        .unwrap();
    }
}

#[test]
fn async_work_runs_in_issue_order_interleaved_with_synchronous_calls() {
    for n in [1, 2, 3, 5] {
        for regime in &REGIMES[..4] {
            spawn_ranks(n, &options(regime), |pg| {
                let rank = pg.rank();
                let ranks_sum = (n * (n - 1) / 2) as i64;
                let first = pg.all_reduce_async(vec![rank as i64; 1000], ReduceOp::Sum);
                let second = pg.all_reduce_async(vec![rank as f32; 20_000], ReduceOp::Max);
                // A synchronous call between async ones waits for them, so every rank sees the same
                // order of collectives.
                let mut bcast = vec![rank as u8; 333];
                pg.broadcast(&mut bcast, n - 1).unwrap();
                assert!(bcast.iter().all(|&x| x as usize == n - 1));
                assert!(
                    first.is_done() && second.is_done(),
                    "a sync call returned before earlier async work"
                );
                let third = pg.all_reduce_async((0..5000).map(|i| (i % 3) as f64).collect(), ReduceOp::Avg);
                let gathered = pg.all_gather_async(vec![rank as i32; 17]);
                let scattered = pg.reduce_scatter_async(vec![1i64; 4 * n], ReduceOp::Sum);
                let broadcast = pg.broadcast_async(vec![rank as u8; 70], 0);
                let last = pg.all_reduce_async(vec![bf16::from_f32(1.0); 999], ReduceOp::Sum);

                // Waiting in reverse order: each handle holds its own buffer.
                let last = last.wait().unwrap();
                assert!(third.is_done(), "work finished out of issue order");
                assert!(last.iter().all(|&x| x == bf16::from_f32(n as f32)));
                assert!(broadcast.wait().unwrap().iter().all(|&x| x == 0));
                assert_eq!(scattered.wait().unwrap(), vec![n as i64; 4]);
                let gathered = gathered.wait().unwrap();
                assert_eq!(gathered, (0..n).flat_map(|r| vec![r as i32; 17]).collect::<Vec<_>>());
                let third = third.wait().unwrap();
                assert!(third.iter().enumerate().all(|(i, &x)| x == (i % 3) as f64));
                assert!(second.wait().unwrap().iter().all(|&x| x == (n - 1) as f32));
                assert_eq!(first.wait().unwrap(), vec![ranks_sum; 1000]);

                // Async point to point around a ring.
                if n > 1 {
                    let (right, left) = ((rank + 1) % n, (rank + n - 1) % n);
                    let sent = pg.send_async(vec![rank as i32; 64], right, 3);
                    let got = pg.recv_async(vec![0i32; 64], left, 3);
                    assert_eq!(got.wait().unwrap(), vec![left as i32; 64]);
                    assert_eq!(sent.wait().unwrap().len(), 64);
                }
                pg.barrier().unwrap();
            })
            .unwrap();
        }
    }
}

/// Random world sizes, lengths, values and tunings; inputs are integers so the sum is exact.
fn random_all_reduce() -> impl Strategy<Value = (usize, Vec<Vec<i32>>, usize, usize)> {
    (
        1usize..=4,
        0usize..700,
        prop_oneof![Just(0usize), Just(usize::MAX)],
        8usize..600,
    )
        .prop_flat_map(|(n, numel, threshold, segment)| {
            (
                Just(n),
                prop::collection::vec(prop::collection::vec(-10_000i32..10_000, numel), n),
                Just(threshold),
                Just(segment),
            )
        })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 12, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn all_reduce_sum_of_random_inputs_equals_the_sequential_sum((n, values, threshold, segment) in random_all_reduce()) {
        let numel = values[0].len();
        let want: Vec<f32> = (0..numel).map(|i| values.iter().map(|v| v[i]).sum::<i32>() as f32).collect();
        let got = spawn_ranks(n, &tuned(threshold, segment, TRANSPORTS[numel % 2]), |pg| {
            let mut data: Vec<f32> = values[pg.rank()].iter().map(|&x| x as f32).collect();
            pg.all_reduce(&mut data, ReduceOp::Sum).map(|()| data)
        })
        .unwrap();
        let distinct: HashSet<Vec<u32>> =
            got.iter().map(|r| r.as_ref().unwrap().iter().map(|x| x.to_bits()).collect()).collect();
        prop_assert_eq!(distinct.len(), 1, "replicas differ");
        for result in got {
            prop_assert_eq!(result.unwrap(), want.clone());
        }
    }
}
