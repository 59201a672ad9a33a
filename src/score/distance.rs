//! Distance scores on the flow output.

use super::ScoreError;

/// Maximum deviation from orthonormality accepted for stored principal components. The
/// tools write components from an f64 eigendecomposition rounded to f32, which stays far
/// below this.
const ORTHONORMALITY_TOLERANCE: f64 = 1e-3;

/// Returns `|z|`, the distance from the flow's target mean, the origin.
pub fn euclidean(z: &[f32]) -> f64 {
    z.iter()
        .map(|&v| f64::from(v) * f64::from(v))
        .sum::<f64>()
        .sqrt()
}

/// Squared Mahalanobis distance under a low-rank-plus-isotropic covariance
/// `U diag(variances) U^T + residual_variance (I - U U^T)`, with `U` the `k` principal
/// components as orthonormal columns.
#[derive(Debug, Clone, PartialEq)]
pub struct Mahalanobis {
    dim: usize,
    mean: Vec<f32>,
    /// `[k][dim]`, one principal component per row.
    components: Vec<f32>,
    variances: Vec<f64>,
    residual_variance: f64,
}

impl Mahalanobis {
    /// Validates and stores the parameters: `mean` `[dim]`, `components` `[k][dim]` with
    /// orthonormal rows, `variances` `[k]` and `residual_variance`, all finite, the
    /// variances positive. `k` may be 0, which leaves the scaled squared distance to the
    /// mean.
    pub fn new(
        mean: Vec<f32>,
        components: Vec<f32>,
        variances: Vec<f64>,
        residual_variance: f64,
    ) -> Result<Self, ScoreError> {
        let dim = mean.len();
        if dim == 0 {
            return Err(ScoreError::InvalidDimension { dim });
        }
        let k = variances.len();
        if components.len() != k * dim {
            return Err(ScoreError::PartLength {
                part: "components",
                expected: k * dim,
                actual: components.len(),
            });
        }
        if let Some(index) = mean.iter().position(|v| !v.is_finite()) {
            return Err(ScoreError::NonFinitePart {
                part: "mean",
                index,
            });
        }
        if let Some(index) = components.iter().position(|v| !v.is_finite()) {
            return Err(ScoreError::NonFinitePart {
                part: "components",
                index,
            });
        }
        if let Some(index) = variances.iter().position(|v| !(v.is_finite() && *v > 0.0)) {
            return Err(ScoreError::InvalidVariance {
                part: "variances",
                index,
                value: variances[index],
            });
        }
        if !(residual_variance.is_finite() && residual_variance > 0.0) {
            return Err(ScoreError::InvalidVariance {
                part: "residual_variance",
                index: 0,
                value: residual_variance,
            });
        }
        check_orthonormal(&components, dim)?;
        Ok(Self {
            dim,
            mean,
            components,
            variances,
            residual_variance,
        })
    }

    pub fn dim(&self) -> usize {
        self.dim
    }

    /// Number of principal components.
    pub fn rank(&self) -> usize {
        self.variances.len()
    }

    /// Returns `sum_k ((z - m) . u_k)^2 / variance_k
    /// + (|z - m|^2 - sum_k ((z - m) . u_k)^2) / residual_variance`.
    pub fn score(&self, z: &[f32]) -> Result<f64, ScoreError> {
        if z.len() != self.dim {
            return Err(ScoreError::LengthMismatch {
                expected: self.dim,
                actual: z.len(),
            });
        }
        if let Some(index) = z.iter().position(|v| !v.is_finite()) {
            return Err(ScoreError::NonFinite { index });
        }

        let centred_squared: f64 = z
            .iter()
            .zip(&self.mean)
            .map(|(&v, &m)| (f64::from(v) - f64::from(m)).powi(2))
            .sum();
        let mut explained = 0.0;
        let mut in_subspace = 0.0;
        for (component, &variance) in self.components.chunks_exact(self.dim).zip(&self.variances) {
            let projection: f64 = z
                .iter()
                .zip(&self.mean)
                .zip(component)
                .map(|((&v, &m), &u)| (f64::from(v) - f64::from(m)) * f64::from(u))
                .sum();
            let squared = projection * projection;
            explained += squared / variance;
            in_subspace += squared;
        }
        // Rounding can push the residual slightly below zero when z - m lies in the span.
        let residual = (centred_squared - in_subspace).max(0.0);
        Ok(explained + residual / self.residual_variance)
    }
}

