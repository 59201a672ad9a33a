//! Activation sampling at a blue-noise mask.
//!
//! The tapped layers are stacked along the channel axis and each is thought of as
//! upsampled (nearest neighbour) to the network input size, which gives one sampling
//! space of `(channel, y, x)` with `channel` running over all tapped channels in tap
//! order. A Poisson-disc pattern in that space (no two points closer than the minimum
//! distance, generated from a seed with Bridson's algorithm) picks the values that form
//! the flow's input vector.
//!
//! The upsampled maps are never built: [`GatherPlan`] maps every point to the source
//! element it would have been copied from (`source = floor(target * in / out)`, as
//! PyTorch's `interpolate(mode="nearest")` does) and reads just those elements.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

/// Maximum number of tapped layers. The frame loop passes the tap slices in a
/// fixed-capacity list on the stack, so that gathering allocates nothing.
pub const MAX_TAPS: usize = 64;

/// Shape of one tapped activation (batch 1, CHW).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TapShape {
    /// Tensor name in the backbone graph.
    pub name: String,
    pub channels: usize,
    pub height: usize,
    pub width: usize,
}

impl TapShape {
    pub fn len(&self) -> usize {
        self.channels * self.height * self.width
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Error for masks that do not fit the taps or activations that cannot be sampled.
#[derive(Debug, thiserror::Error)]
pub enum SamplingError {
    #[error("minimum distance {0} is invalid: use a finite value of at least 2")]
    MinDistance(f64),
    #[error(
        "sampling space {extent:?} is empty: the taps must have channels and the input a size"
    )]
    EmptySpace { extent: [usize; 3] },
    #[error(
        "mask point {index} at (channel {channel}, y {y}, x {x}) lies outside the sampling \
         space {extent:?}: the mask was made for other taps or another input size"
    )]
    PointOutside {
        index: usize,
        channel: u32,
        y: u32,
        x: u32,
        extent: [usize; 3],
    },
    #[error(
        "mask points {first} and {second} read the same activation element: the mask is invalid"
    )]
    DuplicateElement { first: usize, second: usize },
    #[error("{taps} taps given, at most {MAX_TAPS} are supported: tap fewer layers")]
    TooManyTaps { taps: usize },
    #[error("expected {expected} tapped activations, got {actual}")]
    TapCount { expected: usize, actual: usize },
    #[error("tap {name} has {actual} values, expected {expected}")]
    TapLength {
        name: String,
        actual: usize,
        expected: usize,
    },
    #[error("output vector has {actual} values, expected {expected}")]
    OutputLength { actual: usize, expected: usize },
    #[error("activation of tap {name} at element {element} is {value}: the backbone produced a non-finite value")]
    NonFinite {
        name: String,
        element: usize,
        value: f32,
    },
}

/// Returns the extent `[channels, height, width]` of the sampling space.
pub fn sampling_extent(taps: &[TapShape], input_height: usize, input_width: usize) -> [usize; 3] {
    let channels = taps.iter().map(|t| t.channels).sum();
    [channels, input_height, input_width]
}

