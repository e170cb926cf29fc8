//! Parameters and gradients as flat `f32` buffers, named by module path.
//!
//! What DDP (all-reduce of gradients), the start-of-training broadcast, replica checks and
//! safetensors checkpoints are built on. Parameters are visited in burn's module order, which is
//! deterministic (struct fields in declaration order, `Vec` entries by index) and the same on every
//! rank; `ParamId`s are random per process and are never used to match parameters across ranks.
//!
//! Names are module paths joined with `.`: struct field names and `Vec` indices; enum variant
//! names (our `Block::Dense` etc.) are left out, and `Option` adds nothing (burn's convention).
//! So a built-in model's names are `blocks.<i>.<field>….<param>`, e.g. `blocks.0.linear.weight`,
//! `blocks.2.qkv.bias`, `blocks.1.weight` (a conv block), and they are the same in a pipeline slice.
//!
//! Values are converted to f32 on the way out and to the parameter's own dtype on the way in.
//! Nothing here knows a particular model: it serves any burn `Module` (the built-in ones, and
//! users' through [`super::Ddp`]).

use std::ops::Range;

use burn::module::{Module, ModuleMapper, ModuleVisitor, Param};
use burn::optim::GradientsParams;
use burn::tensor::{bf16, f16, DType, Tensor, TensorData};
use half::slice::HalfFloatSliceExt;

/// Reading or writing a module's tensors as flat buffers failed.
#[derive(Debug, thiserror::Error)]
pub enum ParamError {
    /// A flat parameter or gradient buffer has the wrong length for the model.
    #[error("{what}: buffer of {got} values does not fit the model's {expected} parameters")]
    BadBufferLength {
        /// Which buffer (`parameters`, `gradients`).
        what: &'static str,
        /// The model's total number of parameter values.
        expected: usize,
        /// The buffer's length.
        got: usize,
    },
    /// A parameter the model needs is missing from a named source (e.g. a checkpoint).
    #[error("parameter {name} (shape {shape:?}) is missing from the source")]
    MissingParam {
        /// The parameter's module path.
        name: String,
        /// Its shape in the model.
        shape: Vec<usize>,
    },
    /// A named source holds a parameter with the wrong number of values.
    #[error("parameter {name}: the model's shape {shape:?} needs {expected} values, the source has {got}")]
    ParamSizeMismatch {
        /// The parameter's module path.
        name: String,
        /// Its shape in the model.
        shape: Vec<usize>,
        /// Values expected.
        expected: usize,
        /// Values found.
        got: usize,
    },
    /// A tensor could not be read back from the device.
    #[error("parameter {name}: reading its values back failed: {why}")]
    ReadBack {
        /// The parameter's module path.
        name: String,
        /// burn's message.
        why: String,
    },
}

/// One parameter's place in a flat buffer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParamInfo {
    /// Module path, e.g. `blocks.0.linear.weight`.
    pub name: String,
    /// burn's shape (linear weights are `[in, out]`, transposed from PyTorch's).
    pub shape: Vec<usize>,
    /// First index in the flat buffer.
    pub offset: usize,
    /// Number of values (product of `shape`).
    pub numel: usize,
}

impl ParamInfo {
    /// The parameter's indices in the flat buffer.
    pub fn range(&self) -> Range<usize> {
        self.offset..self.offset + self.numel
    }
}

/// The parameters of a module in visit order, and where each lies in a flat buffer.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ParamLayout {
    /// One entry per float parameter, in visit order, contiguous from offset 0.
    pub params: Vec<ParamInfo>,
    /// Total number of values.
    pub numel: usize,
}

impl ParamLayout {
    /// The layout of `module`'s float parameters (no tensor is read or initialised).
    pub fn of<M: Module>(module: &M) -> Self {
        // Invariant: LayoutVisitor::visit always returns Ok.
        visit_params(module, LayoutVisitor::default())
            .expect("the layout visitor never fails")
            .layout
    }

    /// The entry named `name`.
    pub fn get(&self, name: &str) -> Option<&ParamInfo> {
        self.params.iter().find(|p| p.name == name)
    }

    /// Number of parameters (tensors, not values).
    pub fn len(&self) -> usize {
        self.params.len()
    }

    /// Whether the module has no float parameter.
    pub fn is_empty(&self) -> bool {
        self.params.is_empty()
    }
}

