//! Histogram-based outlier score (HBOS) with the semantics of PyOD's
//! `pyod.models.hbos.HBOS` (checked against PyOD 3.6.7 with NumPy histograms of f32 data).

use super::ScoreError;

/// Defaults of `pyod.models.hbos.HBOS`.
pub const PYOD_DEFAULT_N_BINS: usize = 10;
pub const PYOD_DEFAULT_ALPHA: f64 = 0.1;
pub const PYOD_DEFAULT_TOL: f64 = 0.5;

/// A fitted HBOS model: per feature, the histogram bin edges and the log-density of each
/// bin, stored feature-major.
#[derive(Debug, Clone, PartialEq)]
pub struct Hbos {
    dim: usize,
    n_bins: usize,
    tol: f64,
    /// `[dim][n_bins + 1]`, increasing per feature.
    bin_edges: Vec<f64>,
    /// `[dim][n_bins]`, `log2(density + alpha)`.
    log_density: Vec<f64>,
    /// Per feature, the minimum of its `log_density`, used for values far outside the edges.
    min_log_density: Vec<f64>,
    /// Minimum and maximum of the training decision values, for [`Hbos::probability`].
    decision_min: f64,
    decision_max: f64,
}

impl Hbos {
    /// Fits the histograms on `rows` (`n_rows x dim`, row-major) as
    /// `HBOS(n_bins, alpha, tol).fit(rows)` does, and records the training decision range.
    ///
    /// The histograms follow `numpy.histogram(column, bins=n_bins, density=True)` on f32
    /// data: equal-width edges between the column's minimum and maximum (widened by 0.5 on
    /// each side when they are equal), rounded to f32; bins half-open except the last.
    pub fn fit(
        rows: &[f32],
        n_rows: usize,
        dim: usize,
        n_bins: usize,
        alpha: f64,
        tol: f64,
    ) -> Result<Self, ScoreError> {
        if dim == 0 {
            return Err(ScoreError::InvalidDimension { dim });
        }
        if n_rows == 0 {
            return Err(ScoreError::NoTrainingRows);
        }
        if rows.len() != n_rows * dim {
            return Err(ScoreError::TrainingDataLength {
                n_rows,
                dim,
                expected: n_rows * dim,
                actual: rows.len(),
            });
        }
        check_settings(n_bins, tol)?;
        if !(alpha.is_finite() && alpha > 0.0) {
            return Err(ScoreError::InvalidAlpha { alpha });
        }
        if let Some(index) = rows.iter().position(|v| !v.is_finite()) {
            return Err(ScoreError::NonFiniteTraining {
                row: index / dim,
                feature: index % dim,
            });
        }

        let mut bin_edges = Vec::with_capacity(dim * (n_bins + 1));
        let mut log_density = Vec::with_capacity(dim * n_bins);
        let mut column = Vec::with_capacity(n_rows);
        for feature in 0..dim {
            column.clear();
            column.extend(rows.iter().skip(feature).step_by(dim).copied());
            let (edges, density) = numpy_histogram_f32(&column, n_bins);
            if edges.windows(2).any(|pair| pair[0] == pair[1]) {
                return Err(ScoreError::DegenerateFeature {
                    feature,
                    min: edges[0],
                    max: edges[n_bins],
                });
            }
            bin_edges.extend(edges);
            log_density.extend(density.iter().map(|&value| (value + alpha).log2()));
        }

        let mut model = Self::from_parts(dim, n_bins, tol, bin_edges, log_density, 0.0, 1.0)?;
        let mut decision_min = f64::INFINITY;
        let mut decision_max = f64::NEG_INFINITY;
        for row in rows.chunks_exact(dim) {
            let decision = model.decision(row)?;
            decision_min = decision_min.min(decision);
            decision_max = decision_max.max(decision);
        }
        model.decision_min = decision_min;
        model.decision_max = decision_max;
        Ok(model)
    }

