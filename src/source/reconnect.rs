//! Reopens a live source that disappears, with exponential backoff.
//!
//! A USB or GMSL camera can drop off the bus (loose connector, power glitch, driver
//! reset) and come back seconds later under the same path. [`Reconnecting`] wraps the
//! function that opens the source: when a read fails because the device is gone, it
//! drops the source, waits, reopens it with growing delays, and continues the stream.
//! Timestamps stay monotonic across the gap, and the frame loop's watchdog raises STALE
//! while no frame arrives.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::{Frame, FrameSource, SourceError};

/// Delays between reconnection attempts: `initial`, then multiplied by `factor` after
/// each failure, capped at `max`.
#[derive(Debug, Clone, PartialEq)]
pub struct Backoff {
    pub initial: Duration,
    pub max: Duration,
    pub factor: f64,
    /// Failed attempts in a row after which the source gives up, or `None` to retry until
    /// a stop is requested.
    pub max_attempts: Option<u32>,
}

impl Default for Backoff {
    fn default() -> Self {
        Self {
            initial: Duration::from_millis(100),
            max: Duration::from_secs(5),
            factor: 2.0,
            max_attempts: None,
        }
    }
}

impl Backoff {
    /// Returns the delay before attempt `attempt` (1-based) of a reconnection.
    pub fn delay(&self, attempt: u32) -> Duration {
        let exponent = attempt.saturating_sub(1).min(64) as i32;
        let seconds = self.initial.as_secs_f64() * self.factor.max(1.0).powi(exponent);
        Duration::from_secs_f64(seconds.min(self.max.as_secs_f64()))
    }
}

/// Counts of a [`Reconnecting`] source. Every clone of the `Arc` reads the same counters.
#[derive(Debug, Default)]
pub struct ReconnectStats {
    lost: std::sync::atomic::AtomicU64,
    reconnected: std::sync::atomic::AtomicU64,
    failed_attempts: std::sync::atomic::AtomicU64,
}

impl ReconnectStats {
    /// Times the device was found gone.
    pub fn lost(&self) -> u64 {
        self.lost.load(Ordering::Relaxed)
    }

    /// Times it was opened again.
    pub fn reconnected(&self) -> u64 {
        self.reconnected.load(Ordering::Relaxed)
    }

    /// Reopen attempts that failed.
    pub fn failed_attempts(&self) -> u64 {
        self.failed_attempts.load(Ordering::Relaxed)
    }
}

/// Function that opens (or reopens) the wrapped source.
pub type OpenFn<S> = Box<dyn FnMut() -> Result<S, SourceError> + Send>;

/// A source that reopens itself with [`Backoff`] when its device disappears.
///
/// Only errors for which [`SourceError::is_device_lost`] returns true start a reconnection.
/// Other errors, such as one damaged frame, pass through to the caller unchanged.
pub struct Reconnecting<S> {
    open: OpenFn<S>,
    source: Option<S>,
    backoff: Backoff,
    stop: Arc<AtomicBool>,
    stats: Arc<ReconnectStats>,
    description: String,
    frame_rate: Option<f64>,
    /// Frames delivered so far; the next frame gets this index.
    next_index: u64,
    /// Added to the wrapped source's timestamps, which restart at zero after a reopen.
    timestamp_offset: Duration,
    last_timestamp: Duration,
    /// When the device was found gone; the gap is added to the timestamp offset.
    lost_at: Option<Instant>,
}

impl<S: FrameSource> Reconnecting<S> {
    /// Opens the source once with `open` and fails as `open` does: a device that is
    /// missing at start is a configuration error, not a disconnection.
    pub fn open(
        mut open: OpenFn<S>,
        backoff: Backoff,
        stop: Arc<AtomicBool>,
    ) -> Result<Self, SourceError> {
        let source = open()?;
        Ok(Self {
            description: source.describe(),
            frame_rate: source.nominal_frame_rate(),
            open,
            source: Some(source),
            backoff,
            stop,
            stats: Arc::new(ReconnectStats::default()),
            next_index: 0,
            timestamp_offset: Duration::ZERO,
            last_timestamp: Duration::ZERO,
            lost_at: None,
        })
    }

