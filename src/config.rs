//! Runtime configuration, read from TOML. Unknown keys are rejected with their name, so
//! a misspelt setting never silently falls back to its default.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::alert::AlertPolicy;
use crate::backbone::BackbonePrecision;
use crate::pipeline::{ExecutionMode, OverloadPolicy};
use crate::source::Backoff;

/// Maximum `alerts.capacity`. The alert channel allocates every slot when it is created,
/// so a larger value would only risk running out of memory at start.
pub const MAX_ALERT_CAPACITY: usize = 65_536;

/// Maximum `pipeline.queue_capacity`. The frame queue allocates every slot when it is
/// created, and every queued frame adds a frame period of latency.
pub const MAX_QUEUE_CAPACITY: usize = 1024;

/// Error while reading a configuration file.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("failed to read config {path}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("invalid config {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("invalid config {path}: `{key}` = {value} is invalid: {reason}")]
    Value {
        path: PathBuf,
        key: &'static str,
        value: String,
        reason: &'static str,
    },
}

/// Settings of the detection run. Every field has a default, so an empty file is valid.
#[derive(Debug, Clone, PartialEq, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Bundle directory; the `--bundle` option takes precedence.
    pub bundle: Option<PathBuf>,
    pub detector: DetectorConfig,
    pub alerts: AlertConfig,
    pub pipeline: PipelineConfig,
    pub camera: CameraConfig,
}

/// Decision and backbone settings.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DetectorConfig {
    /// Replaces the bundle's calibrated threshold (in the unit of the bundle's score).
    pub threshold: Option<f64>,
    /// Backbone model of the bundle to run. `int8` needs a bundle with a
    /// quantised backbone.
    pub backbone: BackbonePrecision,
    /// Threads that run the backbone: tract's pool, on which the plan, its matrix
    /// multiplications, the rewritten operators and the preprocessing split their work.
    pub threads: usize,
    /// Placement of gather and flow: `out-of-plan` (default) or `in-plan`, which needs a
    /// bundle with `plan.onnx`.
    pub execution: ExecutionMode,
}

impl Default for DetectorConfig {
    fn default() -> Self {
        Self {
            threshold: None,
            backbone: BackbonePrecision::F32,
            threads: 1,
            execution: ExecutionMode::OutOfPlan,
        }
    }
}

/// Alert channel settings.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AlertConfig {
    /// Capacity of the bounded alert channel, in alerts.
    pub capacity: usize,
    /// Consecutive frames above the threshold before the level rises to WARN.
    pub raise_after: u32,
    /// Consecutive frames below the threshold before the level falls back to OK.
    pub clear_after: u32,
    /// Policy that decides which alert is lost when the channel is full.
    pub policy: AlertPolicy,
}

impl Default for AlertConfig {
    fn default() -> Self {
        Self {
            capacity: 64,
            raise_after: 1,
            clear_after: 1,
            policy: AlertPolicy::DropNewest,
        }
    }
}

/// Settings of the threaded frame loop.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PipelineConfig {
    /// Capacity of the queue between the decode and the detection thread, in frames.
    pub queue_capacity: usize,
    /// Overload policy of the frame queue. `None` picks `block`
    /// for video files and still images replayed as fast as possible, and `drop-oldest`
    /// for cameras and `--realtime` replay.
    pub overload: Option<OverloadPolicy>,
    /// Per-frame deadline from delivery by the source to the score, in milliseconds.
    pub deadline_ms: u64,
    /// Time without a frame leaving the detector after which the level turns STALE, in
    /// milliseconds.
    pub watchdog_ms: u64,
    /// Source errors in a row (damaged frames or images) after which the run ends.
    pub source_error_limit: u32,
}

impl Default for PipelineConfig {
    fn default() -> Self {
        Self {
            queue_capacity: 2,
            overload: None,
            deadline_ms: 200,
            watchdog_ms: 2000,
            source_error_limit: 10,
        }
    }
}

/// V4L2 camera settings.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CameraConfig {
    /// Reopen the camera when it disappears during a run.
    pub reconnect: bool,
    /// Delay before the first reopen attempt, in milliseconds; it doubles after each
    /// failed attempt.
    pub reconnect_initial_ms: u64,
    /// Maximum delay between reopen attempts, in milliseconds.
    pub reconnect_max_ms: u64,
    /// Failed reopen attempts in a row after which the run ends with an error. Unset:
    /// retry until the run is stopped.
    pub reconnect_attempts: Option<u32>,
}

impl Default for CameraConfig {
    fn default() -> Self {
        Self {
            reconnect: true,
            reconnect_initial_ms: 100,
            reconnect_max_ms: 5000,
            reconnect_attempts: None,
        }
    }
}

