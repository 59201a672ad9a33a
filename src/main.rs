//! `daain`: scores every frame of a video, image folder or camera for anomalous or
//! adversarial input and reports alerts.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};

use daain::alert::{self, Alert};
use daain::bundle::Bundle;
use daain::config::Config;
use daain::pipeline::{
    Detector, DetectorOptions, FrameOutcome, OverloadPolicy, Pacing, RunOptions, RunSummary,
    StopFlag,
};
use daain::source::{open_source, FrameSource, Reconnecting, SourceOptions, SourceSpec};

/// Default bundle directory, relative to the working directory.
const DEFAULT_BUNDLE: &str = "models/default";

#[derive(Parser)]
#[command(
    name = "daain",
    version,
    about = "Detect anomalous and adversarial camera input to ESPNet"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Score every frame of a source and report alerts.
    Run(RunArgs),
    /// Replay a clip at camera rate through the frame loop for a set time, as a
    /// hardware-in-the-loop benchmark, and write a report (JSON and a latency histogram).
    BenchHil(BenchHilArgs),
    /// Print a bundle's manifest summary and check its files.
    Inspect {
        /// Bundle directory.
        #[arg(long, default_value = DEFAULT_BUNDLE)]
        bundle: PathBuf,
    },
}

#[derive(clap::Args)]
#[command(group(clap::ArgGroup::new("source").required(true).args(["video", "images", "camera"])))]
struct RunArgs {
    /// Video file to replay (any container and codec FFmpeg decodes).
    #[arg(long)]
    video: Option<PathBuf>,
    /// Directory of still images (JPEG or PNG), scored in file-name order.
    #[arg(long)]
    images: Option<PathBuf>,
    /// V4L2 camera device, for example /dev/video0.
    #[arg(long)]
    camera: Option<PathBuf>,
    /// Bundle directory [default: the config's `bundle`, else models/default].
    #[arg(long)]
    bundle: Option<PathBuf>,
    /// TOML configuration file (see configs/default.toml).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Print one JSON object per frame on stdout (logs stay on stderr).
    #[arg(long)]
    json: bool,
    /// Write the per-pixel class index (0..19) of every frame as an 8-bit PNG into DIR.
    #[arg(long, value_name = "DIR")]
    segmentation_out: Option<PathBuf>,
    /// Append every alert as one JSON object per line to FILE (created if missing), for
    /// an integration to read. A named pipe works too.
    #[arg(long, value_name = "FILE")]
    alerts_out: Option<PathBuf>,
    /// Stop after this many frames.
    #[arg(long)]
    max_frames: Option<u64>,
    /// Replay a video or still images at recorded speed, delivering each frame at its
    /// timestamp as a camera would. Frames the detector cannot keep up with are dropped
    /// unless the config sets `pipeline.overload = "block"`. Default: as fast as possible.
    #[arg(long)]
    realtime: bool,
}

#[derive(clap::Args)]
struct BenchHilArgs {
    /// Video file to replay in a loop.
    #[arg(long)]
    video: PathBuf,
    /// Bundle directory [default: the config's `bundle`, else models/default].
    #[arg(long)]
    bundle: Option<PathBuf>,
    /// TOML configuration file (see configs/default.toml).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Length of the run in seconds of camera time.
    #[arg(long, default_value_t = 60.0)]
    seconds: f64,
    /// Camera rate in frames per second [default: the clip's own rate].
    #[arg(long)]
    fps: Option<f64>,
    /// Directory for report.json and latency.png (created if missing).
    #[arg(long, value_name = "DIR")]
    report: PathBuf,
}

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"))
        .target(env_logger::Target::Stderr)
        .init();
    if daain::heap::tune_allocator() {
        log::debug!("glibc malloc: large blocks stay in the heap between frames, in one arena");
    }
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Run(args) => run(args),
        Command::BenchHil(args) => bench_hil(args),
        Command::Inspect { bundle } => inspect(&bundle),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

