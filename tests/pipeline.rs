//! The threaded frame loop on the shipped clip and bundle: frame accounting under both
//! overload policies, a source that fails part way, a stalled alert consumer, the
//! watchdog and a requested stop.

mod common;

use std::time::Duration;

use daain::alert::{self, Alert, AlertLevel, AlertPolicy};
use daain::bundle::Bundle;
use daain::pipeline::{
    run, Detector, FrameOutcome, OverloadPolicy, Pacing, RunOptions, RunSummary, StopFlag,
};
use daain::source::{open_source, Frame, FrameSource, SourceError, SourceOptions, SourceSpec};

use common::{repo_path, watchdog_for};

fn clip() -> Box<dyn FrameSource> {
    let spec = SourceSpec::Video(repo_path("data/footage/solidWhiteRight.mp4"));
    open_source(&spec, &SourceOptions::default()).expect("the shipped clip opens")
}

fn bundle() -> Bundle {
    Bundle::open(&repo_path("models/default")).expect("the shipped bundle opens")
}

/// Runs the loop and returns the summary with every outcome handed to the caller.
fn run_collecting(
    source: &mut dyn FrameSource,
    detector: &mut Detector<'_>,
    alerts: &alert::AlertSender,
    options: &RunOptions,
    consumer_delay: Duration,
) -> (RunSummary, Vec<FrameOutcome>) {
    let mut outcomes = Vec::new();
    let summary = run(source, detector, alerts, options, &mut |outcome, _| {
        outcomes.push(outcome.clone());
        std::thread::sleep(consumer_delay);
        Ok(())
    })
    .expect("the run succeeds");
    (summary, outcomes)
}

fn frame_indices(outcomes: &[FrameOutcome]) -> Vec<u64> {
    outcomes.iter().map(|o| o.frame).collect()
}

/// Wraps a real source and returns a decode error in place of each of the `failures`
/// frames from `fail_at` on.
struct FailingSource {
    inner: Box<dyn FrameSource>,
    fail_at: u64,
    failures: u64,
}

impl FrameSource for FailingSource {
    fn next_frame(&mut self, frame: &mut Frame) -> Result<bool, SourceError> {
        let mut next = Frame::new();
        if !self.inner.next_frame(&mut next)? {
            return Ok(false);
        }
        if (self.fail_at..self.fail_at + self.failures).contains(&next.index) {
            return Err(SourceError::Decode {
                path: repo_path("data/footage/solidWhiteRight.mp4"),
                frame_index: next.index,
                reason: "injected failure".into(),
            });
        }
        *frame = next;
        Ok(true)
    }

    fn describe(&self) -> String {
        format!(
            "{} failing at frame {}",
            self.inner.describe(),
            self.fail_at
        )
    }

    fn nominal_frame_rate(&self) -> Option<f64> {
        self.inner.nominal_frame_rate()
    }
}

/// Wraps a real source and waits `pause` before delivering frame `stall_at`.
struct StallingSource {
    inner: Box<dyn FrameSource>,
    stall_at: u64,
    pause: Duration,
}

impl FrameSource for StallingSource {
    fn next_frame(&mut self, frame: &mut Frame) -> Result<bool, SourceError> {
        let delivered = self.inner.next_frame(frame)?;
        if delivered && frame.index == self.stall_at {
            std::thread::sleep(self.pause);
        }
        Ok(delivered)
    }

    fn describe(&self) -> String {
        format!(
            "{} stalling at frame {}",
            self.inner.describe(),
            self.stall_at
        )
    }

    fn nominal_frame_rate(&self) -> Option<f64> {
        self.inner.nominal_frame_rate()
    }
}

