//! Tensor parallelism (`parallel.tensor = T`, Megatron-LM's split): which slice of a full
//! parameter a tensor-parallel rank holds, and moving values between the full tensor and a slice.
//! A plain type below the layers that use it (`models` describe their splits, `parallel`
//! re-exports it, `train` moves values and checkpoints with it), like the mesh.
//!
//! A column-parallel linear layer (burn's weight is `[in, out]`) keeps `out / T` of the output
//! columns: rank r the r-th run of every section (a fused query/key/value weight has three
//! sections, so a rank holds the same heads' queries, keys and values). A row-parallel one keeps
//! `in / T` of the input rows. Everything else is replicated. The trainer runs the
//! communication (`crate::train`): the partial outputs of a tensor-parallel segment are summed
//! over the group in forward, the gradient of its input in backward.

use std::ops::Range;

/// Where a tensor-parallel rank's slice of a parameter lies in the full parameter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorSplit {
    /// The full parameter's shape.
    pub full_shape: Vec<usize>,
    /// The split dimension (`shape.len() - 1` for output columns, 0 for input rows).
    pub dim: usize,
    /// The indices along `dim` this rank holds, in the order its slice stores them.
    pub ranges: Vec<Range<usize>>,
}

impl TensorSplit {
    /// Rank `rank` of `ranks`'s share of a dimension of `len` made of `sections` equal sections
    /// (3 for a fused query/key/value projection, else 1): the rank-th run of each section.
    pub fn even(full_shape: Vec<usize>, dim: usize, sections: usize, rank: usize, ranks: usize) -> Self {
        let section = full_shape[dim] / sections;
        let run = section / ranks;
        let ranges = (0..sections)
            .map(|s| s * section + rank * run..s * section + (rank + 1) * run)
            .collect();
        Self {
            full_shape,
            dim,
            ranges,
        }
    }

    /// The slice's shape.
    pub fn local_shape(&self) -> Vec<usize> {
        let mut shape = self.full_shape.clone();
        shape[self.dim] = self.ranges.iter().map(|r| r.len()).sum();
        shape
    }

    /// Values of the slice.
    pub fn local_numel(&self) -> usize {
        self.local_shape().iter().product()
    }

    /// Calls `f(full_offset, local_offset, len)` for every contiguous run of the slice in the
    /// row-major full tensor.
    pub fn runs(&self, mut f: impl FnMut(usize, usize, usize)) {
        // Row-major: everything after `dim` is contiguous; everything before repeats.
        let inner: usize = self.full_shape[self.dim + 1..].iter().product();
        let outer: usize = self.full_shape[..self.dim].iter().product();
        let full_row = self.full_shape[self.dim] * inner;
        let local_row: usize = self.ranges.iter().map(|r| r.len()).sum::<usize>() * inner;
        for o in 0..outer {
            let mut local = o * local_row;
            for r in &self.ranges {
                f(o * full_row + r.start * inner, local, r.len() * inner);
                local += r.len() * inner;
            }
        }
    }

    /// This rank's slice of `full` (row-major, `full_shape`).
    pub fn take(&self, full: &[f32]) -> Vec<f32> {
        let mut out = vec![0.0; self.local_numel()];
        self.runs(|from, to, len| out[to..to + len].copy_from_slice(&full[from..from + len]));
        out
    }

    /// The split as text, `<dim>:<start>-<end>,...` (a checkpoint's header records it).
    pub fn describe(&self) -> String {
        let ranges: Vec<String> = self.ranges.iter().map(|r| format!("{}-{}", r.start, r.end)).collect();
        format!("{}:{}", self.dim, ranges.join(","))
    }

    /// The split [`Self::describe`] wrote, of a parameter of `full_shape`; `None` if `text` is
    /// not one or does not fit the shape.
    pub fn parse(text: &str, full_shape: Vec<usize>) -> Option<Self> {
        let (dim, ranges) = text.split_once(':')?;
        let dim: usize = dim.parse().ok()?;
        let ranges = ranges
            .split(',')
            .map(|r| {
                let (a, b) = r.split_once('-')?;
                Some(a.parse().ok()?..b.parse().ok()?)
            })
            .collect::<Option<Vec<Range<usize>>>>()?;
        let fits = dim < full_shape.len() && ranges.iter().all(|r| r.start <= r.end && r.end <= full_shape[dim]);
        fits.then_some(Self {
            full_shape,
            dim,
            ranges,
        })
    }

    /// Writes this rank's `slice` into its place in `full`.
    pub fn put(&self, slice: &[f32], full: &mut [f32]) {
        self.runs(|to, from, len| full[to..to + len].copy_from_slice(&slice[from..from + len]));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn column_slices_of_a_fused_projection_take_the_same_run_of_each_section_and_cover_it() {
        // [2, 6] = 2 rows of three sections of 2 columns; 2 ranks take one column per section.
        let full: Vec<f32> = (0..12).map(|v| v as f32).collect();
        let r0 = TensorSplit::even(vec![2, 6], 1, 3, 0, 2);
        let r1 = TensorSplit::even(vec![2, 6], 1, 3, 1, 2);
        assert_eq!(r0.local_shape(), vec![2, 3]);
        assert_eq!(r0.take(&full), vec![0.0, 2.0, 4.0, 6.0, 8.0, 10.0]);
        assert_eq!(r1.take(&full), vec![1.0, 3.0, 5.0, 7.0, 9.0, 11.0]);
        let mut back = vec![-1.0; 12];
        r0.put(&r0.take(&full), &mut back);
        r1.put(&r1.take(&full), &mut back);
        assert_eq!(back, full);
    }

    #[test]
    fn a_split_reads_back_from_its_description_and_a_bad_one_is_refused() {
        let split = TensorSplit::even(vec![4, 12], 1, 3, 1, 2);
        assert_eq!(TensorSplit::parse(&split.describe(), vec![4, 12]), Some(split));
        assert_eq!(TensorSplit::parse("1:0-13", vec![4, 12]), None);
        assert_eq!(TensorSplit::parse("x", vec![4, 12]), None);
    }

    #[test]
    fn row_slices_and_vectors_are_contiguous_runs() {
        let full: Vec<f32> = (0..8).map(|v| v as f32).collect();
        let rows = TensorSplit::even(vec![4, 2], 0, 1, 1, 2);
        assert_eq!(rows.take(&full), vec![4.0, 5.0, 6.0, 7.0]);
        let bias = TensorSplit::even(vec![8], 0, 1, 3, 4);
        assert_eq!(bias.take(&full), vec![6.0, 7.0]);
    }
}
