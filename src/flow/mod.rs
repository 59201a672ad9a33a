//! Normalizing flow that maps a sampled activation vector to a standard normal.
//!
//! The flow is a chain of FrEIA `AllInOneBlock` coupling blocks (FrEIA 0.2) on 1-D input of
//! dimension `d`, with the defaults DAAIN trains with: affine clamping 2.0, no GIN, SOFTPLUS
//! global affine, hard permutation, no Householder reflections. Each block
//!
//! 1. splits `x` into `x1 = x[..d1]` and `x2 = x[d1..]` with `d1 = d - d / 2` and
//!    `d2 = d / 2`, so an odd `d` puts the extra value in `x1`;
//! 2. evaluates `a = 0.1 * subnet(x1)` with the subnet
//!    `Linear(d1, hidden) -> ReLU -> Linear(hidden, 2 * d2)`;
//! 3. maps `x2` to `x2 * exp(s) + a[d2..]` with `s = clamp * tanh(a[..d2])`;
//! 4. maps every value `v` to `v * scale + offset` with
//!    `scale = 0.1 * softplus_{beta = 0.5}(global_scale)`, the PyTorch softplus with its
//!    default threshold 20;
//! 5. permutes: `out[i] = v[permutation[i]]`.
//!
//! The block's log|det J| is `sum(s) + sum(ln scale)`. [`Flow::forward`] returns the sum
//! over blocks, and [`Flow::negative_log_likelihood`] turns `z` and that sum into the
//! negative log-likelihood under the standard normal.
//!
//! # Flow file layout
//!
//! The bundle stores the flow as a safetensors file (little-endian) with, for every block
//! `K` from 0 without gaps:
//!
//! | tensor                       | dtype | shape           | meaning                          |
//! |------------------------------|-------|-----------------|----------------------------------|
//! | `blocks.K.permutation`       | I32   | `[d]`           | `out[i] = v[permutation[i]]`     |
//! | `blocks.K.global_scale`      | F32   | `[d]`           | raw FrEIA `global_scale`         |
//! | `blocks.K.global_offset`     | F32   | `[d]`           | FrEIA `global_offset`            |
//! | `blocks.K.subnet.0.weight`   | F32 or F16 | `[hidden, d1]`  | first Linear, PyTorch layout |
//! | `blocks.K.subnet.0.bias`     | F32 or F16 | `[hidden]`      |                              |
//! | `blocks.K.subnet.2.weight`   | F32 or F16 | `[2 * d2, hidden]` | second Linear, PyTorch layout |
//! | `blocks.K.subnet.2.bias`     | F32 or F16 | `[2 * d2]`      |                              |
//!
//! The optional header metadata key `affine_clamping` contains the clamp as a decimal string.
//! Without it, [`params_from_safetensors`] uses FrEIA's default [`FREIA_DEFAULT_CLAMP`].
//! [`params_from_safetensors`] borrows F32 and I32 tensor data, so it must be aligned to
//! 4 bytes in memory. The safetensors serializer orders tensors by dtype alignment and pads
//! the header to 8 bytes, so a file it wrote and then read or memory-mapped at an aligned
//! address satisfies that. F16 subnet tensors take half the space of F32 ones, and the
//! subnet weights are most of the file. The reader widens them to owned f32 copies once, so
//! evaluation costs the same as with F32 tensors.
//!
//! # Kernels
//!
//! [`Flow::forward`] in f32 runs the block kernel that [`forward_kernel_f32`] picks for
//! this CPU: AVX2 with FMA on x86_64, NEON on aarch64, or the scalar [`block_forward`].
//! Setting the environment variable `DAAIN_FLOW_KERNEL=scalar` forces the scalar kernel.
//! [`Flow::forward_with`] runs any kernel, and f64 evaluation is always scalar.

mod kernel;
mod layout;
mod simd;

use std::borrow::Cow;

use thiserror::Error;

pub use kernel::{block_forward, block_inverse, BlockForwardFn, Element};
pub use layout::{params_from_safetensors, AFFINE_CLAMPING_METADATA_KEY};
#[cfg(target_arch = "x86_64")]
pub use simd::avx2_fma_coupling_forward_f32;
#[cfg(target_arch = "aarch64")]
pub use simd::neon_coupling_forward_f32;
pub use simd::{
    available_forward_kernels_f32, forward_kernel_f32, select_forward_kernel_f32, ForwardKernel,
    KernelRequestError, FLOW_KERNEL_ENV,
};

/// FrEIA's default `affine_clamping` of `AllInOneBlock`.
pub const FREIA_DEFAULT_CLAMP: f32 = 2.0;