#[test]
fn block_scores_every_frame_once() {
    let bundle = bundle();
    let mut detector = Detector::new(&bundle, None).unwrap();
    let (alerts, _receiver) = alert::channel(1000);
    let options = RunOptions {
        max_frames: Some(12),
        queue_capacity: 2,
        overload: OverloadPolicy::Block,
        ..RunOptions::default()
    };
    let mut source = clip();
    let (summary, outcomes) = run_collecting(
        source.as_mut(),
        &mut detector,
        &alerts,
        &options,
        Duration::ZERO,
    );

    assert_eq!(summary.decoded, 12);
    assert_eq!(summary.scored, 12);
    assert_eq!(summary.dropped, 0);
    assert_eq!(summary.failed, 0);
    assert!(!summary.stopped);
    assert!(summary.source_error.is_none());

    assert_eq!(frame_indices(&outcomes), (0..12).collect::<Vec<u64>>());
    for outcome in &outcomes {
        assert!(outcome.score.is_some_and(f64::is_finite), "{outcome:?}");
        assert!(outcome.timings.queue_ms >= 0.0, "{outcome:?}");
        assert!(
            outcome.latency_ms >= outcome.timings.backbone_ms,
            "latency excludes the backbone: {outcome:?}"
        );
    }
    let misses = outcomes.iter().filter(|o| o.deadline_missed).count() as u64;
    assert_eq!(summary.deadline_misses, misses);
}

#[test]
fn tiny_deadline_counts_every_miss() {
    let bundle = bundle();
    let mut detector = Detector::new(&bundle, None).unwrap();
    let (alerts, _receiver) = alert::channel(1000);
    // No frame goes through ESPNet in a microsecond, so every frame misses.
    let options = RunOptions {
        max_frames: Some(4),
        deadline: Duration::from_micros(1),
        ..RunOptions::default()
    };
    let mut source = clip();
    let (summary, outcomes) = run_collecting(
        source.as_mut(),
        &mut detector,
        &alerts,
        &options,
        Duration::ZERO,
    );
    assert_eq!(summary.scored, 4);
    assert_eq!(summary.deadline_misses, 4);
    assert!(outcomes.iter().all(|o| o.deadline_missed));
}

#[test]
fn source_error_skips_damaged_frame() {
    let bundle = bundle();
    let mut detector = Detector::new(&bundle, None).unwrap();
    let (alerts, _receiver) = alert::channel(1000);
    let mut source = FailingSource {
        inner: clip(),
        fail_at: 5,
        failures: 1,
    };
    let options = RunOptions {
        max_frames: Some(8),
        ..RunOptions::default()
    };
    let (summary, outcomes) = run_collecting(
        &mut source,
        &mut detector,
        &alerts,
        &options,
        Duration::ZERO,
    );
    assert_eq!(frame_indices(&outcomes), vec![0, 1, 2, 3, 4, 6, 7, 8]);
    assert!(outcomes.iter().all(|o| o.error.is_none()));
    assert_eq!(summary.decoded, 8);
    assert_eq!(summary.scored, 8);
    assert_eq!(summary.source_errors, 1);
    let error = summary.source_error.expect("the source error is reported");
    assert!(error.contains("frame 5"), "{error}");
    assert!(error.contains("injected failure"), "{error}");
}

#[test]
fn source_error_limit_ends_run() {
    let bundle = bundle();
    let mut detector = Detector::new(&bundle, None).unwrap();
    let (alerts, _receiver) = alert::channel(1000);
    let mut source = FailingSource {
        inner: clip(),
        fail_at: 5,
        failures: 100,
    };
    let options = RunOptions {
        source_error_limit: 3,
        ..RunOptions::default()
    };
    let (summary, outcomes) = run_collecting(
        &mut source,
        &mut detector,
        &alerts,
        &options,
        Duration::ZERO,
    );
    assert_eq!(frame_indices(&outcomes), vec![0, 1, 2, 3, 4]);
    assert_eq!(summary.decoded, 5);
    assert_eq!(summary.scored, 5);
    assert_eq!(summary.source_errors, 3);
    let error = summary
        .source_error
        .expect("the last source error is reported");
    assert!(error.contains("frame 7"), "{error}");
}

#[test]
fn source_error_limit_one_stops_at_first() {
    let bundle = bundle();
    let mut detector = Detector::new(&bundle, None).unwrap();
    let (alerts, _receiver) = alert::channel(1000);
    let mut source = FailingSource {
        inner: clip(),
        fail_at: 5,
        failures: 1,
    };
    let options = RunOptions {
        source_error_limit: 1,
        ..RunOptions::default()
    };
    let (summary, outcomes) = run_collecting(
        &mut source,
        &mut detector,
        &alerts,
        &options,
        Duration::ZERO,
    );
    assert_eq!(frame_indices(&outcomes), vec![0, 1, 2, 3, 4]);
    assert_eq!(summary.source_errors, 1);
    assert!(summary.source_error.is_some());
}