/// Generates a Poisson-disc point set in the box `extent` (`[channel, y, x]`) with
/// Bridson's algorithm: no two points are closer than `min_distance` (Euclidean, in
/// voxel units), and the box is filled until no candidate fits. The same seed and
/// arguments always give the same points (ChaCha8 stream). Points are returned as
/// integer voxel coordinates sorted by `(channel, y, x)`.
pub fn poisson_disc(
    extent: [usize; 3],
    min_distance: f64,
    seed: u64,
) -> Result<Vec<[u32; 3]>, SamplingError> {
    const CANDIDATES_PER_POINT: usize = 30;
    if !min_distance.is_finite() || min_distance < 2.0 {
        return Err(SamplingError::MinDistance(min_distance));
    }
    if extent.contains(&0) {
        return Err(SamplingError::EmptySpace { extent });
    }

    // Background grid with cells of side r / sqrt(3): each cell contains at most one point,
    // and a conflicting point lies at most two cells away on each axis.
    let cell = min_distance / 3f64.sqrt();
    let dims: [usize; 3] = std::array::from_fn(|a| (extent[a] as f64 / cell).ceil() as usize);
    let mut grid: Vec<u32> = vec![u32::MAX; dims[0] * dims[1] * dims[2]];
    let cell_of = |p: &[f64; 3]| -> [usize; 3] {
        std::array::from_fn(|a| ((p[a] / cell) as usize).min(dims[a] - 1))
    };
    let grid_index = |c: [usize; 3]| (c[0] * dims[1] + c[1]) * dims[2] + c[2];

    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut points: Vec<[f64; 3]> = Vec::new();
    let mut active: Vec<usize> = Vec::new();
    let first: [f64; 3] = std::array::from_fn(|a| rng.gen::<f64>() * extent[a] as f64);
    grid[grid_index(cell_of(&first))] = 0;
    points.push(first);
    active.push(0);

    let r2 = min_distance * min_distance;
    while !active.is_empty() {
        let slot = rng.gen_range(0..active.len());
        let centre = points[active[slot]];
        let mut placed = false;
        for _ in 0..CANDIDATES_PER_POINT {
            // Uniform direction, radius uniform in [r, 2r).
            let direction = loop {
                let v: [f64; 3] = std::array::from_fn(|_| rng.gen::<f64>() * 2.0 - 1.0);
                let norm2 = v[0] * v[0] + v[1] * v[1] + v[2] * v[2];
                if norm2 > 1e-12 && norm2 <= 1.0 {
                    let norm = norm2.sqrt();
                    break [v[0] / norm, v[1] / norm, v[2] / norm];
                }
            };
            let radius = min_distance * (1.0 + rng.gen::<f64>());
            let candidate: [f64; 3] = std::array::from_fn(|a| centre[a] + direction[a] * radius);
            if (0..3).any(|a| candidate[a] < 0.0 || candidate[a] >= extent[a] as f64) {
                continue;
            }
            let c = cell_of(&candidate);
            let mut fits = true;
            'search: for i in c[0].saturating_sub(2)..(c[0] + 3).min(dims[0]) {
                for j in c[1].saturating_sub(2)..(c[1] + 3).min(dims[1]) {
                    for k in c[2].saturating_sub(2)..(c[2] + 3).min(dims[2]) {
                        let occupant = grid[grid_index([i, j, k])];
                        if occupant == u32::MAX {
                            continue;
                        }
                        let q = points[occupant as usize];
                        let d2: f64 = (0..3).map(|a| (q[a] - candidate[a]).powi(2)).sum();
                        if d2 < r2 {
                            fits = false;
                            break 'search;
                        }
                    }
                }
            }
            if fits {
                grid[grid_index(c)] = points.len() as u32;
                active.push(points.len());
                points.push(candidate);
                placed = true;
                break;
            }
        }
        if !placed {
            active.swap_remove(slot);
        }
    }

    let mut voxels: Vec<[u32; 3]> = points
        .iter()
        .map(|p| std::array::from_fn(|a| p[a].floor() as u32))
        .collect();
    voxels.sort_unstable();
    Ok(voxels)
}

/// One element read by the gather: which tap, and the flat CHW index inside it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GatherEntry {
    pub tap: u32,
    pub element: u32,
}

/// Precomputed gather from tapped activations to the flow's input vector.
#[derive(Debug, Clone)]
pub struct GatherPlan {
    taps: Vec<TapShape>,
    entries: Vec<GatherEntry>,
}

impl GatherPlan {
    /// Maps mask points in the upsampled space to source elements of the taps. The
    /// output vector keeps the order of `points`.
    pub fn new(
        points: &[[u32; 3]],
        taps: &[TapShape],
        input_height: usize,
        input_width: usize,
    ) -> Result<Self, SamplingError> {
        if taps.len() > MAX_TAPS {
            return Err(SamplingError::TooManyTaps { taps: taps.len() });
        }
        let extent = sampling_extent(taps, input_height, input_width);
        let mut channel_starts = Vec::with_capacity(taps.len());
        let mut start = 0;
        for tap in taps {
            channel_starts.push(start);
            start += tap.channels;
        }

        let mut entries = Vec::with_capacity(points.len());
        for (index, &[channel, y, x]) in points.iter().enumerate() {
            let (c, yy, xx) = (channel as usize, y as usize, x as usize);
            if c >= extent[0] || yy >= extent[1] || xx >= extent[2] {
                return Err(SamplingError::PointOutside {
                    index,
                    channel,
                    y,
                    x,
                    extent,
                });
            }
            let tap_index = channel_starts.partition_point(|&s| s <= c) - 1;
            let tap = &taps[tap_index];
            let source_channel = c - channel_starts[tap_index];
            let source_y = yy * tap.height / input_height;
            let source_x = xx * tap.width / input_width;
            let element = (source_channel * tap.height + source_y) * tap.width + source_x;
            entries.push(GatherEntry {
                tap: tap_index as u32,
                element: element as u32,
            });
        }

        let mut order: Vec<usize> = (0..entries.len()).collect();
        order.sort_unstable_by_key(|&i| (entries[i].tap, entries[i].element));
        for pair in order.windows(2) {
            if entries[pair[0]] == entries[pair[1]] {
                return Err(SamplingError::DuplicateElement {
                    first: pair[0],
                    second: pair[1],
                });
            }
        }
        Ok(Self {
            taps: taps.to_vec(),
            entries,
        })
    }

    pub fn taps(&self) -> &[TapShape] {
        &self.taps
    }

    pub fn entries(&self) -> &[GatherEntry] {
        &self.entries
    }

