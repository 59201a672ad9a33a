//! CPU capabilities that decide which kernels run, logged once per process.

use std::sync::Once;

use tract_onnx::prelude::tract_linalg::mmm::MatMatMul;
use tract_onnx::prelude::tract_linalg::{isa, MmmDispatch};
use tract_onnx::prelude::DatumType;

/// Returns the SIMD features of this CPU that the runtime or tract can use, as the
/// standard library's feature detection names them.
pub fn detected_features() -> Vec<&'static str> {
    #[allow(unused_mut)]
    let mut features = Vec::new();
    #[cfg(target_arch = "x86_64")]
    {
        macro_rules! probe {
            ($($name:tt),*) => {
                $(if std::arch::is_x86_feature_detected!($name) { features.push($name); })*
            };
        }
        probe!("sse2", "sse4.1", "avx", "avx2", "fma", "f16c", "avx512f", "avx512vnni");
    }
    #[cfg(target_arch = "aarch64")]
    {
        macro_rules! probe {
            ($($name:tt),*) => {
                $(if std::arch::is_aarch64_feature_detected!($name) { features.push($name); })*
            };
        }
        probe!("neon", "fp16", "dotprod", "i8mm", "sve", "sve2");
    }
    features
}

/// Returns the architecture, the SIMD features and the flow kernel on one line, for
/// reports.
pub fn describe() -> String {
    format!(
        "{} with {}; flow kernel {}",
        std::env::consts::ARCH,
        detected_features().join(", "),
        crate::flow::forward_kernel_f32().name()
    )
}

/// A tract matrix-multiplication kernel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MatmulKernel {
    /// Tract's kernel name, such as `arm64simd_mmm_f32_8x8_gen` or `fma_mmm_f32_16x6`.
    pub name: String,
    /// Whether the kernel is written for this CPU architecture (assembly or intrinsics)
    /// rather than being tract's portable Rust fallback.
    pub native: bool,
}

impl MatmulKernel {
    pub(crate) fn of(kernel: &dyn MatMatMul) -> Self {
        Self {
            name: kernel.name().to_string(),
            native: kernel.arch().is_some(),
        }
    }
}

/// Returns the f32 matrix-multiplication kernel that tract prefers on this CPU for a
/// product with `n` columns (`None` for a shape not known in advance), or `None` when
/// tract's dispatch has no preference and decides per shape.
///
/// The choice follows tract's instruction-set probe and, on aarch64, its CPU family, which
/// `TRACT_CPU_AARCH64_KIND` overrides (`a53`, `a55`, `a72`, `a73`, `a75`, `neoverse`;
/// anything else selects the generic NEON kernels).
pub fn preferred_matmul_kernel_f32(n: Option<usize>) -> Option<MatmulKernel> {
    MmmDispatch::native()
        .preferred_kernel(DatumType::F32, None, None, n)
        .map(|kernel| MatmulKernel::of(&*kernel))
}

/// Logs at `info` level, once per process, the CPU's architecture and SIMD features, the
/// flow kernel chosen for them, and tract's instruction set and preferred f32
/// matrix-multiplication kernels. The backbone logs the kernels its plan actually uses
/// when it loads.
pub fn log_capabilities() {
    static LOGGED: Once = Once::new();
    LOGGED.call_once(|| {
        log::info!(
            "cpu: {} with {}",
            std::env::consts::ARCH,
            detected_features().join(", ")
        );
        // Choosing the kernel logs the choice.
        crate::flow::forward_kernel_f32();
        let describe = |kernel: Option<MatmulKernel>| {
            kernel.map_or_else(|| "chosen per shape".to_string(), |kernel| kernel.name)
        };
        log::info!(
            "tract: instruction set {:?}, f32 matmul kernel {} (matrix), {} (matrix-vector)",
            isa::native(),
            describe(preferred_matmul_kernel_f32(None)),
            describe(preferred_matmul_kernel_f32(Some(1)))
        );
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn baseline_features_are_detected() {
        // On other architectures (armv7) nothing is probed, so there is nothing to check.
        #[allow(unused_variables)]
        let features = detected_features();
        #[cfg(target_arch = "x86_64")]
        assert!(features.contains(&"sse2"), "{features:?}");
        #[cfg(target_arch = "aarch64")]
        assert!(features.contains(&"neon"), "{features:?}");
    }

    #[test]
    fn tract_prefers_native_matmul_kernel() {
        let matrix = preferred_matmul_kernel_f32(None);
        let vector = preferred_matmul_kernel_f32(Some(1));
        // Tract's aarch64 dispatch always returns a kernel: a NEON one unless SVE2, SME or
        // Apple's AMX offer better ones.
        #[cfg(target_arch = "aarch64")]
        {
            let matrix = matrix.expect("no preferred f32 matmul kernel on aarch64");
            let vector = vector.expect("no preferred f32 matrix-vector kernel on aarch64");
            assert!(matrix.native, "{matrix:?}");
            assert!(vector.native, "{vector:?}");
            // The families with kernels of their own must show in the names, which proves
            // that a forced family (as the qemu runner sets it) reaches tract.
            let kind = std::env::var("TRACT_CPU_AARCH64_KIND").unwrap_or_default();
            for family in ["a53", "a55"] {
                if kind.to_lowercase().contains(family) {
                    let suffix = format!("_{family}");
                    assert!(vector.name.ends_with(&suffix), "{kind}: {vector:?}");
                }
            }
        }
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            let vector = vector.expect("no preferred f32 matrix-vector kernel with FMA");
            assert!(vector.native, "{vector:?}");
            if let Some(matrix) = matrix {
                assert!(matrix.native, "{matrix:?}");
            }
        }
        #[cfg(not(any(target_arch = "aarch64", target_arch = "x86_64")))]
        let _ = (matrix, vector);
    }
}
