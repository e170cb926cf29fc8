//! The datasets and the distributed sampler: determinism, file formats and their errors, and the
//! sharding rules data parallelism relies on.
#![cfg(feature = "train")]

use std::collections::HashSet;
use std::path::PathBuf;

use burn::tensor::{Device, Int, Tensor};
use burnrun::data::{
    read_idx, write_idx, Batch, DataError, Dataset, DistributedSampler, IdxDataset, SyntheticDataset, TextDataset,
};

fn device() -> Device {
    Device::flex()
}

/// A fresh directory under the system's temp dir, removed when dropped.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("burnrun-data-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("create temp dir");
        Self(dir)
    }

    fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn floats(t: Tensor<2>) -> Vec<f32> {
    t.into_data().try_into_vec_as::<f32>().expect("f32 data")
}

fn ints(t: Tensor<2, Int>) -> Vec<i64> {
    t.into_data().try_into_vec_as::<i64>().expect("i64 data")
}

fn sampler(len: usize, world_size: usize, rank: usize, batch: usize, drop_last: bool) -> DistributedSampler {
    DistributedSampler::new(len, world_size, rank, batch, 11, true, drop_last).expect("valid sampler")
}

// ---- synthetic ----

#[test]
fn the_synthetic_set_is_a_function_of_its_seed() {
    let device = device();
    let a = SyntheticDataset::generate(50, 7, 3, 0.5, 1, None).unwrap();
    let b = SyntheticDataset::generate(50, 7, 3, 0.5, 1, None).unwrap();
    let c = SyntheticDataset::generate(50, 7, 3, 0.5, 2, None).unwrap();
    let all: Vec<usize> = (0..50).collect();
    let (ba, bb, bc) = (
        a.batch(&all, &device).unwrap(),
        b.batch(&all, &device).unwrap(),
        c.batch(&all, &device).unwrap(),
    );
    assert_eq!(ba.inputs.dims(), [50, 7]);
    assert_eq!(ba.targets.dims(), [50, 1]);
    assert_eq!(floats(ba.inputs.clone()), floats(bb.inputs));
    assert_ne!(floats(ba.inputs), floats(bc.inputs));
    assert!(a.labels().iter().all(|&l| (0..3).contains(&l)));
    let classes: HashSet<i64> = a.labels().iter().copied().collect();
    assert_eq!(classes.len(), 3, "50 samples cover all 3 classes");
    // Sample i does not depend on how many samples were generated.
    let longer = SyntheticDataset::generate(80, 7, 3, 0.5, 1, None).unwrap();
    assert_eq!(
        floats(longer.batch(&[49], &device).unwrap().inputs),
        floats(a.batch(&[49], &device).unwrap().inputs)
    );
}

#[test]
fn synthetic_images_must_match_the_feature_count() {
    let ok = SyntheticDataset::generate(4, 12, 2, 1.0, 0, Some([3, 2, 2])).unwrap();
    assert_eq!(ok.image_shape(), Some([3, 2, 2]));
    let err = SyntheticDataset::generate(4, 10, 2, 1.0, 0, Some([3, 2, 2])).unwrap_err();
    assert!(err.to_string().contains("synthetic.image_shape"), "{err}");
    let err = SyntheticDataset::generate(4, 10, 1, 1.0, 0, None).unwrap_err();
    assert!(err.to_string().contains("synthetic.classes"), "{err}");
}

#[test]
fn a_batch_keeps_the_order_of_its_indices_and_splits_into_micro_batches() {
    let device = device();
    let data = SyntheticDataset::generate(10, 3, 2, 1.0, 5, None).unwrap();
    let batch = data.batch(&[4, 1, 7], &device).unwrap();
    let rows = floats(batch.inputs.clone());
    for (row, index) in [4, 1, 7].into_iter().enumerate() {
        let single = floats(data.batch(&[index], &device).unwrap().inputs);
        assert_eq!(rows[row * 3..row * 3 + 3], single[..]);
    }
    let micro: Batch = batch.narrow(1, 2);
    assert_eq!(micro.len(), 2);
    assert_eq!(floats(micro.inputs), rows[3..9]);
    let err = data.batch(&[3, 10], &device).unwrap_err();
    assert!(
        matches!(err, DataError::IndexOutOfRange { index: 10, len: 10, .. }),
        "{err}"
    );
}

// ---- IDX ----

