//! The real-time frame loop on three threads:
//!
//! - the decode thread reads frames from the source, paces them on their timestamps under
//!   [`Pacing::Realtime`], and puts them into the bounded frame queue, where the
//!   [`OverloadPolicy`] decides what happens when the queue is full;
//! - the detection thread scores each queued frame and passes the outcome on through a
//!   second bounded queue, which blocks, so every scored frame is reported;
//! - the caller's thread tracks the alert level, sends alerts, runs the watchdog and
//!   hands every outcome to the caller.
//!
//! A slow caller fills the outcome queue, which stalls detection and fills the frame
//! queue, so under [`OverloadPolicy::DropOldest`] the decode thread drops frames instead
//! of falling behind the source. Alerts never block: see [`crate::alert`].
//!
//! Frame buffers and class maps travel back to their producer through return queues, so
//! after the first few frames no pixel buffer is allocated.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender, TrySendError};
use serde::{Deserialize, Serialize};

use super::detector::{millis, Detector, FrameOutcome};
use crate::alert::{alert_due, Alert, AlertLevel, AlertSender, LevelTracker};
use crate::source::{Frame, FrameSource};

/// Policy of the decode thread for a full frame queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum OverloadPolicy {
    /// Wait until the detector takes a frame, so every decoded frame is scored. Suits
    /// offline replay, where the source can wait.
    Block,
    /// Evict the oldest queued frame and count it as dropped, so the frames scored stay
    /// close to the source's present. Suits cameras and real-time replay.
    DropOldest,
}

impl std::fmt::Display for OverloadPolicy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            OverloadPolicy::Block => "block",
            OverloadPolicy::DropOldest => "drop-oldest",
        })
    }
}

/// When the decode thread hands a frame to the detector.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Pacing {
    /// As soon as it is decoded.
    #[default]
    AsFastAsPossible,
    /// At the frame's timestamp relative to the first frame, as a camera delivers it.
    Realtime,
}

/// Shared flag that requests a running [`run`] to stop reading the source. Frames already
/// read are still scored and reported.
#[derive(Debug, Clone, Default)]
pub struct StopFlag(Arc<AtomicBool>);

impl StopFlag {
    pub fn new() -> Self {
        Self::default()
    }

    /// Asks the run to stop. Safe to call from any thread.
    pub fn request_stop(&self) {
        self.0.store(true, Ordering::SeqCst);
    }

    pub fn is_stop_requested(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }

    /// Returns the underlying flag, for handlers such as `signal_hook::flag::register`
    /// that set an `Arc<AtomicBool>`.
    pub fn as_atomic(&self) -> Arc<AtomicBool> {
        Arc::clone(&self.0)
    }
}

/// Callback that receives every scored outcome on the caller's thread, with the class map
/// when segmentation is on. An error stops the run.
pub type OnFrame<'a> = dyn FnMut(&FrameOutcome, Option<&[u8]>) -> anyhow::Result<()> + 'a;

/// Settings of one [`run`].
#[derive(Debug, Clone)]
pub struct RunOptions {
    /// Consecutive anomalous frames before the level rises to WARN.
    pub raise_after: u32,
    /// Consecutive normal frames before the level falls back to OK.
    pub clear_after: u32,
    /// Stop after the source delivered this many frames.
    pub max_frames: Option<u64>,
    /// Compute the class map of every frame and pass it to the caller.
    pub segment: bool,
    /// Capacity of the frame queue between the decode and the detection thread.
    pub queue_capacity: usize,
    pub overload: OverloadPolicy,
    pub pacing: Pacing,
    /// Per-frame deadline from delivery by the source to the score.
    pub deadline: Duration,
    /// Time without a frame leaving the detector after which the level turns STALE.
    pub watchdog: Duration,
    /// Source errors in a row after which the run ends. Below it, the frame that failed
    /// is counted in [`RunSummary::source_errors`] and the run reads the next one. `1`
    /// ends the run at the first error.
    pub source_error_limit: u32,
    pub stop: StopFlag,
}

impl Default for RunOptions {
    fn default() -> Self {
        Self {
            raise_after: 1,
            clear_after: 1,
            max_frames: None,
            segment: false,
            queue_capacity: 2,
            overload: OverloadPolicy::Block,
            pacing: Pacing::AsFastAsPossible,
            deadline: Duration::from_millis(200),
            watchdog: Duration::from_millis(2000),
            source_error_limit: 10,
            stop: StopFlag::new(),
        }
    }
}

