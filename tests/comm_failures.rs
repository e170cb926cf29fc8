//! Failure paths of the collective engine: mismatched calls, absent and vanished ranks, bad
//! arguments, strangers and garbage on the data connections. Every case is bounded: the
//! collective deadline is short, and each test asserts that the failing call returns in time.

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream};
use std::sync::Arc;
use std::time::{Duration, Instant};

use burnrun::auth::{AuthError, JobSecret};
use burnrun::comm::{init_with_store, spawn_ranks, BufMut, BufRef, CommError, InitOptions, ProcessGroup, Tuning};
use burnrun::rendezvous::{MemoryStore, Store};
use burnrun::transport::{self, DataListener, FrameHeader, Tag, TransportError, HEADER_BYTES, MAX_FRAME_BYTES};
use burnrun::{DType, ReduceOp};

/// Collective deadline of the tests that wait for it to pass.
const TIMEOUT: Duration = Duration::from_secs(2);
/// Deadline of the tests where a failure must come from the connection, not the clock: long, so
/// that a quick error cannot be a timeout.
const LONG: Duration = Duration::from_secs(20);
/// How late a failing call may return after its cause: scheduling noise on a small shared
/// machine whose tests run in parallel, not a second deadline.
const SLACK: Duration = Duration::from_secs(3);

/// Threshold 0 runs the ring paths, `usize::MAX` recursive doubling and the trees.
const THRESHOLDS: [usize; 2] = [0, usize::MAX];

fn options(ring_threshold_bytes: usize, timeout: Duration) -> InitOptions {
    InitOptions {
        timeout,
        rdzv_timeout: LONG,
        tuning: Tuning {
            ring_threshold_bytes,
            segment_bytes: 256,
            ..Default::default()
        },
        ..Default::default()
    }
}

/// [`options`], with same-host frames over shared memory (`true`) or loopback TCP.
fn over(shm: bool, ring_threshold_bytes: usize, timeout: Duration) -> InitOptions {
    let mut o = options(ring_threshold_bytes, timeout);
    o.shm.enabled = shm;
    o
}

/// Both transports, named for messages.
const TRANSPORTS: [(bool, &str); 2] = [(true, "shm"), (false, "tcp")];

/// Runs `f` and returns its result with how long it took.
fn timed<R>(f: impl FnOnce() -> R) -> (R, Duration) {
    let start = Instant::now();
    let result = f();
    (result, start.elapsed())
}

#[test]
fn a_collective_mismatch_is_reported_with_both_calls_and_nobody_hangs() {
    for (n, (shm, transport)) in [
        (2, TRANSPORTS[0]),
        (3, TRANSPORTS[1]),
        (4, TRANSPORTS[0]),
        (4, TRANSPORTS[1]),
    ] {
        for threshold in THRESHOLDS {
            for other_call in ["all_gather(f32 x 1000)", "all_reduce(f32 x 999, sum)"] {
                let results = spawn_ranks(n, &over(shm, threshold, TIMEOUT), |pg| {
                    let mut data = vec![1f32; 1000];
                    timed(|| {
                        if pg.rank() == 0 {
                            pg.all_reduce(&mut data, ReduceOp::Sum)
                        } else if other_call.starts_with("all_gather") {
                            let mut out = vec![0f32; 1000 * n];
                            pg.all_gather(&data, &mut out)
                        } else {
                            pg.all_reduce(&mut data[..999], ReduceOp::Sum)
                        }
                    })
                })
                .unwrap();
                let case = format!(
                    "{n} ranks ({transport}), threshold {threshold}, all_reduce(f32 x 1000, sum) vs {other_call}"
                );
                for (rank, (result, elapsed)) in results.iter().enumerate() {
                    assert!(result.is_err(), "{case}: rank {rank} succeeded");
                    assert!(*elapsed < TIMEOUT + SLACK, "{case}: rank {rank} took {elapsed:?}");
                }
                let named_both = results.iter().any(|(result, elapsed)| match result {
                    Err(e @ CommError::Mismatch { .. }) => {
                        let text = e.to_string();
                        // Found from the frames, not by waiting for the deadline.
                        text.contains("all_reduce(f32 x 1000, sum)") && text.contains(other_call) && *elapsed < TIMEOUT
                    }
                    _ => false,
                });
                let errors: Vec<String> = results.iter().map(|(r, t)| format!("{t:?}: {r:?}")).collect();
                assert!(
                    named_both,
                    "{case}: no rank reported a mismatch naming both calls: {errors:#?}"
                );
            }
        }
    }
}

