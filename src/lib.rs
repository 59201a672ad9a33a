//! daain-edge: detection of anomalous and adversarial camera input to a segmentation
//! network, after DAAIN (Detection of Anomalous and Adversarial Input using Normalizing
//! Flows, arXiv 2105.14638).
//!
//! The frame path: a [`source`] yields frames, [`preprocess`] turns them into ESPNet's
//! input tensor, [`backbone`] runs ESPNet through tract and returns the tapped
//! activations, [`sampling`] gathers the values at the bundle's blue-noise mask, [`flow`]
//! maps that vector to a standard normal, [`score`] turns the flow output into an outlier
//! score, and [`alert`] decides and reports. [`bundle`] loads the trained parameters of
//! every stage, [`pipeline`] wires the stages into the real-time loop, [`plan`] runs backbone, gather
//! and flow as one tract plan with custom operators, and [`hil`]
//! replays a clip at camera rate through that loop and reports on it.

pub mod alert;
pub mod backbone;
pub mod bundle;
pub mod config;
pub mod cpu;
pub mod exec_scope;
pub mod flow;
#[doc(hidden)]
pub mod fuzzing;
pub mod heap;
pub mod hil;
pub mod pipeline;
pub mod plan;
pub mod preprocess;
pub mod rewrite;
pub mod sampling;
pub mod score;
pub mod source;