/// PyTorch `Softplus` switches to the identity when `beta * x` exceeds this threshold.
const SOFTPLUS_THRESHOLD: f64 = 20.0;
/// FrEIA's SOFTPLUS global affine uses `0.1 * Softplus(beta = 0.5)`.
const SOFTPLUS_BETA: f64 = 0.5;
const GLOBAL_SCALE_FACTOR: f64 = 0.1;

/// Errors from building or evaluating a flow.
#[derive(Debug, Error, PartialEq)]
pub enum FlowError {
    #[error("flow dimension {dim} is invalid: a coupling block needs at least 2 values")]
    InvalidDimension { dim: usize },
    #[error("subnet width {hidden} is invalid: it must be at least 1")]
    InvalidHidden { hidden: usize },
    #[error("affine clamp {clamp} is invalid: it must be finite and positive (FrEIA default 2.0)")]
    InvalidClamp { clamp: f32 },
    #[error("flow has no blocks: pass at least one block")]
    NoBlocks,
    #[error(
        "block {block}: parameter `{parameter}` has {actual} values, expected {expected}; \
         check the flow dimension and subnet width"
    )]
    ParameterLength {
        block: usize,
        parameter: &'static str,
        expected: usize,
        actual: usize,
    },
    #[error(
        "block {block}: permutation[{index}] = {value} is out of range for dimension {dim}; \
         the permutation must hold each of 0..{dim} once"
    )]
    PermutationOutOfRange {
        block: usize,
        index: usize,
        value: u32,
        dim: usize,
    },
    #[error(
        "block {block}: permutation holds {value} twice (at {first} and {second}); \
         the permutation must hold each index once"
    )]
    PermutationDuplicate {
        block: usize,
        value: u32,
        first: usize,
        second: usize,
    },
    #[error("block {block}: parameter `{parameter}`[{index}] = {value} is not finite")]
    NonFiniteParameter {
        block: usize,
        parameter: &'static str,
        index: usize,
        value: f32,
    },
    #[error(
        "block {block}: global_scale[{index}] = {raw} gives the activated scale {scale}, \
         which is not a positive finite number; the parameter is corrupt"
    )]
    InvalidGlobalScale {
        block: usize,
        index: usize,
        raw: f32,
        scale: f64,
    },
    #[error("{what} has {actual} values, expected the flow dimension {expected}")]
    LengthMismatch {
        what: &'static str,
        expected: usize,
        actual: usize,
    },
    #[error("scratch space was sized for another flow; create it with Flow::scratch")]
    ScratchMismatch,
    #[error("input value at index {index} is not finite (NaN or infinite)")]
    NonFinite { index: usize },
    #[error(
        "flow output at index {index} is not finite; the input is far outside the range \
         the flow was trained on"
    )]
    NonFiniteOutput { index: usize },
    #[error(
        "flow log|det J| = {log_det} is not finite; the input is far outside the range the \
         flow was trained on"
    )]
    NonFiniteLogDet { log_det: f64 },
    #[error("flow file is not valid safetensors: {0}")]
    Safetensors(String),
    #[error("flow file has no tensor `{name}`")]
    MissingTensor { name: String },
    #[error("flow file has the unexpected tensor `{name}`; expected only `blocks.K.*` tensors")]
    UnexpectedTensor { name: String },
    #[error("flow tensor `{name}` has dtype {actual}, expected {expected}")]
    Dtype {
        name: String,
        expected: &'static str,
        actual: String,
    },
    #[error("flow tensor `{name}` has shape {actual:?}, expected {expected:?}")]
    Shape {
        name: String,
        expected: Vec<usize>,
        actual: Vec<usize>,
    },
    #[error(
        "flow tensor `{name}` is not aligned to 4 bytes in memory; load the file into an \
         aligned buffer or write it with the safetensors serializer"
    )]
    Unaligned { name: String },
    #[error("flow file metadata `{key}` = {value:?} is invalid: {reason}")]
    InvalidMetadata {
        key: &'static str,
        value: String,
        reason: String,
    },
}

/// Parameters of one `AllInOneBlock`, borrowed so that memory-mapped data needs no copy.
#[derive(Debug, Clone, Copy)]
pub struct BlockParams<'a> {
    /// Output index `i` takes value `permutation[i]`, so FrEIA's `w_perm[i, permutation[i]]`
    /// is 1.
    pub permutation: &'a [u32],
    /// Raw FrEIA `global_scale` before the softplus activation, `[d]`.
    pub global_scale: &'a [f32],
    /// FrEIA `global_offset`, `[d]`.
    pub global_offset: &'a [f32],
    /// First subnet Linear, `[hidden, d1]` row-major (PyTorch layout).
    pub subnet_0_weight: &'a [f32],
    /// `[hidden]`.
    pub subnet_0_bias: &'a [f32],
    /// Second subnet Linear, `[2 * d2, hidden]` row-major; rows `..d2` give the log-scale,
    /// rows `d2..` the shift.
    pub subnet_2_weight: &'a [f32],
    /// `[2 * d2]`.
    pub subnet_2_bias: &'a [f32],
}

