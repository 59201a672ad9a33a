//! Runtime configuration, read from TOML. Unknown keys are rejected with their name, so
//! a misspelt setting never silently falls back to its default.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::alert::AlertPolicy;
use crate::pipeline::{ExecutionMode, OverloadPolicy};

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
}

/// Decision settings.
#[derive(Debug, Clone, PartialEq, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct DetectorConfig {
    /// Replaces the bundle's calibrated threshold (in the unit of the bundle's score).
    pub threshold: Option<f64>,
    /// Where gather and flow run: `out-of-plan` (default) or `in-plan`, which needs a
    /// bundle with `plan.onnx`.
    pub execution: ExecutionMode,
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
}

impl Default for PipelineConfig {
    fn default() -> Self {
        Self {
            queue_capacity: 2,
            overload: None,
            deadline_ms: 200,
            watchdog_ms: 2000,
        }
    }
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
            message: e.message().to_owned(),
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
        if self.alerts.capacity == 0 {
            return Err(invalid("alerts.capacity", "0".into(), "use at least 1"));
        }
        if self.alerts.raise_after == 0 {
            return Err(invalid("alerts.raise_after", "0".into(), "use at least 1"));
        }
        if self.alerts.clear_after == 0 {
            return Err(invalid("alerts.clear_after", "0".into(), "use at least 1"));
        }
        if self.pipeline.queue_capacity == 0 {
            return Err(invalid(
                "pipeline.queue_capacity",
                "0".into(),
                "use at least 1",
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
    fn zero_capacity_is_rejected() {
        let err = parse("[alerts]\ncapacity = 0\n").unwrap_err();
        assert!(err.to_string().contains("alerts.capacity"), "{err}");
    }
}