/// The module path stack shared by every visitor here.
#[derive(Debug, Default)]
struct PathStack {
    /// `(name, counts)`: enum variants are pushed with `counts = false` so exits stay balanced.
    parts: Vec<(String, bool)>,
}

impl PathStack {
    fn enter(&mut self, name: &str, container_type: &str) {
        self.parts
            .push((name.to_string(), !container_type.starts_with("Enum:")));
    }

    fn exit(&mut self) {
        self.parts.pop();
    }

    fn name(&self) -> String {
        let names: Vec<&str> = self
            .parts
            .iter()
            .filter(|(_, counts)| *counts)
            .map(|(name, _)| name.as_str())
            .collect();
        names.join(".")
    }
}

/// What a visitor here does with one float parameter, told the module path it sits at (the name
/// is built only when asked for: most visits never need it).
trait ParamVisit {
    fn visit<const D: usize>(&mut self, path: &PathStack, param: &Param<Tensor<D>>) -> Result<(), ParamError>;
}

/// Visits every float parameter of `module` in order with `inner`, tracking module paths, and
/// stops at the first error; returns `inner` for its results.
fn visit_params<M: Module, V: ParamVisit>(module: &M, inner: V) -> Result<V, ParamError> {
    let mut visitor = PathVisitor {
        path: PathStack::default(),
        inner,
        error: None,
    };
    module.visit(&mut visitor);
    visitor.error.map_or(Ok(visitor.inner), Err)
}

/// burn's [`ModuleVisitor`] around a [`ParamVisit`]: the path tracking and the first error.
/// (burn's `visit_float_with_path` is not called by `Module::visit`, hence the stack.)
#[derive(Debug)]
struct PathVisitor<V> {
    path: PathStack,
    inner: V,
    error: Option<ParamError>,
}

impl<V: ParamVisit> ModuleVisitor for PathVisitor<V> {
    fn enter_module(&mut self, name: &str, container_type: &str) {
        self.path.enter(name, container_type);
    }

    fn exit_module(&mut self, _name: &str, _container_type: &str) {
        self.path.exit();
    }

    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        if self.error.is_none() {
            self.error = self.inner.visit(&self.path, param).err();
        }
    }
}

/// Collects the [`ParamLayout`].
#[derive(Debug, Default)]
struct LayoutVisitor {
    layout: ParamLayout,
}

impl ParamVisit for LayoutVisitor {
    fn visit<const D: usize>(&mut self, path: &PathStack, param: &Param<Tensor<D>>) -> Result<(), ParamError> {
        let shape = param.lazy_shape().to_vec();
        let numel = shape.iter().product();
        self.layout.params.push(ParamInfo {
            name: path.name(),
            shape,
            offset: self.layout.numel,
            numel,
        });
        self.layout.numel += numel;
        Ok(())
    }
}

/// Appends a tensor's values to `out` as f32 and returns how many. Two steps: burn's read-back
/// (which moves the buffer when the tensor holds it alone, and copies it when it is shared, as a
/// gradient still held by `GradientsParams` or a parameter is), then one pass from that data
/// straight into `out`, widening f16 and bf16 on the way (no intermediate `Vec<f32>`).
fn append_f32<const D: usize>(tensor: Tensor<D>, path: &PathStack, out: &mut Vec<f32>) -> Result<usize, ParamError> {
    let read_back = |why: &dyn std::fmt::Debug| ParamError::ReadBack {
        name: path.name(),
        why: format!("{why:?}"),
    };
    let data = tensor.try_into_data().map_err(|e| read_back(&e))?;
    let start = out.len();
    match data.dtype() {
        DType::F32 => out.extend_from_slice(data.as_slice::<f32>().map_err(|e| read_back(&e))?),
        DType::F16 => append_widened(data.as_slice::<f16>().map_err(|e| read_back(&e))?, out),
        DType::BF16 => append_widened(data.as_slice::<bf16>().map_err(|e| read_back(&e))?, out),
        // f64 and the rest: burn's conversion, through a Vec (no model here uses them).
        _ => out.extend_from_slice(&data.try_into_vec_as::<f32>().map_err(|e| read_back(&e))?),
    }
    Ok(out.len() - start)
}