#[test]
fn a_broadcast_from_different_roots_is_not_silently_accepted() {
    // Each rank believes it is the root and only sends: without a check the call "succeeds" with
    // every rank keeping its own data. The peer's broadcast frame then waits unread, which the
    // next collective's end (here a barrier, whose frames come after it on the same pair) finds.
    for (threshold, (shm, transport)) in THRESHOLDS.into_iter().zip(TRANSPORTS).chain([(0, TRANSPORTS[1])]) {
        let results = spawn_ranks(2, &over(shm, threshold, TIMEOUT), |pg| {
            let mut data = vec![pg.rank() as f32; 100];
            let first = pg.broadcast(&mut data, pg.rank());
            let second = pg.barrier();
            (first, second)
        })
        .unwrap();
        let errors: Vec<String> = results.iter().map(|r| format!("{r:?}")).collect();
        let named = results.iter().any(|(first, second)| {
            [first, second].into_iter().any(|r| match r {
                Err(e @ CommError::Mismatch { seq: 0, .. }) => {
                    let text = e.to_string();
                    text.contains("broadcast(f32 x 100, root 0)") && text.contains("broadcast(f32 x 100, root 1)")
                }
                _ => false,
            })
        });
        assert!(
            named,
            "threshold {threshold} ({transport}): no rank named both broadcasts: {errors:#?}"
        );
    }
}

#[test]
fn a_rank_that_never_joins_a_collective_gives_a_timeout_naming_op_seq_rank_and_peer() {
    for threshold in THRESHOLDS {
        let results = spawn_ranks(2, &options(threshold, TIMEOUT), |pg| {
            pg.barrier().unwrap();
            if pg.rank() == 1 {
                // Absent, but its connections stay open: the others can only wait.
                std::thread::sleep(TIMEOUT + Duration::from_millis(1500));
                return None;
            }
            let mut data = vec![1f32; 1000];
            Some(timed(|| pg.all_reduce(&mut data, ReduceOp::Sum)))
        })
        .unwrap();
        let (result, elapsed) = results[0].as_ref().unwrap();
        match result {
            Err(
                e @ CommError::Timeout {
                    rank: 0,
                    op: "all_reduce",
                    seq: 1,
                    peer: 1,
                    timeout,
                    ..
                },
            ) => {
                assert_eq!(*timeout, TIMEOUT);
                let text = e.to_string();
                assert!(
                    text.contains("rank 0") && text.contains("all_reduce #1") && text.contains("peer 1"),
                    "{text}"
                );
            }
            other => panic!("threshold {threshold}: expected a timeout of all_reduce #1 waiting for peer 1: {other:?}"),
        }
        assert!(
            *elapsed >= TIMEOUT && *elapsed < TIMEOUT + SLACK,
            "returned after {elapsed:?}"
        );
    }
}

#[test]
fn an_absent_rank_among_several_is_named_by_the_ranks_that_wait_for_it() {
    for threshold in THRESHOLDS {
        let results = spawn_ranks(3, &options(threshold, TIMEOUT), |pg| {
            if pg.rank() == 2 {
                std::thread::sleep(TIMEOUT + Duration::from_millis(1500));
                return None;
            }
            let mut data = vec![1i64; 5000];
            Some(timed(|| pg.all_reduce(&mut data, ReduceOp::Max)))
        })
        .unwrap();
        let mut named = false;
        for (rank, outcome) in results.iter().take(2).enumerate() {
            let (result, elapsed) = outcome.as_ref().unwrap();
            assert!(result.is_err(), "rank {rank} succeeded without rank 2");
            assert!(*elapsed < TIMEOUT + SLACK, "rank {rank} returned after {elapsed:?}");
            named |= matches!(
                result,
                Err(CommError::Timeout {
                    op: "all_reduce",
                    seq: 0,
                    peer: 2,
                    ..
                })
            );
        }
        assert!(
            named,
            "threshold {threshold}: no rank named the absent rank 2: {results:?}"
        );
    }
}

#[test]
fn a_recv_nobody_sends_to_times_out_naming_the_peer_and_tag() {
    spawn_ranks(2, &options(0, TIMEOUT), |pg| {
        if pg.rank() == 0 {
            let mut data = [0u8; 10];
            let (result, elapsed) = timed(|| pg.recv(&mut data, 1, 77));
            match result {
                Err(CommError::Timeout {
                    rank: 0,
                    op: "send/recv",
                    seq: 77,
                    peer: 1,
                    ..
                }) => {}
                other => panic!("expected a timeout of recv tag 77 from peer 1: {other:?}"),
            }
            assert!(
                elapsed >= TIMEOUT && elapsed < TIMEOUT + SLACK,
                "returned after {elapsed:?}"
            );
        } else {
            std::thread::sleep(TIMEOUT + Duration::from_millis(1500));
        }
    })
    .unwrap();
}

