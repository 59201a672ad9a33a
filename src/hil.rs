//! Hardware-in-the-loop benchmark: replays a recorded clip at camera rate through the
//! real frame loop for a set time and reports per-stage latency, deadline misses, drops,
//! alerts and memory, as `daain bench-hil` writes them.
//!
//! The clip is looped, and its frames get camera timestamps (`index / frame_rate`), so
//! the loop paces and drops exactly as it would behind a camera of that rate.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::OnceLock;
use std::time::Duration;

use anyhow::{anyhow, Context};
use serde::Serialize;

use crate::pipeline::{FrameOutcome, RunSummary};
use crate::source::{Frame, FrameSource, SourceError};

/// Function that opens the replayed clip from its start.
pub type OpenClip = Box<dyn FnMut() -> Result<Box<dyn FrameSource>, SourceError> + Send>;

/// A clip replayed in a loop with the timestamps of a camera running at `frame_rate`.
pub struct LoopingReplay {
    open: OpenClip,
    source: Box<dyn FrameSource>,
    frame_rate: f64,
    description: String,
    next_index: u64,
    /// Frames delivered since the clip was last opened; a pass that delivers none ends
    /// the replay instead of reopening forever.
    frames_this_pass: u64,
    passes: u64,
}

impl LoopingReplay {
    /// Opens the clip. `frame_rate` must be positive and finite.
    pub fn open(mut open: OpenClip, frame_rate: f64) -> Result<Self, SourceError> {
        let source = open()?;
        Self::with_first_pass(open, source, frame_rate)
    }

    /// Starts the replay with `source`, a clip that `open` already opened (for example to
    /// read its frame rate), so the first pass does not open the file again.
    pub fn with_first_pass(
        open: OpenClip,
        source: Box<dyn FrameSource>,
        frame_rate: f64,
    ) -> Result<Self, SourceError> {
        if !(frame_rate.is_finite() && frame_rate > 0.0) {
            return Err(SourceError::InvalidRequest {
                path: source.describe().into(),
                reason: format!("frame rate {frame_rate} must be a positive number"),
            });
        }
        Ok(Self {
            description: source.describe(),
            open,
            source,
            frame_rate,
            next_index: 0,
            frames_this_pass: 0,
            passes: 1,
        })
    }

    /// Times the clip was started, including the first.
    pub fn passes(&self) -> u64 {
        self.passes
    }
}

impl FrameSource for LoopingReplay {
    fn next_frame(&mut self, frame: &mut Frame) -> Result<bool, SourceError> {
        loop {
            if self.source.next_frame(frame)? {
                frame.index = self.next_index;
                frame.timestamp = Duration::from_secs_f64(self.next_index as f64 / self.frame_rate);
                self.next_index += 1;
                self.frames_this_pass += 1;
                return Ok(true);
            }
            if self.frames_this_pass == 0 {
                return Ok(false);
            }
            self.source = (self.open)()?;
            self.frames_this_pass = 0;
            self.passes += 1;
        }
    }

    fn describe(&self) -> String {
        format!(
            "{} looped at {} frames per second",
            self.description, self.frame_rate
        )
    }

    fn nominal_frame_rate(&self) -> Option<f64> {
        Some(self.frame_rate)
    }
}

/// Summary statistics of one latency series, in milliseconds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct LatencyStats {
    pub samples: usize,
    pub mean_ms: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
}

impl LatencyStats {
    /// Computes the statistics; percentiles use the nearest-rank method. Sorts `samples`.
    pub fn from_samples(samples: &mut [f64]) -> Self {
        if samples.is_empty() {
            return Self::default();
        }
        samples.sort_by(f64::total_cmp);
        let rank = |p: f64| {
            let index = (p * samples.len() as f64).ceil() as usize;
            samples[index.clamp(1, samples.len()) - 1]
        };
        Self {
            samples: samples.len(),
            mean_ms: samples.iter().sum::<f64>() / samples.len() as f64,
            p50_ms: rank(0.50),
            p99_ms: rank(0.99),
            max_ms: samples[samples.len() - 1],
        }
    }
}

/// Stage names in report order, with the accessor of each stage's time.
const STAGES: [(&str, fn(&FrameOutcome) -> f64); 7] = [
    ("queue", |o| o.timings.queue_ms),
    ("preprocess", |o| o.timings.preprocess_ms),
    ("backbone", |o| o.timings.backbone_ms),
    ("sampling", |o| o.timings.sampling_ms),
    ("flow", |o| o.timings.flow_ms),
    ("score", |o| o.timings.score_ms),
    ("latency", |o| o.latency_ms),
];

/// Per-stage times of every scored frame, collected while the run goes on.
#[derive(Debug, Default)]
pub struct StageSamples {
    series: [Vec<f64>; STAGES.len()],
    rss_samples: Vec<u64>,
}

impl StageSamples {
    /// Creates collectors for a run of about `frames` frames.
    pub fn with_capacity(frames: usize) -> Self {
        Self {
            series: std::array::from_fn(|_| Vec::with_capacity(frames)),
            rss_samples: Vec::new(),
        }
    }

