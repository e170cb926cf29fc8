//! The built-in models: shapes, slicing, deterministic replicas, flat parameters and gradients,
//! and that each one learns on its data.
#![cfg(feature = "train")]

use burn::module::{Module, ModuleVisitor, Param};
use burn::optim::{AdamConfig, GradientsParams};
use burn::tensor::{DType, Device, Int, Tensor, TensorData};
use burnrun::data::{Dataset, DistributedSampler, SyntheticDataset, TextDataset};
use burnrun::models::{BlockStack, ModelError, ModelSpec};
use burnrun::parallel::params::flatten_grads_via_device;
use burnrun::parallel::{
    flatten_grads, flatten_params, grads_from_flat, load_params, load_params_by_name, ParamError, ParamLayout,
};

/// Same arithmetic, same order, same process: results must agree bit for bit.
const EXACT: f32 = 0.0;

fn device() -> Device {
    Device::flex().autodiff()
}

fn values(t: Tensor<2>) -> Vec<f32> {
    t.into_data().try_into_vec_as::<f32>().expect("f32 data")
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "buffers of different lengths");
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

fn tiny_mlp(seed: u64, device: &Device) -> BlockStack {
    BlockStack::mlp(6, &[8, 5], 3, seed, device).expect("valid mlp")
}

fn tiny_cnn(seed: u64, device: &Device) -> BlockStack {
    BlockStack::cnn([2, 8, 8], &[4, 6], &[10], 3, seed, device).expect("valid cnn")
}

fn tiny_gpt(seed: u64, device: &Device) -> BlockStack {
    BlockStack::gpt(11, 8, 2, 2, 8, seed, device).expect("valid gpt")
}

fn features(batch: usize, width: usize, device: &Device) -> Tensor<2> {
    let data: Vec<f32> = (0..batch * width).map(|i| ((i * 37 % 17) as f32 - 8.0) / 8.0).collect();
    Tensor::from_data(TensorData::new(data, [batch, width]), device)
}

fn token_ids(batch: usize, seq: usize, vocab: usize, device: &Device) -> Tensor<2> {
    let data: Vec<f32> = (0..batch * seq).map(|i| ((i * 7 + 3) % vocab) as f32).collect();
    Tensor::from_data(TensorData::new(data, [batch, seq]), device)
}

fn class_targets(batch: usize, classes: usize, device: &Device) -> Tensor<2, Int> {
    let data: Vec<i64> = (0..batch).map(|i| (i % classes) as i64).collect();
    Tensor::from_data(TensorData::new(data, [batch, 1]), device)
}

/// Every model with an input batch and targets for it.
fn cases(device: &Device) -> Vec<(BlockStack, Tensor<2>, Tensor<2, Int>)> {
    let gpt_targets: Vec<i64> = (0..3 * 5).map(|i| ((i * 5 + 1) % 11) as i64).collect();
    vec![
        (tiny_mlp(1, device), features(4, 6, device), class_targets(4, 3, device)),
        (
            tiny_cnn(1, device),
            features(3, 2 * 8 * 8, device),
            class_targets(3, 3, device),
        ),
        (
            tiny_gpt(1, device),
            token_ids(3, 5, 11, device),
            Tensor::from_data(TensorData::new(gpt_targets, [3, 5]), device),
        ),
    ]
}

#[test]
fn each_model_maps_its_input_to_logits_of_the_documented_shape() {
    let device = device();
    let mlp = tiny_mlp(1, &device);
    assert_eq!(mlp.num_blocks(), 3);
    assert_eq!(mlp.forward(features(4, 6, &device)).unwrap().dims(), [4, 3]);

    let cnn = tiny_cnn(1, &device);
    assert_eq!(cnn.num_blocks(), 4);
    assert_eq!(cnn.forward(features(3, 128, &device)).unwrap().dims(), [3, 3]);

    let gpt = tiny_gpt(1, &device);
    assert_eq!(gpt.num_blocks(), 4, "embedding + 2 layers + head");
    assert_eq!(gpt.forward(token_ids(3, 5, 11, &device)).unwrap().dims(), [3, 5 * 11]);
    assert_eq!(
        gpt.forward(token_ids(2, 8, 11, &device)).unwrap().dims(),
        [2, 8 * 11],
        "seq = block_size"
    );
}