/// Appends 16-bit floats to `out` as f32 (`half`'s block conversion, SIMD where the CPU has it).
fn append_widened<H>(src: &[H], out: &mut Vec<f32>)
where
    [H]: HalfFloatSliceExt,
{
    let start = out.len();
    out.resize(start + src.len(), 0.0);
    src.convert_to_f32_slice(&mut out[start..]);
}

/// Reads the selected float parameters (all of them without `select`) into `out`, in visit order.
#[derive(Debug)]
struct ParamReader<'a> {
    select: Option<std::slice::Iter<'a, bool>>,
    out: &'a mut Vec<f32>,
}

impl ParamVisit for ParamReader<'_> {
    fn visit<const D: usize>(&mut self, path: &PathStack, param: &Param<Tensor<D>>) -> Result<(), ParamError> {
        if let Some(select) = self.select.as_mut() {
            if !select.next().copied().unwrap_or(false) {
                return Ok(());
            }
        }
        append_f32(param.val(), path, self.out).map(|_| ())
    }
}

/// Every float parameter of `module`, concatenated in [`ParamLayout`] order.
pub fn flatten_params<M: Module>(module: &M) -> Result<Vec<f32>, ParamError> {
    let mut out = Vec::new();
    flatten_params_into(module, &mut out)?;
    Ok(out)
}

/// [`flatten_params`] into a reused buffer (cleared first).
pub fn flatten_params_into<M: Module>(module: &M, out: &mut Vec<f32>) -> Result<(), ParamError> {
    out.clear();
    visit_params(module, ParamReader { select: None, out }).map(|_| ())
}

/// Replaces each selected float parameter's value by the next `numel` values of `values`. Ids,
/// dtypes, devices and gradient requirements are kept (a parameter that required a gradient still
/// does).
#[derive(Debug)]
struct ParamWriter<'a> {
    layout: std::slice::Iter<'a, ParamInfo>,
    /// Per parameter, whether it is written (`None`: all of them).
    select: Option<std::slice::Iter<'a, bool>>,
    values: &'a [f32],
    /// Next unread index of `values`.
    offset: usize,
    /// Per parameter, whether the new tensor requires a gradient (`None`: as the old one did).
    require_grad: Option<std::slice::Iter<'a, bool>>,
}

impl ModuleMapper for ParamWriter<'_> {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
        // The layout was computed from this very module, so it has one entry per parameter.
        let Some(info) = self.layout.next() else {
            return param;
        };
        let wants_grad = self.require_grad.as_mut().and_then(|r| r.next().copied());
        if let Some(select) = self.select.as_mut() {
            if !select.next().copied().unwrap_or(false) {
                return param;
            }
        }
        let values = self.values[self.offset..self.offset + info.numel].to_vec();
        self.offset += info.numel;
        let shape = info.shape.clone();
        param.map(|old| {
            let device = old.device();
            let dtype = old.dtype();
            let require_grad = wants_grad.unwrap_or_else(|| old.is_require_grad());
            let new = Tensor::<D>::from_data(TensorData::new(values, shape), (&device, dtype));
            // A fresh tensor is a leaf without gradient tracking: re-mark it or it gets no gradient.
            if require_grad {
                new.require_grad()
            } else {
                new
            }
        })
    }
}

/// Loads `values` (laid out as [`ParamLayout::of`]`(&module)`, e.g. from [`flatten_params`] on a
/// replica) into `module`.
pub fn load_params<M: Module>(module: M, values: &[f32]) -> Result<M, ParamError> {
    let layout = ParamLayout::of(&module);
    if values.len() != layout.numel {
        return Err(ParamError::BadBufferLength {
            what: "parameters",
            expected: layout.numel,
            got: values.len(),
        });
    }
    let mut writer = ParamWriter {
        layout: layout.params.iter(),
        select: None,
        values,
        offset: 0,
        require_grad: None,
    };
    Ok(module.map(&mut writer))
}

/// Loads `values` into the parameters `select` marks (one flag per entry of
/// [`ParamLayout::of`]`(&module)`), which it holds back to back in layout order; the others keep
/// their values. E.g. the buffers (running statistics) a data-parallel wrapper broadcast.
pub fn load_selected<M: Module>(module: M, select: &[bool], values: &[f32]) -> Result<M, ParamError> {
    let layout = ParamLayout::of(&module);
    write_selected(module, &layout, select, values, None)
}