fn inspect(dir: &Path) -> Result<()> {
    let bundle = Bundle::open(dir)?;
    let manifest = bundle.manifest();
    println!("bundle {}", dir.display());
    println!(
        "  backbone    {} ({} taps)",
        manifest.backbone.file.file,
        manifest.backbone.taps.len()
    );
    println!(
        "  mask        {} points, seed {}, min distance {}",
        manifest.mask.points, manifest.mask.seed, manifest.mask.min_distance
    );
    println!(
        "  flow        {} blocks, dim {}, hidden {}",
        manifest.flow.blocks, manifest.flow.dim, manifest.flow.hidden
    );
    match &manifest.plan {
        Some(plan) => println!("  plan        {} (backbone, gather and flow)", plan.file),
        None => println!("  plan        none (run `daain-tools export-plan` to add one)"),
    }
    println!("  score       {}", manifest.score.kind);
    println!(
        "  threshold   {} (false-positive rate {} on {} frames of {})",
        manifest.threshold.value,
        manifest.threshold.false_positive_rate,
        manifest.threshold.calibration_frames,
        manifest.threshold.calibration_source
    );
    Ok(())
}

/// Loop settings from the config, for a run with no frame limit and no segmentation.
fn run_options(
    config: &Config,
    overload: OverloadPolicy,
    pacing: Pacing,
    stop: StopFlag,
) -> RunOptions {
    RunOptions {
        raise_after: config.alerts.raise_after,
        clear_after: config.alerts.clear_after,
        max_frames: None,
        segment: false,
        queue_capacity: config.pipeline.queue_capacity,
        overload,
        pacing,
        deadline: Duration::from_millis(config.pipeline.deadline_ms),
        watchdog: Duration::from_millis(config.pipeline.watchdog_ms),
        source_error_limit: config.pipeline.source_error_limit,
        stop,
    }
}

fn detector_options(config: &Config) -> DetectorOptions {
    DetectorOptions {
        threshold: config.detector.threshold,
        precision: config.detector.backbone,
        threads: config.detector.threads,
        execution: config.detector.execution,
    }
}

fn load_config(path: Option<&Path>) -> Result<Config> {
    Ok(match path {
        Some(path) => Config::from_path(path)?,
        None => Config::default(),
    })
}

/// Returns the bundle directory: the option, else the config's `bundle`, else the default.
fn bundle_dir(option: Option<&PathBuf>, config: &Config) -> PathBuf {
    option
        .cloned()
        .or_else(|| config.bundle.clone())
        .unwrap_or_else(|| PathBuf::from(DEFAULT_BUNDLE))
}

fn run(args: RunArgs) -> Result<()> {
    let config = load_config(args.config.as_deref())?;
    let bundle_dir = bundle_dir(args.bundle.as_ref(), &config);
    let bundle = Bundle::open(&bundle_dir)
        .with_context(|| format!("failed to open bundle {}", bundle_dir.display()))?;
    let mut detector = Detector::with_options(&bundle, &detector_options(&config))?;

    let spec = if let Some(path) = &args.video {
        SourceSpec::Video(path.clone())
    } else if let Some(dir) = &args.images {
        SourceSpec::StillDirectory(dir.clone())
    } else if let Some(device) = &args.camera {
        SourceSpec::Camera(device.clone())
    } else {
        bail!("no source given: pass --video PATH, --images DIR or --camera DEVICE");
    };
    let stop = StopFlag::new();
    let mut source = open_spec(&spec, &config, &stop)?;

    if let Some(dir) = &args.segmentation_out {
        std::fs::create_dir_all(dir).with_context(|| {
            format!("failed to create segmentation directory {}", dir.display())
        })?;
    }

    let overload = config
        .pipeline
        .overload
        .unwrap_or(if args.realtime || args.camera.is_some() {
            OverloadPolicy::DropOldest
        } else {
            OverloadPolicy::Block
        });
    register_stop_signals(&stop)?;
    let pacing = if args.realtime {
        Pacing::Realtime
    } else {
        Pacing::AsFastAsPossible
    };
    let options = RunOptions {
        max_frames: args.max_frames,
        segment: args.segmentation_out.is_some(),
        ..run_options(&config, overload, pacing, stop)
    };

    let (alert_sender, alert_receiver) =
        alert::channel_with_policy(config.alerts.capacity, config.alerts.policy);
    let mut alert_sink = match &args.alerts_out {
        Some(path) => Some(AlertSink::open(path)?),
        None => None,
    };
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    let mut received_alerts = 0u64;
    let mut on_frame = |outcome: &FrameOutcome, classes: Option<&[u8]>| -> Result<()> {
        if let (Some(dir), Some(classes)) = (&args.segmentation_out, classes) {
            let path = dir.join(format!("{:06}.png", outcome.frame));
            daain::pipeline::write_class_png(&path, classes, outcome.segmentation_size)?;
        }
        if args.json {
            serde_json::to_writer(&mut out, outcome)?;
            writeln!(out)?;
        } else {
            writeln!(out, "{}", outcome.summary())?;
        }
        // The CLI is the alert consumer: drain after every frame.
        for alert in alert_receiver.try_iter() {
            received_alerts += 1;
            log_alert(&alert);
            if let Some(sink) = alert_sink.as_mut() {
                sink.write(&alert)?;
            }
        }
        Ok(())
    };

    let summary: RunSummary = daain::pipeline::run(
        source.as_mut(),
        &mut detector,
        &alert_sender,
        &options,
        &mut on_frame,
    )?;
    for alert in alert_receiver.try_iter() {
        received_alerts += 1;
        log_alert(&alert);
        if let Some(sink) = alert_sink.as_mut() {
            sink.write(&alert)?;
        }
    }
    // The summary is the result of the run, so it is printed whatever the log level.
    eprintln!("summary: {summary} alerts_received={received_alerts}");
    if let Some(error) = summary.source_error {
        bail!(
            "the source failed {} time(s) and delivered {} frames; last error: {error}",
            summary.source_errors,
            summary.decoded
        );
    }
    Ok(())
}

