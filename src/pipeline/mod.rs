//! The frame path: [`Detector`] scores one frame, [`run`] drives a source through it on
//! three threads (decode, detection, and the caller's thread for output and alerts).

mod detector;
mod run;

pub use detector::{
    write_class_png, DetectError, Detector, DetectorOptions, ExecutionMode, FrameOutcome, Scores,
    StageTimings,
};
pub use run::{run, OnFrame, OverloadPolicy, Pacing, RunOptions, RunSummary, StopFlag};
