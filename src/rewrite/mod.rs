//! Graph rewrites that replace patterns tract 0.23 runs in several passes over memory by
//! one operator of this crate each. They apply to the ONNX model in memory when a
//! backbone or combined plan loads. The files on disk stay standard ONNX, and each
//! rewritten node keeps its output name, so taps and graph outputs keep their values.
//!
//! | rewrite | replaces | share of a frame before |
//! |---|---|---|
//! | [`prelu`] | BatchNorm + PRelu (Mul, Greater, Iff, Mul, Add) | about a third (f32) |
//! | [`deconv`] | 2x2 stride-2 `ConvTranspose` (matmul + `DeconvSum`) | about a tenth (f32) |
//! | [`conv3x3`] | 3x3 `Conv` of stride 1 or 2 (`DirectSpatialConv`, im2col + matmul) | about half (f32) |
//! | [`qconv3x3`] | int8 3x3 `QuantizeLinear -> ConvInteger -> Cast -> Mul (-> Add)` | most (int8) |
//!
//! [`bands`] then replaces tract's additions, channel concatenations, reshapes and average
//! pooling in the optimised plan, and fuses each ESP block's tail into one operator, so
//! that on several threads every operator splits the rows of a tensor the same way.

use std::collections::HashMap;

use anyhow::Context;
use tract_onnx::pb;
use tract_onnx::prelude::*;

pub mod bands;
pub mod conv3x3;
pub mod deconv;
pub mod prelu;
pub mod qconv3x3;
mod split;

pub(crate) use split::for_each_band;

/// Choice of the graph rewrites applied to an ONNX model before tract types it, and of
/// those applied to the optimised plan after (see [`Rewrites::apply_typed`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rewrites {
    /// Each PRelu, with the BatchNorm before it, as one pass ([`prelu`]).
    pub prelu: bool,
    /// Each 2x2 stride-2 transposed convolution as one pass ([`deconv`]).
    pub deconv: bool,
    /// Each 3x3 convolution of stride 1 (dilated or not) or 2 as one pass ([`conv3x3`]).
    pub conv3x3: bool,
    /// Each int8 3x3 convolution with its rescaling to f32 as one pass ([`qconv3x3`]).
    pub qconv3x3: bool,
    /// tract's additions, channel concatenations, reshapes and average pooling of NCHW
    /// tensors in the optimised plan replaced by operators that split rows among the
    /// threads as the others, and each ESP block's tail fused into one ([`bands`]).
    pub bands: bool,
}

impl Rewrites {
    /// Every rewrite on: the default.
    pub const ALL: Rewrites = Rewrites {
        prelu: true,
        deconv: true,
        conv3x3: true,
        qconv3x3: true,
        bands: true,
    };
    /// The model as tract lowers it by itself.
    pub const NONE: Rewrites = Rewrites {
        prelu: false,
        deconv: false,
        conv3x3: false,
        qconv3x3: false,
        bands: false,
    };

    /// Returns every rewrite except those turned off with `DAAIN_PRELU_FUSION=off`,
    /// `DAAIN_DECONV_FUSION=off`, `DAAIN_CONV3X3_FUSION=off`, `DAAIN_QCONV3X3_FUSION=off` or
    /// `DAAIN_BAND_OPS=off`, for benchmarks and profiles of tract's own lowering.
    pub fn from_env() -> Rewrites {
        let on = |name: &str| std::env::var(name).map_or(true, |v| v != "off");
        Rewrites {
            prelu: on("DAAIN_PRELU_FUSION"),
            deconv: on("DAAIN_DECONV_FUSION"),
            conv3x3: on("DAAIN_CONV3X3_FUSION"),
            qconv3x3: on("DAAIN_QCONV3X3_FUSION"),
            bands: on("DAAIN_BAND_OPS"),
        }
    }