#[test]
fn a_rank_that_drops_its_group_makes_the_others_fail_with_peer_lost_quickly() {
    for n in [2, 3, 4, 5] {
        for (threshold, (shm, transport)) in THRESHOLDS.into_iter().zip(TRANSPORTS).chain([(0, TRANSPORTS[1])]) {
            let results = spawn_ranks(n, &over(shm, threshold, LONG), |pg| {
                let mut data = vec![1f32; 3000];
                pg.all_reduce(&mut data, ReduceOp::Sum).unwrap();
                if pg.rank() == n - 1 {
                    // Dropping the group closes its sockets, as a crashed process would.
                    drop(pg);
                    return None;
                }
                Some(timed(|| pg.all_reduce(&mut data, ReduceOp::Sum)))
            })
            .unwrap();
            for (rank, outcome) in results.iter().take(n - 1).enumerate() {
                let (result, elapsed) = outcome.as_ref().unwrap();
                assert!(
                    matches!(
                        result,
                        Err(CommError::PeerLost {
                            op: "all_reduce",
                            seq: 1,
                            ..
                        })
                    ),
                    "{n} ranks ({transport}), threshold {threshold}: rank {rank} got {result:?} after {elapsed:?}"
                );
                assert!(
                    *elapsed < SLACK,
                    "{n} ranks ({transport}), threshold {threshold}: rank {rank} took {elapsed:?}"
                );
            }
        }
    }
}

#[test]
fn a_recv_whose_dtype_or_length_differs_from_the_send_is_a_clear_error() {
    for (recv_dtype, recv_numel, wanted) in [
        (DType::I32, 10, "send/recv(i32 x 10)"),
        (DType::F32, 12, "send/recv(f32 x 12)"),
    ] {
        let results = spawn_ranks(2, &options(0, TIMEOUT), |pg| {
            let comm = pg.communicator();
            timed(|| {
                if pg.rank() == 0 {
                    comm.send(BufRef::host(&[1.5f32; 10]), 1, 4)
                } else {
                    let mut buf = burnrun::comm::HostBuffer::zeros(recv_dtype, recv_numel);
                    comm.recv(buf.view_mut(), 0, 4)
                }
            })
        })
        .unwrap();
        let (received, elapsed) = &results[1];
        match received {
            Err(e @ CommError::Mismatch { rank: 1, peer: 0, .. }) => {
                let text = e.to_string();
                assert!(text.contains(wanted) && text.contains("send/recv(f32 x 10)"), "{text}");
            }
            other => panic!("a recv of {recv_dtype} x {recv_numel} from a send of f32 x 10 gave {other:?}"),
        }
        assert!(*elapsed < TIMEOUT, "the mismatch was found only after {elapsed:?}");
        assert!(
            results[0].1 < TIMEOUT + SLACK,
            "the sender returned after {:?}",
            results[0].1
        );
    }
}

fn expect_invalid(result: Result<(), CommError>, op: &str, words: &str) {
    match result {
        Err(CommError::InvalidArgument {
            rank: 0,
            op: got,
            reason,
        }) if got == op => {
            assert!(
                reason.contains(words),
                "{op}: the reason {reason:?} does not mention {words:?}"
            );
        }
        other => panic!("{op}: expected an invalid-argument error about {words:?}, got {other:?}"),
    }
}