/// Loads `values` into the parameters `select` marks, `layout` being the module's as built;
/// `require_grad` (one flag per parameter) overrides whether each new tensor is tracked.
fn write_selected<M: Module>(
    module: M,
    layout: &ParamLayout,
    select: &[bool],
    values: &[f32],
    require_grad: Option<&[bool]>,
) -> Result<M, ParamError> {
    let expected = selected_numel(layout, select);
    let flags_fit = require_grad.is_none_or(|r| r.len() == layout.len());
    if values.len() != expected || select.len() != layout.len() || !flags_fit {
        return Err(ParamError::BadBufferLength {
            what: "selected parameters",
            expected,
            got: values.len(),
        });
    }
    let mut writer = ParamWriter {
        layout: layout.params.iter(),
        select: Some(select.iter()),
        values,
        offset: 0,
        require_grad: require_grad.map(|r| r.iter()),
    };
    Ok(module.map(&mut writer))
}

/// [`load_selected`] into a module whose current tensors may not have their real shapes (ZeRO-3
/// keeps the parameters of the blocks it is not computing as placeholders, see
/// [`release_selected`]): `layout` is the module's layout as built, and `require_grad` says per
/// parameter whether the new tensor is tracked (`false` everywhere: a forward builds no graph).
pub fn load_selected_as<M: Module>(
    module: M,
    layout: &ParamLayout,
    select: &[bool],
    values: &[f32],
    require_grad: &[bool],
) -> Result<M, ParamError> {
    write_selected(module, layout, select, values, Some(require_grad))
}

/// Replaces each selected float parameter by a one-value placeholder of the same rank, dtype and
/// device (and id), freeing its values: ZeRO-3 holds only the blocks it is computing. A released
/// parameter must be loaded again ([`load_selected_as`]) before the module computes with it.
pub fn release_selected<M: Module>(module: M, select: &[bool]) -> M {
    #[derive(Debug)]
    struct Releaser<'a>(std::slice::Iter<'a, bool>);
    impl ModuleMapper for Releaser<'_> {
        fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
            if !self.0.next().copied().unwrap_or(false) {
                return param;
            }
            param.map(|old| {
                let (device, dtype) = (old.device(), old.dtype());
                Tensor::<D>::from_data(TensorData::new(vec![0.0f32], [1; D]), (&device, dtype))
            })
        }
    }
    module.map(&mut Releaser(select.iter()))
}

/// Number of values of the parameters `select` marks.
pub fn selected_numel(layout: &ParamLayout, select: &[bool]) -> usize {
    layout
        .params
        .iter()
        .zip(select)
        .filter(|(_, &on)| on)
        .map(|(p, _)| p.numel)
        .sum()
}

/// Per float parameter in [`ParamLayout`] order, whether autodiff tracks it: false for frozen
/// parameters (`set_require_grad(false)`), for running statistics (burn's `RunningState`, e.g.
/// BatchNorm's), and for every parameter of a model on a device without autodiff. Initialises
/// lazy parameters (building them is what their first forward would do anyway).
pub fn trainable_mask<M: Module>(module: &M) -> Vec<bool> {
    #[derive(Debug, Default)]
    struct Mask(Vec<bool>);
    impl ModuleVisitor for Mask {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            self.0.push(param.val().is_require_grad());
        }
    }
    let mut mask = Mask::default();
    module.visit(&mut mask);
    mask.0
}

/// Reads every selected float parameter into `out` (cleared first), back to back in layout order.
pub fn flatten_selected_into<M: Module>(module: &M, select: &[bool], out: &mut Vec<f32>) -> Result<(), ParamError> {
    out.clear();
    let reader = ParamReader {
        select: Some(select.iter()),
        out,
    };
    visit_params(module, reader).map(|_| ())
}

/// Loads every float parameter by name from `source`, which returns the values of a name (or
/// `None` if it has none); e.g. a checkpoint written by another pipeline layout. Every parameter of
/// `module` must be found with the right number of values; extra names in the source are ignored
/// (they belong to other stages).
pub fn load_params_by_name<M, F>(module: M, mut source: F) -> Result<M, ParamError>
where
    M: Module,
    F: FnMut(&ParamInfo) -> Option<Vec<f32>>,
{
    let layout = ParamLayout::of(&module);
    let mut values = Vec::with_capacity(layout.numel);
    for info in &layout.params {
        let found = source(info).ok_or_else(|| ParamError::MissingParam {
            name: info.name.clone(),
            shape: info.shape.clone(),
        })?;
        if found.len() != info.numel {
            return Err(ParamError::ParamSizeMismatch {
                name: info.name.clone(),
                shape: info.shape.clone(),
                expected: info.numel,
                got: found.len(),
            });
        }
        values.extend_from_slice(&found);
    }
    load_params(module, &values)
}