fn write_mnist_like(dir: &TempDir, count: usize, rows: usize, cols: usize) -> (PathBuf, PathBuf) {
    let images = dir.path("images-idx3-ubyte");
    let labels = dir.path("labels-idx1-ubyte");
    let pixels: Vec<u8> = (0..count * rows * cols).map(|i| (i * 13 % 256) as u8).collect();
    let label_bytes: Vec<u8> = (0..count).map(|i| (i % 10) as u8).collect();
    write_idx(&images, &[count, rows, cols], &pixels).unwrap();
    write_idx(&labels, &[count], &label_bytes).unwrap();
    (images, labels)
}

#[test]
fn idx_files_written_here_read_back_as_scaled_images_and_labels() {
    let dir = TempDir::new("idx-ok");
    let (images, labels) = write_mnist_like(&dir, 12, 4, 3);
    let raw = std::fs::read(&images).unwrap();
    assert_eq!(raw[..4], [0, 0, 8, 3], "images magic 0x00000803");
    assert_eq!(
        std::fs::read(&labels).unwrap()[..4],
        [0, 0, 8, 1],
        "labels magic 0x00000801"
    );

    let data = IdxDataset::open(&images, &labels).unwrap();
    assert_eq!(data.len(), 12);
    assert_eq!(data.input_width(), 12);
    assert_eq!(data.image_shape(), Some([1, 4, 3]));
    assert_eq!(data.num_classes(), 10);
    let batch = data.batch(&[2, 11], &device()).unwrap();
    assert_eq!(batch.inputs.dims(), [2, 12]);
    assert_eq!(ints(batch.targets), vec![2, 1]);
    let pixels = floats(batch.inputs);
    assert_eq!(pixels[0], (24 * 13 % 256) as f32 / 255.0, "sample 2 starts at pixel 24");
    assert!(pixels.iter().all(|p| (0.0..=1.0).contains(p)));
    assert_eq!(read_idx(&labels, 1, "labels").unwrap().dims, vec![12]);
}

#[test]
fn idx_files_with_a_bad_magic_number_are_refused_naming_the_file() {
    let dir = TempDir::new("idx-magic");
    let (images, labels) = write_mnist_like(&dir, 3, 2, 2);
    let mut bytes = std::fs::read(&images).unwrap();
    bytes[0] = 0x12;
    let bad = dir.path("bad-images");
    std::fs::write(&bad, &bytes).unwrap();
    let err = IdxDataset::open(&bad, &labels).unwrap_err();
    let message = err.to_string();
    assert!(matches!(err, DataError::IdxFormat { .. }), "{message}");
    assert!(
        message.contains("bad-images") && message.contains("bad magic number 0x12000803"),
        "{message}"
    );
    assert!(message.contains("expected 0x00000803"), "{message}");

    // Images and labels swapped: the dimension count in the magic gives it away.
    let err = IdxDataset::open(&labels, &images).unwrap_err().to_string();
    assert!(
        err.contains("labels-idx1-ubyte") && err.contains("says 1 dimensions, images need 3"),
        "{err}"
    );

    let gz = dir.path("images.gz");
    std::fs::write(&gz, [0x1f, 0x8b, 8, 0, 0, 0]).unwrap();
    let err = IdxDataset::open(&gz, &labels).unwrap_err().to_string();
    assert!(err.contains("gzip"), "{err}");

    bytes[0] = 0;
    bytes[2] = 0x0d;
    std::fs::write(&bad, &bytes).unwrap();
    let err = IdxDataset::open(&bad, &labels).unwrap_err().to_string();
    assert!(err.contains("element type 0x0d"), "{err}");
}

#[test]
fn truncated_missing_and_mismatched_idx_files_are_refused() {
    let dir = TempDir::new("idx-size");
    let (images, labels) = write_mnist_like(&dir, 3, 2, 2);
    let bytes = std::fs::read(&images).unwrap();
    let short = dir.path("short-images");
    std::fs::write(&short, &bytes[..bytes.len() - 1]).unwrap();
    let err = IdxDataset::open(&short, &labels).unwrap_err().to_string();
    assert!(
        err.contains("short-images") && err.contains("need 12 data bytes, the file has 11"),
        "{err}"
    );

    let err = IdxDataset::open(dir.path("nowhere"), &labels).unwrap_err();
    assert!(matches!(err, DataError::Io { op: "read", .. }), "{err}");
    assert!(err.to_string().contains("nowhere"), "{err}");

    let other_labels = dir.path("four-labels");
    write_idx(&other_labels, &[4], &[0, 1, 2, 3]).unwrap();
    let err = IdxDataset::open(&images, &other_labels).unwrap_err();
    assert!(
        matches!(
            err,
            DataError::IdxCountMismatch {
                image_count: 3,
                label_count: 4,
                ..
            }
        ),
        "{err}"
    );
}