    /// Returns the counters, which stay readable after the source moved to another thread.
    pub fn stats(&self) -> Arc<ReconnectStats> {
        Arc::clone(&self.stats)
    }

    /// Reopens the source, sleeping between attempts. Returns `Ok(false)` when a stop was
    /// requested while waiting.
    fn reconnect(&mut self) -> Result<bool, SourceError> {
        let mut attempt = 0u32;
        loop {
            attempt += 1;
            if !self.sleep(self.backoff.delay(attempt)) {
                return Ok(false);
            }
            match (self.open)() {
                Ok(source) => {
                    log::info!("{}: reopened after {attempt} attempt(s)", self.description);
                    self.stats.reconnected.fetch_add(1, Ordering::Relaxed);
                    self.source = Some(source);
                    return Ok(true);
                }
                Err(error) => {
                    self.stats.failed_attempts.fetch_add(1, Ordering::Relaxed);
                    if self
                        .backoff
                        .max_attempts
                        .is_some_and(|limit| attempt >= limit)
                    {
                        log::error!(
                            "{}: giving up after {attempt} reopen attempts",
                            self.description
                        );
                        return Err(SourceError::ReconnectFailed {
                            description: self.description.clone(),
                            attempts: attempt,
                            source: Box::new(error),
                        });
                    }
                    // Attempt 1, 2, 4, 8, ... are logged, so a long outage does not
                    // flood the log.
                    if attempt.is_power_of_two() {
                        log::warn!(
                            "{}: reopen attempt {attempt} failed: {error}; retrying in {:?}",
                            self.description,
                            self.backoff.delay(attempt + 1)
                        );
                    }
                }
            }
        }
    }

    /// Sleeps for `duration` in short steps; returns `false` when a stop was requested.
    fn sleep(&self, duration: Duration) -> bool {
        const STEP: Duration = Duration::from_millis(20);
        let until = Instant::now() + duration;
        loop {
            if self.stop.load(Ordering::SeqCst) {
                return false;
            }
            let now = Instant::now();
            if now >= until {
                return true;
            }
            std::thread::sleep((until - now).min(STEP));
        }
    }
}

impl<S: FrameSource> FrameSource for Reconnecting<S> {
    fn next_frame(&mut self, frame: &mut Frame) -> Result<bool, SourceError> {
        loop {
            let Some(source) = self.source.as_mut() else {
                if !self.reconnect()? {
                    return Ok(false);
                }
                if let Some(lost_at) = self.lost_at.take() {
                    // The reopened source counts from zero again: continue after the last
                    // timestamp, plus the time the device was away.
                    self.timestamp_offset = self.last_timestamp + lost_at.elapsed();
                }
                continue;
            };
            match source.next_frame(frame) {
                Ok(true) => {
                    frame.index = self.next_index;
                    frame.timestamp += self.timestamp_offset;
                    self.next_index += 1;
                    self.last_timestamp = frame.timestamp;
                    return Ok(true);
                }
                Ok(false) => return Ok(false),
                Err(error) if error.is_device_lost() => {
                    log::warn!(
                        "{}: device lost after {} frames: {error}; reconnecting",
                        self.description,
                        self.next_index
                    );
                    self.stats.lost.fetch_add(1, Ordering::Relaxed);
                    self.source = None;
                    self.lost_at = Some(Instant::now());
                }
                Err(error) => return Err(error),
            }
        }
    }

    fn describe(&self) -> String {
        format!("{} (reconnecting)", self.description)
    }

    fn nominal_frame_rate(&self) -> Option<f64> {
        self.frame_rate
    }
}
