//! PNG plots of an evaluation: ROC curves and a per-frame score timeline.
//!
//! Text is drawn with `plotters`' `ab_glyph` renderer from DejaVu Sans embedded in the
//! binary (`data/fonts/DejaVuSans.ttf`), so plotting needs neither fontconfig nor any
//! system font.

use std::path::Path;
use std::sync::Once;

use anyhow::{anyhow, Context, Result};
use plotters::prelude::*;
use plotters::style::FontStyle;

use crate::metrics::RocPoint;

const FONT: &str = "sans-serif";
static FONT_BYTES: &[u8] = include_bytes!("../../data/fonts/DejaVuSans.ttf");
static REGISTER_FONT: Once = Once::new();

fn register_font() -> Result<()> {
    let mut result = Ok(());
    REGISTER_FONT.call_once(|| {
        result = plotters::style::register_font(FONT, FontStyle::Normal, FONT_BYTES)
            .map_err(|_| anyhow!("the embedded DejaVu Sans font is invalid"));
    });
    result
}

const PALETTE: [RGBColor; 6] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
];

fn save_png(path: &Path, buffer: &[u8], size: (u32, u32)) -> Result<()> {
    let image = image::RgbImage::from_raw(size.0, size.1, buffer.to_vec())
        .context("plot buffer has the wrong size")?;
    image
        .save_with_format(path, image::ImageFormat::Png)
        .with_context(|| format!("failed to write {}", path.display()))
}

fn plot_error<E: std::fmt::Display>(error: E) -> anyhow::Error {
    anyhow!("plotting failed: {error}")
}

/// Draws ROC curves, one per `(label, curve)`, with the chance diagonal, into a PNG.
pub fn roc_plot(path: &Path, title: &str, curves: &[(String, Vec<RocPoint>)]) -> Result<()> {
    register_font()?;
    let size = (640u32, 520u32);
    let mut buffer = vec![0u8; (size.0 * size.1 * 3) as usize];
    {
        let root = BitMapBackend::with_buffer(&mut buffer, size).into_drawing_area();
        root.fill(&WHITE).map_err(plot_error)?;
        let mut chart = ChartBuilder::on(&root)
            .caption(title, (FONT, 22))
            .margin(12)
            .x_label_area_size(42)
            .y_label_area_size(52)
            .build_cartesian_2d(0f64..1f64, 0f64..1.02f64)
            .map_err(plot_error)?;
        chart
            .configure_mesh()
            .x_desc("false-positive rate")
            .y_desc("true-positive rate")
            .label_style((FONT, 14))
            .draw()
            .map_err(plot_error)?;
        chart
            .draw_series(LineSeries::new([(0.0, 0.0), (1.0, 1.0)], BLACK.mix(0.3)))
            .map_err(plot_error)?;
        for (i, (label, curve)) in curves.iter().enumerate() {
            let color = PALETTE[i % PALETTE.len()];
            let points: Vec<(f64, f64)> = curve
                .iter()
                .map(|point| (point.false_positive_rate, point.true_positive_rate))
                .collect();
            chart
                .draw_series(LineSeries::new(points, color.stroke_width(2)))
                .map_err(plot_error)?
                .label(label.as_str())
                .legend(move |(x, y)| PathElement::new([(x, y), (x + 18, y)], color.stroke_width(2)));
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::LowerRight)
            .label_font((FONT, 14))
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .draw()
            .map_err(plot_error)?;
        root.present().map_err(plot_error)?;
    }
    save_png(path, &buffer, size)
}

/// One stretch of a replayed timeline.
pub struct TimelineSegment {
    pub label: String,
    /// Scores of consecutive frames.
    pub scores: Vec<f64>,
}

/// Maps a score to the plotted value: the signed `log10(1 + |score - threshold|)`, so that
/// the threshold is at 0 and scores many orders of magnitude apart fit one axis.
pub fn signed_log_distance(score: f64, threshold: f64) -> f64 {
    let distance = score - threshold;
    distance.signum() * distance.abs().ln_1p() / std::f64::consts::LN_10
}

/// Draws the scores of consecutive segments of frames against the threshold, marking the
/// frames above it (alerts) in red.
pub fn timeline_plot(path: &Path, title: &str, segments: &[TimelineSegment], threshold: f64) -> Result<()> {
    register_font()?;
    let size = (1000u32, 420u32);
    let mut buffer = vec![0u8; (size.0 * size.1 * 3) as usize];
    let values: Vec<f64> = segments
        .iter()
        .flat_map(|segment| segment.scores.iter().map(|&s| signed_log_distance(s, threshold)))
        .collect();
    let total = values.len().max(1);
    let low = values.iter().copied().fold(0.0f64, f64::min) - 0.5;
    let high = values.iter().copied().fold(0.0f64, f64::max) + 0.5;
    {
        let root = BitMapBackend::with_buffer(&mut buffer, size).into_drawing_area();
        root.fill(&WHITE).map_err(plot_error)?;
        let mut chart = ChartBuilder::on(&root)
            .caption(title, (FONT, 22))
            .margin(12)
            .x_label_area_size(42)
            .y_label_area_size(60)
            .build_cartesian_2d(0f64..total as f64, low..high)
            .map_err(plot_error)?;
        chart
            .configure_mesh()
            .x_desc("frame in replay order")
            .y_desc("sign * log10(1 + |score - threshold|)")
            .label_style((FONT, 14))
            .draw()
            .map_err(plot_error)?;
        chart
            .draw_series(LineSeries::new([(0.0, 0.0), (total as f64, 0.0)], RED.stroke_width(1)))
            .map_err(plot_error)?
            .label("threshold")
            .legend(|(x, y)| PathElement::new([(x, y), (x + 18, y)], RED));
        let points: Vec<(f64, f64)> = values.iter().enumerate().map(|(i, &v)| (i as f64, v)).collect();
        chart
            .draw_series(LineSeries::new(points.clone(), PALETTE[0].stroke_width(1)))
            .map_err(plot_error)?
            .label("score")
            .legend(|(x, y)| PathElement::new([(x, y), (x + 18, y)], PALETTE[0]));
        chart
            .draw_series(
                points
                    .iter()
                    .filter(|(_, v)| *v > 0.0)
                    .map(|&(x, y)| Circle::new((x, y), 3, RED.filled())),
            )
            .map_err(plot_error)?
            .label("alert (above threshold)")
            .legend(|(x, y)| Circle::new((x + 9, y), 3, RED.filled()));
        let mut start = 0usize;
        for segment in segments {
            chart
                .draw_series([Text::new(
                    segment.label.clone(),
                    (start as f64 + 0.5, high - 0.3),
                    (FONT, 14).into_font(),
                )])
                .map_err(plot_error)?;
            if start > 0 {
                chart
                    .draw_series(LineSeries::new(
                        [(start as f64 - 0.5, low), (start as f64 - 0.5, high)],
                        BLACK.mix(0.5),
                    ))
                    .map_err(plot_error)?;
            }
            start += segment.scores.len();
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::LowerRight)
            .label_font((FONT, 14))
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .draw()
            .map_err(plot_error)?;
        root.present().map_err(plot_error)?;
    }
    save_png(path, &buffer, size)
}