/// Reads the gradients of the selected float parameters (all of them without `select`) into
/// `out`, back to back; missing gradients (a parameter that took no part in the loss) are zeros,
/// so every rank's buffer has the same layout. `present`, if given, gets one flag per parameter:
/// whether it had a gradient (0 for unselected ones).
#[derive(Debug)]
struct GradReader<'a> {
    grads: &'a GradientsParams,
    select: Option<std::slice::Iter<'a, bool>>,
    out: &'a mut Vec<f32>,
    present: Option<&'a mut Vec<u8>>,
}

impl GradReader<'_> {
    fn mark(&mut self, had: bool) {
        if let Some(present) = self.present.as_mut() {
            present.push(u8::from(had));
        }
    }
}

impl ParamVisit for GradReader<'_> {
    fn visit<const D: usize>(&mut self, path: &PathStack, param: &Param<Tensor<D>>) -> Result<(), ParamError> {
        if let Some(select) = self.select.as_mut() {
            if !select.next().copied().unwrap_or(false) {
                self.mark(false);
                return Ok(());
            }
        }
        let numel = param.lazy_shape().num_elements();
        let Some(grad) = self.grads.get::<D>(param.id) else {
            self.mark(false);
            self.out.resize(self.out.len() + numel, 0.0);
            return Ok(());
        };
        self.mark(true);
        let got = append_f32(grad, path, self.out)?;
        if got != numel {
            return Err(ParamError::ParamSizeMismatch {
                name: path.name(),
                shape: param.lazy_shape().to_vec(),
                expected: numel,
                got,
            });
        }
        Ok(())
    }
}

/// Collects each float parameter's gradient as a flat tensor on its own device (zeros where it
/// has none), for one concatenation on the device.
#[derive(Debug)]
struct DeviceGradCollector<'a> {
    grads: &'a GradientsParams,
    /// Per parameter, whether it is read (`None`: all of them).
    select: Option<std::slice::Iter<'a, bool>>,
    parts: Vec<Tensor<1>>,
    /// Per parameter (layout order), 1 when it was read and had a gradient.
    present: Vec<u8>,
}

impl ParamVisit for DeviceGradCollector<'_> {
    fn visit<const D: usize>(&mut self, _path: &PathStack, param: &Param<Tensor<D>>) -> Result<(), ParamError> {
        if let Some(select) = self.select.as_mut() {
            if !select.next().copied().unwrap_or(false) {
                self.present.push(0);
                return Ok(());
            }
        }
        let numel = param.lazy_shape().num_elements();
        let grad = self.grads.get::<D>(param.id);
        self.present.push(u8::from(grad.is_some()));
        let part = match grad {
            Some(grad) => grad.reshape([numel]),
            // Gradients live on the inner (non-autodiff) device.
            None => Tensor::zeros([numel], &param.lazy_device().without_autodiff()),
        };
        self.parts.push(part);
        Ok(())
    }
}

/// [`flatten_grads_into`] through one buffer on the device: the gradients are concatenated there
/// and cross to the host in a single read instead of one per parameter. For GPU devices, where
/// every read is a synchronisation and a transfer; on the CPU the per-parameter read is free and
/// the concatenation a copy, so [`flatten_grads_into`] is the better choice there.
pub fn flatten_grads_via_device<M: Module>(
    module: &M,
    grads: &GradientsParams,
    out: &mut Vec<f32>,
) -> Result<(), ParamError> {
    flatten_selected_grads_via_device(module, grads, None, out)
}

/// [`flatten_grads_via_device`] for the parameters `select` marks (`None`: all), back to back in
/// layout order.
pub fn flatten_selected_grads_via_device<M: Module>(
    module: &M,
    grads: &GradientsParams,
    select: Option<&[bool]>,
    out: &mut Vec<f32>,
) -> Result<(), ParamError> {
    out.clear();
    if let Some(flat) = flat_grads_on_device(module, grads, select)? {
        read_flat(flat, out)?;
    }
    Ok(())
}