// ---- text ----

#[test]
fn a_text_file_becomes_shifted_windows_over_its_sorted_characters() {
    let dir = TempDir::new("text");
    let path = dir.path("corpus.txt");
    std::fs::write(&path, "hello world").unwrap();
    let data = TextDataset::from_file(&path, 4, 2).unwrap();
    assert_eq!(data.vocab(), [' ', 'd', 'e', 'h', 'l', 'o', 'r', 'w']);
    assert_eq!(data.num_classes(), 8);
    // 11 characters, windows of 5 every 2: starts 0, 2, 4, 6.
    assert_eq!(data.len(), 4);
    assert_eq!((data.input_width(), data.targets_per_sample()), (4, 4));
    let batch = data.batch(&[1], &device()).unwrap();
    let inputs: Vec<u32> = floats(batch.inputs).into_iter().map(|x| x as u32).collect();
    let targets: Vec<u32> = ints(batch.targets).into_iter().map(|x| x as u32).collect();
    assert_eq!(data.decode(&inputs), "llo ");
    assert_eq!(data.decode(&targets), "lo w");
    assert_eq!(data.encode("hold").unwrap(), vec![3, 5, 4, 1]);
    let err = data.encode("hex").unwrap_err();
    assert!(matches!(err, DataError::UnknownChar { ch: 'x', .. }), "{err}");
}

#[test]
fn a_text_too_short_or_not_utf8_is_refused_naming_the_file() {
    let dir = TempDir::new("text-bad");
    let short = dir.path("short.txt");
    std::fs::write(&short, "abc").unwrap();
    let err = TextDataset::from_file(&short, 3, 1).unwrap_err().to_string();
    assert!(
        err.contains("short.txt") && err.contains("3 characters") && err.contains("needs 4"),
        "{err}"
    );
    let binary = dir.path("binary.txt");
    std::fs::write(&binary, [b'a', b'b', 0xff, b'c']).unwrap();
    let err = TextDataset::from_file(&binary, 1, 1).unwrap_err();
    assert!(matches!(err, DataError::NotUtf8 { valid_up_to: 2, .. }), "{err}");
    assert!(err.to_string().contains("binary.txt"), "{err}");
}

// ---- sampler ----

#[test]
fn ranks_get_disjoint_shards_that_cover_the_epoch() {
    for world_size in 1..=4 {
        let len = 96;
        let batch = 4;
        let mut seen = HashSet::new();
        for rank in 0..world_size {
            let s = sampler(len, world_size, rank, batch, true);
            assert_eq!(s.batches_per_epoch(), len / (world_size * batch));
            for indices in s.epoch_batches(3) {
                assert_eq!(indices.len(), batch);
                for i in indices {
                    assert!(seen.insert(i), "world {world_size}: sample {i} given twice");
                }
            }
        }
        assert_eq!(
            seen.len(),
            len,
            "world {world_size}: 96 is a multiple of every global batch"
        );
    }
}

#[test]
fn the_order_depends_only_on_seed_and_epoch() {
    let a = sampler(50, 2, 1, 5, true);
    let b = sampler(50, 2, 1, 5, true);
    assert_eq!(a.epoch_batches(0), b.epoch_batches(0));
    assert_ne!(a.epoch_order(0), a.epoch_order(1), "each epoch reshuffles");
    let other_seed = DistributedSampler::new(50, 2, 1, 5, 12, true, true).unwrap();
    assert_ne!(a.epoch_order(0), other_seed.epoch_order(0));
    let mut sorted = a.epoch_order(4);
    sorted.sort_unstable();
    assert_eq!(sorted, (0..50).collect::<Vec<_>>(), "a permutation");
    let plain = DistributedSampler::new(10, 2, 1, 2, 0, false, true).unwrap();
    assert_eq!(
        plain.epoch_batches(7),
        vec![vec![2, 3], vec![6, 7]],
        "no shuffle: blocked split of 0..len"
    );
}