    /// Applies the chosen rewrites to `model` and logs what each replaced, with the kernel
    /// it runs on this CPU.
    pub fn apply(&self, model: &mut pb::ModelProto) {
        let log = |count: usize, what: &str, kernel: &str| {
            if count > 0 {
                log::info!("rewrote {count} {what} ({kernel} kernel)");
            }
        };
        if self.prelu {
            let (prelus, batch_norms) = prelu::fuse_affine_prelu(model);
            log::debug!("fused {prelus} PRelus and {batch_norms} BatchNorms before them");
        }
        if self.deconv {
            let deconvs = deconv::fuse_deconv2x2(model);
            log(
                deconvs,
                "2x2 stride-2 transposed convolutions",
                Simd::best().name(),
            );
        }
        if self.conv3x3 {
            log(
                conv3x3::fuse_conv3x3(model),
                "3x3 convolutions",
                Simd::best().name(),
            );
        }
        if self.qconv3x3 {
            let convs = qconv3x3::fuse_qconv3x3(model);
            log(convs, "int8 3x3 convolutions", qconv3x3::kernel_name());
            let dot_product = matches!(qconv3x3::kernel_name(), "avx512vnni" | "avxvnni");
            if convs > 0 && !dot_product {
                log::warn!(
                    "this CPU has no int8 dot-product kernel (AVX-512 VNNI or AVX-VNNI), so the \
                     int8 backbone runs its {} code, no faster than f32: set \
                     detector.backbone = \"f32\"",
                    qconv3x3::kernel_name()
                );
            }
        }
    }
}

impl Rewrites {
    /// Applies the chosen rewrites of the optimised plan, after those of the ONNX graph.
    /// An output of the plan may then have the rows of its last two axes merged (same
    /// values, same order), so read the output shapes before calling it.
    pub fn apply_typed(&self, model: &mut TypedModel) -> TractResult<()> {
        if self.bands {
            let (adds, concats) = bands::replace_band_ops(model)?;
            let fused = bands::fuse_concat_prelu(model)?;
            let shared = bands::share_reshaped_inputs(model)?;
            log::debug!(
                "replaced {adds} additions and {concats} concatenations by band operators, \
                 fused {fused} concatenations with the additions and PRelu around them, and \
                 moved {shared} of their inputs onto reshapes"
            );
        }
        Ok(())
    }
}

/// Returns tract's ONNX parser with the operators of the [`Rewrites`] registered.
pub fn onnx_parser() -> tract_onnx::Onnx {
    let mut onnx = tract_onnx::onnx();
    onnx.op_register
        .insert(prelu::OP_TYPE, prelu::parse_affine_prelu);
    onnx.op_register
        .insert(deconv::OP_TYPE, deconv::parse_deconv2x2);
    onnx.op_register
        .insert(conv3x3::OP_TYPE, conv3x3::parse_conv3x3);
    onnx.op_register
        .insert(qconv3x3::OP_TYPE, qconv3x3::parse_qconv3x3);
    onnx
}

/// Instruction sets the rewritten operators have vector kernels for, best first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Simd {
    /// x86_64 with AVX-512F.
    Avx512,
    /// x86_64 with AVX and FMA.
    AvxFma,
    /// aarch64 with NEON.
    Neon,
    /// No vector kernel: portable code.
    Portable,
}

impl Simd {
    /// Returns every instruction set this CPU supports, best first, `Portable` last.
    pub fn supported() -> Vec<Simd> {
        let mut supported = Vec::new();
        #[cfg(target_arch = "x86_64")]
        {
            if std::arch::is_x86_feature_detected!("avx512f") {
                supported.push(Simd::Avx512);
            }
            if std::arch::is_x86_feature_detected!("avx")
                && std::arch::is_x86_feature_detected!("fma")
            {
                supported.push(Simd::AvxFma);
            }
        }
        #[cfg(target_arch = "aarch64")]
        if std::arch::is_aarch64_feature_detected!("neon") {
            supported.push(Simd::Neon);
        }
        supported.push(Simd::Portable);
        supported
    }

    /// Returns the best instruction set this CPU supports, detected once and kept because
    /// the kernels ask on every run.
    pub fn best() -> Simd {
        static BEST: std::sync::OnceLock<Simd> = std::sync::OnceLock::new();
        *BEST.get_or_init(|| Simd::supported()[0])
    }

    /// Returns the name used in logs and tests.
    pub fn name(self) -> &'static str {
        match self {
            Simd::Avx512 => "avx512f",
            Simd::AvxFma => "avx+fma",
            Simd::Neon => "neon",
            Simd::Portable => "portable",
        }
    }
}

/// Returns the integer list attribute `name` of `node`, or `default` when it is absent.
pub(crate) fn ints(node: &pb::NodeProto, name: &str, default: &[i64]) -> Vec<i64> {
    node.attribute
        .iter()
        .find(|a| a.name == name)
        .map_or_else(|| default.to_vec(), |a| a.ints.clone())
}

/// Returns the integer attribute `name` of `node`, or `default` when it is absent.
pub(crate) fn int(node: &pb::NodeProto, name: &str, default: i64) -> i64 {
    node.attribute
        .iter()
        .find(|a| a.name == name)
        .map_or(default, |a| a.i)
}

