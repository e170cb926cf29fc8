//! The hierarchical all-reduce and broadcast (`src/comm/algorithms/hier.rs`): ranks on threads made into
//! "hosts" by `ShmOptions::host_id`, with shared memory inside a host (or loopback TCP) and TCP
//! between hosts. Results are compared with a sequential reference, replicas must hold the same
//! bits on every rank, and the traffic between hosts shows which algorithm ran.
//!
//! As in `tests/collectives.rs`, inputs are small integers, so every sum is exact whatever order
//! the algorithm combines in and f32/f64/i32 results equal the reference bit for bit.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use burnrun::comm::{spawn_ranks_each, Element, Hierarchy, InitOptions, ProcessGroup, ShmOptions, Tuning};
use burnrun::transport::{shm_file_prefix, MIN_SHM_RING_BYTES};
use burnrun::{DType, ReduceOp};
use half::bf16;

/// Deadline of the rendezvous and of every collective. Generous: the machine is small and shared.
const TIMEOUT: Duration = Duration::from_secs(30);

/// bf16 keeps 8 significant bits; an average rounds its f32 quotient and then to bf16: two
/// roundings of at most 2^-8 of the value each. (Sums of our inputs are exact.)
const BF16_TOLERANCE: f64 = 2.0 / 256.0;

/// Host of each rank in the layouts every test runs: 2 hosts of 2 ranks, 3 + 1, 2 + 1 with the
/// hosts interleaved in rank order, 2 + 2 + 1.
const LAYOUTS: [&[usize]; 4] = [&[0, 0, 1, 1], &[0, 0, 0, 1], &[0, 1, 0], &[0, 0, 1, 1, 2]];

/// A distinct name for every group of threads, so shared-memory files and host ids of tests
/// that run at once never meet.
fn unique(what: &str) -> String {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    format!("{what}-{}-{}", std::process::id(), NEXT.fetch_add(1, Ordering::Relaxed))
}

/// Options of each rank of a job laid out as `hosts` says (rank r on host `hosts[r]`).
fn layout_options(hosts: &[usize], tuning: Tuning, shm: bool) -> Vec<InitOptions> {
    let job = unique("hier");
    hosts
        .iter()
        .map(|host| InitOptions {
            timeout: TIMEOUT,
            rdzv_timeout: TIMEOUT,
            tuning,
            shm: ShmOptions {
                enabled: shm,
                ring_bytes: MIN_SHM_RING_BYTES,
                file_prefix: shm_file_prefix(&job),
                host_id: Some(format!("{job}-host-{host}")),
                ..Default::default()
            },
            ..Default::default()
        })
        .collect()
}

/// Runs `f` on one thread per rank, rank r with `options[r]`; returns each rank's result.
fn run_ranks<R: Send>(options: Vec<InitOptions>, f: impl Fn(ProcessGroup) -> R + Sync) -> Vec<R> {
    spawn_ranks_each(&options, f).unwrap_or_else(|e| panic!("a rank failed to join: {e}"))
}

fn tuning(hierarchical: Hierarchy, ring_threshold_bytes: usize, segment_bytes: usize) -> Tuning {
    Tuning {
        ring_threshold_bytes,
        segment_bytes,
        hierarchical,
    }
}

/// Test-side view of an element type.
trait Elem: Element {
    fn from_f64(x: f64) -> Self;
    fn to_f64(self) -> f64;
}

impl Elem for f32 {
    fn from_f64(x: f64) -> Self {
        x as f32
    }
    fn to_f64(self) -> f64 {
        self as f64
    }
}

impl Elem for f64 {
    fn from_f64(x: f64) -> Self {
        x
    }
    fn to_f64(self) -> f64 {
        self
    }
}

impl Elem for i32 {
    fn from_f64(x: f64) -> Self {
        x as i32
    }
    fn to_f64(self) -> f64 {
        self as f64
    }
}

impl Elem for bf16 {
    fn from_f64(x: f64) -> Self {
        bf16::from_f64(x)
    }
    fn to_f64(self) -> f64 {
        f64::from(self)
    }
}