/// The gradients of the parameters `select` marks (`None`: all) as one flat tensor on their
/// device (the inner, non-autodiff one), in layout order, zeros for parameters without a
/// gradient; `None` when nothing is selected. A fresh, contiguous buffer: a device communicator
/// may reduce it in place.
pub fn flat_grads_on_device<M: Module>(
    module: &M,
    grads: &GradientsParams,
    select: Option<&[bool]>,
) -> Result<Option<Tensor<1>>, ParamError> {
    let mut present = Vec::new();
    flat_selected_grads_on_device(module, grads, select, &mut present)
}

/// [`flat_grads_on_device`], also saying in `present` (cleared first; one entry per layout
/// entry, zero for unselected ones) which parameters had a gradient, as
/// [`flatten_selected_grads_into`] does on the host.
pub fn flat_selected_grads_on_device<M: Module>(
    module: &M,
    grads: &GradientsParams,
    select: Option<&[bool]>,
    present: &mut Vec<u8>,
) -> Result<Option<Tensor<1>>, ParamError> {
    let collector = visit_params(
        module,
        DeviceGradCollector {
            grads,
            select: select.map(|s| s.iter()),
            parts: Vec::new(),
            present: {
                present.clear();
                std::mem::take(present)
            },
        },
    )?;
    *present = collector.present;
    if collector.parts.is_empty() {
        return Ok(None);
    }
    Ok(Some(Tensor::cat(collector.parts, 0)))
}

/// Appends a flat tensor's values to `out` as f32 (one read from its device).
pub fn read_flat(flat: Tensor<1>, out: &mut Vec<f32>) -> Result<usize, ParamError> {
    append_f32(flat, &PathStack::default(), out)
}

/// The gradients of `module`'s parameters, concatenated in [`ParamLayout`] order (zeros for
/// parameters without a gradient).
pub fn flatten_grads<M: Module>(module: &M, grads: &GradientsParams) -> Result<Vec<f32>, ParamError> {
    let mut out = Vec::new();
    flatten_grads_into(module, grads, &mut out)?;
    Ok(out)
}

/// [`flatten_grads`] into a reused buffer (cleared first).
pub fn flatten_grads_into<M: Module>(
    module: &M,
    grads: &GradientsParams,
    out: &mut Vec<f32>,
) -> Result<(), ParamError> {
    out.clear();
    let reader = GradReader {
        grads,
        select: None,
        out,
        present: None,
    };
    visit_params(module, reader).map(|_| ())
}

/// Registers the next `numel` values of `values` as the gradient of every selected parameter.
#[derive(Debug)]
struct GradWriter<'a> {
    layout: std::slice::Iter<'a, ParamInfo>,
    /// Per parameter, whether `values` holds its values (`None`: all of them).
    eligible: Option<std::slice::Iter<'a, bool>>,
    /// Per parameter, whether it gets a gradient (`None`: all of them); implies `eligible`.
    select: Option<std::slice::Iter<'a, bool>>,
    values: GradValues<'a>,
    /// Next unread index of `values`.
    offset: usize,
    grads: GradientsParams,
}

/// Where [`GradWriter`] takes the values from.
#[derive(Debug)]
enum GradValues<'a> {
    /// A host buffer.
    Host(&'a [f32]),
    /// A flat tensor on the gradients' device (boxed: a tensor handle is large).
    Device(Box<Tensor<1>>),
}

impl ModuleVisitor for GradWriter<'_> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        // The layout was computed from this very module, so it has one entry per parameter.
        let Some(info) = self.layout.next() else {
            return;
        };
        let holds = self
            .eligible
            .as_mut()
            .is_none_or(|e| e.next().copied().unwrap_or(false));
        let gets = self.select.as_mut().is_none_or(|s| s.next().copied().unwrap_or(false));
        if !holds {
            return;
        }
        let range = self.offset..self.offset + info.numel;
        self.offset += info.numel;
        if !gets {
            return;
        }
        let dtype = param.val().dtype();
        let grad = match &self.values {
            GradValues::Host(values) => {
                // Gradients live on the inner (non-autodiff) device, in the parameter's dtype.
                let device = param.lazy_device().without_autodiff();
                let data = TensorData::new(values[range].to_vec(), info.shape.clone());
                Tensor::from_data(data, (&device, dtype))
            }
            // A slice of the flat buffer, on its device: nothing crosses to the host.
            GradValues::Device(flat) => {
                let shape: [usize; D] = std::array::from_fn(|i| info.shape[i]);
                (**flat).clone().slice(range).reshape(shape).cast(dtype)
            }
        };
        self.grads.register::<D>(param.id, grad);
    }
}