fn check_orthonormal(components: &[f32], dim: usize) -> Result<(), ScoreError> {
    let rows: Vec<&[f32]> = components.chunks_exact(dim).collect();
    for (i, row_i) in rows.iter().enumerate() {
        for (j, row_j) in rows.iter().enumerate().skip(i) {
            let dot: f64 = row_i
                .iter()
                .zip(row_j.iter())
                .map(|(&a, &b)| f64::from(a) * f64::from(b))
                .sum();
            let expected = if i == j { 1.0 } else { 0.0 };
            if (dot - expected).abs() > ORTHONORMALITY_TOLERANCE {
                return Err(ScoreError::NotOrthonormal {
                    first: i,
                    second: j,
                    dot,
                });
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn euclidean_is_norm() {
        assert_eq!(euclidean(&[3.0, 4.0]), 5.0);
        assert_eq!(euclidean(&[0.0; 7]), 0.0);
    }

    #[test]
    fn mahalanobis_without_components_is_scaled_distance() {
        let score = Mahalanobis::new(vec![1.0, 1.0, 1.0], Vec::new(), Vec::new(), 4.0).unwrap();
        assert_eq!(score.rank(), 0);
        assert_eq!(score.score(&[3.0, 1.0, 1.0]).unwrap(), 1.0);
    }

    #[test]
    fn mahalanobis_splits_subspace_and_residual() {
        // One component along the first axis with variance 2, residual variance 0.5.
        let score = Mahalanobis::new(vec![0.0, 0.0], vec![1.0, 0.0], vec![2.0], 0.5).unwrap();
        assert_eq!(score.score(&[1.0, 1.0]).unwrap(), 1.0 / 2.0 + 1.0 / 0.5);
        assert_eq!(score.score(&[2.0, 0.0]).unwrap(), 2.0);
    }

    #[test]
    fn mahalanobis_rejects_bad_parameters() {
        assert!(matches!(
            Mahalanobis::new(vec![0.0, 0.0], vec![1.0, 1.0], vec![1.0], 1.0).unwrap_err(),
            ScoreError::NotOrthonormal {
                first: 0,
                second: 0,
                ..
            }
        ));
        assert!(matches!(
            Mahalanobis::new(
                vec![0.0, 0.0],
                vec![1.0, 0.0, 1.0, 0.0],
                vec![1.0, 1.0],
                1.0
            )
            .unwrap_err(),
            ScoreError::NotOrthonormal {
                first: 0,
                second: 1,
                ..
            }
        ));
        assert!(matches!(
            Mahalanobis::new(vec![0.0, 0.0], vec![1.0, 0.0], vec![0.0], 1.0).unwrap_err(),
            ScoreError::InvalidVariance {
                part: "variances",
                index: 0,
                ..
            }
        ));
        assert!(matches!(
            Mahalanobis::new(vec![0.0, 0.0], vec![1.0, 0.0], vec![1.0], f64::NAN).unwrap_err(),
            ScoreError::InvalidVariance {
                part: "residual_variance",
                ..
            }
        ));
        assert!(matches!(
            Mahalanobis::new(vec![0.0, 0.0], vec![1.0], vec![1.0], 1.0).unwrap_err(),
            ScoreError::PartLength {
                part: "components",
                ..
            }
        ));
        let score = Mahalanobis::new(vec![0.0, 0.0], Vec::new(), Vec::new(), 1.0).unwrap();
        assert_eq!(
            score.score(&[1.0]).unwrap_err(),
            ScoreError::LengthMismatch {
                expected: 2,
                actual: 1
            }
        );
    }
}