    /// Records the stage times of one scored frame; frames that failed are skipped.
    /// Samples the resident set size every 100 frames.
    pub fn push(&mut self, outcome: &FrameOutcome) {
        if outcome.error.is_some() {
            return;
        }
        for (series, (_, stage)) in self.series.iter_mut().zip(STAGES) {
            series.push(stage(outcome));
        }
        if outcome.frame % 100 == 0 {
            if let Some(rss) = current_rss_bytes() {
                self.rss_samples.push(rss);
            }
        }
    }

    /// End-to-end latency of every scored frame, in milliseconds.
    pub fn latencies(&self) -> &[f64] {
        &self.series[STAGES.len() - 1]
    }
}

/// Report of one `daain bench-hil` run, written as JSON.
#[derive(Debug, Clone, Serialize)]
pub struct HilReport {
    pub source: String,
    pub bundle: String,
    /// Camera rate the clip was replayed at, in frames per second.
    pub frame_rate: f64,
    /// Requested length of the run in seconds, and the time it took.
    pub requested_s: f64,
    pub elapsed_s: f64,
    /// Times the clip was started.
    pub clip_passes: u64,
    pub deadline_ms: f64,
    pub summary: RunSummary,
    /// Alerts the consumer received from the alert channel.
    pub alerts_received: u64,
    /// Per-stage statistics over scored frames: `queue` is the wait in the frame queue,
    /// `latency` the time from delivery by the source to the score.
    pub stages: BTreeMap<&'static str, LatencyStats>,
    /// Peak resident set size of the process (`VmHWM`), in bytes; `None` off Linux.
    pub peak_rss_bytes: Option<u64>,
    /// Resident set size after the first scored frame and after the last sample, in
    /// bytes. Growth between them over a long run points to a leak.
    pub rss_first_bytes: Option<u64>,
    pub rss_last_bytes: Option<u64>,
    /// SIMD features and the flow kernel, as logged at start.
    pub cpu: String,
    /// Backbone precision, matmul threads and where gather and flow ran, for example
    /// `f32 backbone, 1 thread(s), out-of-plan`. In plan, the `backbone` stage includes
    /// gather and flow.
    pub detector: String,
}

impl HilReport {
    /// Builds the report from the run's counts and the collected samples.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        source: String,
        bundle: String,
        frame_rate: f64,
        requested: Duration,
        elapsed: Duration,
        clip_passes: u64,
        deadline: Duration,
        summary: RunSummary,
        alerts_received: u64,
        mut samples: StageSamples,
        detector: String,
    ) -> Self {
        let stages = STAGES
            .iter()
            .zip(samples.series.iter_mut())
            .map(|((name, _), series)| (*name, LatencyStats::from_samples(series)))
            .collect();
        Self {
            source,
            bundle,
            frame_rate,
            requested_s: requested.as_secs_f64(),
            elapsed_s: elapsed.as_secs_f64(),
            clip_passes,
            deadline_ms: deadline.as_secs_f64() * 1e3,
            summary,
            alerts_received,
            stages,
            peak_rss_bytes: peak_rss_bytes(),
            rss_first_bytes: samples.rss_samples.first().copied(),
            rss_last_bytes: samples.rss_samples.last().copied(),
            cpu: crate::cpu::describe(),
            detector,
        }
    }

    /// Formats the main figures as a few lines for the terminal.
    pub fn text(&self) -> String {
        let mut text = format!(
            "bench-hil: {:.0} s of {} at {} fps: decoded={} scored={} dropped={} \
             deadline_misses={} (deadline {} ms) stalls={} alerts_received={} \
             alerts_undelivered={}\n",
            self.elapsed_s,
            self.source,
            self.frame_rate,
            self.summary.decoded,
            self.summary.scored,
            self.summary.dropped,
            self.summary.deadline_misses,
            self.deadline_ms,
            self.summary.stalls,
            self.alerts_received,
            self.summary.alerts_undelivered
        );
        for (name, stats) in &self.stages {
            text.push_str(&format!(
                "  {name:<10} p50 {:8.2} ms  p99 {:8.2} ms  max {:8.2} ms\n",
                stats.p50_ms, stats.p99_ms, stats.max_ms
            ));
        }
        if let Some(peak) = self.peak_rss_bytes {
            text.push_str(&format!(
                "  peak RSS {:.1} MiB\n",
                peak as f64 / (1 << 20) as f64
            ));
        }
        text
    }
}

/// Reads a `Vm*` line of /proc/self/status, in bytes.
fn proc_status_bytes(key: &str) -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|line| line.starts_with(key))?;
    let kib: u64 = line[key.len()..]
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kib * 1024)
}

/// Peak resident set size of this process in bytes (Linux `VmHWM`), or `None` where
/// /proc is not available.
pub fn peak_rss_bytes() -> Option<u64> {
    proc_status_bytes("VmHWM:")
}

/// Current resident set size of this process in bytes (Linux `VmRSS`).
pub fn current_rss_bytes() -> Option<u64> {
    proc_status_bytes("VmRSS:")
}