/// splitmix64 of (salt, rank, index).
fn mix(salt: u64, rank: usize, i: usize) -> u64 {
    let mut z = salt ^ ((rank as u64) << 48) ^ (i as u64);
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Input element `i` of `rank`: an integer in [-5, 5] for sums (exact in every type), in
/// [-100, 100] for max.
fn value(op: ReduceOp, rank: usize, i: usize) -> f64 {
    let salt = ReduceOp::ALL.iter().position(|&o| o == op).unwrap_or(0) as u64 + 1;
    let h = mix(salt, rank, i);
    match op {
        ReduceOp::Max => (h % 201) as f64 - 100.0,
        _ => (h % 11) as f64 - 5.0,
    }
}

/// The sequential reference of element `i` over ranks `0..n`.
fn reference(op: ReduceOp, dtype: DType, n: usize, i: usize) -> f64 {
    let values = (0..n).map(|r| value(op, r, i));
    match op {
        ReduceOp::Max => values.fold(f64::MIN, f64::max),
        ReduceOp::Avg => {
            let avg = values.sum::<f64>() / n as f64;
            // Integer averages truncate, like integer division.
            if dtype == DType::I32 {
                avg.trunc()
            } else {
                avg
            }
        }
        _ => values.sum(),
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

/// All-reduces every op on `numel` elements of `T`, checks the result and records its digest.
fn check_all_reduce<T: Elem>(pg: &ProcessGroup, numel: usize, label: &str, digests: &mut Vec<(String, u64)>) {
    let (n, rank) = (pg.world_size(), pg.rank());
    for op in [ReduceOp::Sum, ReduceOp::Avg, ReduceOp::Max] {
        let label = format!("{label}: all_reduce({op}) {} x {numel}, rank {rank}", T::DTYPE);
        let mut data: Vec<T> = (0..numel).map(|i| T::from_f64(value(op, rank, i))).collect();
        pg.all_reduce(&mut data, op).unwrap_or_else(|e| panic!("{label}: {e}"));
        for (i, got) in data.iter().enumerate() {
            let want = reference(op, T::DTYPE, n, i);
            let ok = match T::DTYPE {
                DType::BF16 => (got.to_f64() - want).abs() <= BF16_TOLERANCE * want.abs(),
                _ => *got == T::from_f64(want),
            };
            assert!(ok, "{label}: element {i} is {got:?}, expected {want}");
        }
        digests.push((label, digest(&data)));
    }
}

/// Asserts every rank recorded the same digests as rank 0 (labels carry the rank, so compare
/// values in order).
fn assert_bit_identical(per_rank: &[Vec<(String, u64)>]) {
    for (rank, digests) in per_rank.iter().enumerate() {
        assert_eq!(digests.len(), per_rank[0].len());
        for (mine, first) in digests.iter().zip(&per_rank[0]) {
            assert_eq!(mine.1, first.1, "{}: rank {rank} holds other bits than rank 0", mine.0);
        }
    }
}

/// Sizes for a layout whose largest host holds `m` ranks: empty, one element, fewer elements
/// than chunks, odd sizes, one more than a multiple of everything.
fn small_sizes(m: usize) -> Vec<usize> {
    let mut sizes = vec![0, 1, m - 1, m, m + 1, 7, 1001];
    sizes.sort_unstable();
    sizes.dedup();
    sizes
}

fn max_local(hosts: &[usize]) -> usize {
    (0..hosts.len())
        .map(|h| hosts.iter().filter(|&&x| x == h).count())
        .max()
        .unwrap_or(0)
}

/// Every layout and transport with the hierarchical path forced, at every size: with threshold
/// 0 the chunks cross hosts by ring, with `usize::MAX` by recursive doubling.
#[test]
fn forced_hierarchical_all_reduce_matches_the_reference_with_bit_identical_replicas_on_uneven_hosts() {
    for hosts in LAYOUTS {
        for shm in [true, false] {
            for threshold in [0, usize::MAX] {
                let label = format!("hosts {hosts:?}, shm {shm}, threshold {threshold}");
                let options = layout_options(hosts, tuning(Hierarchy::Always, threshold, 64), shm);
                let per_rank = run_ranks(options, |pg| {
                    let mut digests = Vec::new();
                    for numel in small_sizes(max_local(hosts)) {
                        check_all_reduce::<f32>(&pg, numel, &label, &mut digests);
                        check_all_reduce::<f64>(&pg, numel, &label, &mut digests);
                        check_all_reduce::<i32>(&pg, numel, &label, &mut digests);
                        check_all_reduce::<bf16>(&pg, numel, &label, &mut digests);
                    }
                    digests
                });
                assert_bit_identical(&per_rank);
            }
        }
    }
}

/// Buffers above the ring threshold take the hierarchical path on their own (`Auto`), with
/// several segments per chunk; smaller ones keep recursive doubling.
#[test]
fn large_buffers_on_several_hosts_go_hierarchical_by_default_and_match_the_reference() {
    for hosts in LAYOUTS {
        for shm in [true, false] {
            let label = format!("hosts {hosts:?}, shm {shm}, auto");
            let options = layout_options(hosts, tuning(Hierarchy::Auto, 4096, 4096), shm);
            let per_rank = run_ranks(options, |pg| {
                let mut digests = Vec::new();
                for numel in [3, 1000, 100_003] {
                    check_all_reduce::<f32>(&pg, numel, &label, &mut digests);
                    check_all_reduce::<bf16>(&pg, numel, &label, &mut digests);
                }
                check_all_reduce::<f64>(&pg, 100_003, &label, &mut digests);
                check_all_reduce::<i32>(&pg, 100_003, &label, &mut digests);
                digests
            });
            assert_bit_identical(&per_rank);
        }
    }
}

/// From 4 MiB up the hierarchical all-reduce runs in pipelined pieces (one piece crosses hosts on
/// a thread of its own while the next is reduced inside the host): every layout and transport,
/// odd lengths so that pieces and chunks differ in size.
#[test]
fn pipelined_hierarchical_all_reduce_matches_the_reference_with_bit_identical_replicas() {
    for hosts in LAYOUTS {
        for shm in [true, false] {
            let label = format!("hosts {hosts:?}, shm {shm}, pipelined");
            let options = layout_options(hosts, tuning(Hierarchy::Auto, 64 << 10, 256 << 10), shm);
            let per_rank = run_ranks(options, |pg| {
                let mut digests = Vec::new();
                check_all_reduce::<f32>(&pg, (1 << 20) + 5, &label, &mut digests);
                check_all_reduce::<f64>(&pg, (1 << 19) + 3, &label, &mut digests);
                check_all_reduce::<i32>(&pg, (3 << 20) + 1, &label, &mut digests);
                digests
            });
            assert_bit_identical(&per_rank);
        }
    }
}

/// Floats with full mantissas: the order of the additions changes the rounding, so only an
/// algorithm that computes each element once and copies it leaves identical replicas.
#[test]
fn hierarchical_all_reduce_of_random_floats_leaves_bit_identical_replicas() {
    for hosts in LAYOUTS {
        let options = layout_options(hosts, tuning(Hierarchy::Always, 1024, 256), true);
        let per_rank = run_ranks(options, |pg| {
            let rank = pg.rank();
            let mut digests = Vec::new();
            for numel in [5, 4099] {
                for op in [ReduceOp::Sum, ReduceOp::Avg] {
                    let draw = |i: usize| (mix(77, rank, i) >> 11) as f64 / (1u64 << 52) as f64 - 1.0;
                    let mut single: Vec<f32> = (0..numel).map(|i| draw(i) as f32).collect();
                    pg.all_reduce(&mut single, op).unwrap();
                    digests.push((format!("f32 {op} x {numel}"), digest(&single)));
                    let mut half: Vec<bf16> = (0..numel).map(|i| bf16::from_f64(draw(i))).collect();
                    pg.all_reduce(&mut half, op).unwrap();
                    digests.push((format!("bf16 {op} x {numel}"), digest(&half)));
                }
            }
            digests
        });
        assert_bit_identical(&per_rank);
    }
}

/// Bytes each rank sent to other hosts during one all-reduce of `numel` f32 (after a warm-up
/// call, so connections and rings are settled), with the results checked.
fn bytes_across_hosts(hosts: &[usize], hierarchical: Hierarchy, numel: usize) -> Vec<u64> {
    let options = layout_options(hosts, tuning(hierarchical, 128 * 1024, 64 * 1024), true);
    run_ranks(options, |pg| {
        let mut digests = Vec::new();
        check_all_reduce::<f32>(&pg, 8, "warm-up", &mut digests);
        let before = pg.bytes_sent_across_hosts();
        let mut data = vec![(pg.rank() + 1) as f32; numel];
        pg.all_reduce(&mut data, ReduceOp::Sum).unwrap();
        let n = pg.world_size();
        assert!(data.iter().all(|&x| x == (n * (n + 1) / 2) as f32));
        pg.bytes_sent_across_hosts() - before
    })
}

#[test]
fn the_automatic_rule_cuts_the_traffic_between_two_hosts_of_two_ranks() {
    // 4 MiB, far above the 128 KiB threshold. The flat ring 0-1-2-3 crosses hosts at 1->2 and
    // 3->0: ranks 1 and 3 each send 2(n-1)/n = 1.5x the buffer to the other host, 3x in all.
    // Hierarchically each rank all-reduces half the buffer with its peer on the other host,
    // sending half the buffer: 2x in all, and every rank's link carries a third of the ring's
    // busiest one.
    let numel = 1 << 20;
    let bytes = (numel * 4) as f64;
    let flat = bytes_across_hosts(&[0, 0, 1, 1], Hierarchy::Never, numel);
    let auto = bytes_across_hosts(&[0, 0, 1, 1], Hierarchy::Auto, numel);
    let (flat_total, auto_total) = (flat.iter().sum::<u64>() as f64, auto.iter().sum::<u64>() as f64);
    // Frame headers add well under 1%.
    assert!(
        (flat_total / bytes - 3.0).abs() < 0.03,
        "flat ring sent {flat:?} across hosts"
    );
    assert!(
        (auto_total / bytes - 2.0).abs() < 0.02,
        "hierarchical sent {auto:?} across hosts"
    );
    for (rank, &sent) in auto.iter().enumerate() {
        assert!(
            (sent as f64 / bytes - 0.5).abs() < 0.01,
            "rank {rank} sent {sent} bytes across hosts, expected half the buffer: {auto:?}"
        );
    }
    let busiest = |v: &[u64]| *v.iter().max().unwrap_or(&0) as f64;
    assert!(
        busiest(&auto) < 0.4 * busiest(&flat),
        "flat {flat:?}, hierarchical {auto:?}"
    );
}

#[test]
fn every_rank_on_its_own_host_stays_flat() {
    // Nothing to reduce inside a host: the automatic rule keeps the flat ring, which sends the
    // very bytes `Never` sends.
    let numel = 1 << 18;
    let hosts = [0, 1, 2];
    assert_eq!(
        bytes_across_hosts(&hosts, Hierarchy::Auto, numel),
        bytes_across_hosts(&hosts, Hierarchy::Never, numel)
    );
    let options = layout_options(&hosts, tuning(Hierarchy::Always, 0, 64), true);
    let per_rank = run_ranks(options, |pg| {
        let mut digests = Vec::new();
        for numel in [0, 1, 2, 1001] {
            check_all_reduce::<f32>(&pg, numel, "own hosts", &mut digests);
        }
        digests
    });
    assert_bit_identical(&per_rank);
}

#[test]
fn small_buffers_keep_recursive_doubling_under_the_automatic_rule() {
    // Below the threshold every rank exchanges its whole buffer with log2(n) partners; the
    // hierarchical path would send less across hosts. Same bytes as `Never` means doubling ran.
    let numel = 1024;
    let hosts = [0, 0, 1, 1];
    assert_eq!(
        bytes_across_hosts(&hosts, Hierarchy::Auto, numel),
        bytes_across_hosts(&hosts, Hierarchy::Never, numel)
    );
}

#[test]
fn a_sub_group_learns_the_hosts_of_its_members() {
    // World: two hosts of two ranks. Sub-group [1, 2, 3]: rank 1 alone on host 0, ranks 2 and 3
    // on host 1, so it goes hierarchical (1 + 2); [0, 2] has one rank per host and stays flat.
    let options = layout_options(&[0, 0, 1, 1], tuning(Hierarchy::Auto, 1024, 64 * 1024), true);
    let numel = 1 << 16;
    let per_rank = run_ranks(options, |pg| {
        let mut digests = Vec::new();
        let trio = pg.new_group(&[1, 2, 3]).unwrap();
        let pair = pg.new_group(&[0, 2]).unwrap();
        let mut across = [0u64; 2];
        if let Some(trio) = &trio {
            check_all_reduce::<f32>(trio, 1001, "trio", &mut digests);
            let before = pg.bytes_sent_across_hosts();
            check_all_reduce::<f32>(trio, numel, "trio", &mut digests);
            across[0] = pg.bytes_sent_across_hosts() - before;
        }
        if let Some(pair) = &pair {
            let before = pg.bytes_sent_across_hosts();
            check_all_reduce::<f32>(pair, numel, "pair", &mut Vec::new());
            across[1] = pg.bytes_sent_across_hosts() - before;
        }
        (pg.rank(), digests, across)
    });
    // Replicas of the trio's results (the pair's ranks recorded none).
    let trio: Vec<_> = per_rank
        .iter()
        .filter(|(r, ..)| *r >= 1)
        .map(|(_, d, _)| d.clone())
        .collect();
    assert_bit_identical(&trio);
    // Hierarchically (M = 2 chunks): rank 1 owns both and all-reduces each with one rank of
    // host 1, so it sends the whole buffer across per op (3 ops: sum, avg, max); ranks 2 and 3
    // send half each. A flat ring 1-2-3 would have rank 1 send 4/3 and rank 3 4/3 of it across.
    let bytes = (numel * 4 * 3) as f64;
    let sent = |rank: usize| per_rank[rank].2[0] as f64 / bytes;
    assert!((sent(1) - 1.0).abs() < 0.02, "rank 1 sent {} x the buffers", sent(1));
    assert!((sent(2) - 0.5).abs() < 0.02, "rank 2 sent {} x the buffers", sent(2));
    assert!((sent(3) - 0.5).abs() < 0.02, "rank 3 sent {} x the buffers", sent(3));
    // The pair is a flat 2-rank ring: each sends the buffer once, all of it across.
    for rank in [0, 2] {
        let sent = per_rank[rank].2[1] as f64 / bytes;
        assert!((sent - 1.0).abs() < 0.02, "pair rank {rank} sent {sent} x the buffers");
    }
}

/// Broadcasts `numel` elements of `T` from every root in turn; checks every copy against the
/// root's input and records its digest.
fn check_broadcast<T: Elem>(pg: &ProcessGroup, numel: usize, label: &str, digests: &mut Vec<(String, u64)>) {
    let rank = pg.rank();
    for root in 0..pg.world_size() {
        let label = format!("{label}: broadcast(root {root}) {} x {numel}, rank {rank}", T::DTYPE);
        // Every rank starts with other data, so a rank the broadcast skipped shows.
        let input = |r: usize| -> Vec<T> { (0..numel).map(|i| T::from_f64(value(ReduceOp::Max, r, i))).collect() };
        let mut data = input(rank);
        pg.broadcast(&mut data, root).unwrap_or_else(|e| panic!("{label}: {e}"));
        let want = input(root);
        assert!(
            digest(&data) == digest(&want) && data.len() == want.len(),
            "{label}: differs from the root's buffer"
        );
        digests.push((label, digest(&data)));
    }
}

#[test]
fn hierarchical_broadcast_from_every_root_copies_the_roots_buffer_on_uneven_hosts() {
    for hosts in LAYOUTS {
        for shm in [true, false] {
            for (hierarchical, threshold) in [
                (Hierarchy::Always, 0),
                (Hierarchy::Always, usize::MAX),
                (Hierarchy::Auto, 4096),
            ] {
                let label = format!("hosts {hosts:?}, shm {shm}, {hierarchical:?}, threshold {threshold}");
                let options = layout_options(hosts, tuning(hierarchical, threshold, 256), shm);
                let per_rank = run_ranks(options, |pg| {
                    let mut digests = Vec::new();
                    for numel in small_sizes(pg.world_size()).into_iter().chain([100_003]) {
                        check_broadcast::<f32>(&pg, numel, &label, &mut digests);
                        check_broadcast::<bf16>(&pg, numel, &label, &mut digests);
                    }
                    digests
                });
                assert_bit_identical(&per_rank);
            }
        }
    }
}

#[test]
fn broadcast_between_two_hosts_of_two_ranks_crosses_once_per_host() {
    // 4 MiB from rank 0. Flat scatter + ring all-gather: the scatter sends the other host's two
    // ranks a quarter each (0.5x), and the ring 0-1-2-3 crosses at 1->2 and 3->0 with 0.75x
    // each: 2x in all. Hierarchically rank 0 sends the buffer to rank 2 once: 1x.
    let numel = 1 << 20;
    let bytes = (numel * 4) as f64;
    let across = |hierarchical: Hierarchy| -> Vec<u64> {
        let options = layout_options(&[0, 0, 1, 1], tuning(hierarchical, 128 * 1024, 64 * 1024), true);
        run_ranks(options, |pg| {
            let mut digests = Vec::new();
            check_broadcast::<f32>(&pg, 8, "warm-up", &mut digests);
            let before = pg.bytes_sent_across_hosts();
            let mut data = vec![pg.rank() as f32; numel];
            pg.broadcast(&mut data, 0).unwrap();
            assert!(data.iter().all(|&x| x == 0.0));
            pg.bytes_sent_across_hosts() - before
        })
    };
    let flat = across(Hierarchy::Never);
    let auto = across(Hierarchy::Auto);
    let total = |v: &[u64]| v.iter().sum::<u64>() as f64 / bytes;
    assert!(
        (total(&flat) - 2.0).abs() < 0.02,
        "flat broadcast sent {flat:?} across hosts"
    );
    assert!(
        (total(&auto) - 1.0).abs() < 0.01,
        "hierarchical broadcast sent {auto:?} across hosts"
    );
}
