//! Alerts: levels with hysteresis, and the bounded channel that carries them.
//!
//! The detector never blocks on a slow consumer: alerts go through a bounded
//! `crossbeam-channel`, and when it is full the [`AlertPolicy`] decides which alert is
//! lost. Either way the lost alert is counted in [`AlertSender::dropped`] and logged (the
//! first time, then every 100th), so a stalled consumer shows up in the counters instead
//! of stalling the frame loop.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crossbeam_channel::{Receiver, Sender, TrySendError};
use serde::{Deserialize, Serialize};

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

/// Which alert is lost when the alert channel is full. The sender never waits for the
/// consumer under either policy.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum AlertPolicy {
    /// Keep the queued alerts and reject the new one.
    #[default]
    DropNewest,
    /// Evict the oldest queued alert to make room for the new one, so the consumer gets
    /// the latest state when it catches up.
    DropOldest,
}

impl std::fmt::Display for AlertPolicy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            AlertPolicy::DropNewest => "drop-newest",
            AlertPolicy::DropOldest => "drop-oldest",
        })
    }
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
    /// Level before the tracker went STALE, restored by [`LevelTracker::resume`].
    before_stale: AlertLevel,
}

impl LevelTracker {
    pub fn new(raise_after: u32, clear_after: u32) -> Self {
        Self {
            raise_after: raise_after.max(1),
            clear_after: clear_after.max(1),
            level: AlertLevel::Ok,
            run: 0,
            before_stale: AlertLevel::Ok,
        }
    }

    pub fn level(&self) -> AlertLevel {
        self.level
    }

    /// Updates the level with one frame's decision and returns the new level. A STALE
    /// tracker first returns to its level before the stall.
    pub fn update(&mut self, anomalous: bool) -> AlertLevel {
        self.resume();
        if self.level == AlertLevel::Error {
            // The failure carries no information about the input, so the first scored frame after
            // it sets the level directly instead of counting towards hysteresis.
            self.level = if anomalous { AlertLevel::Warn } else { AlertLevel::Ok };
            self.run = 0;
            return self.level;
        }
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

    /// Records a stall: no frame arrived within the watchdog period. Returns `true` when
    /// the level changed to STALE and `false` when it already was STALE, so a stall is
    /// reported once however long it lasts.
    pub fn stall(&mut self) -> bool {
        if self.level == AlertLevel::Stale {
            return false;
        }
        self.before_stale = self.level;
        self.level = AlertLevel::Stale;
        true
    }

    /// Ends a stall: restores the level from before it and returns that level, or returns
    /// `None` when the tracker was not STALE. The hysteresis count starts again.
    pub fn resume(&mut self) -> Option<AlertLevel> {
        if self.level != AlertLevel::Stale {
            return None;
        }
        self.level = self.before_stale;
        self.run = 0;
        Some(self.level)
    }
}

/// Returns whether a frame whose level went from `previous` to `current` sends an alert:
/// every frame whose level is not OK does, and so does the frame on which it returns to
/// OK.
pub fn alert_due(previous: AlertLevel, current: AlertLevel) -> bool {
    current != AlertLevel::Ok || previous != AlertLevel::Ok
}

/// Sending half of the alert channel, with counts of the alerts passed to it and of
/// those lost because the channel was full or closed.
#[derive(Debug, Clone)]
pub struct AlertSender {
    sender: Sender<Alert>,
    /// A second receiving end, used only to evict the oldest alert under
    /// [`AlertPolicy::DropOldest`].
    evictor: Option<Receiver<Alert>>,
    sent: Arc<AtomicU64>,
    dropped: Arc<AtomicU64>,
}

/// Creates a bounded alert channel holding at most `capacity` alerts, which rejects new
/// alerts when full ([`AlertPolicy::DropNewest`]).
pub fn channel(capacity: usize) -> (AlertSender, Receiver<Alert>) {
    channel_with_policy(capacity, AlertPolicy::DropNewest)
}

/// Creates a bounded alert channel holding at most `capacity` alerts, with `policy`
/// deciding which alert is lost when it is full.
pub fn channel_with_policy(capacity: usize, policy: AlertPolicy) -> (AlertSender, Receiver<Alert>) {
    let (sender, receiver) = crossbeam_channel::bounded(capacity.max(1));
    let evictor = (policy == AlertPolicy::DropOldest).then(|| receiver.clone());
    (
        AlertSender {
            sender,
            evictor,
            sent: Arc::new(AtomicU64::new(0)),
            dropped: Arc::new(AtomicU64::new(0)),
        },
        receiver,
    )
}

impl AlertSender {
    /// Queues an alert without blocking. Returns `false` when an alert was lost: the new
    /// one under [`AlertPolicy::DropNewest`] or when the consumer is gone, the oldest
    /// queued one under [`AlertPolicy::DropOldest`]. A lost alert is counted in
    /// [`AlertSender::dropped`].
    pub fn send(&self, alert: Alert) -> bool {
        self.sent.fetch_add(1, Ordering::Relaxed);
        let mut alert = alert;
        // Under drop-oldest the consumer may empty the channel between the failed send
        // and the eviction, so the eviction finds nothing and the send is retried. The
        // retries are bounded so that the sender never spins.
        for _ in 0..4 {
            match self.sender.try_send(alert) {
                Ok(()) => return true,
                Err(TrySendError::Full(back)) => match &self.evictor {
                    Some(evictor) => {
                        if let Ok(oldest) = evictor.try_recv() {
                            self.count_lost(&oldest);
                            self.queue_after_eviction(back);
                            return false;
                        }
                        alert = back;
                    }
                    None => {
                        self.count_lost(&back);
                        return false;
                    }
                },
                Err(TrySendError::Disconnected(back)) => {
                    self.count_lost(&back);
                    return false;
                }
            }
        }
        self.count_lost(&alert);
        false
    }

