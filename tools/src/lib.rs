//! Offline tools for daain-edge, on libtorch (`tch`): ESPNet import and ONNX export,
//! activation recording, flow training, score fitting, threshold calibration and bundle
//! export, plus frame perturbations and detection metrics for evaluating a bundle.

pub mod espnet;
pub mod flow;
pub mod metrics;
pub mod onnx;
pub mod perturb;
pub mod plan;
pub mod pth;
pub mod record;
pub mod training;
