//! Outlier scores on the flow output `z`. Every score is higher for more anomalous input.
//!
//! - [`Hbos`], PyOD's histogram-based outlier score, as raw decision value or as DAAIN's
//!   published score, the squared `predict_proba` outlier probability.
//! - [`Flow::negative_log_likelihood`](crate::flow::Flow::negative_log_likelihood), the
//!   negative log-likelihood of the sampled activations.
//! - [`euclidean`], the norm `|z|`.
//! - [`Mahalanobis`], the squared Mahalanobis distance under a low-rank-plus-isotropic
//!   covariance fitted by the tools.

mod distance;
mod hbos;

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::flow::Flow;

pub use distance::{euclidean, Mahalanobis};
pub use hbos::{Hbos, PYOD_DEFAULT_ALPHA, PYOD_DEFAULT_N_BINS, PYOD_DEFAULT_TOL};

/// Errors from fitting, loading or evaluating a score.
#[derive(Debug, Error, PartialEq)]
pub enum ScoreError {
    #[error("score dimension {dim} is invalid: it must be at least 1")]
    InvalidDimension { dim: usize },
    #[error("no training rows: HBOS needs at least one row to fit")]
    NoTrainingRows,
    #[error(
        "training data has {actual} values, expected {expected} ({n_rows} rows x {dim} \
         features)"
    )]
    TrainingDataLength {
        n_rows: usize,
        dim: usize,
        expected: usize,
        actual: usize,
    },
    #[error("training value at row {row}, feature {feature} is not finite")]
    NonFiniteTraining { row: usize, feature: usize },
    #[error("HBOS bin count {n_bins} is invalid: it must be at least 2")]
    InvalidBins { n_bins: usize },
    #[error("HBOS alpha {alpha} is invalid: it must be finite and positive (PyOD default 0.1)")]
    InvalidAlpha { alpha: f64 },
    #[error("HBOS tol {tol} is invalid: it must be finite and not negative (PyOD default 0.5)")]
    InvalidTol { tol: f64 },
    #[error(
        "feature {feature} spans only {min}..{max}, so its f32 histogram edges coincide; \
         remove the feature or rescale it"
    )]
    DegenerateFeature { feature: usize, min: f64, max: f64 },
    #[error("`{part}` has {actual} values, expected {expected}")]
    PartLength {
        part: &'static str,
        expected: usize,
        actual: usize,
    },
    #[error("HBOS bin edges of feature {feature} are not finite and strictly increasing")]
    InvalidBinEdges { feature: usize },
    #[error("`{part}`[{index}] is not finite")]
    NonFinitePart { part: &'static str, index: usize },
    #[error("training decision range {min}..{max} is invalid: both must be finite, min <= max")]
    InvalidDecisionRange { min: f64, max: f64 },
    #[error("`{part}`[{index}] = {value} is invalid: a variance must be finite and positive")]
    InvalidVariance {
        part: &'static str,
        index: usize,
        value: f64,
    },
    #[error(
        "principal components {first} and {second} have dot product {dot}, so they are not \
         orthonormal; refit the Mahalanobis score"
    )]
    NotOrthonormal {
        first: usize,
        second: usize,
        dot: f64,
    },
    #[error("score input has {actual} values, expected {expected}")]
    LengthMismatch { expected: usize, actual: usize },
    #[error("score input value at index {index} is not finite (NaN or infinite)")]
    NonFinite { index: usize },
    #[error("log|det J| = {log_det} is not finite")]
    NonFiniteLogDet { log_det: f32 },
}

/// Score the detector compares with its alert threshold.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ScoreKind {
    /// Raw HBOS decision value, `-sum log2(density + alpha)`.
    Hbos,
    /// DAAIN's published score: HBOS `predict_proba` outlier probability, squared.
    HbosProbability,
    /// Negative log-likelihood of the sampled activations under the flow.
    NegativeLogLikelihood,
    /// `|z|`.
    Euclidean,
    /// Squared Mahalanobis distance of `z`.
    Mahalanobis,
}

impl ScoreKind {
    pub const ALL: [ScoreKind; 5] = [
        ScoreKind::Hbos,
        ScoreKind::HbosProbability,
        ScoreKind::NegativeLogLikelihood,
        ScoreKind::Euclidean,
        ScoreKind::Mahalanobis,
    ];

