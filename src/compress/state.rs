//! A codec's per-rank state as named f32 tensors, so checkpoints can save it and a resumed run
//! continues where it stopped.
//!
//! Without it, a resumed run restarts error feedback from zero and PowerSGD from freshly seeded
//! Q factors, and drifts away from the uninterrupted run. Names are the codec's own:
//! `residual.bucket<b>` (`[numel of bucket b]`, error feedback), `q.bucket<b>.param<i>`
//! (`[cols, r]`, PowerSGD's warm-started factor of parameter `i` of bucket `b`).

use std::collections::HashMap;

use super::error::CompressError;

/// One tensor of a codec's state.
#[derive(Debug, Clone, PartialEq)]
pub struct StateTensor {
    /// Unique within the codec, e.g. `residual.bucket3` or `q.bucket0.param2`.
    pub name: String,
    /// Shape.
    pub shape: Vec<usize>,
    /// Values, row-major; as many as the shape holds.
    pub data: Vec<f32>,
}

/// The tensors handed to [`GradCodec::load_state`](super::GradCodec::load_state), taken one by
/// one by the parts of the codec that own them; whatever no part takes is an error.
#[derive(Debug)]
pub(crate) struct StateTensors {
    method: &'static str,
    tensors: HashMap<String, StateTensor>,
}

impl StateTensors {
    /// Indexes `tensors` by name; a name given twice, or data that does not fill the shape, is
    /// an error.
    pub(crate) fn new(method: &'static str, tensors: Vec<StateTensor>) -> Result<Self, CompressError> {
        let mut by_name = HashMap::with_capacity(tensors.len());
        for tensor in tensors {
            let numel: usize = tensor.shape.iter().product();
            if numel != tensor.data.len() {
                return Err(CompressError::StateTensor {
                    method,
                    name: tensor.name,
                    problem: format!("has shape {:?} but {} values", tensor.shape, tensor.data.len()),
                });
            }
            if by_name.contains_key(&tensor.name) {
                return Err(CompressError::StateTensor {
                    method,
                    name: tensor.name,
                    problem: "is given twice".to_string(),
                });
            }
            by_name.insert(tensor.name.clone(), tensor);
        }
        Ok(Self {
            method,
            tensors: by_name,
        })
    }

    /// Takes the tensor `name`, which must have shape `expected`; `None` when there is none.
    pub(crate) fn take(&mut self, name: &str, expected: &[usize]) -> Result<Option<Vec<f32>>, CompressError> {
        let Some(tensor) = self.tensors.remove(name) else {
            return Ok(None);
        };
        if tensor.shape != expected {
            return Err(CompressError::StateShape {
                method: self.method,
                name: tensor.name,
                expected: expected.to_vec(),
                found: tensor.shape,
            });
        }
        Ok(Some(tensor.data))
    }

    /// Fails on the first (by name) tensor nobody took: it belongs to another codec, another
    /// option or another bucket layout.
    pub(crate) fn finish(self) -> Result<(), CompressError> {
        let Some(name) = self.tensors.into_keys().min() else {
            return Ok(());
        };
        Err(CompressError::StateTensor {
            method: self.method,
            name,
            problem: "is not part of this codec's state for these buckets".to_string(),
        })
    }
}

/// `residual.bucket<b>`.
pub fn residual_name(bucket: usize) -> String {
    format!("residual.bucket{bucket}")
}

/// `q.bucket<b>.param<i>`.
pub(crate) fn q_name(bucket: usize, param: usize) -> String {
    format!("q.bucket{bucket}.param{param}")
}

/// Elements of a bucket of parameters of these shapes (a 0-d shape `[]` is one element).
pub(crate) fn bucket_numel(shapes: &[Vec<usize>]) -> usize {
    shapes.iter().map(|s| s.iter().product::<usize>()).sum()
}