/// Parameters of one block as read from a flow file: borrowed where the file stores F32
/// or I32, owned f32 copies where it stores the subnet tensors as F16.
#[derive(Debug, Clone)]
pub struct BlockTensors<'a> {
    /// Output index `i` takes value `permutation[i]`.
    pub permutation: &'a [u32],
    /// Raw FrEIA `global_scale` before the softplus activation, `[d]`.
    pub global_scale: &'a [f32],
    /// FrEIA `global_offset`, `[d]`.
    pub global_offset: &'a [f32],
    /// First subnet Linear, `[hidden, d1]` row-major (PyTorch layout).
    pub subnet_0_weight: Cow<'a, [f32]>,
    /// `[hidden]`.
    pub subnet_0_bias: Cow<'a, [f32]>,
    /// Second subnet Linear, `[2 * d2, hidden]` row-major.
    pub subnet_2_weight: Cow<'a, [f32]>,
    /// `[2 * d2]`.
    pub subnet_2_bias: Cow<'a, [f32]>,
}

impl<'a> From<BlockParams<'a>> for BlockTensors<'a> {
    fn from(params: BlockParams<'a>) -> Self {
        Self {
            permutation: params.permutation,
            global_scale: params.global_scale,
            global_offset: params.global_offset,
            subnet_0_weight: Cow::Borrowed(params.subnet_0_weight),
            subnet_0_bias: Cow::Borrowed(params.subnet_0_bias),
            subnet_2_weight: Cow::Borrowed(params.subnet_2_weight),
            subnet_2_bias: Cow::Borrowed(params.subnet_2_bias),
        }
    }
}

/// Everything [`Flow::new`] needs, as read by [`params_from_safetensors`].
#[derive(Debug, Clone)]
pub struct FlowParams<'a> {
    pub dim: usize,
    pub hidden: usize,
    pub clamp: f32,
    pub blocks: Vec<BlockTensors<'a>>,
}

/// One validated block with its activated global scale precomputed.
#[derive(Debug, Clone)]
pub struct Block<'a> {
    dim: usize,
    permutation: Cow<'a, [u32]>,
    global_scale: Cow<'a, [f32]>,
    global_offset: Cow<'a, [f32]>,
    subnet_0_weight: Cow<'a, [f32]>,
    subnet_0_bias: Cow<'a, [f32]>,
    subnet_2_weight: Cow<'a, [f32]>,
    subnet_2_bias: Cow<'a, [f32]>,
    /// Activated global scale, rounded to f32 from `scale_f64`.
    scale_f32: Vec<f32>,
    scale_f64: Vec<f64>,
    /// `sum(ln scale)`, the block's constant log|det J| term.
    log_scale_sum: f64,
    /// Second subnet Linear and its bias repacked for the vector kernels, see
    /// [`simd::pack_subnet_2`]. It takes about `2 * d2 * (hidden + 1)` floats.
    packed_subnet_2: Vec<f32>,
    /// `scale_f32[permutation[i]]`, so the vector kernels read the scale in output order.
    permuted_scale_f32: Vec<f32>,
    /// `global_offset[permutation[i]]`.
    permuted_offset_f32: Vec<f32>,
}

impl<'a> Block<'a> {
    /// Size of the half the subnet reads, `d - d / 2`.
    pub fn d1(&self) -> usize {
        self.dim - self.dim / 2
    }

    /// Size of the half the coupling transforms, `d / 2`.
    pub fn d2(&self) -> usize {
        self.dim / 2
    }

    pub fn permutation(&self) -> &[u32] {
        &self.permutation
    }