/// Returns whether two f32 slices hold the same bits, so that NaN equals itself, as
/// tract's `Eq` on operators needs.
pub(crate) fn same_bits(a: &[f32], b: &[f32]) -> bool {
    a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits())
}

/// Returns the graph's f32 initializers of rank `rank` by name.
pub(crate) fn f32_initializers(
    graph: &pb::GraphProto,
    rank: usize,
) -> HashMap<&str, &pb::TensorProto> {
    let float = pb::tensor_proto::DataType::Float as i32;
    graph
        .initializer
        .iter()
        .filter(|t| t.data_type == float && t.dims.len() == rank)
        .map(|t| (t.name.as_str(), t))
        .collect()
}

/// Returns the value of the constant input `outlet` of node `name` as f32, with its shape.
pub(crate) fn constant_f32(
    model: &TypedModel,
    outlet: OutletId,
    op_type: &str,
    name: &str,
) -> TractResult<(Vec<usize>, Vec<f32>)> {
    let fact = model.outlet_fact(outlet)?;
    let value = fact
        .konst
        .as_ref()
        .with_context(|| {
            format!(
                "{op_type} input {} of {name} is not a constant",
                outlet.slot
            )
        })?
        .cast_to::<f32>()?;
    let data = value.try_as_plain_ram()?.as_slice::<f32>()?.to_vec();
    Ok((value.shape().to_vec(), data))
}

/// Runs `compute` on the f32 NCHW input of an operator (batch 1, `channels` channels) and
/// an uninitialised output of shape `[1, outputs, size(height), size(width)]`, which
/// `compute` must fill completely. Returns that output.
pub(crate) fn eval_nchw(
    op_name: &str,
    inputs: TVec<TValue>,
    channels: usize,
    outputs: usize,
    size: impl Fn(usize) -> usize,
    compute: impl FnOnce(&[f32], usize, usize, &mut [f32]),
) -> TractResult<TVec<TValue>> {
    let input = inputs
        .into_iter()
        .next()
        .with_context(|| format!("{op_name} has one input"))?;
    let shape = input.shape().to_vec();
    anyhow::ensure!(
        shape.len() == 4 && shape[0] == 1 && shape[1] == channels && shape[2] > 0 && shape[3] > 0,
        "{op_name} input has shape {shape:?}, expected [1, {channels}, H, W] with H, W > 0"
    );
    let (height, width) = (shape[2], shape[3]);
    let source = input.try_as_plain_ram()?;
    let source = source.as_slice::<f32>()?;
    let dims = [1, outputs, size(height), size(width)];
    // SAFETY: `compute` writes every value of the output.
    let output = unsafe {
        new_f32_tensor(&dims, |target| {
            compute(source, height, width, target);
            Ok(())
        })?
    };
    Ok(tvec!(output.into_tvalue()))
}

/// Returns a new f32 tensor of shape `dims` whose values `fill` writes.
///
/// # Safety
/// `fill` must write every value of the slice it gets, because the tensor starts
/// uninitialised.
pub(crate) unsafe fn new_f32_tensor(
    dims: &[usize],
    fill: impl FnOnce(&mut [f32]) -> TractResult<()>,
) -> TractResult<Tensor> {
    // SAFETY: the caller's `fill` writes every value before anything reads it.
    let mut tensor = unsafe { Tensor::uninitialized::<f32>(dims)? };
    {
        let mut target = tensor.try_as_plain_ram_mut()?;
        fill(target.as_slice_mut::<f32>()?)?;
    }
    Ok(tensor)
}

/// Returns the output facts of an operator that maps `[1, channels, H, W]` to
/// `[1, outputs, size(H), size(W)]`, after checking the input against that. The spatial
/// sizes must be known numbers, as they are once the backbone's input size is set.
pub(crate) fn nchw_output_facts(
    op_name: &str,
    inputs: &[&TypedFact],
    channels: usize,
    outputs: usize,
    size: impl Fn(usize) -> usize,
) -> TractResult<TVec<TypedFact>> {
    let shape = &inputs[0].shape;
    anyhow::ensure!(
        shape.rank() == 4 && shape[0] == 1.into() && shape[1] == channels.into(),
        "{op_name} input has shape {shape:?}, expected [1, {channels}, H, W]"
    );
    use tract_onnx::tract_core::internal::DimLike;
    let (height, width) = (shape[2].to_usize()?, shape[3].to_usize()?);
    let dims = [1, outputs, size(height), size(width)];
    Ok(tvec!(inputs[0].datum_type.fact(dims)))
}