#[test]
fn activation_widths_from_the_spec_match_the_blocks_outputs() {
    let device = device();
    for (model, input, _) in cases(&device) {
        let input_width = input.dims()[1];
        let mut x = input;
        for block in 0..model.num_blocks() {
            assert_eq!(model.spec().activation_width(block, input_width).unwrap(), x.dims()[1]);
            x = model.forward_range(x, block..block + 1).unwrap();
        }
        assert_eq!(
            model.spec().activation_width(model.num_blocks(), input_width).unwrap(),
            x.dims()[1],
            "{}: output width",
            model.spec().name()
        );
    }
}

#[test]
fn running_the_blocks_range_by_range_equals_the_full_forward() {
    let device = device();
    for (model, input, _) in cases(&device) {
        let full = values(model.forward(input.clone()).unwrap());
        let n = model.num_blocks();
        // One block at a time, and a two-stage split.
        let mut x = input.clone();
        for block in 0..n {
            x = model.forward_range(x, block..block + 1).unwrap();
        }
        assert!(
            max_abs_diff(&full, &values(x)) <= EXACT,
            "{}: block by block",
            model.spec().name()
        );
        let mid = n / 2;
        let staged = model
            .forward_range(model.forward_range(input, 0..mid).unwrap(), mid..n)
            .unwrap();
        assert!(
            max_abs_diff(&full, &values(staged)) <= EXACT,
            "{}: two stages",
            model.spec().name()
        );
    }
}

#[test]
fn the_spec_counts_each_blocks_parameters_exactly() {
    use burn::module::Module;
    let device = device();
    for (model, _, _) in cases(&device) {
        let counts = model.block_param_counts();
        assert_eq!(counts.len(), model.num_blocks());
        for (i, &count) in counts.iter().enumerate() {
            assert_eq!(
                model.block(i).unwrap().num_params(),
                count,
                "{} block {i}",
                model.spec().name()
            );
        }
        assert_eq!(model.num_params(), counts.iter().sum::<usize>());
    }
}

#[test]
fn parameter_names_are_module_paths_by_block_index() {
    let device = device();
    let names: Vec<String> = ParamLayout::of(&tiny_mlp(1, &device))
        .params
        .into_iter()
        .map(|p| p.name)
        .collect();
    assert_eq!(
        names,
        [
            "blocks.0.linear.weight",
            "blocks.0.linear.bias",
            "blocks.1.linear.weight",
            "blocks.1.linear.bias",
            "blocks.2.linear.weight",
            "blocks.2.linear.bias"
        ]
    );
    let gpt = ParamLayout::of(&tiny_gpt(1, &device));
    let gpt_names: Vec<&str> = gpt.params.iter().map(|p| p.name.as_str()).collect();
    assert_eq!(
        gpt_names[..2],
        ["blocks.0.token_embedding", "blocks.0.position_embedding"]
    );
    assert!(gpt_names.contains(&"blocks.1.qkv.weight"));
    assert!(gpt_names.contains(&"blocks.2.ln1.gamma"));
    assert_eq!(gpt_names.last(), Some(&"blocks.3.lm_head.weight"));
    assert_eq!(gpt.get("blocks.0.token_embedding").unwrap().shape, vec![11, 8]);
    let cnn = ParamLayout::of(&tiny_cnn(1, &device));
    assert_eq!(cnn.params[0].name, "blocks.0.weight");
    assert_eq!(cnn.params[0].shape, vec![4, 2, 3, 3]);
}