    /// Returns the block's parameters, borrowed from the block.
    pub fn params(&self) -> BlockParams<'_> {
        BlockParams {
            permutation: &self.permutation,
            global_scale: &self.global_scale,
            global_offset: &self.global_offset,
            subnet_0_weight: &self.subnet_0_weight,
            subnet_0_bias: &self.subnet_0_bias,
            subnet_2_weight: &self.subnet_2_weight,
            subnet_2_bias: &self.subnet_2_bias,
        }
    }

    /// Activated global scale `0.1 * softplus_{beta = 0.5}(global_scale)`.
    pub fn scale(&self) -> &[f64] {
        &self.scale_f64
    }

    /// Constant log|det J| term of the global affine, `sum(ln scale)`.
    pub fn log_scale_sum(&self) -> f64 {
        self.log_scale_sum
    }

    fn into_owned(self) -> Block<'static> {
        Block {
            dim: self.dim,
            permutation: Cow::Owned(self.permutation.into_owned()),
            global_scale: Cow::Owned(self.global_scale.into_owned()),
            global_offset: Cow::Owned(self.global_offset.into_owned()),
            subnet_0_weight: Cow::Owned(self.subnet_0_weight.into_owned()),
            subnet_0_bias: Cow::Owned(self.subnet_0_bias.into_owned()),
            subnet_2_weight: Cow::Owned(self.subnet_2_weight.into_owned()),
            subnet_2_bias: Cow::Owned(self.subnet_2_bias.into_owned()),
            scale_f32: self.scale_f32,
            scale_f64: self.scale_f64,
            log_scale_sum: self.log_scale_sum,
            packed_subnet_2: self.packed_subnet_2,
            permuted_scale_f32: self.permuted_scale_f32,
            permuted_offset_f32: self.permuted_offset_f32,
        }
    }
}

/// Computes FrEIA's SOFTPLUS global scale `0.1 * softplus_{beta = 0.5}(raw)` in f64, with
/// PyTorch's switch to the identity above `beta * raw = 20`.
pub fn activate_global_scale(raw: f32) -> f64 {
    let raw = f64::from(raw);
    let softplus = if raw * SOFTPLUS_BETA > SOFTPLUS_THRESHOLD {
        raw
    } else {
        (raw * SOFTPLUS_BETA).exp().ln_1p() / SOFTPLUS_BETA
    };
    GLOBAL_SCALE_FACTOR * softplus
}

/// Reusable work buffers for [`Flow::forward`] and [`Flow::inverse`], so that evaluation
/// does not allocate.
#[derive(Debug, Clone)]
pub struct FlowScratch<T> {
    current: Vec<T>,
    next: Vec<T>,
    hidden: Vec<T>,
    subnet_out: Vec<T>,
}

/// A validated chain of coupling blocks.
#[derive(Debug, Clone)]
pub struct Flow<'a> {
    dim: usize,
    hidden: usize,
    clamp: f32,
    blocks: Vec<Block<'a>>,
}

