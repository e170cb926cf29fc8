use burnrun::comm::{spawn_ranks, InitOptions, Tuning};
use burnrun::ReduceOp;

#[test]
fn smoke_all_reduce() {
    for n in 1..=5 {
        for size in [0usize, 1, 3, 1000, 100_003] {
            for threshold in [0usize, usize::MAX] {
                let opts = InitOptions {
                    tuning: Tuning {
                        ring_threshold_bytes: threshold,
                        segment_bytes: 4096,
                    },
                    ..Default::default()
                };
                let out = spawn_ranks(n, &opts, |pg| {
                    let mut v: Vec<f32> = (0..size).map(|i| (i % 7) as f32 + pg.rank() as f32).collect();
                    pg.all_reduce(&mut v, ReduceOp::Sum).unwrap();
                    let mut b: Vec<i64> = vec![pg.rank() as i64; size];
                    pg.broadcast(&mut b, n - 1).unwrap();
                    assert!(b.iter().all(|&x| x == (n - 1) as i64));
                    let mut g = vec![0f32; size * n];
                    pg.all_gather(&v, &mut g).unwrap();
                    pg.barrier().unwrap();
                    v
                })
                .unwrap();
                let want: Vec<f32> = (0..size)
                    .map(|i| n as f32 * (i % 7) as f32 + (n * (n - 1) / 2) as f32)
                    .collect();
                for v in out {
                    assert_eq!(v, want, "n={n} size={size} thr={threshold}");
                }
            }
        }
    }
}

#[test]
fn two_ranks_sending_large_buffers_to_each_other_before_receiving_do_not_deadlock() {
    let opts = InitOptions {
        timeout: std::time::Duration::from_secs(20),
        ..Default::default()
    };
    let out = spawn_ranks(2, &opts, |pg| {
        let peer = 1 - pg.rank();
        let big: Vec<f32> = vec![pg.rank() as f32 + 1.0; 8 << 20];
        pg.send(&big, peer, 7).unwrap();
        let mut got = vec![0f32; 8 << 20];
        pg.recv(&mut got, peer, 7).unwrap();
        got[0]
    })
    .unwrap();
    assert_eq!(out, vec![2.0, 1.0]);
}
