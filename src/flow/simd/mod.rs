//! Vectorised f32 forward kernels of the coupling block and the run-time choice between
//! them.
//!
//! [`forward_kernel_f32`] picks a kernel once per process, logs the choice at `info` level
//! and returns the same kernel afterwards. The candidates, fastest first:
//!
//! | name       | kernel                                | needs                        |
//! |------------|---------------------------------------|------------------------------|
//! | `avx2+fma` | [`avx2_fma_coupling_forward_f32`]     | x86_64 with AVX2 and FMA     |
//! | `neon`     | [`neon_coupling_forward_f32`]         | aarch64 with NEON            |
//! | `scalar`   | [`block_forward::<f32>`](block_forward) | nothing                    |
//!
//! The environment variable `DAAIN_FLOW_KERNEL` ([`FLOW_KERNEL_ENV`]) overrides the choice:
//! `scalar` forces the scalar kernel, the name of another kernel requests that one, and
//! `auto` or an empty value keeps the automatic choice. A name that is unknown or
//! unsupported on this CPU is logged as a warning and the automatic choice applies. The
//! variable is read once, at the first call.
//!
//! # Accuracy
//!
//! The vector kernels compute the same formulas as [`block_forward`] but sum the dot
//! products in another order, fuse multiplications and additions, and evaluate `tanh` and
//! `exp` with the single-precision Cephes approximations (`tanhf`, `expf`) in place of libm.
//! The AVX2 unit tests measure a maximum relative error of 1.3e-7 for tanh over
//! [-12, 12] and 8.1e-8 for exp over [-87, 88.7], against f64. The NEON kernel evaluates
//! the same polynomials in the same order.

use std::fmt;
use std::sync::OnceLock;

use log::{info, warn};

use super::kernel::{block_forward, BlockForwardFn};
use super::Block;

#[cfg(target_arch = "x86_64")]
mod avx2;
#[cfg(target_arch = "aarch64")]
mod neon;

#[cfg(target_arch = "x86_64")]
pub use avx2::avx2_fma_coupling_forward_f32;
#[cfg(target_arch = "aarch64")]
pub use neon::neon_coupling_forward_f32;

/// Environment variable that overrides the kernel choice of [`forward_kernel_f32`].
pub const FLOW_KERNEL_ENV: &str = "DAAIN_FLOW_KERNEL";

/// Name of the scalar kernel, [`block_forward::<f32>`](block_forward).
const SCALAR_NAME: &str = "scalar";

/// Number of outputs of the second subnet Linear per packed chunk, see [`pack_subnet_2`].
/// It equals the AVX2 f32 lane count, and NEON handles a chunk as two vectors of 4.
pub(crate) const PACKED_LANES: usize = 8;

/// A block forward kernel for f32 with the name the dispatcher and the logs use for it.
#[derive(Clone, Copy, Debug)]
pub struct ForwardKernel {
    name: &'static str,
    kernel: BlockForwardFn<f32>,
}

impl ForwardKernel {
    /// Kernel name: `avx2+fma`, `neon` or `scalar`.
    pub fn name(&self) -> &'static str {
        self.name
    }

    pub fn kernel(&self) -> BlockForwardFn<f32> {
        self.kernel
    }

    /// The scalar kernel, available on every CPU.
    pub fn scalar() -> Self {
        Self {
            name: SCALAR_NAME,
            kernel: block_forward::<f32>,
        }
    }
}

/// A kernel request, from [`FLOW_KERNEL_ENV`] or a caller, that this CPU cannot satisfy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KernelRequestError {
    pub requested: String,
    pub available: Vec<&'static str>,
}

impl fmt::Display for KernelRequestError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "flow kernel {:?} is unknown or not supported by this CPU; use one of {}, or auto",
            self.requested,
            self.available.join(", ")
        )
    }
}

impl std::error::Error for KernelRequestError {}