    /// Returns the length of the gathered vector.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Reads the mask's values from the tapped activations (one CHW slice per tap, in
    /// tap order) into `output`. Rejects non-finite values, naming the tap and element.
    pub fn gather(&self, activations: &[&[f32]], output: &mut [f32]) -> Result<(), SamplingError> {
        if activations.len() != self.taps.len() {
            return Err(SamplingError::TapCount {
                expected: self.taps.len(),
                actual: activations.len(),
            });
        }
        for (tap, values) in self.taps.iter().zip(activations) {
            if values.len() != tap.len() {
                return Err(SamplingError::TapLength {
                    name: tap.name.clone(),
                    actual: values.len(),
                    expected: tap.len(),
                });
            }
        }
        if output.len() != self.entries.len() {
            return Err(SamplingError::OutputLength {
                actual: output.len(),
                expected: self.entries.len(),
            });
        }
        for (slot, entry) in output.iter_mut().zip(&self.entries) {
            let value = activations[entry.tap as usize][entry.element as usize];
            if !value.is_finite() {
                return Err(SamplingError::NonFinite {
                    name: self.taps[entry.tap as usize].name.clone(),
                    element: entry.element as usize,
                    value,
                });
            }
            *slot = value;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tap(name: &str, channels: usize, height: usize, width: usize) -> TapShape {
        TapShape {
            name: name.into(),
            channels,
            height,
            width,
        }
    }

    #[test]
    fn poisson_disc_respects_min_distance() {
        let points = poisson_disc([40, 64, 128], 6.0, 7).unwrap();
        assert!(points.len() > 200, "only {} points", points.len());
        // Voxel rounding moves each point by less than sqrt(3).
        let limit = (6.0f64 - 3f64.sqrt()).powi(2);
        for (i, p) in points.iter().enumerate() {
            for q in &points[i + 1..] {
                let d2: f64 = (0..3).map(|a| (p[a] as f64 - q[a] as f64).powi(2)).sum();
                assert!(d2 >= limit, "{p:?} and {q:?} are too close");
            }
        }
    }

    #[test]
    fn poisson_disc_is_deterministic_per_seed() {
        let a = poisson_disc([20, 32, 64], 5.0, 1).unwrap();
        let b = poisson_disc([20, 32, 64], 5.0, 1).unwrap();
        let c = poisson_disc([20, 32, 64], 5.0, 2).unwrap();
        assert_eq!(a, b);
        assert_ne!(a, c);
    }

    #[test]
    fn poisson_disc_rejects_bad_arguments() {
        assert!(matches!(
            poisson_disc([1, 1, 1], 1.0, 0),
            Err(SamplingError::MinDistance(_))
        ));
        assert!(matches!(
            poisson_disc([0, 4, 4], 3.0, 0),
            Err(SamplingError::EmptySpace { .. })
        ));
    }

    #[test]
    fn gather_matches_nearest_upsampling() {
        // Two taps: 2 channels at 2x4 and 1 channel at 4x8, input 4x8.
        let taps = [tap("a", 2, 2, 4), tap("b", 1, 4, 8)];
        let a: Vec<f32> = (0..16).map(|v| v as f32).collect();
        let b: Vec<f32> = (0..32).map(|v| 100.0 + v as f32).collect();
        let points = [[0, 3, 7], [1, 0, 0], [2, 2, 5]];
        let plan = GatherPlan::new(&points, &taps, 4, 8).unwrap();
        let mut out = [0.0; 3];
        plan.gather(&[&a, &b], &mut out).unwrap();
        // (0, 3, 7) -> tap a, channel 0, y 1, x 3 -> 7.
        assert_eq!(out[0], 7.0);
        // (1, 0, 0) -> tap a, channel 1, y 0, x 0 -> 8.
        assert_eq!(out[1], 8.0);
        // (2, 2, 5) -> tap b, channel 0, y 2, x 5 -> 100 + 21.
        assert_eq!(out[2], 121.0);
    }

    #[test]
    fn gather_rejects_points_outside_and_nan() {
        let taps = [tap("a", 1, 2, 2)];
        let err = GatherPlan::new(&[[1, 0, 0]], &taps, 2, 2).unwrap_err();
        assert!(
            matches!(err, SamplingError::PointOutside { index: 0, .. }),
            "{err}"
        );

        let plan = GatherPlan::new(&[[0, 1, 1]], &taps, 2, 2).unwrap();
        let mut out = [0.0];
        let err = plan
            .gather(&[&[0.0, 0.0, 0.0, f32::NAN]], &mut out)
            .unwrap_err();
        assert!(err.to_string().contains("NaN"), "{err}");
    }

    #[test]
    fn gather_rejects_duplicate_elements() {
        // Both points fall on the same source element of a 1x1 map.
        let taps = [tap("a", 1, 1, 1)];
        let err = GatherPlan::new(&[[0, 0, 0], [0, 1, 1]], &taps, 2, 2).unwrap_err();
        assert!(
            matches!(err, SamplingError::DuplicateElement { .. }),
            "{err}"
        );
    }
}
