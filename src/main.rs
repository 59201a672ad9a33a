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
    Detector, FrameOutcome, OverloadPolicy, Pacing, RunOptions, RunSummary, StopFlag,
};
use daain::source::{open_source, SourceOptions, SourceSpec};

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
    /// Stop after this many frames.
    #[arg(long)]
    max_frames: Option<u64>,
    /// Replay a video or still images at recorded speed, delivering each frame at its
    /// timestamp as a camera would. Frames the detector cannot keep up with are dropped
    /// unless the config sets `pipeline.overload = "block"`. Default: as fast as possible.
    #[arg(long)]
    realtime: bool,
}

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"))
        .target(env_logger::Target::Stderr)
        .init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Run(args) => run(args),
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

fn run(args: RunArgs) -> Result<()> {
    let config = match &args.config {
        Some(path) => Config::from_path(path)?,
        None => Config::default(),
    };
    let bundle_dir = args
        .bundle
        .clone()
        .or_else(|| config.bundle.clone())
        .unwrap_or_else(|| PathBuf::from(DEFAULT_BUNDLE));
    let bundle = Bundle::open(&bundle_dir)
        .with_context(|| format!("failed to open bundle {}", bundle_dir.display()))?;
    let mut detector =
        Detector::with_mode(&bundle, config.detector.threshold, config.detector.execution)?;

    let spec = if let Some(path) = &args.video {
        SourceSpec::Video(path.clone())
    } else if let Some(dir) = &args.images {
        SourceSpec::StillDirectory(dir.clone())
    } else if let Some(device) = &args.camera {
        SourceSpec::Camera(device.clone())
    } else {
        bail!("no source given: pass --video PATH, --images DIR or --camera DEVICE");
    };
    let mut source = open_source(&spec, &SourceOptions::default())?;

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
    let stop = StopFlag::new();
    register_stop_signals(&stop)?;
    let options = RunOptions {
        raise_after: config.alerts.raise_after,
        clear_after: config.alerts.clear_after,
        max_frames: args.max_frames,
        segment: args.segmentation_out.is_some(),
        queue_capacity: config.pipeline.queue_capacity,
        overload,
        pacing: if args.realtime {
            Pacing::Realtime
        } else {
            Pacing::AsFastAsPossible
        },
        deadline: Duration::from_millis(config.pipeline.deadline_ms),
        watchdog: Duration::from_millis(config.pipeline.watchdog_ms),
        stop,
    };

    let (alert_sender, alert_receiver) =
        alert::channel_with_policy(config.alerts.capacity, config.alerts.policy);
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
    }
    // The summary is the result of the run, so it is printed whatever the log level.
    eprintln!("summary: {summary} alerts_received={received_alerts}");
    if let Some(error) = summary.source_error {
        bail!("source failed after {} frames: {error}", summary.decoded);
    }
    Ok(())
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