/// DejaVu Sans, embedded so that plots render the same on a vehicle computer without
/// fonts or fontconfig. Its licence is data/fonts/LICENSE.
static FONT: &[u8] = include_bytes!("../data/fonts/DejaVuSans.ttf");

fn register_font() -> anyhow::Result<()> {
    static REGISTERED: OnceLock<Result<(), String>> = OnceLock::new();
    REGISTERED
        .get_or_init(|| {
            plotters::style::register_font("sans-serif", plotters::style::FontStyle::Normal, FONT)
                .map_err(|_| "the embedded DejaVu Sans font is invalid".to_owned())
        })
        .clone()
        .map_err(|message| anyhow!(message))
}

/// Draws the histogram of end-to-end latencies (ms) as a PNG, with the deadline marked.
pub fn write_latency_histogram(
    path: &Path,
    latencies_ms: &[f64],
    deadline_ms: f64,
    title: &str,
) -> anyhow::Result<()> {
    use plotters::prelude::*;

    register_font()?;
    let max_latency = latencies_ms.iter().copied().fold(0.0, f64::max);
    let x_max = (max_latency.max(deadline_ms) * 1.05).max(1.0);
    const BINS: usize = 60;
    let width = x_max / BINS as f64;
    let mut counts = [0u64; BINS];
    for &latency in latencies_ms {
        let bin = ((latency / width) as usize).min(BINS - 1);
        counts[bin] += 1;
    }
    let y_max = counts.iter().copied().max().unwrap_or(0).max(1) as f64 * 1.1;

    let draw = || -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
        let root = BitMapBackend::new(path, (960, 540)).into_drawing_area();
        root.fill(&WHITE)?;
        let mut chart = ChartBuilder::on(&root)
            .caption(title, ("sans-serif", 22))
            .margin(16)
            .x_label_area_size(44)
            .y_label_area_size(64)
            .build_cartesian_2d(0.0..x_max, 0.0..y_max)?;
        chart
            .configure_mesh()
            .disable_x_mesh()
            .x_desc("latency from delivery to score (ms)")
            .y_desc("frames")
            .label_style(("sans-serif", 15))
            .draw()?;
        chart
            .draw_series(counts.iter().enumerate().map(|(bin, &count)| {
                let low = bin as f64 * width;
                Rectangle::new(
                    [(low, 0.0), (low + width, count as f64)],
                    RGBColor(52, 101, 164).filled(),
                )
            }))?
            .label("frames")
            .legend(|(x, y)| {
                Rectangle::new(
                    [(x, y - 5), (x + 12, y + 5)],
                    RGBColor(52, 101, 164).filled(),
                )
            });
        chart
            .draw_series(LineSeries::new(
                [(deadline_ms, 0.0), (deadline_ms, y_max)],
                RED.stroke_width(2),
            ))?
            .label(format!("deadline {deadline_ms:.0} ms"))
            .legend(|(x, y)| PathElement::new([(x, y), (x + 12, y)], RED.stroke_width(2)));
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.9))
            .border_style(BLACK)
            .label_font(("sans-serif", 15))
            .draw()?;
        root.present()?;
        Ok(())
    };
    draw()
        .map_err(|error| anyhow!("{error}"))
        .with_context(|| format!("failed to write the latency histogram {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        let mut samples: Vec<f64> = (1..=100).rev().map(f64::from).collect();
        let stats = LatencyStats::from_samples(&mut samples);
        assert_eq!(stats.samples, 100);
        assert_eq!(stats.p50_ms, 50.0);
        assert_eq!(stats.p99_ms, 99.0);
        assert_eq!(stats.max_ms, 100.0);
        assert_eq!(stats.mean_ms, 50.5);
    }

    #[test]
    fn single_sample_percentiles() {
        let stats = LatencyStats::from_samples(&mut [7.0]);
        assert_eq!((stats.p50_ms, stats.p99_ms, stats.max_ms), (7.0, 7.0, 7.0));
    }

    #[test]
    fn empty_series_is_zero() {
        assert_eq!(LatencyStats::from_samples(&mut []), LatencyStats::default());
    }

    #[test]
    fn rss_is_read_on_linux() {
        if cfg!(target_os = "linux") {
            // The two values are not compared: the kernel updates VmHWM lazily, so it can
            // lag behind VmRSS (seen under qemu-user).
            let peak = peak_rss_bytes().expect("VmHWM is readable");
            let current = current_rss_bytes().expect("VmRSS is readable");
            assert!(peak > 1 << 20, "implausible peak RSS {peak}");
            assert!(current > 1 << 20, "implausible RSS {current}");
        }
    }

    #[test]
    fn histogram_png_is_written() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("latency.png");
        let latencies: Vec<f64> = (0..500).map(|i| 80.0 + (i % 37) as f64).collect();
        write_latency_histogram(&path, &latencies, 200.0, "test").unwrap();
        let image = image::open(&path).unwrap().to_rgb8();
        assert_eq!(image.dimensions(), (960, 540));
        // Bars and the deadline line were drawn: the image is not blank.
        let non_white = image.pixels().filter(|p| p.0 != [255, 255, 255]).count();
        assert!(non_white > 10_000, "only {non_white} drawn pixels");
    }
}