#[test]
fn drop_oldest_counts_drops_under_realtime() {
    let bundle = bundle();
    let mut detector = Detector::new(&bundle, None).unwrap();
    let (alerts, _receiver) = alert::channel(1000);
    // 25 frames last one second at the clip's 25 fps. A consumer taking 150 ms a frame
    // handles at most 7 of them plus the few that fit in the queues.
    let options = RunOptions {
        max_frames: Some(25),
        queue_capacity: 1,
        overload: OverloadPolicy::DropOldest,
        pacing: Pacing::Realtime,
        ..RunOptions::default()
    };
    let mut source = clip();
    let (summary, outcomes) = run_collecting(
        source.as_mut(),
        &mut detector,
        &alerts,
        &options,
        Duration::from_millis(150),
    );

    assert_eq!(summary.decoded, 25);
    assert!(summary.dropped > 0, "{summary}");
    assert_eq!(
        summary.scored + summary.dropped,
        summary.decoded,
        "{summary}"
    );
    assert_eq!(outcomes.len() as u64, summary.scored);

    let indices = frame_indices(&outcomes);
    assert!(
        indices.windows(2).all(|pair| pair[0] < pair[1]),
        "frames out of order or repeated: {indices:?}"
    );
    // Drop-oldest keeps the newest frame, so the last frame is always scored.
    assert_eq!(indices.last(), Some(&24));
}

/// Runs 10 frames that all raise an alert into a channel of 2 whose consumer takes one
/// alert and then stalls until the run is over. Returns the summary and the frames of the
/// alerts the consumer received, in order.
fn run_with_stalled_consumer(policy: AlertPolicy) -> (RunSummary, Vec<u64>) {
    let bundle = bundle();
    // Every frame is above this threshold, so every frame sends a WARN alert.
    let mut detector = Detector::new(&bundle, Some(-1e300)).unwrap();
    let (alerts, receiver) = alert::channel_with_policy(2, policy);
    let (release, released) = crossbeam_channel::bounded::<()>(1);
    let consumer = std::thread::spawn(move || {
        let first = receiver.recv().expect("the first alert arrives");
        // Stalls until the run is over. If the frame loop waited for this consumer, the
        // run would not end, the wait would time out and the test fails below.
        let was_released = released.recv_timeout(Duration::from_secs(300)).is_ok();
        let mut frames = vec![first.frame];
        frames.extend(receiver.try_iter().map(|alert: Alert| alert.frame));
        (was_released, frames)
    });
    let options = RunOptions {
        max_frames: Some(10),
        // No STALE alert may add to the count, however slow the frames are.
        watchdog: Duration::from_secs(3600),
        ..RunOptions::default()
    };
    let mut source = clip();

    let (summary, _) = run_collecting(
        source.as_mut(),
        &mut detector,
        &alerts,
        &options,
        Duration::ZERO,
    );
    release.send(()).unwrap();
    let (was_released, frames) = consumer.join().unwrap();
    assert!(
        was_released,
        "the consumer's stall ended before the run did"
    );
    (summary, frames)
}

#[test]
fn stalled_consumer_drop_newest() {
    let (summary, frames) = run_with_stalled_consumer(AlertPolicy::DropNewest);
    assert_eq!(summary.scored, 10);
    assert_eq!(summary.alerts_sent, 10);
    // The consumer took one alert and the channel has room for two, so at least 7 were
    // lost.
    assert!(summary.alerts_undelivered >= 7, "{summary}");
    assert_eq!(
        frames.len() as u64,
        summary.alerts_sent - summary.alerts_undelivered
    );
    // The channel kept the earliest alerts and rejected the later ones.
    assert!(!frames.contains(&9), "{frames:?}");
}

