//! The shared-memory transport's set-up: which pairs use it, what happens when it cannot be had,
//! and what it leaves on disk. Ranks run on threads and rendezvous through a memory store, each
//! with its own options (the launcher's ranks would differ the same way: one on a full
//! `/dev/shm`, say). The collectives themselves run over shared memory in `tests/collectives.rs`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use burnrun::comm::{spawn_ranks_each, InitOptions, ShmOptions};
use burnrun::transport::shm_file_prefix;
use burnrun::ReduceOp;

/// Deadline of the rendezvous and of every collective here.
const TIMEOUT: Duration = Duration::from_secs(30);

/// Options whose shared-memory files go to `dir` under `prefix`.
fn options(dir: &Path, prefix: &str) -> InitOptions {
    InitOptions {
        timeout: TIMEOUT,
        rdzv_timeout: TIMEOUT,
        shm: ShmOptions {
            dir: dir.to_path_buf(),
            file_prefix: prefix.to_string(),
            ..Default::default()
        },
        ..Default::default()
    }
}

/// Runs `world_size` ranks on threads, rank r with `options[r]`; each joins, all-reduces
/// `[r + 1; 1000]`, checks the sum and returns its links as the communicator reports them.
fn join_and_all_reduce(options: Vec<InitOptions>) -> Vec<String> {
    let n = options.len();
    spawn_ranks_each(&options, |pg| {
        let rank = pg.rank();
        for len in [1000, 3 << 20] {
            let mut data = vec![(rank + 1) as f32; len];
            pg.all_reduce(&mut data, ReduceOp::Sum).unwrap();
            let want = (n * (n + 1) / 2) as f32;
            assert!(data.iter().all(|&x| x == want), "rank {rank}: wrong sum of {len}");
        }
        pg.communicator().links()
    })
    .unwrap_or_else(|e| panic!("a rank failed to join: {e}"))
}

/// Names in `dir` that start with `prefix`.
fn files_with_prefix(dir: &Path, prefix: &str) -> Vec<String> {
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .filter_map(|e| e.ok()?.file_name().into_string().ok())
                .filter(|name| name.starts_with(prefix))
                .collect()
        })
        .unwrap_or_default()
}

fn unique_prefix(what: &str) -> String {
    shm_file_prefix(&format!("test-{what}-{}", std::process::id()))
}

#[test]
fn ranks_of_one_host_use_shared_memory_and_leave_no_file_behind() {
    let dir = PathBuf::from(burnrun::transport::SHM_DIR);
    let prefix = unique_prefix("all");
    let links = join_and_all_reduce((0..3).map(|_| options(&dir, &prefix)).collect());
    for (rank, links) in links.iter().enumerate() {
        assert_eq!(links, "shared memory to 2 peer(s)", "rank {rank}");
    }
    let left = files_with_prefix(&dir, &prefix);
    assert!(left.is_empty(), "inboxes are unlinked once mapped: {left:?}");
}

#[test]
fn a_rank_without_shared_memory_keeps_its_pairs_on_tcp_and_the_others_still_share() {
    let dir = PathBuf::from(burnrun::transport::SHM_DIR);
    let prefix = unique_prefix("one-fails");
    let mut all: Vec<InitOptions> = (0..3).map(|_| options(&dir, &prefix)).collect();
    // Rank 1 cannot create its inbox (as on a missing or full /dev/shm): it says so in the store
    // and every pair with it stays on TCP, on both sides.
    all[1].shm.dir = dir.join("no-such-directory");
    let links = join_and_all_reduce(all);
    assert_eq!(links[0], "shared memory to 1 peer(s), TCP to 1 peer(s)");
    assert_eq!(links[1], "TCP to 2 peer(s)");
    assert_eq!(links[2], "shared memory to 1 peer(s), TCP to 1 peer(s)");
    assert!(files_with_prefix(&dir, &prefix).is_empty());
}

#[test]
fn shared_memory_switched_off_on_one_rank_means_tcp_for_its_pairs() {
    let dir = PathBuf::from(burnrun::transport::SHM_DIR);
    let prefix = unique_prefix("off");
    // Only rank 0 has it off (BURNRUN_SHM=0 set on one node, say): rank 1 must not wait for it.
    let mut all: Vec<InitOptions> = (0..2).map(|_| options(&dir, &prefix)).collect();
    all[0].shm.enabled = false;
    let started = std::time::Instant::now();
    let links = join_and_all_reduce(all);
    assert_eq!(links, vec!["TCP to 1 peer(s)", "TCP to 1 peer(s)"]);
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "took {:?}",
        started.elapsed()
    );
    assert!(files_with_prefix(&dir, &prefix).is_empty());
}