    /// Builds a fitted model from stored parts, as the bundle loader reads them.
    ///
    /// `bin_edges` is `[dim][n_bins + 1]` and `log_density` (`log2(density + alpha)`) is
    /// `[dim][n_bins]`, both feature-major. `decision_min` and `decision_max` are the range of
    /// the training decision values.
    pub fn from_parts(
        dim: usize,
        n_bins: usize,
        tol: f64,
        bin_edges: Vec<f64>,
        log_density: Vec<f64>,
        decision_min: f64,
        decision_max: f64,
    ) -> Result<Self, ScoreError> {
        if dim == 0 {
            return Err(ScoreError::InvalidDimension { dim });
        }
        check_settings(n_bins, tol)?;
        if bin_edges.len() != dim * (n_bins + 1) {
            return Err(ScoreError::PartLength {
                part: "bin_edges",
                expected: dim * (n_bins + 1),
                actual: bin_edges.len(),
            });
        }
        if log_density.len() != dim * n_bins {
            return Err(ScoreError::PartLength {
                part: "log_density",
                expected: dim * n_bins,
                actual: log_density.len(),
            });
        }
        for (feature, edges) in bin_edges.chunks_exact(n_bins + 1).enumerate() {
            let increasing = edges.windows(2).all(|pair| pair[0] < pair[1]);
            if edges.iter().any(|v| !v.is_finite()) || !increasing {
                return Err(ScoreError::InvalidBinEdges { feature });
            }
        }
        if let Some(index) = log_density.iter().position(|v| !v.is_finite()) {
            return Err(ScoreError::NonFinitePart {
                part: "log_density",
                index,
            });
        }
        if !(decision_min.is_finite() && decision_max.is_finite() && decision_min <= decision_max) {
            return Err(ScoreError::InvalidDecisionRange {
                min: decision_min,
                max: decision_max,
            });
        }

        let min_log_density = log_density
            .chunks_exact(n_bins)
            .map(|bins| bins.iter().copied().fold(f64::INFINITY, f64::min))
            .collect();
        Ok(Self {
            dim,
            n_bins,
            tol,
            bin_edges,
            log_density,
            min_log_density,
            decision_min,
            decision_max,
        })
    }

    pub fn dim(&self) -> usize {
        self.dim
    }

    pub fn n_bins(&self) -> usize {
        self.n_bins
    }

    pub fn tol(&self) -> f64 {
        self.tol
    }

    /// Bin edges, `[dim][n_bins + 1]` feature-major.
    pub fn bin_edges(&self) -> &[f64] {
        &self.bin_edges
    }

    /// `log2(density + alpha)` per bin, `[dim][n_bins]` feature-major.
    pub fn log_density(&self) -> &[f64] {
        &self.log_density
    }

    /// Minimum and maximum of the training decision values.
    pub fn decision_range(&self) -> (f64, f64) {
        (self.decision_min, self.decision_max)
    }

    /// Computes PyOD's `decision_function` for one sample: the negative sum over features
    /// of the bin's `log2(density + alpha)`. Higher is more anomalous.
    ///
    /// A value is placed with `numpy.digitize(x, edges, right=True)`, so a bin includes its
    /// upper edge and a value equal to the lowest edge falls below the histogram. Below the
    /// lowest or above the highest edge, the value takes the outermost bin when it lies
    /// within `tol` bin widths of it and the feature's lowest bin score otherwise.
    pub fn decision(&self, z: &[f32]) -> Result<f64, ScoreError> {
        if z.len() != self.dim {
            return Err(ScoreError::LengthMismatch {
                expected: self.dim,
                actual: z.len(),
            });
        }
        if let Some(index) = z.iter().position(|v| !v.is_finite()) {
            return Err(ScoreError::NonFinite { index });
        }

        let n_bins = self.n_bins;
        let mut sum = 0.0;
        for (feature, &value) in z.iter().enumerate() {
            let value = f64::from(value);
            let edges = &self.bin_edges[feature * (n_bins + 1)..(feature + 1) * (n_bins + 1)];
            let scores = &self.log_density[feature * n_bins..(feature + 1) * n_bins];
            // digitize(right=True) returns the number of edges strictly below the value.
            let bin = edges.partition_point(|&edge| edge < value);
            let score = if bin == 0 {
                let width = edges[1] - edges[0];
                if edges[0] - value <= width * self.tol {
                    scores[0]
                } else {
                    self.min_log_density[feature]
                }
            } else if bin == n_bins + 1 {
                let width = edges[n_bins] - edges[n_bins - 1];
                if value - edges[n_bins] <= width * self.tol {
                    scores[n_bins - 1]
                } else {
                    self.min_log_density[feature]
                }
            } else {
                scores[bin - 1]
            };
            sum += score;
        }
        Ok(-sum)
    }