#[test]
fn a_stage_built_alone_equals_the_same_blocks_of_the_full_model_with_the_same_names() {
    let device = device();
    let spec = ModelSpec::Gpt {
        vocab: 11,
        block_size: 8,
        n_layer: 3,
        n_head: 2,
        n_embd: 8,
    };
    let full = BlockStack::new(spec.clone(), 42, &device).unwrap();
    let full_layout = ParamLayout::of(&full);
    let full_values = flatten_params(&full).unwrap();
    for range in [0..2, 2..5, 1..4] {
        let alone = BlockStack::new_range(spec.clone(), range.clone(), 42, &device).unwrap();
        let sliced = BlockStack::new(spec.clone(), 42, &device)
            .unwrap()
            .slice(range.clone())
            .unwrap();
        assert_eq!(alone.held(), range);
        for stage in [&alone, &sliced] {
            let layout = ParamLayout::of(stage);
            let stage_values = flatten_params(stage).unwrap();
            assert!(!layout.is_empty());
            for p in &layout.params {
                let block: usize = p.name.split('.').nth(1).unwrap().parse().unwrap();
                assert!(range.contains(&block), "{} outside {range:?}", p.name);
                let in_full = full_layout.get(&p.name).expect("same name in the full model");
                assert_eq!(in_full.shape, p.shape);
                assert_eq!(full_values[in_full.range()], stage_values[p.range()], "{}", p.name);
            }
        }
    }
}

#[test]
fn slices_refuse_blocks_they_do_not_hold() {
    let device = device();
    let stage = tiny_mlp(1, &device).slice(1..3).unwrap();
    assert!(!stage.holds_input() && stage.holds_output());
    let err = stage.forward_range(features(2, 6, &device), 0..1).unwrap_err();
    assert!(matches!(err, ModelError::BlockNotHeld { block: 0, .. }), "{err}");
    let err = stage.clone().slice(0..2).unwrap_err();
    assert!(matches!(err, ModelError::BlockNotHeld { .. }), "{err}");
    let err = stage.forward_range(features(2, 8, &device), 1..4).unwrap_err();
    assert!(matches!(err, ModelError::BadRange { num_blocks: 3, .. }), "{err}");
}

#[test]
fn a_wrong_input_shape_is_an_error_naming_the_block() {
    let device = device();
    let err = tiny_mlp(1, &device).forward(features(2, 7, &device)).unwrap_err();
    let message = err.to_string();
    assert!(matches!(err, ModelError::BadInput { block: 0, .. }), "{message}");
    assert!(
        message.contains("block 0 (dense)") && message.contains("[batch, 6]"),
        "{message}"
    );
    let err = tiny_gpt(1, &device).forward(token_ids(1, 9, 11, &device)).unwrap_err();
    assert!(err.to_string().contains("seq <= 8"), "{err}");
}

#[test]
fn invalid_specs_are_refused_with_the_parameter_named() {
    let device = device();
    let err = BlockStack::gpt(11, 8, 2, 3, 8, 0, &device).unwrap_err();
    assert!(
        err.to_string().contains("n_embd = 8 is not divisible by n_head = 3"),
        "{err}"
    );
    let err = BlockStack::cnn([1, 4, 4], &[2, 2, 2], &[], 3, 0, &device).unwrap_err();
    assert!(err.to_string().contains("channels"), "{err}");
    let err = BlockStack::mlp(4, &[0], 3, 0, &device).unwrap_err();
    assert!(err.to_string().contains("hidden"), "{err}");
}

#[test]
fn the_same_seed_builds_identical_replicas_and_another_seed_does_not() {
    let device = device();
    for build in [tiny_mlp, tiny_cnn, tiny_gpt] {
        let a = flatten_params(&build(7, &device)).unwrap();
        let b = flatten_params(&build(7, &device)).unwrap();
        let c = flatten_params(&build(8, &device)).unwrap();
        assert_eq!(a, b);
        assert_ne!(a, c);
    }
}

