//! Runtime configuration, read from TOML. Unknown keys are rejected with their name, so
//! a misspelt setting never silently falls back to its default.

use std::path::{Path, PathBuf};

use serde::Deserialize;

/// Error while reading a configuration file.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("failed to read config {path}: {source}")]
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
}

/// Decision settings.
#[derive(Debug, Clone, PartialEq, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct DetectorConfig {
    /// Replaces the bundle's calibrated threshold (in the unit of the bundle's score).
    pub threshold: Option<f64>,
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
}

impl Default for AlertConfig {
    fn default() -> Self {
        Self {
            capacity: 64,
            raise_after: 1,
            clear_after: 1,
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
    fn zero_capacity_is_rejected() {
        let err = parse("[alerts]\ncapacity = 0\n").unwrap_err();
        assert!(err.to_string().contains("alerts.capacity"), "{err}");
    }
}