    /// Maps a decision value to PyOD's `predict_proba(method="linear")[:, 1]`: min-max scaled
    /// against the training decision values and clipped to `[0, 1]`.
    pub fn probability(&self, decision: f64) -> f64 {
        // sklearn's MinMaxScaler computes x * scale + (0 - min * scale) and treats a zero
        // range as 1.
        let range = self.decision_max - self.decision_min;
        let scale = 1.0 / if range == 0.0 { 1.0 } else { range };
        let offset = -self.decision_min * scale;
        (decision * scale + offset).clamp(0.0, 1.0)
    }
}

fn check_settings(n_bins: usize, tol: f64) -> Result<(), ScoreError> {
    if n_bins < 2 {
        return Err(ScoreError::InvalidBins { n_bins });
    }
    if !(tol.is_finite() && tol >= 0.0) {
        return Err(ScoreError::InvalidTol { tol });
    }
    Ok(())
}

/// Computes `numpy.histogram(column, bins=n_bins, density=True)` for an f32 column and
/// returns the edges (widened to f64) and the densities.
///
/// NumPy 2 keeps f32 data in f32 throughout (NEP 50 type promotion), so `linspace` computes
/// the edges as `k * step + min` in f32 arithmetic. Each value goes into the bin whose f32
/// edges enclose it. The densities divide the counts by the f32 bin widths and the total
/// count.
fn numpy_histogram_f32(column: &[f32], n_bins: usize) -> (Vec<f64>, Vec<f64>) {
    let mut first = column.iter().copied().fold(f32::INFINITY, f32::min);
    let mut last = column.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    if first == last {
        first -= 0.5;
        last += 0.5;
    }

    // numpy.linspace in f32: step = (stop - start) / n, value k = k * step + start, and the
    // last value set to stop exactly.
    let step = (last - first) / n_bins as f32;
    let edges_f32: Vec<f32> = (0..=n_bins)
        .map(|k| {
            if k == n_bins {
                last
            } else {
                k as f32 * step + first
            }
        })
        .collect();

    let mut counts = vec![0usize; n_bins];
    for &value in column {
        // Every value lies within [first, last], so the upper bound below keeps the last
        // bin closed as NumPy does.
        let above = edges_f32[1..n_bins].partition_point(|&edge| edge <= value);
        counts[above] += 1;
    }

    let total = column.len() as f64;
    let density = counts
        .iter()
        .enumerate()
        .map(|(k, &count)| {
            let width = f64::from(edges_f32[k + 1] - edges_f32[k]);
            count as f64 / width / total
        })
        .collect();
    let edges = edges_f32.iter().map(|&edge| f64::from(edge)).collect();
    (edges, density)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn log_density(density: f64) -> f64 {
        (density + PYOD_DEFAULT_ALPHA).log2()
    }

    /// One feature with values [0, 0, 0, 1, 3] and 2 bins: edges [0, 1.5, 3], counts
    /// [4, 1], densities [4 / 1.5 / 5, 1 / 1.5 / 5].
    fn skewed() -> Hbos {
        Hbos::fit(
            &[0.0, 0.0, 0.0, 1.0, 3.0],
            5,
            1,
            2,
            PYOD_DEFAULT_ALPHA,
            PYOD_DEFAULT_TOL,
        )
        .unwrap()
    }

    #[test]
    fn fit_matches_numpy_histogram() {
        let hbos = skewed();
        assert_eq!(hbos.bin_edges(), [0.0, 1.5, 3.0]);
        let expected = [log_density(4.0 / 1.5 / 5.0), log_density(1.0 / 1.5 / 5.0)];
        assert_eq!(hbos.log_density(), expected);
    }

    #[test]
    fn decision_follows_digitize_right() {
        let hbos = skewed();
        let dense = -log_density(4.0 / 1.5 / 5.0);
        let sparse = -log_density(1.0 / 1.5 / 5.0);
        // digitize(right=True) puts a value equal to an inner edge into the lower bin.
        assert_eq!(hbos.decision(&[1.5]).unwrap(), dense);
        assert_eq!(hbos.decision(&[1.6]).unwrap(), sparse);
        assert_eq!(hbos.decision(&[3.0]).unwrap(), sparse);
        // Equal to the lowest edge counts as below the histogram, at distance 0.
        assert_eq!(hbos.decision(&[0.0]).unwrap(), dense);
        // Within tol = 0.5 bin widths (0.75) of the outer edges: the outer bin.
        assert_eq!(hbos.decision(&[-0.75]).unwrap(), dense);
        assert_eq!(hbos.decision(&[3.75]).unwrap(), sparse);
        // Further out: the lowest bin score of the feature, here the sparse bin.
        assert_eq!(hbos.decision(&[-0.76]).unwrap(), sparse);
        assert_eq!(hbos.decision(&[100.0]).unwrap(), sparse);
    }

    #[test]
    fn constant_feature_widens_edges() {
        let hbos = Hbos::fit(&[5.0; 4], 4, 1, 2, PYOD_DEFAULT_ALPHA, PYOD_DEFAULT_TOL).unwrap();
        assert_eq!(hbos.bin_edges(), [4.5, 5.0, 5.5]);
        // The value 5.0 equals the middle edge, so NumPy counts it in the upper bin.
        assert_eq!(hbos.log_density(), [log_density(0.0), log_density(2.0)]);
    }

    #[test]
    fn probability_scales_and_clips() {
        let hbos =
            Hbos::from_parts(1, 2, 0.5, vec![0.0, 1.0, 2.0], vec![0.0, 1.0], -4.0, 6.0).unwrap();
        assert_eq!(hbos.probability(-4.0), 0.0);
        assert_eq!(hbos.probability(1.0), 0.5);
        assert_eq!(hbos.probability(6.0), 1.0);
        assert_eq!(hbos.probability(-10.0), 0.0);
        assert_eq!(hbos.probability(60.0), 1.0);
    }

    #[test]
    fn fit_rejects_bad_input() {
        let tol = PYOD_DEFAULT_TOL;
        let alpha = PYOD_DEFAULT_ALPHA;
        assert_eq!(
            Hbos::fit(&[1.0, f32::NAN, 2.0, 3.0], 2, 2, 2, alpha, tol).unwrap_err(),
            ScoreError::NonFiniteTraining { row: 0, feature: 1 }
        );
        assert!(matches!(
            Hbos::fit(&[1.0, 2.0, 3.0], 2, 2, 2, alpha, tol).unwrap_err(),
            ScoreError::TrainingDataLength {
                expected: 4,
                actual: 3,
                ..
            }
        ));
        assert_eq!(
            Hbos::fit(&[1.0, 2.0], 2, 1, 1, alpha, tol).unwrap_err(),
            ScoreError::InvalidBins { n_bins: 1 }
        );
        assert!(matches!(
            Hbos::fit(&[1.0, 2.0], 2, 1, 2, -1.0, tol).unwrap_err(),
            ScoreError::InvalidAlpha { .. }
        ));
        assert!(matches!(
            Hbos::fit(&[1e6, 1e6 + 0.0625], 2, 1, 40, alpha, tol).unwrap_err(),
            ScoreError::DegenerateFeature { feature: 0, .. }
        ));
    }

    #[test]
    fn decision_rejects_bad_input() {
        let hbos = skewed();
        assert_eq!(
            hbos.decision(&[1.0, 2.0]).unwrap_err(),
            ScoreError::LengthMismatch {
                expected: 1,
                actual: 2
            }
        );
        assert_eq!(
            hbos.decision(&[f32::NAN]).unwrap_err(),
            ScoreError::NonFinite { index: 0 }
        );
    }

    #[test]
    fn from_parts_rejects_bad_parts() {
        assert!(matches!(
            Hbos::from_parts(1, 2, 0.5, vec![0.0, 1.0], vec![0.0, 1.0], 0.0, 1.0).unwrap_err(),
            ScoreError::PartLength {
                part: "bin_edges",
                ..
            }
        ));
        assert_eq!(
            Hbos::from_parts(1, 2, 0.5, vec![0.0, 2.0, 1.0], vec![0.0, 1.0], 0.0, 1.0).unwrap_err(),
            ScoreError::InvalidBinEdges { feature: 0 }
        );
        assert!(matches!(
            Hbos::from_parts(1, 2, 0.5, vec![0.0, 1.0, 2.0], vec![0.0, 1.0], 2.0, 1.0).unwrap_err(),
            ScoreError::InvalidDecisionRange { .. }
        ));
    }
}