#[test]
fn flat_parameters_load_back_and_still_train() {
    let device = device();
    for (source, input, targets) in cases(&device) {
        let spec = source.spec().clone();
        let flat = flatten_params(&source).unwrap();
        let other = BlockStack::new(spec, 99, &device).unwrap();
        assert_ne!(flatten_params(&other).unwrap(), flat);
        let loaded = load_params(other, &flat).unwrap();
        assert_eq!(flatten_params(&loaded).unwrap(), flat);
        let expected = values(source.forward(input.clone()).unwrap());
        let logits = loaded.forward(input).unwrap();
        assert!(max_abs_diff(&expected, &values(logits.clone())) <= EXACT);
        // Loaded parameters must still receive gradients.
        let loss = loaded.loss(logits, targets).unwrap();
        let grads = GradientsParams::from_grads(loss.backward(), &loaded);
        assert_eq!(grads.len(), ParamLayout::of(&loaded).len(), "{}", loaded.spec().name());
        let flat_grads = flatten_grads(&loaded, &grads).unwrap();
        assert!(flat_grads.iter().any(|g| *g != 0.0));
    }
}

#[test]
fn a_buffer_of_the_wrong_length_is_refused() {
    let device = device();
    let model = tiny_mlp(1, &device);
    let numel = ParamLayout::of(&model).numel;
    let err = load_params(model.clone(), &vec![0.0; numel - 1]).unwrap_err();
    assert!(matches!(err, ParamError::BadBufferLength { .. }), "{err}");
    let err = grads_from_flat(&model, &vec![0.0; numel + 1]).unwrap_err();
    assert!(
        matches!(err, ParamError::BadBufferLength { what: "gradients", .. }),
        "{err}"
    );
}

#[test]
fn parameters_load_by_name_across_pipeline_layouts() {
    let device = device();
    let spec = ModelSpec::Mlp {
        input: 6,
        hidden: vec![8, 8, 5],
        classes: 3,
    };
    // A "checkpoint" of the full model, as name -> values.
    let full = BlockStack::new(spec.clone(), 3, &device).unwrap();
    let layout = ParamLayout::of(&full);
    let values = flatten_params(&full).unwrap();
    let lookup = |name: &str| layout.get(name).map(|p| values[p.range()].to_vec());

    let stage = BlockStack::new_range(spec.clone(), 2..4, 77, &device).unwrap();
    let stage = load_params_by_name(stage, |p| lookup(&p.name)).unwrap();
    let stage_layout = ParamLayout::of(&stage);
    let stage_values = flatten_params(&stage).unwrap();
    for p in &stage_layout.params {
        assert_eq!(stage_values[p.range()], values[layout.get(&p.name).unwrap().range()]);
    }

    let err = load_params_by_name(BlockStack::new(spec, 3, &device).unwrap(), |p| {
        (p.name != "blocks.1.linear.bias").then(|| lookup(&p.name)).flatten()
    })
    .unwrap_err();
    assert!(err.to_string().contains("blocks.1.linear.bias"), "{err}");
}

#[test]
fn two_replicas_flatten_identical_gradients_in_the_same_order() {
    let device = device();
    for ((a, input, targets), (b, _, _)) in cases(&device).into_iter().zip(cases(&device)) {
        let loss_a = a.loss(a.forward(input.clone()).unwrap(), targets.clone()).unwrap();
        let loss_b = b.loss(b.forward(input).unwrap(), targets).unwrap();
        let grads_a = GradientsParams::from_grads(loss_a.backward(), &a);
        let grads_b = GradientsParams::from_grads(loss_b.backward(), &b);
        assert_eq!(ParamLayout::of(&a), ParamLayout::of(&b));
        let flat_a = flatten_grads(&a, &grads_a).unwrap();
        let flat_b = flatten_grads(&b, &grads_b).unwrap();
        assert_eq!(flat_a.len(), ParamLayout::of(&a).numel);
        assert_eq!(flat_a, flat_b, "{}", a.spec().name());
    }
}