fn bench_hil(args: BenchHilArgs) -> Result<()> {
    if !(args.seconds.is_finite() && args.seconds > 0.0) {
        bail!(
            "--seconds {} is invalid; pass a positive number",
            args.seconds
        );
    }
    let config = load_config(args.config.as_deref())?;
    let bundle_dir = bundle_dir(args.bundle.as_ref(), &config);
    let bundle = Bundle::open(&bundle_dir)
        .with_context(|| format!("failed to open bundle {}", bundle_dir.display()))?;
    let mut detector = Detector::with_options(&bundle, &detector_options(&config))?;

    let spec = SourceSpec::Video(args.video.clone());
    let mut open: daain::hil::OpenClip =
        Box::new(move || open_source(&spec, &SourceOptions::default()));
    let first_pass = open()?;
    let frame_rate = match (args.fps, first_pass.nominal_frame_rate()) {
        (Some(fps), _) => fps,
        (None, Some(rate)) => rate,
        (None, None) => bail!(
            "{} declares no frame rate; pass --fps",
            args.video.display()
        ),
    };
    let mut source = daain::hil::LoopingReplay::with_first_pass(open, first_pass, frame_rate)?;
    std::fs::create_dir_all(&args.report).with_context(|| {
        format!(
            "failed to create report directory {}",
            args.report.display()
        )
    })?;

    let stop = StopFlag::new();
    register_stop_signals(&stop)?;
    let requested = Duration::from_secs_f64(args.seconds);
    let frames = (args.seconds * frame_rate).ceil() as u64;
    let overload = config
        .pipeline
        .overload
        .unwrap_or(OverloadPolicy::DropOldest);
    let options = RunOptions {
        max_frames: Some(frames),
        ..run_options(&config, overload, Pacing::Realtime, stop)
    };
    let (alert_sender, alert_receiver) =
        alert::channel_with_policy(config.alerts.capacity, config.alerts.policy);
    let mut samples = daain::hil::StageSamples::with_capacity(frames as usize);
    let mut alerts_received = 0u64;
    let started = std::time::Instant::now();
    let summary = daain::pipeline::run(
        &mut source,
        &mut detector,
        &alert_sender,
        &options,
        &mut |outcome: &FrameOutcome, _| {
            samples.push(outcome);
            alerts_received += alert_receiver.try_iter().count() as u64;
            Ok(())
        },
    )?;
    alerts_received += alert_receiver.try_iter().count() as u64;
    let elapsed = started.elapsed();
    let latencies = samples.latencies().to_vec();

    let report = daain::hil::HilReport::new(
        args.video.display().to_string(),
        bundle_dir.display().to_string(),
        frame_rate,
        requested,
        elapsed,
        source.passes(),
        options.deadline,
        summary,
        alerts_received,
        samples,
        format!(
            "{} backbone, {} thread(s), {}",
            config.detector.backbone,
            config.detector.threads.max(1),
            config.detector.execution
        ),
    );
    let json_path = args.report.join("report.json");
    std::fs::write(&json_path, serde_json::to_string_pretty(&report)? + "\n")
        .with_context(|| format!("failed to write {}", json_path.display()))?;
    let png_path = args.report.join("latency.png");
    daain::hil::write_latency_histogram(
        &png_path,
        &latencies,
        report.deadline_ms,
        &format!(
            "daain bench-hil: {} frames at {frame_rate} fps, p50 {:.1} ms, p99 {:.1} ms",
            report.summary.scored, report.stages["latency"].p50_ms, report.stages["latency"].p99_ms
        ),
    )?;
    eprint!("{}", report.text());
    eprintln!("report: {} and {}", json_path.display(), png_path.display());
    if let Some(error) = &report.summary.source_error {
        bail!(
            "the source failed {} time(s); last error: {error}",
            report.summary.source_errors
        );
    }
    Ok(())
}