/// Counts of one run over a source. Every decoded frame is either scored or dropped, so
/// `scored + dropped == decoded`.
#[derive(Debug, Clone, Default, Serialize)]
pub struct RunSummary {
    /// Frames the source delivered.
    pub decoded: u64,
    /// Frames that went through the detector and were reported, including the `failed`
    /// ones.
    pub scored: u64,
    /// Frames evicted from the full frame queue under [`OverloadPolicy::DropOldest`].
    pub dropped: u64,
    pub anomalous: u64,
    /// Frames the detector could not score (reported with an error).
    pub failed: u64,
    /// Scored frames whose latency exceeded the deadline.
    pub deadline_misses: u64,
    /// Times the watchdog found no frame leaving the detector for its whole period.
    pub stalls: u64,
    /// Alerts passed to the alert channel during this run.
    pub alerts_sent: u64,
    /// Of those, alerts lost because the channel was full or closed.
    pub alerts_undelivered: u64,
    /// Whether the run ended because a stop was requested.
    pub stopped: bool,
    /// Errors the source returned, each in place of a frame that was lost (a damaged
    /// frame or image). They are not part of `decoded`.
    pub source_errors: u64,
    /// The last source error, if any. When `source_errors` reached the run's
    /// `source_error_limit` in a row, this error ended the run.
    pub source_error: Option<String>,
}

impl std::fmt::Display for RunSummary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "decoded={} scored={} dropped={} source_errors={} anomalous={} failed={} \
             deadline_misses={} stalls={} alerts_sent={} alerts_undelivered={} stopped={}",
            self.decoded,
            self.scored,
            self.dropped,
            self.source_errors,
            self.anomalous,
            self.failed,
            self.deadline_misses,
            self.stalls,
            self.alerts_sent,
            self.alerts_undelivered,
            self.stopped
        )
    }
}

/// A frame in the frame queue, with the moment the source delivered it.
struct QueuedFrame {
    frame: Frame,
    delivered_at: Instant,
}

/// A frame that went through the detector.
struct Detected {
    outcome: FrameOutcome,
    timestamp: Duration,
    classes: Option<Vec<u8>>,
}

/// Counts and end reason that the decode thread returns.
#[derive(Default)]
struct DecodeEnd {
    decoded: u64,
    dropped: u64,
    stopped: bool,
    source_errors: u64,
    source_error: Option<String>,
}

/// Sets a flag when dropped, including while a thread unwinds from a panic.
struct SetOnDrop<'a>(&'a AtomicBool);

impl Drop for SetOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

/// Allows a log line at most once per interval, so a condition that repeats on every
/// frame does not flood the log.
struct LogLimiter {
    interval: Duration,
    last: Option<Instant>,
}

impl LogLimiter {
    fn new(interval: Duration) -> Self {
        Self {
            interval,
            last: None,
        }
    }

    fn allow(&mut self) -> bool {
        let now = Instant::now();
        if self.last.is_none_or(|last| now - last >= self.interval) {
            self.last = Some(now);
            true
        } else {
            false
        }
    }
}

/// Minimum time between two log lines about dropped frames or missed deadlines.
const LOG_INTERVAL: Duration = Duration::from_secs(5);

/// Maximum sleep of the decode thread between two checks of the stop flag.
const STOP_POLL: Duration = Duration::from_millis(20);

