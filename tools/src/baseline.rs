//! Baseline anomaly scores from the segmentation output, for comparison with DAAIN:
//! maximum softmax probability (Hendrycks and Gimpel, 2017), max logit (Hendrycks et al.,
//! 2022) and the predictive entropy of Monte Carlo dropout (Gal and Ghahramani, 2016).
//!
//! Each is averaged over the pixels of a frame and oriented so that a higher value means
//! more anomalous, as DAAIN's scores are: the MSP and max-logit scores are the negated
//! means.

use anyhow::{ensure, Result};
use tch::{Kind, Tensor};

/// Frame scores computed from one set of class logits.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LogitScores {
    /// Negative mean over pixels of the largest softmax probability.
    pub max_softmax: f64,
    /// Negative mean over pixels of the largest logit.
    pub max_logit: f64,
}

/// Computes the MSP and max-logit scores of class logits laid out `classes x pixels`,
/// row-major, as the runtime's backbone returns them.
pub fn logit_scores(logits: &[f32], classes: usize) -> Result<LogitScores> {
    ensure!(
        classes > 0 && !logits.is_empty() && logits.len() % classes == 0,
        "logits have {} values, not a non-empty multiple of {classes} classes",
        logits.len()
    );
    if let Some(index) = logits.iter().position(|v| !v.is_finite()) {
        anyhow::bail!("logit {index} is {}: logits must be finite", logits[index]);
    }
    let pixels = (logits.len() / classes) as i64;
    let logits = Tensor::from_slice(logits).view([classes as i64, pixels]);
    let max_logit = logits.amax(0, false).mean(Kind::Double).double_value(&[]);
    let max_softmax = logits
        .softmax(0, Kind::Float)
        .amax(0, false)
        .mean(Kind::Double)
        .double_value(&[]);
    Ok(LogitScores {
        max_softmax: -max_softmax,
        max_logit: -max_logit,
    })
}

/// Returns the mean over pixels of the entropy (in nats) of class probabilities laid out
/// `[1, classes, H, W]`, such as the output of
/// [`Espnet::mc_dropout_probabilities`](crate::espnet::Espnet::mc_dropout_probabilities).
pub fn mean_entropy(probabilities: &Tensor) -> f64 {
    // p ln p tends to 0 as p does; the clamp keeps ln finite at p = 0.
    let p = probabilities.to_kind(Kind::Double);
    let plogp = &p * p.clamp_min(1e-300).log();
    (-plogp.sum_dim_intlist(1, false, Kind::Double))
        .mean(Kind::Double)
        .double_value(&[])
}