impl<'a> Flow<'a> {
    /// Validates the parameters and precomputes each block's activated global scale.
    ///
    /// Checks every length against `dim` and `hidden`, that each permutation contains each of
    /// `0..dim` once, that every parameter is finite, and that every activated scale is
    /// positive and finite. `blocks` are [`BlockParams`] or the [`BlockTensors`] that
    /// [`params_from_safetensors`] returns.
    pub fn new<B: Into<BlockTensors<'a>>>(
        dim: usize,
        hidden: usize,
        clamp: f32,
        blocks: Vec<B>,
    ) -> Result<Self, FlowError> {
        if dim < 2 {
            return Err(FlowError::InvalidDimension { dim });
        }
        if hidden == 0 {
            return Err(FlowError::InvalidHidden { hidden });
        }
        if !(clamp.is_finite() && clamp > 0.0) {
            return Err(FlowError::InvalidClamp { clamp });
        }
        if blocks.is_empty() {
            return Err(FlowError::NoBlocks);
        }
        let blocks = blocks
            .into_iter()
            .enumerate()
            .map(|(index, params)| prepare_block(index, dim, hidden, params.into()))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self {
            dim,
            hidden,
            clamp,
            blocks,
        })
    }

    /// Builds the flow from parameters read by [`params_from_safetensors`].
    pub fn from_params(params: FlowParams<'a>) -> Result<Self, FlowError> {
        Self::new(params.dim, params.hidden, params.clamp, params.blocks)
    }

    /// Copies borrowed parameters so the flow no longer borrows the source buffer.
    pub fn into_owned(self) -> Flow<'static> {
        Flow {
            dim: self.dim,
            hidden: self.hidden,
            clamp: self.clamp,
            blocks: self.blocks.into_iter().map(Block::into_owned).collect(),
        }
    }

    pub fn dim(&self) -> usize {
        self.dim
    }

    /// Width of the subnets' hidden layer.
    pub fn hidden(&self) -> usize {
        self.hidden
    }

    pub fn clamp(&self) -> f32 {
        self.clamp
    }

    pub fn blocks(&self) -> &[Block<'a>] {
        &self.blocks
    }

    /// Allocates the work buffers for evaluating this flow in precision `T`.
    pub fn scratch<T: Element>(&self) -> FlowScratch<T> {
        FlowScratch {
            current: vec![T::ZERO; self.dim],
            next: vec![T::ZERO; self.dim],
            hidden: vec![T::ZERO; self.hidden],
            subnet_out: vec![T::ZERO; 2 * (self.dim / 2)],
        }
    }

    /// Maps `x` to `z` and returns log|det dz/dx|.
    ///
    /// In f32 it runs the kernel of [`forward_kernel_f32`], in f64 the scalar
    /// [`block_forward`]. Rejects a non-finite input value with [`FlowError::NonFinite`] and a non-finite
    /// result with [`FlowError::NonFiniteOutput`] or [`FlowError::NonFiniteLogDet`].
    pub fn forward<T: Element>(
        &self,
        x: &[T],
        z: &mut [T],
        scratch: &mut FlowScratch<T>,
    ) -> Result<T, FlowError> {
        self.forward_with(T::default_forward_kernel(), x, z, scratch)
    }

    /// Runs [`Flow::forward`] with another block kernel, such as a vectorised one.
    pub fn forward_with<T: Element>(
        &self,
        kernel: BlockForwardFn<T>,
        x: &[T],
        z: &mut [T],
        scratch: &mut FlowScratch<T>,
    ) -> Result<T, FlowError> {
        self.check_buffers(x, z, scratch)?;
        let clamp = T::from_f32(self.clamp);
        let log_det = run_chain(self.blocks.iter(), kernel, clamp, x, z, scratch);
        check_output(z, log_det)?;
        Ok(log_det)
    }

    /// Maps `z` back to `x` and returns log|det dx/dz|, the negative of the forward value.
    pub fn inverse<T: Element>(
        &self,
        z: &[T],
        x: &mut [T],
        scratch: &mut FlowScratch<T>,
    ) -> Result<T, FlowError> {
        self.check_buffers(z, x, scratch)?;
        let clamp = T::from_f32(self.clamp);
        let log_det = run_chain(
            self.blocks.iter().rev(),
            block_inverse::<T>,
            clamp,
            z,
            x,
            scratch,
        );
        check_output(x, log_det)?;
        Ok(log_det)
    }

    /// Returns the negative log-likelihood of `x` under the flow, given its image `z` and
    /// log|det dz/dx|: `0.5 * |z|^2 + 0.5 * d * ln(2 pi) - log_det`, in f64.
    pub fn negative_log_likelihood<T: Element>(z: &[T], log_det: T) -> f64 {
        let squared_norm: f64 = z.iter().map(|&v| v.to_f64() * v.to_f64()).sum();
        let dim = z.len() as f64;
        0.5 * squared_norm + 0.5 * dim * (2.0 * std::f64::consts::PI).ln() - log_det.to_f64()
    }

    fn check_buffers<T: Element>(
        &self,
        input: &[T],
        output: &[T],
        scratch: &FlowScratch<T>,
    ) -> Result<(), FlowError> {
        if input.len() != self.dim {
            return Err(FlowError::LengthMismatch {
                what: "input",
                expected: self.dim,
                actual: input.len(),
            });
        }
        if output.len() != self.dim {
            return Err(FlowError::LengthMismatch {
                what: "output",
                expected: self.dim,
                actual: output.len(),
            });
        }
        if scratch.current.len() != self.dim
            || scratch.next.len() != self.dim
            || scratch.hidden.len() != self.hidden
            || scratch.subnet_out.len() != 2 * (self.dim / 2)
        {
            return Err(FlowError::ScratchMismatch);
        }
        if let Some(index) = input.iter().position(|v| !v.is_finite()) {
            return Err(FlowError::NonFinite { index });
        }
        Ok(())
    }
}

/// Passes `input` through `blocks` in order, ping-ponging between the scratch buffers, and
/// writes the last block's output into `output`.
fn run_chain<'b, 'a: 'b, T: Element>(
    blocks: impl ExactSizeIterator<Item = &'b Block<'a>>,
    kernel: BlockForwardFn<T>,
    clamp: T,
    input: &[T],
    output: &mut [T],
    scratch: &mut FlowScratch<T>,
) -> T {
    let FlowScratch {
        current,
        next,
        hidden,
        subnet_out,
    } = scratch;
    let last = blocks.len() - 1;
    let mut log_det = T::ZERO;
    for (k, block) in blocks.enumerate() {
        let block_input: &[T] = if k == 0 { input } else { current };
        if k == last {
            log_det += kernel(block, clamp, block_input, output, hidden, subnet_out);
        } else {
            log_det += kernel(block, clamp, block_input, next, hidden, subnet_out);
            std::mem::swap(current, next);
        }
    }
    log_det
}