#[test]
fn gradients_registered_from_a_flat_buffer_step_the_optimizer_like_the_originals() {
    let device = device();
    let (model, input, targets) = cases(&device).remove(0);
    let loss = model.loss(model.forward(input).unwrap(), targets).unwrap();
    let grads = GradientsParams::from_grads(loss.backward(), &model);
    let flat = flatten_grads(&model, &grads).unwrap();
    let rebuilt = grads_from_flat(&model, &flat).unwrap();
    assert_eq!(flatten_grads(&model, &rebuilt).unwrap(), flat);

    let mut optim_a = AdamConfig::new().init();
    let mut optim_b = AdamConfig::new().init();
    let stepped_a = optim_a.step(1e-2, model.clone(), grads);
    let stepped_b = optim_b.step(1e-2, model, rebuilt);
    assert_eq!(flatten_params(&stepped_a).unwrap(), flatten_params(&stepped_b).unwrap());
}

#[test]
fn missing_gradients_flatten_as_zeros() {
    let device = device();
    let model = tiny_mlp(1, &device);
    let numel = ParamLayout::of(&model).numel;
    let flat = flatten_grads(&model, &GradientsParams::new()).unwrap();
    assert_eq!(flat, vec![0.0; numel]);
    let mut via_device = Vec::new();
    flatten_grads_via_device(&model, &GradientsParams::new(), &mut via_device).unwrap();
    assert_eq!(via_device, vec![0.0; numel]);
}

#[test]
fn the_gpt_is_causal() {
    let device = device();
    let gpt = tiny_gpt(5, &device);
    let (batch, seq, vocab) = (1, 6, 11);
    let ids: Vec<f32> = vec![1.0, 4.0, 2.0, 7.0, 3.0, 9.0];
    let mut changed = ids.clone();
    changed[3] = 0.0;
    let run = |ids: Vec<f32>| {
        values(
            gpt.forward(Tensor::from_data(TensorData::new(ids, [batch, seq]), &device))
                .unwrap(),
        )
    };
    let (a, b) = (run(ids), run(changed));
    // Positions 0..3 must not see token 3; positions 3.. must.
    assert!(max_abs_diff(&a[..3 * vocab], &b[..3 * vocab]) <= 1e-6);
    assert!(max_abs_diff(&a[3 * vocab..], &b[3 * vocab..]) > 1e-6);
}

#[test]
fn the_loss_refuses_targets_that_do_not_fit_the_logits() {
    let device = device();
    let model = tiny_mlp(1, &device);
    let logits = model.forward(features(4, 6, &device)).unwrap();
    let err = model.loss(logits, class_targets(3, 3, &device)).unwrap_err();
    assert!(matches!(err, ModelError::BadTargets { .. }), "{err}");
}

/// Trains `model` with Adam on `steps` batches and returns the mean loss of the first and last
/// `window` steps.
fn train(mut model: BlockStack, data: &dyn Dataset, steps: u64, lr: f64, device: &Device) -> (f32, f32) {
    let sampler = DistributedSampler::new(data.len(), 1, 0, 16, 0, true, true).unwrap();
    let mut optim = AdamConfig::new().init();
    let mut losses = Vec::new();
    for step in 0..steps {
        let batch = data.batch(&sampler.step_indices(step), device).unwrap();
        let loss = model.loss(model.forward(batch.inputs).unwrap(), batch.targets).unwrap();
        losses.push(loss.clone().into_scalar::<f32>());
        let grads = GradientsParams::from_grads(loss.backward(), &model);
        model = optim.step(lr, model, grads);
    }
    let window = 3;
    let first = losses[..window].iter().sum::<f32>() / window as f32;
    let last = losses[losses.len() - window..].iter().sum::<f32>() / window as f32;
    (first, last)
}

#[test]
fn the_mlp_learns_the_synthetic_set() {
    let device = device();
    let data = SyntheticDataset::generate(256, 20, 4, 1.0, 3, None).unwrap();
    let model = BlockStack::mlp(20, &[32], 4, 1, &device).unwrap();
    let (first, last) = train(model, &data, 30, 1e-2, &device);
    assert!(last < 0.5 * first, "loss {first} -> {last}");
}