#[test]
fn invalid_arguments_are_refused_before_any_byte_is_sent() {
    for threshold in THRESHOLDS {
        spawn_ranks(3, &options(threshold, TIMEOUT), |pg| {
            if pg.rank() == 0 {
                // Only rank 0 makes these calls. Had one of them sent a frame or used a sequence
                // number, the all-reduce below would mismatch or time out.
                let mut x = [1f32; 6];
                expect_invalid(pg.reduce(&mut x, ReduceOp::Sum, 3), "reduce", "root 3");
                expect_invalid(pg.broadcast(&mut x, 7), "broadcast", "root 7");
                expect_invalid(
                    pg.all_gather(&[1f32; 4], &mut [0f32; 11]),
                    "all_gather",
                    "expected f32 x 12",
                );
                expect_invalid(
                    pg.reduce_scatter(&[1f32; 11], &mut [0f32; 4], ReduceOp::Sum),
                    "reduce_scatter",
                    "11",
                );
                expect_invalid(pg.all_to_all(&[1f32; 4], &mut [0f32; 4]), "all_to_all", "multiple");
                expect_invalid(
                    pg.all_to_all(&[1f32; 6], &mut [0f32; 3]),
                    "all_to_all",
                    "same dtype and length",
                );
                expect_invalid(pg.send(&x, 0, 1), "send/recv", "peer 0");
                expect_invalid(pg.send(&x, 3, 1), "send/recv", "peer 3");
                expect_invalid(pg.recv(&mut x, 9, 1), "send/recv", "peer 9");
                let mut ints = [0i32; 18];
                let comm = pg.communicator();
                let result = comm.all_gather(BufRef::host(&x), BufMut::host(&mut ints));
                expect_invalid(result, "all_gather", "output is i32 x 18");
                let async_result = pg.reduce_scatter_async(vec![1i64; 7], ReduceOp::Sum).wait().map(|_| ());
                match async_result {
                    Err(CommError::InvalidArgument {
                        op: "reduce_scatter", ..
                    }) => {}
                    other => panic!("an async reduce-scatter of 7 elements over 3 ranks gave {other:?}"),
                }
                for (ranks, what) in [(&[0, 0][..], "duplicate"), (&[0, 3][..], "out of range")] {
                    match pg.new_group(ranks) {
                        Err(CommError::InvalidArgument { op: "new_group", .. }) => {}
                        other => panic!("new_group with a {what} rank gave {other:?}"),
                    }
                }
                match pg.split(&[0, 1]) {
                    Err(CommError::InvalidArgument {
                        op: "split", reason, ..
                    }) => assert!(reason.contains("2 entries")),
                    other => panic!("split with 2 colors for 3 ranks gave {other:?}"),
                }
            }
            let mut data = vec![pg.rank() as i32; 100];
            pg.all_reduce(&mut data, ReduceOp::Sum).unwrap();
            assert_eq!(data, vec![3; 100]);
            // Sub-groups made after the refused ones still agree on their ids.
            let pair = pg.new_group(&[0, 2]).unwrap();
            if let Some(pair) = pair {
                let mut data = [pg.rank() as u8];
                pair.all_reduce(&mut data, ReduceOp::Sum).unwrap();
                assert_eq!(data, [2]);
            }
        })
        .unwrap();
    }
}

#[test]
fn a_data_connection_with_a_wrong_secret_is_refused_and_the_listener_keeps_accepting() {
    let secret = JobSecret::generate().unwrap();
    let wrong = JobSecret::generate().unwrap();
    let listener = DataListener::bind(0, IpAddr::V4(Ipv4Addr::LOCALHOST)).unwrap();
    let addr = listener.local_addr().unwrap();
    let deadline = Instant::now() + LONG;
    std::thread::scope(|s| {
        let acceptor = s.spawn(|| listener.accept(&secret, deadline));

        let (refused, elapsed) = timed(|| transport::connect(1, 0, addr, &wrong, deadline));
        match refused {
            Err(TransportError::Auth {
                rank: 1,
                source: AuthError::BadProof { .. },
            }) => {}
            other => panic!("a client with the wrong secret got {other:?}"),
        }
        assert!(elapsed < SLACK, "refusing took {elapsed:?}");

        // A stranger that does not speak the protocol at all.
        let mut stranger = TcpStream::connect(addr).unwrap();
        stranger.write_all(b"GET / HTTP/1.1\r\nHost: burnrun\r\n\r\n").unwrap();
        let mut reply = Vec::new();
        stranger.set_read_timeout(Some(LONG)).unwrap();
        let _ = stranger.read_to_end(&mut reply);
        assert!(reply.is_empty(), "the listener answered a stranger: {reply:?}");

        let (accepted, elapsed) = timed(|| transport::connect(2, 0, addr, &secret, deadline));
        accepted.expect("the right secret is accepted after refused connections");
        let (peer, _stream) = acceptor
            .join()
            .unwrap()
            .expect("the listener accepted the right client");
        assert_eq!(peer, 2, "the accepted connection says which rank it comes from");
        assert!(elapsed < SLACK, "accepting took {elapsed:?}");
    });
}

