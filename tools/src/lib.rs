//! Offline tools for daain-edge, on libtorch (`tch`): ESPNet import and ONNX export,
//! activation recording, flow training, score fitting, threshold calibration and bundle
//! export, plus frame perturbations, adversarial attacks, baseline scores, detection
//! metrics and the evaluation report of a bundle.

pub mod ablation;
pub mod attack;
pub mod baseline;
pub mod espnet;
pub mod evaluate;
pub mod flow;
pub mod metrics;
pub mod onnx;
pub mod perturb;
pub mod plot;
pub mod plan;
pub mod pth;
pub mod quantize;
pub mod reference;
pub mod record;
pub mod report;
pub mod training;