/// Scores frames from `source` until it ends, `max_frames` is reached, a stop is
/// requested or the source fails, on the threads described in the module documentation.
///
/// `on_frame` runs on the caller's thread and receives every scored outcome in frame
/// order, and the class map when `segment` is set. Alerts go to `alerts`: one for every
/// frame whose level is not OK, one when the level returns to OK, one STALE alert per
/// stall and one when frames resume after it.
///
/// A source error costs the frame it replaces: it is counted in the summary and the run
/// reads on, until `source_error_limit` errors in a row end it. Every frame before the
/// last error is scored and reported either way. An error from `on_frame` stops the run
/// and is returned.
pub fn run(
    source: &mut dyn FrameSource,
    detector: &mut Detector<'_>,
    alerts: &AlertSender,
    options: &RunOptions,
    on_frame: &mut OnFrame<'_>,
) -> anyhow::Result<RunSummary> {
    let capacity = options.queue_capacity.max(1);
    let (frame_sender, frame_receiver) = crossbeam_channel::bounded::<QueuedFrame>(capacity);
    let (outcome_sender, outcome_receiver) = crossbeam_channel::bounded::<Detected>(capacity);
    // Return queues: spare frame buffers to the decode thread, spare class maps to the
    // detection thread. Sized so that a returned buffer always fits.
    let (spare_frame_sender, spare_frame_receiver) = crossbeam_channel::bounded(2 * capacity + 2);
    let (spare_classes_sender, spare_classes_receiver) =
        crossbeam_channel::bounded(2 * capacity + 2);
    // Set by the caller's thread when it gives up early (an error from `on_frame`), and by
    // the decode thread when it has no more frames to deliver.
    let abort = AtomicBool::new(false);
    let decode_finished = AtomicBool::new(false);
    let alerts_sent_before = alerts.sent();
    let alerts_dropped_before = alerts.dropped();

    log::info!(
        "scoring {} with {} threshold {}: frame queue of {capacity} ({}), {}, deadline {} ms, \
         watchdog {} ms",
        source.describe(),
        detector.score_kind(),
        detector.threshold(),
        options.overload,
        match options.pacing {
            Pacing::AsFastAsPossible => "as fast as possible",
            Pacing::Realtime => "paced at recorded speed",
        },
        options.deadline.as_millis(),
        options.watchdog.as_millis()
    );

    // Only drop-oldest evicts. Under block the decode thread must hold no receiving end,
    // so that its blocked send fails when the detection thread is gone.
    let evictor = (options.overload == OverloadPolicy::DropOldest).then(|| frame_receiver.clone());

    let (decode_end, detection_end, consumed) = std::thread::scope(|scope| {
        let abort = &abort;
        let decode_finished = &decode_finished;
        let decode = std::thread::Builder::new()
            .name("daain-decode".into())
            .spawn_scoped(scope, move || {
                let _finished = SetOnDrop(decode_finished);
                decode_loop(
                    source,
                    options,
                    abort,
                    frame_sender,
                    evictor,
                    spare_frame_receiver,
                )
            })
            .expect("failed to spawn the decode thread");
        let detection = std::thread::Builder::new()
            .name("daain-detect".into())
            .spawn_scoped(scope, move || {
                // Stops the decode thread when detection ends early, also by a panic.
                let _abort = SetOnDrop(abort);
                detect_loop(
                    detector,
                    options,
                    frame_receiver,
                    outcome_sender,
                    spare_frame_sender,
                    spare_classes_receiver,
                )
            })
            .expect("failed to spawn the detection thread");

        let consumed = consume_loop(
            alerts,
            options,
            decode_finished,
            outcome_receiver,
            spare_classes_sender,
            on_frame,
        );
        if consumed.is_err() {
            abort.store(true, Ordering::SeqCst);
        }
        (decode.join(), detection.join(), consumed)
    });
    let Ok(decode_end) = decode_end else {
        anyhow::bail!("the decode thread panicked; see the message above");
    };
    if detection_end.is_err() {
        anyhow::bail!("the detection thread panicked; see the message above");
    }
    let mut summary = consumed?;
    summary.decoded = decode_end.decoded;
    summary.dropped = decode_end.dropped;
    summary.stopped = decode_end.stopped;
    summary.source_errors = decode_end.source_errors;
    summary.source_error = decode_end.source_error;
    summary.alerts_sent = alerts.sent() - alerts_sent_before;
    summary.alerts_undelivered = alerts.dropped() - alerts_dropped_before;
    debug_assert_eq!(
        summary.scored + summary.dropped,
        summary.decoded,
        "every decoded frame is scored or dropped"
    );
    Ok(summary)
}

