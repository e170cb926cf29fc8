//! MNIST-format IDX files: images (`[count, rows, cols]` unsigned bytes) and labels (`[count]`).
//!
//! An IDX file is a 4-byte magic number `0x00 0x00 <type> <ndims>`, then `ndims` big-endian u32
//! sizes, then the values row-major. Only the unsigned-byte type (`0x08`) is read, as MNIST and
//! Fashion-MNIST use: images have magic `0x00000803`, labels `0x00000801`. Pixels are scaled to
//! `[0, 1]`.

use std::path::{Path, PathBuf};

use super::batch::Dataset;
use super::error::DataError;

/// The IDX type code of unsigned bytes.
const UBYTE: u8 = 0x08;
/// The two leading bytes of gzip data: the common mistake of passing `train-images-idx3-ubyte.gz`.
const GZIP_MAGIC: [u8; 2] = [0x1f, 0x8b];

/// An n-dimensional array of unsigned bytes read from an IDX file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdxArray {
    /// Size of each dimension.
    pub dims: Vec<usize>,
    /// The values, row-major.
    pub data: Vec<u8>,
}

/// Reads an unsigned-byte IDX file with `expected_dims` dimensions; `role` (`images`, `labels`)
/// only names the file's purpose in errors.
pub fn read_idx(path: &Path, expected_dims: usize, role: &'static str) -> Result<IdxArray, DataError> {
    let bytes = std::fs::read(path).map_err(|source| DataError::Io {
        path: path.to_path_buf(),
        op: "read",
        source,
    })?;
    let bad = |why: String| DataError::IdxFormat {
        path: path.to_path_buf(),
        role,
        why,
    };
    let expected_magic = u32::from(UBYTE) << 8 | expected_dims as u32;
    if bytes.len() < 4 {
        return Err(bad(format!(
            "{} bytes is too short for the 4-byte magic number",
            bytes.len()
        )));
    }
    if bytes[..2] == GZIP_MAGIC {
        return Err(bad("the file is gzip-compressed; decompress it first (gunzip)".into()));
    }
    let magic = u32::from_be_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]);
    if bytes[0] != 0 || bytes[1] != 0 {
        return Err(bad(format!(
            "bad magic number 0x{magic:08x}: expected 0x{expected_magic:08x} (two zero bytes, type, dims)"
        )));
    }
    if bytes[2] != UBYTE {
        return Err(bad(format!(
            "element type 0x{:02x} in magic 0x{magic:08x} is not supported: only unsigned bytes (0x08)",
            bytes[2]
        )));
    }
    let ndims = usize::from(bytes[3]);
    if ndims != expected_dims {
        return Err(bad(format!(
            "magic 0x{magic:08x} says {ndims} dimensions, {role} need {expected_dims} (magic 0x{expected_magic:08x})"
        )));
    }
    let header = 4 + 4 * ndims;
    if bytes.len() < header {
        return Err(bad(format!(
            "{} bytes is too short for the header of {ndims} dimension sizes ({header} bytes)",
            bytes.len()
        )));
    }
    let dims: Vec<usize> = bytes[4..header]
        .chunks_exact(4)
        .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]) as usize)
        .collect();
    let numel = dims
        .iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(d))
        .ok_or_else(|| bad(format!("dimensions {dims:?} overflow")))?;
    let body = bytes.len() - header;
    if body != numel {
        return Err(bad(format!(
            "the header's dimensions {dims:?} need {numel} data bytes, the file has {body}"
        )));
    }
    Ok(IdxArray {
        dims,
        data: bytes[header..].to_vec(),
    })
}

/// Writes an unsigned-byte IDX file (what tests and tools use to make small MNIST-like files).
pub fn write_idx(path: &Path, dims: &[usize], data: &[u8]) -> Result<(), DataError> {
    let invalid = |why: String| DataError::Invalid { what: "idx.dims", why };
    if dims.is_empty() || dims.len() > 255 {
        return Err(invalid(format!("{} dimensions: IDX holds 1 to 255", dims.len())));
    }
    if dims.iter().product::<usize>() != data.len() {
        return Err(invalid(format!(
            "dimensions {dims:?} do not hold {} values",
            data.len()
        )));
    }
    let mut bytes = vec![0, 0, UBYTE, dims.len() as u8];
    for &d in dims {
        let d = u32::try_from(d).map_err(|_| invalid(format!("dimension {d} does not fit in u32")))?;
        bytes.extend_from_slice(&d.to_be_bytes());
    }
    bytes.extend_from_slice(data);
    std::fs::write(path, bytes).map_err(|source| DataError::Io {
        path: path.to_path_buf(),
        op: "write",
        source,
    })
}

/// An MNIST-like dataset: `[count, rows, cols]` images and `count` labels.
#[derive(Debug, Clone)]
pub struct IdxDataset {
    /// Pixels scaled to `[0, 1]`, `[count, rows * cols]`.
    pixels: Vec<f32>,
    labels: Vec<i64>,
    rows: usize,
    cols: usize,
    classes: usize,
}

impl IdxDataset {
    /// Reads an images file and a labels file (e.g. `train-images-idx3-ubyte` and
    /// `train-labels-idx1-ubyte`) and checks that they hold the same number of samples.
    pub fn open(images: impl AsRef<Path>, labels: impl AsRef<Path>) -> Result<Self, DataError> {
        let (images, labels) = (images.as_ref(), labels.as_ref());
        let image_array = read_idx(images, 3, "images")?;
        let label_array = read_idx(labels, 1, "labels")?;
        let [count, rows, cols] = [image_array.dims[0], image_array.dims[1], image_array.dims[2]];
        if count != label_array.dims[0] {
            return Err(DataError::IdxCountMismatch {
                images: PathBuf::from(images),
                image_count: count,
                labels: PathBuf::from(labels),
                label_count: label_array.dims[0],
            });
        }
        if count == 0 || rows == 0 || cols == 0 {
            return Err(DataError::IdxFormat {
                path: images.to_path_buf(),
                role: "images",
                why: format!("holds no pixel: dimensions [{count}, {rows}, {cols}]"),
            });
        }
        let pixels = image_array.data.iter().map(|&p| f32::from(p) / 255.0).collect();
        let labels: Vec<i64> = label_array.data.iter().map(|&l| i64::from(l)).collect();
        // Labels are bytes, so this is at most 256; MNIST has 10.
        let classes = labels.iter().copied().max().map_or(0, |max| max as usize + 1);
        Ok(Self {
            pixels,
            labels,
            rows,
            cols,
            classes,
        })
    }

    /// The class id of every sample.
    pub fn labels(&self) -> &[i64] {
        &self.labels
    }
}

impl Dataset for IdxDataset {
    fn name(&self) -> &'static str {
        "idx"
    }

    fn len(&self) -> usize {
        self.labels.len()
    }

    fn input_width(&self) -> usize {
        self.rows * self.cols
    }

    fn targets_per_sample(&self) -> usize {
        1
    }

    /// One more than the largest label present (10 for MNIST).
    fn num_classes(&self) -> usize {
        self.classes
    }

    fn image_shape(&self) -> Option<[usize; 3]> {
        Some([1, self.rows, self.cols])
    }

    fn write_sample(&self, index: usize, inputs: &mut Vec<f32>, targets: &mut Vec<i64>) {
        let width = self.input_width();
        inputs.extend_from_slice(&self.pixels[index * width..(index + 1) * width]);
        targets.push(self.labels[index]);
    }
}