/// Rejects a non-finite flow output or log|det J| with the errors of [`Flow::forward`].
pub(crate) fn check_output<T: Element>(output: &[T], log_det: T) -> Result<(), FlowError> {
    if let Some(index) = output.iter().position(|v| !v.is_finite()) {
        return Err(FlowError::NonFiniteOutput { index });
    }
    if !log_det.is_finite() {
        return Err(FlowError::NonFiniteLogDet {
            log_det: log_det.to_f64(),
        });
    }
    Ok(())
}

fn check_length(
    block: usize,
    parameter: &'static str,
    values: usize,
    expected: usize,
) -> Result<(), FlowError> {
    if values != expected {
        return Err(FlowError::ParameterLength {
            block,
            parameter,
            expected,
            actual: values,
        });
    }
    Ok(())
}

fn check_finite(block: usize, parameter: &'static str, values: &[f32]) -> Result<(), FlowError> {
    match values.iter().position(|v| !v.is_finite()) {
        Some(index) => Err(FlowError::NonFiniteParameter {
            block,
            parameter,
            index,
            value: values[index],
        }),
        None => Ok(()),
    }
}

fn check_permutation(block: usize, permutation: &[u32]) -> Result<(), FlowError> {
    let dim = permutation.len();
    let mut seen_at = vec![usize::MAX; dim];
    for (index, &value) in permutation.iter().enumerate() {
        let slot = seen_at
            .get_mut(value as usize)
            .ok_or(FlowError::PermutationOutOfRange {
                block,
                index,
                value,
                dim,
            })?;
        if *slot != usize::MAX {
            return Err(FlowError::PermutationDuplicate {
                block,
                value,
                first: *slot,
                second: index,
            });
        }
        *slot = index;
    }
    Ok(())
}

