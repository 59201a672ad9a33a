//! Offline tools for daain-edge, on libtorch (`tch`): ESPNet import and ONNX export,
//! activation recording, flow training, score fitting, threshold calibration and bundle
//! export.

pub mod espnet;
pub mod flow;
pub mod onnx;
pub mod pth;
pub mod record;
pub mod training;