    /// Queues `alert` into the room an eviction made. Another clone of this sender may
    /// have taken that room, in which case `alert` is lost too.
    fn queue_after_eviction(&self, alert: Alert) {
        if let Err(TrySendError::Full(lost) | TrySendError::Disconnected(lost)) =
            self.sender.try_send(alert)
        {
            self.count_lost(&lost);
        }
    }

    fn count_lost(&self, alert: &Alert) {
        let dropped = self.dropped.fetch_add(1, Ordering::Relaxed) + 1;
        if dropped == 1 || dropped.is_multiple_of(100) {
            log::warn!(
                "alert channel full or closed: alert for frame {} ({}) not delivered, \
                 {dropped} undelivered so far",
                alert.frame,
                alert.level
            );
        }
    }

    /// Returns the number of alerts passed to [`AlertSender::send`], delivered or not.
    pub fn sent(&self) -> u64 {
        self.sent.load(Ordering::Relaxed)
    }

    /// Returns the number of alerts lost because the channel was full or closed.
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
    fn scored_frame_after_failure_sets_level() {
        let mut tracker = LevelTracker::new(3, 3);
        assert_eq!(tracker.fail(), AlertLevel::Error);
        assert_eq!(tracker.update(true), AlertLevel::Warn);
        assert_eq!(tracker.fail(), AlertLevel::Error);
        assert_eq!(tracker.update(false), AlertLevel::Ok);
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
    fn drop_oldest_keeps_latest_alerts() {
        let (sender, receiver) = channel_with_policy(2, AlertPolicy::DropOldest);
        for frame in 0..5 {
            sender.send(alert(frame));
        }
        assert_eq!(sender.sent(), 5);
        assert_eq!(sender.dropped(), 3);
        let queued: Vec<u64> = receiver.try_iter().map(|a| a.frame).collect();
        assert_eq!(queued, vec![3, 4]);
    }

    #[test]
    fn drop_newest_keeps_first_alerts() {
        let (sender, receiver) = channel_with_policy(2, AlertPolicy::DropNewest);
        for frame in 0..5 {
            sender.send(alert(frame));
        }
        assert_eq!(sender.sent(), 5);
        assert_eq!(sender.dropped(), 3);
        let queued: Vec<u64> = receiver.try_iter().map(|a| a.frame).collect();
        assert_eq!(queued, vec![0, 1]);
    }

    #[test]
    fn stall_reports_once_and_resumes() {
        let mut tracker = LevelTracker::new(1, 2);
        assert_eq!(tracker.update(true), AlertLevel::Warn);
        assert!(tracker.stall());
        assert!(!tracker.stall());
        assert_eq!(tracker.level(), AlertLevel::Stale);
        assert_eq!(tracker.resume(), Some(AlertLevel::Warn));
        assert_eq!(tracker.resume(), None);
        assert!(tracker.stall());
        // A frame during a stall ends it before it counts.
        assert_eq!(tracker.update(false), AlertLevel::Warn);
        assert_eq!(tracker.update(false), AlertLevel::Ok);
    }

    #[test]
    fn level_serialises_uppercase() {
        assert_eq!(
            serde_json::to_string(&AlertLevel::Stale).unwrap(),
            "\"STALE\""
        );
    }
}