    /// Returns the kebab-case name used in configuration files.
    pub fn name(self) -> &'static str {
        match self {
            ScoreKind::Hbos => "hbos",
            ScoreKind::HbosProbability => "hbos-probability",
            ScoreKind::NegativeLogLikelihood => "negative-log-likelihood",
            ScoreKind::Euclidean => "euclidean",
            ScoreKind::Mahalanobis => "mahalanobis",
        }
    }
}

impl fmt::Display for ScoreKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Error for an unknown score name.
#[derive(Debug, Error, PartialEq)]
#[error(
    "unknown score `{0}`; expected one of hbos, hbos-probability, negative-log-likelihood, \
     euclidean, mahalanobis"
)]
pub struct UnknownScoreKind(pub String);

impl FromStr for ScoreKind {
    type Err = UnknownScoreKind;

    fn from_str(name: &str) -> Result<Self, Self::Err> {
        ScoreKind::ALL
            .into_iter()
            .find(|kind| kind.name() == name)
            .ok_or_else(|| UnknownScoreKind(name.to_string()))
    }
}

/// A score of one [`ScoreKind`] with the fitted model it needs.
#[derive(Debug, Clone)]
pub enum Scorer {
    Hbos(Hbos),
    HbosProbability(Hbos),
    NegativeLogLikelihood,
    Euclidean,
    Mahalanobis(Mahalanobis),
}

impl Scorer {
    pub fn kind(&self) -> ScoreKind {
        match self {
            Scorer::Hbos(_) => ScoreKind::Hbos,
            Scorer::HbosProbability(_) => ScoreKind::HbosProbability,
            Scorer::NegativeLogLikelihood => ScoreKind::NegativeLogLikelihood,
            Scorer::Euclidean => ScoreKind::Euclidean,
            Scorer::Mahalanobis(_) => ScoreKind::Mahalanobis,
        }
    }

    /// Scores one flow output `z` with its log|det J| (used only by the negative
    /// log-likelihood).
    pub fn score(&self, z: &[f32], log_det: f32) -> Result<f64, ScoreError> {
        if let Some(index) = z.iter().position(|v| !v.is_finite()) {
            return Err(ScoreError::NonFinite { index });
        }
        match self {
            Scorer::Hbos(hbos) => hbos.decision(z),
            Scorer::HbosProbability(hbos) => {
                let probability = hbos.probability(hbos.decision(z)?);
                Ok(probability * probability)
            }
            Scorer::NegativeLogLikelihood => {
                if !log_det.is_finite() {
                    return Err(ScoreError::NonFiniteLogDet { log_det });
                }
                Ok(Flow::negative_log_likelihood(z, log_det))
            }
            Scorer::Euclidean => Ok(euclidean(z)),
            Scorer::Mahalanobis(mahalanobis) => mahalanobis.score(z),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn score_kind_names_round_trip() {
        for kind in ScoreKind::ALL {
            let json = serde_json::to_string(&kind).unwrap();
            assert_eq!(json, format!("\"{kind}\""));
            assert_eq!(serde_json::from_str::<ScoreKind>(&json).unwrap(), kind);
            assert_eq!(kind.to_string().parse::<ScoreKind>().unwrap(), kind);
        }
        assert_eq!(ScoreKind::HbosProbability.to_string(), "hbos-probability");
        assert_eq!(
            "hbos_probability".parse::<ScoreKind>().unwrap_err(),
            UnknownScoreKind("hbos_probability".into())
        );
    }

    #[test]
    fn scorer_computes_each_kind() {
        let z = [3.0f32, 4.0];
        assert_eq!(Scorer::Euclidean.score(&z, 0.0).unwrap(), 5.0);
        let nll = Scorer::NegativeLogLikelihood.score(&z, 1.5).unwrap();
        let expected = 12.5 + (2.0 * std::f64::consts::PI).ln() - 1.5;
        assert!((nll - expected).abs() < 1e-12, "{nll} != {expected}");
        assert_eq!(
            Scorer::NegativeLogLikelihood
                .score(&z, f32::INFINITY)
                .unwrap_err(),
            ScoreError::NonFiniteLogDet {
                log_det: f32::INFINITY
            }
        );
        let mahalanobis = Mahalanobis::new(vec![0.0, 0.0], Vec::new(), Vec::new(), 25.0).unwrap();
        assert_eq!(
            Scorer::Mahalanobis(mahalanobis).score(&z, 0.0).unwrap(),
            1.0
        );
        assert_eq!(
            Scorer::Euclidean.score(&[f32::NAN, 0.0], 0.0),
            Err(ScoreError::NonFinite { index: 0 })
        );
    }
}