/// Rank 0 of a world of 2 whose rank 1 is played by the test: it authenticates properly, then
/// writes `bytes`. Returns rank 0's error from an all-reduce and how long it took.
fn garbage_from_an_authenticated_peer(bytes: &[u8]) -> (CommError, Duration) {
    let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
    let secret = JobSecret::generate().unwrap();
    std::thread::scope(|s| {
        let fake = s.spawn(|| {
            // Every rank says which host it is on (`host_id/<rank>`), with or without shared memory.
            store.set("host_id/1", b"the fake rank's host").unwrap();
            let raw = store.get("addr/0", LONG).unwrap();
            let addr: SocketAddr = String::from_utf8(raw).unwrap().parse().unwrap();
            let mut stream = transport::connect(1, 0, addr, &secret, Instant::now() + LONG).unwrap();
            stream.write_all(bytes).unwrap();
            // Keep the connection open until rank 0 hangs up, so its error is about the bytes.
            stream.set_read_timeout(Some(LONG)).unwrap();
            let _ = stream.read(&mut [0u8; 64]);
        });
        // The fake rank speaks TCP only: it publishes no host id for shared memory.
        let mut tcp_only = options(0, LONG);
        tcp_only.shm.enabled = false;
        let pg: ProcessGroup = init_with_store(Arc::clone(&store), 0, 2, &secret, &tcp_only).unwrap();
        let mut data = [1f32; 16];
        let (result, elapsed) = timed(|| pg.all_reduce(&mut data, ReduceOp::Sum));
        drop(pg);
        fake.join().unwrap();
        (
            result.expect_err("an all-reduce with a garbage-sending peer succeeded"),
            elapsed,
        )
    })
}

#[test]
fn a_garbage_frame_after_a_valid_handshake_is_a_protocol_error_not_a_crash() {
    let header = |len: u64| {
        FrameHeader {
            tag: Tag { key: 0, step: 1 },
            fingerprint: 0,
            len,
        }
        .encode()
    };
    let mut reserved = header(16);
    reserved[12] = 0x5a;
    let mut text = b"this is not a burnrun frame, just some text".to_vec();
    text.resize(HEADER_BYTES.max(text.len()), b'!');
    let cases: [(&str, Vec<u8>, &str); 4] = [
        ("a non-zero reserved field", reserved.to_vec(), "reserved"),
        (
            "a length just over the limit",
            header(MAX_FRAME_BYTES + 1).to_vec(),
            "limit",
        ),
        ("a length of 2^64 - 1", header(u64::MAX).to_vec(), "limit"),
        ("plain text", text, "reserved"),
    ];
    for (what, bytes, words) in cases {
        let (error, elapsed) = garbage_from_an_authenticated_peer(&bytes);
        match &error {
            CommError::Transport {
                rank: 0,
                op: "all_reduce",
                source: TransportError::Protocol { peer: 1, reason, .. },
                ..
            } => {
                assert!(reason.contains(words), "{what}: {reason}");
            }
            other => panic!("{what}: expected a protocol error from peer 1, got {other:?}"),
        }
        assert!(elapsed < SLACK, "{what}: the error took {elapsed:?}");
    }
}

#[test]
fn after_a_failure_every_later_call_fails_instead_of_hanging() {
    for threshold in THRESHOLDS {
        let results = spawn_ranks(4, &options(threshold, LONG), |pg| {
            let mut data = vec![1f32; 1000];
            // Rank 3 calls another collective: the group breaks.
            let first = if pg.rank() == 3 {
                pg.barrier()
            } else {
                pg.all_reduce(&mut data, ReduceOp::Sum)
            };
            assert!(first.is_err(), "rank {} did not notice the mismatch", pg.rank());
            let (n, rank) = (pg.world_size(), pg.rank());
            let mut later: Vec<(&str, Result<(), CommError>, Duration)> = Vec::new();
            let (r, t) = timed(|| pg.all_reduce(&mut data, ReduceOp::Sum));
            later.push(("all_reduce", r, t));
            let (r, t) = timed(|| pg.broadcast(&mut data, 2));
            later.push(("broadcast", r, t));
            let (r, t) = timed(|| pg.all_gather(&data, &mut vec![0f32; 1000 * n]));
            later.push(("all_gather", r, t));
            let (r, t) = timed(|| pg.barrier());
            later.push(("barrier", r, t));
            let (r, t) = timed(|| pg.all_reduce_async(vec![1u8; 10], ReduceOp::Max).wait().map(|_| ()));
            later.push(("all_reduce_async", r, t));
            let (r, t) = timed(|| pg.send(&[0u8; 100_000], (rank + 1) % n, 1));
            later.push(("send", r, t));
            later
        })
        .unwrap();
        for (rank, later) in results.iter().enumerate() {
            for (what, result, elapsed) in later {
                assert!(
                    result.is_err(),
                    "threshold {threshold}: rank {rank}'s later {what} succeeded"
                );
                assert!(
                    *elapsed < SLACK,
                    "threshold {threshold}: rank {rank}'s later {what} took {elapsed:?}"
                );
            }
        }
    }
}