/// Opens the source; a camera is wrapped so that it is reopened when it disappears,
/// unless the config turns that off.
fn open_spec(spec: &SourceSpec, config: &Config, stop: &StopFlag) -> Result<Box<dyn FrameSource>> {
    let options = SourceOptions::default();
    if !matches!(spec, SourceSpec::Camera(_)) || !config.camera.reconnect {
        return Ok(open_source(spec, &options)?);
    }
    let spec = spec.clone();
    let open = Box::new(move || open_source(&spec, &options));
    let source = Reconnecting::open(open, config.camera.backoff(), stop.as_atomic())?;
    Ok(Box::new(source))
}

/// Makes SIGINT and SIGTERM request a clean stop: the source is closed, the frames
/// already read are scored and reported, and the summary is printed. A second signal
/// while stopping exits at once with status 1.
fn register_stop_signals(stop: &StopFlag) -> Result<()> {
    use signal_hook::consts::{SIGINT, SIGTERM};
    let flag = stop.as_atomic();
    for signal in [SIGINT, SIGTERM] {
        // Registered first, so it runs before the second handler sets the flag.
        signal_hook::flag::register_conditional_shutdown(signal, 1, Arc::clone(&flag))
            .with_context(|| format!("failed to install the handler for signal {signal}"))?;
        signal_hook::flag::register(signal, Arc::clone(&flag))
            .with_context(|| format!("failed to install the handler for signal {signal}"))?;
    }
    Ok(())
}

/// JSON-lines file that receives every alert, flushed after each one so a reader sees
/// it at once.
struct AlertSink {
    path: PathBuf,
    file: std::io::BufWriter<std::fs::File>,
}

impl AlertSink {
    fn open(path: &Path) -> Result<Self> {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .with_context(|| format!("failed to open the alert file {}", path.display()))?;
        Ok(Self {
            path: path.to_owned(),
            file: std::io::BufWriter::new(file),
        })
    }

    fn write(&mut self, alert: &Alert) -> Result<()> {
        let line = serde_json::json!({
            "frame": alert.frame,
            "time_s": alert.timestamp.as_secs_f64(),
            "level": alert.level,
            "score": alert.score,
            "threshold": alert.threshold,
            "message": alert.message,
        });
        serde_json::to_writer(&mut self.file, &line)?;
        writeln!(self.file)?;
        self.file
            .flush()
            .with_context(|| format!("failed to write the alert file {}", self.path.display()))
    }
}

fn log_alert(alert: &Alert) {
    use daain::alert::AlertLevel;
    if !alert.message.is_empty() {
        // ERROR, STALE and resume alerts carry their cause; their score means nothing.
        let message = format!("frame {}: {} ({})", alert.frame, alert.level, alert.message);
        match alert.level {
            AlertLevel::Ok => log::info!("{message}"),
            _ => log::warn!("{message}"),
        }
        return;
    }
    match alert.level {
        AlertLevel::Ok => log::info!(
            "frame {}: level back to OK (score {:.3}, threshold {:.3})",
            alert.frame,
            alert.score,
            alert.threshold
        ),
        _ => log::warn!(
            "frame {}: {} score {:.3} above threshold {:.3}",
            alert.frame,
            alert.level,
            alert.score,
            alert.threshold
        ),
    }
}