/// Lists the kernels this CPU supports, fastest first and the scalar kernel last.
pub fn available_forward_kernels_f32() -> Vec<ForwardKernel> {
    let mut kernels = Vec::with_capacity(2);
    #[cfg(target_arch = "x86_64")]
    if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
        kernels.push(ForwardKernel {
            name: "avx2+fma",
            kernel: avx2_fma_coupling_forward_f32,
        });
    }
    #[cfg(target_arch = "aarch64")]
    if std::arch::is_aarch64_feature_detected!("neon") {
        kernels.push(ForwardKernel {
            name: "neon",
            kernel: neon_coupling_forward_f32,
        });
    }
    kernels.push(ForwardKernel::scalar());
    kernels
}

/// Picks the kernel for a request, without consulting [`FLOW_KERNEL_ENV`] or the cache of
/// [`forward_kernel_f32`].
///
/// `None`, an empty string and `auto` pick the fastest kernel this CPU supports, and a
/// kernel name picks that kernel if the CPU supports it. Leading and trailing whitespace
/// and case are ignored.
pub fn select_forward_kernel_f32(
    request: Option<&str>,
) -> Result<ForwardKernel, KernelRequestError> {
    let available = available_forward_kernels_f32();
    let request = request.map(str::trim).unwrap_or("");
    if request.is_empty() || request.eq_ignore_ascii_case("auto") {
        return Ok(available[0]);
    }
    available
        .iter()
        .find(|kernel| kernel.name.eq_ignore_ascii_case(request))
        .copied()
        .ok_or_else(|| KernelRequestError {
            requested: request.to_string(),
            available: available.iter().map(|kernel| kernel.name).collect(),
        })
}

/// Returns the f32 kernel for this process: the fastest one the CPU supports unless
/// [`FLOW_KERNEL_ENV`] requests another.
///
/// The first call reads the environment, chooses and logs the choice at `info` level. An
/// invalid request is logged as a warning and falls back to the automatic choice.
pub fn forward_kernel_f32() -> ForwardKernel {
    static SELECTED: OnceLock<ForwardKernel> = OnceLock::new();
    *SELECTED.get_or_init(|| {
        let request = std::env::var(FLOW_KERNEL_ENV).ok();
        let kernel = match select_forward_kernel_f32(request.as_deref()) {
            Ok(kernel) => kernel,
            Err(error) => {
                warn!("{FLOW_KERNEL_ENV}: {error}; choosing automatically");
                available_forward_kernels_f32()[0]
            }
        };
        match request.as_deref().map(str::trim) {
            Some(request) if !request.is_empty() => info!(
                "flow kernel: {} ({FLOW_KERNEL_ENV}={request:?})",
                kernel.name
            ),
            _ => info!("flow kernel: {} (fastest this CPU supports)", kernel.name),
        }
        kernel
    })
}

/// Returns whether the buffers have the lengths a block's vector kernel indexes without
/// further checks. The kernels fall back to the scalar one when they do not.
#[cfg_attr(not(any(target_arch = "x86_64", target_arch = "aarch64")), allow(dead_code))]
pub(crate) fn buffers_match(
    block: &Block<'_>,
    input: &[f32],
    output: &[f32],
    hidden: &[f32],
    subnet_out: &[f32],
) -> bool {
    input.len() == block.dim
        && output.len() == block.dim
        && hidden.len() == block.subnet_0_bias.len()
        && subnet_out.len() == 2 * block.d2()
}