/// Gradients for `module` from a flat buffer laid out as [`ParamLayout::of`]`(module)` (e.g. the
/// all-reduced output of [`flatten_grads`]), ready for `optimizer.step`. Every parameter gets one,
/// zeros included, so the optimizer treats all ranks' replicas alike.
pub fn grads_from_flat<M: Module>(module: &M, values: &[f32]) -> Result<GradientsParams, ParamError> {
    let layout = ParamLayout::of(module);
    if values.len() != layout.numel {
        return Err(ParamError::BadBufferLength {
            what: "gradients",
            expected: layout.numel,
            got: values.len(),
        });
    }
    let mut writer = GradWriter {
        layout: layout.params.iter(),
        eligible: None,
        select: None,
        values: GradValues::Host(values),
        offset: 0,
        grads: GradientsParams::new(),
    };
    module.visit(&mut writer);
    Ok(writer.grads)
}

/// Gradients for the parameters `select` marks, from `values` laid out over the parameters
/// `eligible` marks (back to back, layout order; `select` implies `eligible`). The others get no
/// gradient, so an optimizer leaves them alone: a data-parallel wrapper passes the trainable
/// parameters as `eligible` and, as `select`, those that got a gradient on some rank.
pub fn grads_from_selected<M: Module>(
    module: &M,
    eligible: &[bool],
    select: &[bool],
    values: &[f32],
) -> Result<GradientsParams, ParamError> {
    let layout = ParamLayout::of(module);
    let expected = selected_numel(&layout, eligible);
    if values.len() != expected || eligible.len() != layout.len() || select.len() != layout.len() {
        return Err(ParamError::BadBufferLength {
            what: "gradients",
            expected,
            got: values.len(),
        });
    }
    let mut writer = GradWriter {
        layout: layout.params.iter(),
        eligible: Some(eligible.iter()),
        select: Some(select.iter()),
        values: GradValues::Host(values),
        offset: 0,
        grads: GradientsParams::new(),
    };
    module.visit(&mut writer);
    Ok(writer.grads)
}

/// [`grads_from_selected`] from a flat tensor on the gradients' device (e.g. the output of
/// [`flat_selected_grads_on_device`] after an all-reduce): each gradient is a slice of it, on the
/// device; nothing crosses to the host.
pub fn grads_from_selected_tensor<M: Module>(
    module: &M,
    eligible: &[bool],
    select: &[bool],
    flat: Tensor<1>,
) -> Result<GradientsParams, ParamError> {
    let layout = ParamLayout::of(module);
    let expected = selected_numel(&layout, eligible);
    let got = flat.dims()[0];
    if got != expected || eligible.len() != layout.len() || select.len() != layout.len() {
        return Err(ParamError::BadBufferLength {
            what: "gradients",
            expected,
            got,
        });
    }
    let mut writer = GradWriter {
        layout: layout.params.iter(),
        eligible: Some(eligible.iter()),
        select: Some(select.iter()),
        values: GradValues::Device(Box::new(flat)),
        offset: 0,
        grads: GradientsParams::new(),
    };
    module.visit(&mut writer);
    Ok(writer.grads)
}

/// Reads the gradients of the parameters `select` marks into `out` (cleared first), back to back
/// in layout order, zeros where a parameter has none; `present[k]` (one per layout entry, zero
/// for unselected ones) says whether parameter k had a gradient.
pub fn flatten_selected_grads_into<M: Module>(
    module: &M,
    grads: &GradientsParams,
    select: &[bool],
    out: &mut Vec<f32>,
    present: &mut Vec<u8>,
) -> Result<(), ParamError> {
    out.clear();
    present.clear();
    let reader = GradReader {
        grads,
        select: Some(select.iter()),
        out,
        present: Some(present),
    };
    visit_params(module, reader).map(|_| ())
}