#[test]
fn two_hosts_of_two_ranks_share_memory_inside_each_host_and_talk_tcp_across() {
    // The ring of 4 ranks then mixes both transports in every step: rank 1 receives from rank 0
    // over shared memory while it sends to rank 2 over TCP.
    let dir = PathBuf::from(burnrun::transport::SHM_DIR);
    let prefix = unique_prefix("hosts");
    let all: Vec<InitOptions> = (0..4)
        .map(|rank| {
            let mut o = options(&dir, &prefix);
            o.shm.host_id = Some(format!("host-{}", rank / 2));
            o
        })
        .collect();
    let links = join_and_all_reduce(all);
    for (rank, links) in links.iter().enumerate() {
        assert_eq!(links, "shared memory to 1 peer(s), TCP to 2 peer(s)", "rank {rank}");
    }
}

/// A tmpfs of 64 KiB mounted for the test, unmounted on drop.
struct TinyTmpfs(PathBuf);

impl TinyTmpfs {
    fn mount() -> Option<Self> {
        let dir = std::env::temp_dir().join(format!("burnrun-tiny-tmpfs-{}", std::process::id()));
        std::fs::create_dir_all(&dir).ok()?;
        let ok = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=64k", "tmpfs"])
            .arg(&dir)
            .stderr(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if ok {
            Some(Self(dir))
        } else {
            let _ = std::fs::remove_dir(&dir);
            None
        }
    }
}

impl Drop for TinyTmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg(&self.0).status();
        let _ = std::fs::remove_dir(&self.0);
    }
}

#[test]
fn a_full_shared_memory_file_system_falls_back_to_tcp_instead_of_crashing() {
    // Docker gives a container 64 MiB of /dev/shm; rings that do not fit must be refused at
    // set-up (space is reserved with posix_fallocate), not fault with SIGBUS mid-collective.
    let Some(tmpfs) = TinyTmpfs::mount() else {
        eprintln!("skipped: cannot mount a tmpfs here (needs root)");
        return;
    };
    let prefix = unique_prefix("full");
    let links = join_and_all_reduce((0..2).map(|_| options(&tmpfs.0, &prefix)).collect());
    assert_eq!(links, vec!["TCP to 1 peer(s)", "TCP to 1 peer(s)"]);
    let left = files_with_prefix(&tmpfs.0, &prefix);
    assert!(left.is_empty(), "a failed inbox is removed: {left:?}");
}

/// Lengths (f32 elements) of the messages of the ordering test: under and over a box slot's
/// payload, over the eager limit, in runs and alternating.
fn message_lens() -> Vec<usize> {
    (0..300u64)
        .map(|i| {
            let x = i.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 40;
            match x % 5 {
                0 | 1 => (x % 8) as usize,
                2 => 260 + (x % 2) as usize,
                3 => 100 + (x % 500) as usize,
                _ => 5000 + (x % 3000) as usize,
            }
        })
        .collect()
}

#[test]
fn small_and_large_messages_to_one_peer_arrive_in_order_whichever_way_each_travels() {
    // Over shared memory, frames of a few hundred bytes travel through the pair's box and larger
    // ones through its ring; messages of one tag must still come out in the order sent, and a
    // receive posted for a later tag must not take (or lose) an earlier tag's box frame.
    let dir = PathBuf::from(burnrun::transport::SHM_DIR);
    let prefix = unique_prefix("order");
    let lens = message_lens();
    let all: Vec<InitOptions> = (0..2).map(|_| options(&dir, &prefix)).collect();
    let results = spawn_ranks_each(&all, |pg| {
        let pattern = |i: usize, len: usize| -> Vec<f32> { (0..len).map(|j| (i * 1000 + j) as f32).collect() };
        if pg.rank() == 0 {
            for (i, &len) in lens.iter().enumerate() {
                pg.send(&pattern(i, len), 1, 7).unwrap();
            }
            pg.send(&[1.0f32], 1, 1).unwrap();
            pg.send(&[2.0f32, 2.0], 1, 2).unwrap();
        } else {
            for (i, &len) in lens.iter().enumerate() {
                let mut got = vec![0f32; len];
                pg.recv(&mut got, 0, 7).unwrap();
                assert_eq!(got, pattern(i, len), "message {i} ({len} elements)");
            }
            let (mut one, mut two) = ([0f32; 1], [0f32; 2]);
            pg.recv(&mut two, 0, 2).unwrap();
            pg.recv(&mut one, 0, 1).unwrap();
            assert_eq!((one, two), ([1.0], [2.0, 2.0]));
        }
        pg.barrier().unwrap();
        pg.communicator().links()
    })
    .unwrap_or_else(|e| panic!("a rank failed: {e}"));
    assert_eq!(results, vec!["shared memory to 1 peer(s)"; 2]);
}