#[test]
fn stalled_consumer_drop_oldest() {
    let (summary, frames) = run_with_stalled_consumer(AlertPolicy::DropOldest);
    assert_eq!(summary.scored, 10);
    assert_eq!(summary.alerts_sent, 10);
    assert!(summary.alerts_undelivered >= 7, "{summary}");
    assert_eq!(
        frames.len() as u64,
        summary.alerts_sent - summary.alerts_undelivered
    );
    // The channel evicted older alerts, so the two newest were waiting at the end.
    assert_eq!(frames[frames.len() - 2..], [8, 9], "{frames:?}");
}

#[test]
fn watchdog_reports_stall_and_recovers() {
    let bundle = bundle();
    let mut detector = Detector::new(&bundle, None).unwrap();
    let watchdog = watchdog_for(&mut detector);
    let (alerts, receiver) = alert::channel(1000);
    let mut source = StallingSource {
        inner: clip(),
        stall_at: 4,
        pause: watchdog * 10 / 3,
    };
    let options = RunOptions {
        max_frames: Some(7),
        watchdog,
        ..RunOptions::default()
    };
    let (summary, outcomes) = run_collecting(
        &mut source,
        &mut detector,
        &alerts,
        &options,
        Duration::ZERO,
    );
    assert_eq!(summary.scored, 7);
    assert!(summary.stalls >= 1, "{summary}");

    let received: Vec<Alert> = receiver.try_iter().collect();
    let stale: Vec<&Alert> = received
        .iter()
        .filter(|a| a.level == AlertLevel::Stale)
        .collect();
    assert_eq!(stale.len() as u64, summary.stalls);

    // One STALE alert per stall: the next alert after each is the recovery.
    for pair in received.windows(2) {
        assert!(
            !(pair[0].level == AlertLevel::Stale && pair[1].level == AlertLevel::Stale),
            "two STALE alerts in a row: {received:?}"
        );
    }
    // The stall before frame 4 names the last frame scored before it, and frame 4 restores
    // the level that frame 3 had.
    let position = received
        .iter()
        .position(|a| a.level == AlertLevel::Stale && a.frame == 3)
        .unwrap_or_else(|| panic!("no STALE alert after frame 3: {received:?}"));
    let recovery = received
        .get(position + 1)
        .unwrap_or_else(|| panic!("no alert after the STALE one: {received:?}"));
    assert_eq!(recovery.frame, 4);
    assert_eq!(recovery.level, outcomes[3].level);
    assert!(outcomes.iter().all(|o| o.level != AlertLevel::Stale));
}

#[test]
fn stop_flag_drains_queued_frames() {
    let bundle = bundle();
    let mut detector = Detector::new(&bundle, None).unwrap();
    let (alerts, _receiver) = alert::channel(1000);
    let stop = StopFlag::new();
    let options = RunOptions {
        queue_capacity: 4,
        stop: stop.clone(),
        ..RunOptions::default()
    };
    let mut source = clip();
    let mut frames = Vec::new();
    let summary = run(
        source.as_mut(),
        &mut detector,
        &alerts,
        &options,
        &mut |o, _| {
            frames.push(o.frame);
            if o.frame == 2 {
                stop.request_stop();
            }
            Ok(())
        },
    )
    .unwrap();

    assert!(summary.stopped);
    assert!(summary.decoded < 221, "{summary}");
    assert_eq!(summary.dropped, 0);
    assert_eq!(summary.scored, summary.decoded, "{summary}");
    assert_eq!(frames, (0..summary.decoded).collect::<Vec<u64>>());
}

#[test]
fn caller_error_ends_run() {
    let bundle = bundle();
    let mut detector = Detector::new(&bundle, None).unwrap();
    let (alerts, _receiver) = alert::channel(1000);
    let options = RunOptions {
        queue_capacity: 1,
        ..RunOptions::default()
    };
    let mut source = clip();
    let error = run(
        source.as_mut(),
        &mut detector,
        &alerts,
        &options,
        &mut |o, _| {
            anyhow::ensure!(o.frame < 2, "output closed at frame {}", o.frame);
            Ok(())
        },
    )
    .unwrap_err();
    assert!(
        error.to_string().contains("output closed at frame 2"),
        "{error}"
    );
}