/// Repacks the second subnet Linear and its bias so that the vector kernels read them
/// sequentially, one chunk of [`PACKED_LANES`] coupled values at a time.
///
/// `weight` is `[2 * d2, hidden]` row-major and `bias` is `[2 * d2]`. Chunk `c` covers the
/// coupled values `j = 8c .. 8c + 8` and holds `(1 + hidden) * 16` floats: the biases of
/// log-scale rows `j` and shift rows `d2 + j` (8 each), then for every hidden unit `h` the
/// weights `weight[j, h]` and `weight[d2 + j, h]` (8 each). Lanes past `d2` are zero, so the
/// kernels need no masked weight loads.
pub(crate) fn pack_subnet_2(weight: &[f32], bias: &[f32], hidden: usize) -> Vec<f32> {
    let d2 = bias.len() / 2;
    let chunks = d2.div_ceil(PACKED_LANES);
    let chunk_len = (1 + hidden) * 2 * PACKED_LANES;
    let mut packed = vec![0.0; chunks * chunk_len];
    for (c, chunk) in packed.chunks_exact_mut(chunk_len).enumerate() {
        for lane in 0..PACKED_LANES {
            let j = c * PACKED_LANES + lane;
            if j >= d2 {
                break;
            }
            chunk[lane] = bias[j];
            chunk[PACKED_LANES + lane] = bias[d2 + j];
            for h in 0..hidden {
                let base = (1 + h) * 2 * PACKED_LANES;
                chunk[base + lane] = weight[j * hidden + h];
                chunk[base + PACKED_LANES + lane] = weight[(d2 + j) * hidden + h];
            }
        }
    }
    packed
}

// Only the vector kernels (x86_64 and aarch64) use the constants below, so other
// targets such as armv7 would warn that they are unused.
/// Coefficients of the Cephes `tanhf` odd polynomial for `|x| < TANH_SMALL`:
/// `tanh(x) = x + x^3 * P(x^2)`, highest degree first.
// Cephes' coefficients, as in Eigen's and avx_mathfun's ports. They round to f32 on purpose.
#[allow(clippy::excessive_precision)]
#[cfg_attr(not(any(target_arch = "x86_64", target_arch = "aarch64")), allow(dead_code))]
const TANH_POLYNOMIAL: [f32; 5] = [
    -5.704_988_7e-3,
    2.063_908_9e-2,
    -5.373_971_6e-2,
    1.333_144_2e-1,
    -3.333_328_2e-1,
];
/// Below this magnitude tanh uses the polynomial, above it `1 - 2 / (exp(2|x|) + 1)`.
#[cfg_attr(not(any(target_arch = "x86_64", target_arch = "aarch64")), allow(dead_code))]
const TANH_SMALL: f32 = 0.625;
/// tanh(x) rounds to 1 in f32 for x above about 9.01, so larger magnitudes are evaluated
/// at 9.5, where the formula also returns exactly 1.
#[cfg_attr(not(any(target_arch = "x86_64", target_arch = "aarch64")), allow(dead_code))]
const TANH_SATURATION: f32 = 9.5;

/// Coefficients of the Cephes `expf` polynomial on `|r| <= ln(2) / 2`:
/// `exp(r) = 1 + r + r^2 * P(r)`, highest degree first.
// Cephes' coefficients, as in Eigen's and avx_mathfun's ports. They round to f32 on purpose.
#[allow(clippy::excessive_precision)]
#[cfg_attr(not(any(target_arch = "x86_64", target_arch = "aarch64")), allow(dead_code))]
const EXP_POLYNOMIAL: [f32; 6] = [
    1.987_569_2e-4,
    1.398_199_9e-3,
    8.333_452e-3,
    4.166_579_6e-2,
    1.666_666_5e-1,
    5.000_000_1e-1,
];
/// `ln(2)` split into an exactly representable high part and a correction (Cephes).
// Cephes' coefficients, as in Eigen's and avx_mathfun's ports. They round to f32 on purpose.
#[allow(clippy::excessive_precision)]
#[cfg_attr(not(any(target_arch = "x86_64", target_arch = "aarch64")), allow(dead_code))]
const LN2_HIGH: f32 = 0.693_359_375;
#[cfg_attr(not(any(target_arch = "x86_64", target_arch = "aarch64")), allow(dead_code))]
const LN2_LOW: f32 = -2.121_944_4e-4;
/// exp of anything above this overflows f32: the kernels return infinity, as libm does.
#[cfg_attr(not(any(target_arch = "x86_64", target_arch = "aarch64")), allow(dead_code))]
const EXP_INPUT_MAX: f32 = 89.0;
/// exp of anything below this rounds to 0 in f32.
#[cfg_attr(not(any(target_arch = "x86_64", target_arch = "aarch64")), allow(dead_code))]
const EXP_INPUT_MIN: f32 = -104.0;