fn prepare_block<'a>(
    index: usize,
    dim: usize,
    hidden: usize,
    params: BlockTensors<'a>,
) -> Result<Block<'a>, FlowError> {
    let d1 = dim - dim / 2;
    let d2 = dim / 2;
    check_length(index, "permutation", params.permutation.len(), dim)?;
    check_length(index, "global_scale", params.global_scale.len(), dim)?;
    check_length(index, "global_offset", params.global_offset.len(), dim)?;
    check_length(
        index,
        "subnet.0.weight",
        params.subnet_0_weight.len(),
        hidden * d1,
    )?;
    check_length(index, "subnet.0.bias", params.subnet_0_bias.len(), hidden)?;
    check_length(
        index,
        "subnet.2.weight",
        params.subnet_2_weight.len(),
        2 * d2 * hidden,
    )?;
    check_length(index, "subnet.2.bias", params.subnet_2_bias.len(), 2 * d2)?;

    check_permutation(index, params.permutation)?;
    check_finite(index, "global_scale", params.global_scale)?;
    check_finite(index, "global_offset", params.global_offset)?;
    check_finite(index, "subnet.0.weight", &params.subnet_0_weight)?;
    check_finite(index, "subnet.0.bias", &params.subnet_0_bias)?;
    check_finite(index, "subnet.2.weight", &params.subnet_2_weight)?;
    check_finite(index, "subnet.2.bias", &params.subnet_2_bias)?;

    let scale_f64: Vec<f64> = params
        .global_scale
        .iter()
        .map(|&raw| activate_global_scale(raw))
        .collect();
    let mut log_scale_sum = 0.0;
    for (position, (&scale, &raw)) in scale_f64.iter().zip(params.global_scale).enumerate() {
        // Softplus underflows to 0 for raw values below about -1490, and the f32 copy
        // overflows above f32::MAX; either would break the log-determinant.
        if !(scale > 0.0 && (scale as f32).is_finite() && (scale as f32) > 0.0) {
            return Err(FlowError::InvalidGlobalScale {
                block: index,
                index: position,
                raw,
                scale,
            });
        }
        log_scale_sum += scale.ln();
    }
    let scale_f32: Vec<f32> = scale_f64.iter().map(|&scale| scale as f32).collect();
    let packed_subnet_2 =
        simd::pack_subnet_2(&params.subnet_2_weight, &params.subnet_2_bias, hidden);
    let permuted_scale_f32 = params
        .permutation
        .iter()
        .map(|&p| scale_f32[p as usize])
        .collect();
    let permuted_offset_f32 = params
        .permutation
        .iter()
        .map(|&p| params.global_offset[p as usize])
        .collect();

    Ok(Block {
        dim,
        permutation: Cow::Borrowed(params.permutation),
        global_scale: Cow::Borrowed(params.global_scale),
        global_offset: Cow::Borrowed(params.global_offset),
        subnet_0_weight: params.subnet_0_weight,
        subnet_0_bias: params.subnet_0_bias,
        subnet_2_weight: params.subnet_2_weight,
        subnet_2_bias: params.subnet_2_bias,
        scale_f32,
        scale_f64,
        log_scale_sum,
        packed_subnet_2,
        permuted_scale_f32,
        permuted_offset_f32,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Raw global scale whose activated value is 1, FrEIA's initialisation.
    fn unit_raw_scale() -> f32 {
        (2.0 * (5.0f64.exp() - 1.0).ln()) as f32
    }

    struct Owned {
        permutation: Vec<u32>,
        global_scale: Vec<f32>,
        global_offset: Vec<f32>,
        subnet_0_weight: Vec<f32>,
        subnet_0_bias: Vec<f32>,
        subnet_2_weight: Vec<f32>,
        subnet_2_bias: Vec<f32>,
    }

    impl Owned {
        /// A block with zero subnets: the coupling is the identity, leaving the global
        /// affine and the permutation.
        fn identity_coupling(dim: usize, hidden: usize, permutation: Vec<u32>) -> Self {
            Self {
                permutation,
                global_scale: vec![unit_raw_scale(); dim],
                global_offset: vec![0.0; dim],
                subnet_0_weight: vec![0.0; hidden * (dim - dim / 2)],
                subnet_0_bias: vec![0.0; hidden],
                subnet_2_weight: vec![0.0; 2 * (dim / 2) * hidden],
                subnet_2_bias: vec![0.0; 2 * (dim / 2)],
            }
        }

        fn params(&self) -> BlockParams<'_> {
            BlockParams {
                permutation: &self.permutation,
                global_scale: &self.global_scale,
                global_offset: &self.global_offset,
                subnet_0_weight: &self.subnet_0_weight,
                subnet_0_bias: &self.subnet_0_bias,
                subnet_2_weight: &self.subnet_2_weight,
                subnet_2_bias: &self.subnet_2_bias,
            }
        }
    }

    #[test]
    fn global_scale_activation() {
        assert!((activate_global_scale(unit_raw_scale()) - 1.0).abs() < 1e-6);
        // Above beta * raw = 20, PyTorch's softplus returns raw itself.
        assert_eq!(activate_global_scale(100.0), 10.0);
        let expected = 0.2 * (1.0f64 + (-1.5f64).exp()).ln();
        assert!((activate_global_scale(-3.0) - expected).abs() < 1e-15);
    }

    #[test]
    fn identity_coupling_permutes() {
        let dim = 5;
        let block = Owned::identity_coupling(dim, 3, vec![4, 3, 2, 1, 0]);
        let flow = Flow::new(dim, 3, 2.0, vec![block.params()]).unwrap();
        let x = [1.0f32, 2.0, 3.0, 4.0, 5.0];
        let mut z = [0.0f32; 5];
        let log_det = flow.forward(&x, &mut z, &mut flow.scratch()).unwrap();
        assert_eq!(z, [5.0, 4.0, 3.0, 2.0, 1.0]);
        assert!(log_det.abs() < 1e-5, "log_det {log_det}");
    }

    #[test]
    fn offset_and_scale_apply_before_permutation() {
        let dim = 3;
        let mut block = Owned::identity_coupling(dim, 1, vec![1, 2, 0]);
        block.global_offset = vec![10.0, 20.0, 30.0];
        // Above the softplus threshold the activated scale is 0.1 * raw.
        block.global_scale = vec![50.0, 50.0, 50.0];
        let flow = Flow::new(dim, 1, 2.0, vec![block.params()]).unwrap();
        let x = [1.0f64, 2.0, 3.0];
        let mut z = [0.0f64; 3];
        let log_det = flow.forward(&x, &mut z, &mut flow.scratch()).unwrap();
        assert_eq!(z, [2.0 * 5.0 + 20.0, 3.0 * 5.0 + 30.0, 1.0 * 5.0 + 10.0]);
        assert!((log_det - 3.0 * 5.0f64.ln()).abs() < 1e-12);
    }

    #[test]
    fn coupling_uses_tanh_clamp() {
        // d = 3: x1 = x[..2], x2 = x[2..]. With zero weights the subnet returns its bias,
        // so a = 0.1 * [10, 3]. The raw scale 50 is above the softplus threshold: scale 5.
        let dim = 3;
        let mut block = Owned::identity_coupling(dim, 1, vec![0, 1, 2]);
        block.subnet_2_bias = vec![10.0, 3.0];
        block.global_scale = vec![50.0; dim];
        let flow = Flow::new(dim, 1, 1.5, vec![block.params()]).unwrap();
        let x = [0.5f64, -0.5, 2.0];
        let mut z = [0.0f64; 3];
        let log_det = flow.forward(&x, &mut z, &mut flow.scratch()).unwrap();
        let s = 1.5 * 1.0f64.tanh();
        let t = 0.1 * 3.0;
        assert_eq!(&z[..2], &[2.5, -2.5]);
        let expected = 5.0 * (2.0 * s.exp() + t);
        assert!(
            (z[2] - expected).abs() < 1e-12,
            "z[2] = {}, expected {expected}",
            z[2]
        );
        let expected = s + 3.0 * 5.0f64.ln();
        assert!(
            (log_det - expected).abs() < 1e-12,
            "log_det {log_det}, expected {expected}"
        );
    }

    #[test]
    fn new_rejects_invalid_settings() {
        let block = Owned::identity_coupling(4, 2, vec![0, 1, 2, 3]);
        assert_eq!(
            Flow::new(1, 2, 2.0, vec![block.params()]).unwrap_err(),
            FlowError::InvalidDimension { dim: 1 }
        );
        assert_eq!(
            Flow::new(4, 0, 2.0, vec![block.params()]).unwrap_err(),
            FlowError::InvalidHidden { hidden: 0 }
        );
        assert!(matches!(
            Flow::new(4, 2, f32::NAN, vec![block.params()]).unwrap_err(),
            FlowError::InvalidClamp { .. }
        ));
        assert_eq!(
            Flow::new(4, 2, 2.0, Vec::<BlockParams>::new()).unwrap_err(),
            FlowError::NoBlocks
        );
    }

    #[test]
    fn new_rejects_underflowing_scale() {
        let mut block = Owned::identity_coupling(4, 2, vec![0, 1, 2, 3]);
        block.global_scale[2] = -3000.0;
        let error = Flow::new(4, 2, 2.0, vec![block.params()]).unwrap_err();
        assert!(
            matches!(
                error,
                FlowError::InvalidGlobalScale {
                    block: 0,
                    index: 2,
                    ..
                }
            ),
            "{error:?}"
        );
    }

    #[test]
    fn forward_rejects_overflowing_output() {
        let mut block = Owned::identity_coupling(4, 2, vec![0, 1, 2, 3]);
        block.global_scale = vec![1e30; 4];
        let flow = Flow::new(4, 2, 2.0, vec![block.params()]).unwrap();
        let x = [1e10f32, 0.0, 0.0, 0.0];
        let mut z = [0.0f32; 4];
        let error = flow.forward(&x, &mut z, &mut flow.scratch()).unwrap_err();
        assert!(
            matches!(error, FlowError::NonFiniteOutput { index: 0 }),
            "{error:?}"
        );
    }

    #[test]
    fn forward_rejects_foreign_scratch() {
        let small = Owned::identity_coupling(4, 2, vec![0, 1, 2, 3]);
        let large = Owned::identity_coupling(6, 2, vec![0, 1, 2, 3, 4, 5]);
        let small = Flow::new(4, 2, 2.0, vec![small.params()]).unwrap();
        let large = Flow::new(6, 2, 2.0, vec![large.params()]).unwrap();
        let mut scratch = large.scratch::<f32>();
        let mut z = [0.0f32; 4];
        assert_eq!(
            small.forward(&[0.0; 4], &mut z, &mut scratch),
            Err(FlowError::ScratchMismatch)
        );
    }

    #[test]
    fn into_owned_keeps_results() {
        let mut block = Owned::identity_coupling(5, 2, vec![2, 0, 4, 1, 3]);
        block
            .subnet_0_weight
            .iter_mut()
            .enumerate()
            .for_each(|(i, w)| *w = 0.1 * i as f32);
        block
            .subnet_2_weight
            .iter_mut()
            .enumerate()
            .for_each(|(i, w)| *w = 0.05 * i as f32);
        let x = [0.3f32, -1.0, 2.0, 0.7, -0.2];
        let borrowed = Flow::new(5, 2, 2.0, vec![block.params()]).unwrap();
        let mut z_borrowed = [0.0f32; 5];
        let log_det = borrowed
            .forward(&x, &mut z_borrowed, &mut borrowed.scratch())
            .unwrap();
        let owned: Flow<'static> = borrowed.clone().into_owned();
        drop(block);
        assert_eq!(owned.blocks()[0].params().permutation, [2, 0, 4, 1, 3]);
        let mut z_owned = [0.0f32; 5];
        assert_eq!(
            owned
                .forward(&x, &mut z_owned, &mut owned.scratch())
                .unwrap(),
            log_det
        );
        assert_eq!(z_owned, z_borrowed);
    }
}
