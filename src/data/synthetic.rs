//! A deterministic synthetic classification set: Gaussian clusters around random class centroids.
//!
//! Class `k` has a centroid drawn from N(0, 1) per feature; sample `i` picks a uniform class and
//! adds N(0, noise²) per feature. With `noise` around 1 the classes are far apart in many
//! dimensions, so any of the built-in classifiers learns it in a few steps; a larger `noise` makes
//! it harder. Everything is drawn from generators derived from the seed (centroids from stream 0,
//! sample `i` from stream `i + 1`), so sample `i` does not depend on how many samples exist.

use super::batch::Dataset;
use super::error::DataError;
use crate::rng::SplitMix64;

/// Samples of `features` values with a class id each, generated once in memory.
#[derive(Debug, Clone)]
pub struct SyntheticDataset {
    /// `[samples, features]`, row-major.
    features: Vec<f32>,
    /// One class id per sample.
    labels: Vec<i64>,
    width: usize,
    classes: usize,
    image_shape: Option<[usize; 3]>,
}

impl SyntheticDataset {
    /// Generates `samples` samples of `features` values in `classes` classes. With `image_shape`
    /// `Some([c, h, w])` (for the CNN) `features` must equal `c * h * w`; samples are then images
    /// flattened row-major.
    pub fn generate(
        samples: usize,
        features: usize,
        classes: usize,
        noise: f32,
        seed: u64,
        image_shape: Option<[usize; 3]>,
    ) -> Result<Self, DataError> {
        let invalid = |what, why: String| Err(DataError::Invalid { what, why });
        if samples == 0 {
            return invalid("synthetic.samples", "must be at least 1".into());
        }
        if features == 0 {
            return invalid("synthetic.features", "must be at least 1".into());
        }
        if classes < 2 {
            return invalid("synthetic.classes", format!("{classes} classes: need at least 2"));
        }
        if !noise.is_finite() || noise < 0.0 {
            return invalid("synthetic.noise", format!("{noise} is not a finite value >= 0"));
        }
        if let Some([c, h, w]) = image_shape {
            if c * h * w != features {
                return invalid(
                    "synthetic.image_shape",
                    format!("[{c}, {h}, {w}] has {} values but features = {features}", c * h * w),
                );
            }
        }

        let mut centroid_rng = SplitMix64::derive(seed, 0);
        let centroids: Vec<f32> = (0..classes * features).map(|_| centroid_rng.normal()).collect();

        let mut values = Vec::with_capacity(samples * features);
        let mut labels = Vec::with_capacity(samples);
        for i in 0..samples {
            let mut rng = SplitMix64::derive(seed, i as u64 + 1);
            let class = rng.below(classes);
            let centroid = &centroids[class * features..(class + 1) * features];
            values.extend(centroid.iter().map(|&c| c + noise * rng.normal()));
            labels.push(class as i64);
        }
        Ok(Self {
            features: values,
            labels,
            width: features,
            classes,
            image_shape,
        })
    }

    /// The class id of every sample.
    pub fn labels(&self) -> &[i64] {
        &self.labels
    }
}

impl Dataset for SyntheticDataset {
    fn name(&self) -> &'static str {
        "synthetic"
    }

    fn len(&self) -> usize {
        self.labels.len()
    }

    fn input_width(&self) -> usize {
        self.width
    }

    fn targets_per_sample(&self) -> usize {
        1
    }

    fn num_classes(&self) -> usize {
        self.classes
    }

    fn image_shape(&self) -> Option<[usize; 3]> {
        self.image_shape
    }

    fn write_sample(&self, index: usize, inputs: &mut Vec<f32>, targets: &mut Vec<i64>) {
        inputs.extend_from_slice(&self.features[index * self.width..(index + 1) * self.width]);
        targets.push(self.labels[index]);
    }
}