#[test]
fn w_ranks_with_batch_b_read_exactly_the_rows_of_one_rank_with_batch_w_times_b() {
    for (len, drop_last) in [(100, true), (100, false), (37, false)] {
        for world_size in [2, 4] {
            let b = 3;
            let single = sampler(len, 1, 0, world_size * b, drop_last);
            for rank in 0..world_size {
                let ranked = sampler(len, world_size, rank, b, drop_last);
                assert_eq!(ranked.batches_per_epoch(), single.batches_per_epoch());
                for epoch in 0..2 {
                    for step in 0..single.batches_per_epoch() {
                        let whole = single.batch_indices(epoch, step).unwrap();
                        assert_eq!(
                            ranked.batch_indices(epoch, step).unwrap(),
                            whole[rank * b..(rank + 1) * b],
                            "len {len} drop_last {drop_last} world {world_size} rank {rank} step {step}"
                        );
                    }
                }
            }
        }
    }
}

#[test]
fn drop_last_drops_the_uneven_tail_so_every_rank_runs_the_same_full_batches() {
    // 23 samples, 2 ranks x 4: two global batches of 8, 7 samples dropped.
    let ranks: Vec<_> = (0..2).map(|r| sampler(23, 2, r, 4, true)).collect();
    let batches: Vec<_> = ranks.iter().map(|s| s.epoch_batches(0)).collect();
    assert!(batches.iter().all(|b| b.len() == 2 && b.iter().all(|x| x.len() == 4)));
    let used: HashSet<usize> = batches.iter().flatten().flatten().copied().collect();
    assert_eq!(used.len(), 16, "disjoint, 7 of 23 dropped");
    let dropped: HashSet<usize> = ranks[0].epoch_order(0)[16..].iter().copied().collect();
    assert!(
        used.is_disjoint(&dropped),
        "the dropped samples are the end of the epoch's order"
    );
    let err = DistributedSampler::new(7, 2, 0, 4, 0, true, true)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("fewer than one global batch") && err.contains("= 8"),
        "{err}"
    );
}

#[test]
fn without_drop_last_the_tail_is_padded_by_wrapping_to_the_start_of_the_epoch() {
    // 23 samples, 2 ranks x 4: three global batches, the last padded with 1 sample from the start.
    let ranks: Vec<_> = (0..2).map(|r| sampler(23, 2, r, 4, false)).collect();
    let order = ranks[0].epoch_order(2);
    assert_eq!(ranks[0].batches_per_epoch(), 3);
    let last: Vec<usize> = ranks.iter().flat_map(|s| s.batch_indices(2, 2).unwrap()).collect();
    assert_eq!(last[..7], order[16..23]);
    assert_eq!(last[7], order[0], "padding repeats the first sample of the epoch");
    let all: HashSet<usize> = ranks.iter().flat_map(|s| s.epoch_batches(2)).flatten().collect();
    assert_eq!(all.len(), 23, "every sample is read");
    // A dataset smaller than a global batch wraps more than once.
    let tiny = sampler(3, 2, 1, 4, false);
    assert_eq!(tiny.batches_per_epoch(), 1);
    assert_eq!(tiny.batch_indices(0, 0).unwrap().len(), 4);
}

#[test]
fn steps_continue_across_epochs_for_resuming() {
    let s = sampler(20, 2, 0, 3, true);
    assert_eq!(s.batches_per_epoch(), 3);
    assert_eq!(s.position(0), (0, 0));
    assert_eq!(s.position(4), (1, 1));
    assert_eq!(s.step_indices(4), s.batch_indices(1, 1).unwrap());
    let err = s.batch_indices(1, 3).unwrap_err();
    assert!(
        matches!(
            err,
            DataError::BatchOutOfRange {
                batch: 3,
                batches_per_epoch: 3,
                ..
            }
        ),
        "{err}"
    );
}

#[test]
fn impossible_sampler_arguments_are_refused() {
    let err = DistributedSampler::new(10, 2, 2, 1, 0, true, false)
        .unwrap_err()
        .to_string();
    assert!(err.contains("rank 2 is not below world_size 2"), "{err}");
    assert!(DistributedSampler::new(10, 0, 0, 1, 0, true, false).is_err());
    assert!(DistributedSampler::new(10, 1, 0, 0, 0, true, false).is_err());
    assert!(DistributedSampler::new(0, 1, 0, 1, 0, true, false).is_err());
}