/// Reads frames until the source ends, fails, `max_frames` is reached or a stop is
/// requested, and queues them under the overload policy. Dropping `frames` on return
/// ends the detection thread's loop once the queue is empty.
fn decode_loop(
    source: &mut dyn FrameSource,
    options: &RunOptions,
    abort: &AtomicBool,
    frames: Sender<QueuedFrame>,
    evictor: Option<Receiver<QueuedFrame>>,
    spare_frames: Receiver<Frame>,
) -> DecodeEnd {
    let mut end = DecodeEnd::default();
    let mut drop_log = LogLimiter::new(LOG_INTERVAL);
    // Monotonic time and source timestamp of the first frame, the origin of the pacing.
    let mut pacing_origin: Option<(Instant, Duration)> = None;
    let mut spare: Option<Frame> = None;
    let mut consecutive_errors = 0u32;
    loop {
        if options.stop.is_stop_requested() {
            log::info!(
                "stop requested: reading no more frames from {}",
                source.describe()
            );
            end.stopped = true;
            break;
        }
        if abort.load(Ordering::SeqCst) {
            break;
        }
        if options.max_frames.is_some_and(|max| end.decoded >= max) {
            break;
        }
        let mut frame = spare
            .take()
            .or_else(|| spare_frames.try_recv().ok())
            .unwrap_or_default();
        match source.next_frame(&mut frame) {
            Ok(true) => consecutive_errors = 0,
            Ok(false) => break,
            Err(error) => {
                let message = error_chain(&error);
                end.source_errors += 1;
                consecutive_errors += 1;
                let give_up = consecutive_errors >= options.source_error_limit;
                if give_up {
                    log::error!(
                        "source {} failed {consecutive_errors} times in a row after {} \
                         frames, giving up: {message}",
                        source.describe(),
                        end.decoded
                    );
                } else {
                    log::error!(
                        "source {} failed after {} frames, skipping to the next frame: \
                         {message}",
                        source.describe(),
                        end.decoded
                    );
                }
                end.source_error = Some(message);
                spare = Some(frame);
                if give_up {
                    break;
                }
                continue;
            }
        }
        end.decoded += 1;

        if options.pacing == Pacing::Realtime {
            let (start, first) = *pacing_origin.get_or_insert((Instant::now(), frame.timestamp));
            let due = start + frame.timestamp.saturating_sub(first);
            sleep_until(due, &options.stop);
        }

        let mut queued = QueuedFrame {
            frame,
            delivered_at: Instant::now(),
        };
        match options.overload {
            OverloadPolicy::Block => {
                if frames.send(queued).is_err() {
                    // The detection thread is gone; the run reports why.
                    break;
                }
            }
            OverloadPolicy::DropOldest => loop {
                match frames.try_send(queued) {
                    Ok(()) => break,
                    Err(TrySendError::Full(back)) => {
                        queued = back;
                        // The detector may take the oldest frame first; then the retry
                        // finds room.
                        let evicted = evictor.as_ref().and_then(|e| e.try_recv().ok());
                        if let Some(oldest) = evicted {
                            end.dropped += 1;
                            if drop_log.allow() {
                                log::warn!(
                                    "frame queue full: dropped frame {} (the oldest queued), \
                                     {} dropped so far",
                                    oldest.frame.index,
                                    end.dropped
                                );
                            }
                            spare = Some(oldest.frame);
                        }
                    }
                    Err(TrySendError::Disconnected(_)) => return end,
                }
                if abort.load(Ordering::SeqCst) {
                    return end;
                }
            },
        }
    }
    end
}

/// Sleeps until `due` or until a stop is requested, whichever comes first.
fn sleep_until(due: Instant, stop: &StopFlag) {
    loop {
        let now = Instant::now();
        if now >= due || stop.is_stop_requested() {
            return;
        }
        std::thread::sleep((due - now).min(STOP_POLL));
    }
}

/// Scores every queued frame until the decode thread is done and the queue is empty, or
/// the caller's thread stops taking outcomes.
fn detect_loop(
    detector: &mut Detector<'_>,
    options: &RunOptions,
    frames: Receiver<QueuedFrame>,
    outcomes: Sender<Detected>,
    spare_frames: Sender<Frame>,
    spare_classes: Receiver<Vec<u8>>,
) {
    let threshold = detector.threshold();
    let kind = detector.score_kind();
    for queued in frames.iter() {
        let started = Instant::now();
        let frame = queued.frame;
        let mut outcome = FrameOutcome::unscored(&frame, detector);
        match detector.score_frame(&frame, options.segment) {
            Ok((scores, timings)) => {
                let score = scores.get(kind);
                outcome.score = Some(score);
                outcome.anomalous = score > threshold;
                outcome.scores = Some(scores);
                outcome.timings = timings;
            }
            Err(error) => {
                let message = error_chain(&error);
                log::error!("frame {}: {message}", frame.index);
                outcome.error = Some(message);
            }
        }
        let latency = queued.delivered_at.elapsed();
        outcome.timings.queue_ms = millis(started - queued.delivered_at);
        outcome.latency_ms = millis(latency);
        outcome.deadline_missed = latency > options.deadline;

        let classes = (options.segment && outcome.error.is_none()).then(|| {
            let mut classes = spare_classes.try_recv().unwrap_or_default();
            classes.clear();
            classes.extend_from_slice(detector.segmentation());
            classes
        });
        let timestamp = frame.timestamp;
        // A full return queue only costs an allocation later.
        let _ = spare_frames.try_send(frame);
        let detected = Detected {
            outcome,
            timestamp,
            classes,
        };
        if outcomes.send(detected).is_err() {
            // The caller's thread stopped taking outcomes because `on_frame` failed.
            break;
        }
    }
}

