//! Alerts: levels with hysteresis, and the bounded channel that carries them.
//!
//! The detector never blocks on a slow consumer: alerts go through a bounded
//! `crossbeam-channel`, and when it is full the alert is not queued but counted in
//! [`AlertSender::dropped`] and logged (the first time, then every 100th), so a stalled
//! consumer shows up in the counters instead of stalling the frame loop.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crossbeam_channel::{Receiver, Sender, TrySendError};
use serde::Serialize;

/// Severity of the detector's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum AlertLevel {
    /// Input looks like the training data.
    Ok,
    /// Scores above the threshold: the input is anomalous or adversarial.
    Warn,
    /// A frame could not be scored (bad input, non-finite activations).
    Error,
    /// No frame was scored within the deadline.
    Stale,
}

impl std::fmt::Display for AlertLevel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let name = match self {
            AlertLevel::Ok => "OK",
            AlertLevel::Warn => "WARN",
            AlertLevel::Error => "ERROR",
            AlertLevel::Stale => "STALE",
        };
        f.write_str(name)
    }
}

/// One alert as delivered to consumers.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Alert {
    /// 0-based frame index in the source.
    pub frame: u64,
    /// Presentation time of the frame since the start of the source.
    pub timestamp: Duration,
    pub score: f64,
    pub threshold: f64,
    pub level: AlertLevel,
    /// Cause of an ERROR alert; empty otherwise.
    pub message: String,
}

/// Level tracking with hysteresis: the level rises to WARN after `raise_after`
/// consecutive anomalous frames and falls back to OK after `clear_after` consecutive
/// normal ones, so a single noisy frame does not make the level flap.
#[derive(Debug, Clone)]
pub struct LevelTracker {
    raise_after: u32,
    clear_after: u32,
    level: AlertLevel,
    run: u32,
}

impl LevelTracker {
    pub fn new(raise_after: u32, clear_after: u32) -> Self {
        Self {
            raise_after: raise_after.max(1),
            clear_after: clear_after.max(1),
            level: AlertLevel::Ok,
            run: 0,
        }
    }

    pub fn level(&self) -> AlertLevel {
        self.level
    }

    /// Updates the level with one frame's decision and returns the new level.
    pub fn update(&mut self, anomalous: bool) -> AlertLevel {
        let rising = self.level == AlertLevel::Ok;
        if anomalous == rising {
            self.run += 1;
        } else {
            self.run = 0;
        }
        if rising && self.run >= self.raise_after {
            self.level = AlertLevel::Warn;
            self.run = 0;
        } else if !rising && self.run >= self.clear_after {
            self.level = AlertLevel::Ok;
            self.run = 0;
        }
        self.level
    }

    /// Records a frame that could not be scored.
    pub fn fail(&mut self) -> AlertLevel {
        self.level = AlertLevel::Error;
        self.run = 0;
        self.level
    }
}

/// Sending half of the alert channel, with a count of alerts the full channel rejected.
#[derive(Debug, Clone)]
pub struct AlertSender {
    sender: Sender<Alert>,
    dropped: Arc<AtomicU64>,
}

/// Creates a bounded alert channel holding at most `capacity` alerts.
pub fn channel(capacity: usize) -> (AlertSender, Receiver<Alert>) {
    let (sender, receiver) = crossbeam_channel::bounded(capacity.max(1));
    (
        AlertSender {
            sender,
            dropped: Arc::new(AtomicU64::new(0)),
        },
        receiver,
    )
}

impl AlertSender {
    /// Queues an alert without blocking. Returns `false` when the channel was full or
    /// closed; the alert is then counted in [`AlertSender::dropped`].
    pub fn send(&self, alert: Alert) -> bool {
        match self.sender.try_send(alert) {
            Ok(()) => true,
            Err(TrySendError::Full(alert)) | Err(TrySendError::Disconnected(alert)) => {
                let dropped = self.dropped.fetch_add(1, Ordering::Relaxed) + 1;
                if dropped == 1 || dropped % 100 == 0 {
                    log::warn!(
                        "alert channel full or closed: alert for frame {} ({}) not delivered, \
                         {dropped} undelivered so far",
                        alert.frame,
                        alert.level
                    );
                }
                false
            }
        }
    }

    /// Returns the number of alerts that could not be queued.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn alert(frame: u64) -> Alert {
        Alert {
            frame,
            timestamp: Duration::ZERO,
            score: 1.0,
            threshold: 0.5,
            level: AlertLevel::Warn,
            message: String::new(),
        }
    }

    #[test]
    fn tracker_needs_consecutive_frames() {
        let mut tracker = LevelTracker::new(2, 3);
        assert_eq!(tracker.update(true), AlertLevel::Ok);
        assert_eq!(tracker.update(false), AlertLevel::Ok);
        assert_eq!(tracker.update(true), AlertLevel::Ok);
        assert_eq!(tracker.update(true), AlertLevel::Warn);
        assert_eq!(tracker.update(false), AlertLevel::Warn);
        assert_eq!(tracker.update(false), AlertLevel::Warn);
        assert_eq!(tracker.update(false), AlertLevel::Ok);
    }

    #[test]
    fn full_channel_counts_dropped_alerts() {
        let (sender, receiver) = channel(2);
        assert!(sender.send(alert(0)));
        assert!(sender.send(alert(1)));
        assert!(!sender.send(alert(2)));
        assert_eq!(sender.dropped(), 1);
        assert_eq!(receiver.try_recv().unwrap().frame, 0);
        assert!(sender.send(alert(3)));
        assert_eq!(sender.dropped(), 1);
    }

    #[test]
    fn level_serialises_uppercase() {
        assert_eq!(
            serde_json::to_string(&AlertLevel::Stale).unwrap(),
            "\"STALE\""
        );
    }
}