impl CameraConfig {
    /// Returns the backoff these settings describe.
    pub fn backoff(&self) -> Backoff {
        Backoff {
            initial: Duration::from_millis(self.reconnect_initial_ms),
            max: Duration::from_millis(self.reconnect_max_ms),
            factor: 2.0,
            max_attempts: self.reconnect_attempts,
        }
    }
}

/// Formats a TOML error with the line it points at. serde's message alone does not name
/// the key when a value does not fit its type (for example a count too large for a 32-bit
/// `usize` on armv7), so the line shows it.
fn parse_message(error: &toml::de::Error, text: &str) -> String {
    let Some(span) = error.span() else {
        return error.message().to_owned();
    };
    let start = span.start.min(text.len());
    let line = text[..start].matches('\n').count() + 1;
    let line_text = text.lines().nth(line - 1).unwrap_or("").trim();
    format!("line {line} (`{line_text}`): {}", error.message())
}

impl Config {
    /// Reads and validates a TOML configuration file.
    pub fn from_path(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::from_toml(&text, path)
    }

    /// Parses and validates TOML text; `path` is used in error messages only.
    pub fn from_toml(text: &str, path: &Path) -> Result<Self, ConfigError> {
        let config: Config = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_owned(),
            message: parse_message(&e, text),
        })?;
        config.validate(path)?;
        Ok(config)
    }

    fn validate(&self, path: &Path) -> Result<(), ConfigError> {
        let invalid = |key, value: String, reason| ConfigError::Value {
            path: path.to_owned(),
            key,
            value,
            reason,
        };
        if let Some(threshold) = self.detector.threshold {
            if !threshold.is_finite() {
                return Err(invalid(
                    "detector.threshold",
                    threshold.to_string(),
                    "use a finite number",
                ));
            }
        }
        if self.detector.threads == 0 {
            return Err(invalid(
                "detector.threads",
                "0".into(),
                "use at least 1 (1 runs the backbone on the detection thread alone)",
            ));
        }
        if !(1..=MAX_ALERT_CAPACITY).contains(&self.alerts.capacity) {
            return Err(invalid(
                "alerts.capacity",
                self.alerts.capacity.to_string(),
                "use a value from 1 to 65536",
            ));
        }
        if self.alerts.raise_after == 0 {
            return Err(invalid("alerts.raise_after", "0".into(), "use at least 1"));
        }
        if self.alerts.clear_after == 0 {
            return Err(invalid("alerts.clear_after", "0".into(), "use at least 1"));
        }
        if !(1..=MAX_QUEUE_CAPACITY).contains(&self.pipeline.queue_capacity) {
            return Err(invalid(
                "pipeline.queue_capacity",
                self.pipeline.queue_capacity.to_string(),
                "use a value from 1 to 1024",
            ));
        }
        if self.pipeline.deadline_ms == 0 {
            return Err(invalid(
                "pipeline.deadline_ms",
                "0".into(),
                "use at least 1",
            ));
        }
        if self.pipeline.watchdog_ms == 0 {
            return Err(invalid(
                "pipeline.watchdog_ms",
                "0".into(),
                "use at least 1",
            ));
        }
        if self.pipeline.source_error_limit == 0 {
            return Err(invalid(
                "pipeline.source_error_limit",
                "0".into(),
                "use at least 1 (1 ends the run at the first source error)",
            ));
        }
        if self.camera.reconnect_initial_ms == 0 {
            return Err(invalid(
                "camera.reconnect_initial_ms",
                "0".into(),
                "use at least 1, so a camera that is gone is not polled in a busy loop",
            ));
        }
        if self.camera.reconnect_max_ms < self.camera.reconnect_initial_ms {
            return Err(invalid(
                "camera.reconnect_max_ms",
                self.camera.reconnect_max_ms.to_string(),
                "use at least camera.reconnect_initial_ms",
            ));
        }
        if self.camera.reconnect_attempts == Some(0) {
            return Err(invalid(
                "camera.reconnect_attempts",
                "0".into(),
                "use at least 1, or remove the key to retry until stopped",
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::from_toml(text, Path::new("test.toml"))
    }

    #[test]
    fn empty_config_gives_defaults() {
        assert_eq!(parse("").unwrap(), Config::default());
    }

    #[test]
    fn threshold_override_is_read() {
        let config = parse("[detector]\nthreshold = 12.5\n").unwrap();
        assert_eq!(config.detector.threshold, Some(12.5));
    }

    #[test]
    fn unknown_key_is_named() {
        let err = parse("[detector]\nthreshhold = 1.0\n").unwrap_err();
        let message = err.to_string();
        assert!(message.contains("threshhold"), "{message}");
        assert!(message.contains("test.toml"), "{message}");
    }

    #[test]
    fn policies_are_read() {
        let config = parse(
            "[alerts]\npolicy = \"drop-oldest\"\n\
             [pipeline]\noverload = \"block\"\ndeadline_ms = 50\nwatchdog_ms = 500\n",
        )
        .unwrap();
        assert_eq!(config.alerts.policy, AlertPolicy::DropOldest);
        assert_eq!(config.pipeline.overload, Some(OverloadPolicy::Block));
        assert_eq!(config.pipeline.deadline_ms, 50);
        assert_eq!(config.pipeline.watchdog_ms, 500);
    }

    #[test]
    fn unknown_policy_is_named() {
        let err = parse("[pipeline]\noverload = \"drop-newest\"\n").unwrap_err();
        let message = err.to_string();
        assert!(message.contains("drop-newest"), "{message}");
        assert!(message.contains("drop-oldest"), "{message}");
    }

    #[test]
    fn zero_watchdog_is_rejected() {
        let err = parse("[pipeline]\nwatchdog_ms = 0\n").unwrap_err();
        assert!(err.to_string().contains("pipeline.watchdog_ms"), "{err}");
    }

    #[test]
    fn shipped_config_lists_defaults() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("configs/default.toml");
        assert_eq!(Config::from_path(&path).unwrap(), Config::default());
    }

    #[test]
    fn camera_settings_are_read() {
        let config = parse(
            "[camera]\nreconnect = false\nreconnect_initial_ms = 50\n\
             reconnect_max_ms = 800\nreconnect_attempts = 4\n",
        )
        .unwrap();
        assert!(!config.camera.reconnect);
        let backoff = config.camera.backoff();
        assert_eq!(backoff.initial, Duration::from_millis(50));
        assert_eq!(backoff.max, Duration::from_millis(800));
        assert_eq!(backoff.max_attempts, Some(4));
    }

    #[test]
    fn reconnect_max_below_initial_is_rejected() {
        let err =
            parse("[camera]\nreconnect_initial_ms = 500\nreconnect_max_ms = 100\n").unwrap_err();
        let message = err.to_string();
        assert!(message.contains("camera.reconnect_max_ms"), "{message}");
        assert!(message.contains("100"), "{message}");
    }

    #[test]
    fn zero_source_error_limit_is_rejected() {
        let err = parse("[pipeline]\nsource_error_limit = 0\n").unwrap_err();
        assert!(
            err.to_string().contains("pipeline.source_error_limit"),
            "{err}"
        );
    }

    #[test]
    fn huge_capacities_are_rejected() {
        let err = parse("[alerts]\ncapacity = 1000000000000\n").unwrap_err();
        // With a 64-bit usize the value parses and validation names the whole key. With a
        // 32-bit one (armv7) it does not fit, and the parse error shows its line.
        let key = if cfg!(target_pointer_width = "64") {
            "alerts.capacity"
        } else {
            "capacity = 1000000000000"
        };
        assert!(err.to_string().contains(key), "{err}");
        assert!(err.to_string().contains("1000000000000"), "{err}");
        let err = parse("[pipeline]\nqueue_capacity = 4096\n").unwrap_err();
        assert!(err.to_string().contains("pipeline.queue_capacity"), "{err}");
    }

    #[test]
    fn mistyped_value_names_its_line() {
        let err = parse("[alerts]\ncapacity = \"ten\"\n").unwrap_err();
        let message = err.to_string();
        assert!(message.contains("line 2"), "{message}");
        assert!(message.contains("capacity = \"ten\""), "{message}");
    }

    #[test]
    fn backbone_precision_and_threads_are_read() {
        let config = parse("[detector]\nbackbone = \"int8\"\nthreads = 2\n").unwrap();
        assert_eq!(config.detector.backbone, BackbonePrecision::Int8);
        assert_eq!(config.detector.threads, 2);
    }

    #[test]
    fn unknown_precision_is_named() {
        let err = parse("[detector]\nbackbone = \"fp16\"\n").unwrap_err();
        let message = err.to_string();
        assert!(message.contains("fp16"), "{message}");
        assert!(message.contains("int8"), "{message}");
    }

    #[test]
    fn zero_threads_are_rejected() {
        let err = parse("[detector]\nthreads = 0\n").unwrap_err();
        assert!(err.to_string().contains("detector.threads"), "{err}");
    }

    #[test]
    fn zero_capacity_is_rejected() {
        let err = parse("[alerts]\ncapacity = 0\n").unwrap_err();
        assert!(err.to_string().contains("alerts.capacity"), "{err}");
    }
}