/// Receives outcomes on the caller's thread: tracks the level, sends alerts, runs the
/// watchdog and calls `on_frame`. Returns the per-frame counts of the summary.
fn consume_loop(
    alerts: &AlertSender,
    options: &RunOptions,
    decode_finished: &AtomicBool,
    outcomes: Receiver<Detected>,
    spare_classes: Sender<Vec<u8>>,
    on_frame: &mut OnFrame<'_>,
) -> anyhow::Result<RunSummary> {
    let mut summary = RunSummary::default();
    let mut tracker = LevelTracker::new(options.raise_after, options.clear_after);
    let mut deadline_log = LogLimiter::new(LOG_INTERVAL);
    let mut last_progress = Instant::now();
    // Frame index and timestamp of the last outcome, for STALE alerts.
    let mut last_frame: (u64, Duration) = (0, Duration::ZERO);
    loop {
        // Subtracting avoids `Instant + Duration`, which panics on overflow for a huge
        // watchdog period.
        let wait = options.watchdog.saturating_sub(last_progress.elapsed());
        let detected = match outcomes.recv_timeout(wait) {
            Ok(detected) => detected,
            Err(RecvTimeoutError::Disconnected) => break,
            Err(RecvTimeoutError::Timeout) => {
                // After the source ended, the queues drain and no stall is possible.
                if !decode_finished.load(Ordering::SeqCst) && tracker.stall() {
                    summary.stalls += 1;
                    let stalled_ms = last_progress.elapsed().as_millis();
                    log::warn!(
                        "no frame left the detector for {stalled_ms} ms (watchdog {} ms): \
                         level STALE",
                        options.watchdog.as_millis()
                    );
                    alerts.send(Alert {
                        frame: last_frame.0,
                        timestamp: last_frame.1,
                        score: f64::NAN,
                        threshold: f64::NAN,
                        level: AlertLevel::Stale,
                        message: format!("no frame scored for {stalled_ms} ms"),
                    });
                }
                // Check again one watchdog period later, without another alert while the
                // stall lasts.
                last_progress = Instant::now();
                continue;
            }
        };
        let Detected {
            mut outcome,
            timestamp,
            classes,
        } = detected;
        last_progress = Instant::now();
        last_frame = (outcome.frame, timestamp);

        if let Some(restored) = tracker.resume() {
            log::info!(
                "frames resumed at frame {}: level back to {restored}",
                outcome.frame
            );
            alerts.send(Alert {
                frame: outcome.frame,
                timestamp,
                score: outcome.score.unwrap_or(f64::NAN),
                threshold: outcome.threshold,
                level: restored,
                message: "frames resumed after a stall".into(),
            });
        }
        let previous_level = tracker.level();
        outcome.level = match outcome.error {
            None => tracker.update(outcome.anomalous),
            Some(_) => tracker.fail(),
        };

        summary.scored += 1;
        summary.anomalous += u64::from(outcome.anomalous);
        summary.failed += u64::from(outcome.error.is_some());
        if outcome.deadline_missed {
            summary.deadline_misses += 1;
            if deadline_log.allow() {
                log::warn!(
                    "frame {} took {:.1} ms from delivery to score, over the {} ms deadline; \
                     {} deadline misses so far",
                    outcome.frame,
                    outcome.latency_ms,
                    options.deadline.as_millis(),
                    summary.deadline_misses
                );
            }
        }
        if alert_due(previous_level, outcome.level) {
            alerts.send(Alert {
                frame: outcome.frame,
                timestamp,
                score: outcome.score.unwrap_or(f64::NAN),
                threshold: outcome.threshold,
                level: outcome.level,
                message: outcome.error.clone().unwrap_or_default(),
            });
        }
        on_frame(&outcome, classes.as_deref())?;
        if let Some(classes) = classes {
            let _ = spare_classes.try_send(classes);
        }
    }
    Ok(summary)
}

/// Formats an error with its chain of causes, `outer: inner: innermost`.
fn error_chain(error: &dyn std::error::Error) -> String {
    let mut message = error.to_string();
    let mut cause = error.source();
    while let Some(inner) = cause {
        message.push_str(": ");
        message.push_str(&inner.to_string());
        cause = inner.source();
    }
    message
}
