//! CPU capabilities that decide which kernels run, logged once per process.

use std::sync::Once;

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

/// Logs at `info` level, once per process, the CPU's architecture and SIMD features and
/// the flow kernel chosen for them. Each backbone logs tract's matrix-multiplication
/// kernels when it is loaded, because they depend on the model as well.
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
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn baseline_features_are_detected() {
        let features = detected_features();
        #[cfg(target_arch = "x86_64")]
        assert!(features.contains(&"sse2"), "{features:?}");
        #[cfg(target_arch = "aarch64")]
        assert!(features.contains(&"neon"), "{features:?}");
    }
}