#[test]
fn the_cnn_learns_synthetic_images() {
    let device = device();
    let data = SyntheticDataset::generate(256, 64, 4, 1.0, 3, Some([1, 8, 8])).unwrap();
    let model = BlockStack::cnn([1, 8, 8], &[4], &[16], 4, 1, &device).unwrap();
    let (first, last) = train(model, &data, 30, 1e-2, &device);
    assert!(last < 0.5 * first, "loss {first} -> {last}");
}

#[test]
fn the_gpt_learns_a_repetitive_text() {
    let device = device();
    let text = "abcabd abcabd abcabd ".repeat(20);
    let data = TextDataset::from_text(&text, 8, 1, "<test>").unwrap();
    let model = BlockStack::gpt(data.vocab_size(), 8, 1, 2, 16, 1, &device).unwrap();
    let (first, last) = train(model, &data, 30, 1e-2, &device);
    assert!(last < 0.5 * first, "loss {first} -> {last}");
}

#[test]
fn accuracy_counts_arg_max_hits_over_every_target() {
    let device = device();
    // Two samples, two targets each, three classes: arg-maxes 2, 0 | 1, 1.
    let logits: Vec<f32> = vec![0.0, 0.1, 0.9, 0.8, 0.1, 0.0, 0.2, 0.7, 0.1, 0.0, 0.5, 0.4];
    let logits = Tensor::<2>::from_data(TensorData::new(logits, [2, 6]), &device);
    let targets = Tensor::<2, Int>::from_data(TensorData::new(vec![2i64, 1, 1, 0], [2, 2]), &device);
    let accuracy = burnrun::models::accuracy(logits, targets, 3)
        .unwrap()
        .into_scalar::<f32>();
    assert_eq!(accuracy, 0.5);
}

/// Registers `values[range]` as each parameter's gradient, stored as `dtype`.
struct RegisterAs<'a> {
    layout: std::slice::Iter<'a, burnrun::parallel::ParamInfo>,
    values: &'a [f32],
    dtype: DType,
    grads: GradientsParams,
}

impl ModuleVisitor for RegisterAs<'_> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        let info = self.layout.next().expect("one layout entry per parameter");
        let data = TensorData::new(self.values[info.range()].to_vec(), info.shape.clone());
        let device = param.lazy_device().without_autodiff();
        self.grads
            .register::<D>(param.id, Tensor::from_data(data, (&device, self.dtype)));
    }
}

#[test]
fn gradients_held_in_f32_f16_or_bf16_flatten_to_their_values_in_layout_order() {
    let device = device();
    for model in [tiny_mlp(1, &device), tiny_gpt(2, &device)] {
        let layout = ParamLayout::of(&model);
        // Multiples of 1/8 in [-4, 4): exact in f16 and bf16, and different per position so a
        // parameter read in another order or at another offset shows.
        let values: Vec<f32> = (0..layout.numel).map(|i| ((i * 7) % 64) as f32 / 8.0 - 4.0).collect();
        for dtype in [DType::F32, DType::F16, DType::BF16] {
            let mut register = RegisterAs {
                layout: layout.params.iter(),
                values: &values,
                dtype,
                grads: GradientsParams::new(),
            };
            model.visit(&mut register);
            let flat = flatten_grads(&model, &register.grads).unwrap();
            assert_eq!(flat, values, "{} with {dtype:?} gradients", model.spec().name());
            // Through one buffer on the device (the GPU path): the same values, same order.
            let mut via_device = Vec::new();
            flatten_grads_via_device(&model, &register.grads, &mut via_device).unwrap();
            assert_eq!(
                via_device,
                values,
                "{} with {dtype:?} gradients, via the device",
                model.spec().name()
            );
            // The gradients are still there to read again (they are not taken out).
            assert_eq!(flatten_grads(&model, &register.grads).unwrap(), values);
        }
    }
}
