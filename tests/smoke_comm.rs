use burnrun::comm::{spawn_ranks, InitOptions, Tuning};
use burnrun::ReduceOp;

#[test]
fn smoke_all_reduce() {
    for n in 1..=5 {
        for size in [0usize, 1, 3, 1000, 100_003] {
            for threshold in [0usize, usize::MAX] {
                let opts = InitOptions { tuning: Tuning { ring_threshold_bytes: threshold, segment_bytes: 4096 }, ..Default::default() };
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
                let want: Vec<f32> = (0..size).map(|i| n as f32 * (i % 7) as f32 + (n * (n - 1) / 2) as f32).collect();
                for v in out {
                    assert_eq!(v, want, "n={n} size={size} thr={threshold}");
                }
            }
        }
    }
}
