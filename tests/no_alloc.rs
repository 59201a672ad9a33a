//! The per-frame work of the detection and output threads allocates nothing of its own
//! after warm-up: preprocessing, gather, flow, scores, level tracking and alerts, on
//! real frames through the shipped ESPNet and bundle, in both execution modes.
//!
//! A counting global allocator counts the allocations of this thread while a flag is
//! set. `daain::exec_scope::in_tract` returns whether tract's plan execution is making
//! the allocation (its node outputs, its per-run bookkeeping) or daain's code is. tract's
//! count is printed, and only daain's count is asserted to be zero. This test binary
//! contains one test, so no other test allocates on the counted thread.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use daain::alert::{self, Alert, AlertLevel, LevelTracker};
use daain::bundle::Bundle;
use daain::pipeline::{Detector, ExecutionMode, FrameOutcome};
use daain::source::{open_source, Frame, SourceOptions, SourceSpec};

struct CountingAllocator;

static DAAIN_ALLOCATIONS: AtomicU64 = AtomicU64::new(0);
static TRACT_ALLOCATIONS: AtomicU64 = AtomicU64::new(0);

thread_local! {
    static COUNTING: Cell<bool> = const { Cell::new(false) };
}

fn record_allocation() {
    if COUNTING.try_with(Cell::get).unwrap_or(false) {
        if daain::exec_scope::in_tract() {
            TRACT_ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        } else {
            DAAIN_ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        }
    }
}

// SAFETY: every call forwards to the system allocator unchanged; counting touches only
// atomics and a const-initialised thread-local, neither of which allocates.
unsafe impl GlobalAlloc for CountingAllocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        record_allocation();
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        record_allocation();
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        record_allocation();
        unsafe { System.realloc(ptr, layout, new_size) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOCATOR: CountingAllocator = CountingAllocator;

/// Counts the allocations `work` makes on this thread: `(daain, tract)`.
fn count_allocations(work: impl FnOnce()) -> (u64, u64) {
    DAAIN_ALLOCATIONS.store(0, Ordering::Relaxed);
    TRACT_ALLOCATIONS.store(0, Ordering::Relaxed);
    COUNTING.with(|flag| flag.set(true));
    work();
    COUNTING.with(|flag| flag.set(false));
    (
        DAAIN_ALLOCATIONS.load(Ordering::Relaxed),
        TRACT_ALLOCATIONS.load(Ordering::Relaxed),
    )
}

fn repo_path(relative: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(relative)
}

fn clip_frames(count: usize) -> Vec<Frame> {
    let spec = SourceSpec::Video(repo_path("data/footage/solidWhiteRight.mp4"));
    let mut source = open_source(&spec, &SourceOptions::default()).unwrap();
    let mut frames = Vec::new();
    let mut frame = Frame::new();
    while frames.len() < count && source.next_frame(&mut frame).unwrap() {
        frames.push(frame.clone());
    }
    assert_eq!(frames.len(), count, "the clip is too short");
    frames
}

/// What the detection and output threads do for one frame in `pipeline::run`, with the
/// queues left out: score, build the outcome, track the level, send and receive the
/// alert.
struct FrameLoop<'b> {
    detector: Detector<'b>,
    tracker: LevelTracker,
    alerts: alert::AlertSender,
    received: crossbeam_channel::Receiver<Alert>,
    alerts_received: u64,
}

impl FrameLoop<'_> {
    fn process(&mut self, frame: &Frame, segment: bool) {
        let kind = self.detector.score_kind();
        let threshold = self.detector.threshold();
        let mut outcome = FrameOutcome::unscored(frame, &self.detector);
        let (scores, timings) = self.detector.score_frame(frame, segment).unwrap();
        let score = scores.get(kind);
        outcome.score = Some(score);
        outcome.anomalous = score > threshold;
        outcome.scores = Some(scores);
        outcome.timings = timings;

        outcome.level = self.tracker.update(outcome.anomalous);
        if outcome.level != AlertLevel::Ok {
            self.alerts.send(Alert {
                frame: outcome.frame,
                timestamp: frame.timestamp,
                score,
                threshold,
                level: outcome.level,
                message: outcome.error.clone().unwrap_or_default(),
            });
        }
        while let Ok(alert) = self.received.try_recv() {
            assert_eq!(alert.frame, frame.index);
            self.alerts_received += 1;
        }
    }
}

#[test]
fn frame_loop_allocates_nothing_after_warm_up() {
    const WARM_UP: usize = 2;
    let frames = clip_frames(WARM_UP + 4);
    let bundle = Bundle::open(&repo_path("models/default")).unwrap();
    for mode in [ExecutionMode::OutOfPlan, ExecutionMode::InPlan] {
        // A threshold below every score makes every frame anomalous, so that every
        // frame also sends an alert.
        for threshold in [None, Some(-1e300)] {
            let (alerts, received) = alert::channel(4);
            let mut frame_loop = FrameLoop {
                detector: Detector::with_mode(&bundle, threshold, mode).unwrap(),
                tracker: LevelTracker::new(1, 1),
                alerts,
                received,
                alerts_received: 0,
            };
            for (index, frame) in frames.iter().enumerate() {
                let segment = index % 2 == 1;
                if index < WARM_UP {
                    frame_loop.process(frame, segment);
                    continue;
                }
                let (daain, tract) = count_allocations(|| frame_loop.process(frame, segment));
                eprintln!(
                    "{mode}, threshold {threshold:?}, frame {}, segment {segment}: \
                     daain {daain} allocations, tract {tract}",
                    frame.index
                );
                assert_eq!(
                    daain, 0,
                    "{mode}: frame {} allocated {daain} times in daain's code",
                    frame.index
                );
            }
            if threshold.is_some() {
                assert_eq!(frame_loop.alerts_received, frames.len() as u64);
            }
        }
    }
}
