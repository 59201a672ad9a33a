//! `daain-tools`: offline steps that prepare what the daain-edge runtime loads.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};

use daain_tools::espnet::Weights;
use daain_tools::onnx;
use daain_tools::training::{self, TrainingConfig};

#[derive(Debug, Parser)]
#[command(name = "daain-tools", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Export ESPNet (p=2, q=8, Cityscapes) to ONNX for a 1x3x256x512 input, with the
    /// logits and the 20 PReLU activations as outputs.
    ExportOnnx {
        /// ESPNet weights: a .safetensors file or a PyTorch .pth state dict.
        #[arg(long)]
        weights: PathBuf,
        /// ONNX file to write.
        #[arg(long)]
        output: PathBuf,
    },
    /// Convert a FrEIA `SequenceINN` of `AllInOneBlock`s (state dict saved as safetensors,
    /// keys `module_list.K.*` with or without a prefix) into a bundle flow file.
    ImportFreia {
        /// FrEIA state dict as safetensors.
        #[arg(long)]
        input: PathBuf,
        /// The blocks' `affine_clamping` (FrEIA's default is 2.0).
        #[arg(long, default_value_t = 2.0)]
        clamp: f64,
        /// Flow file to write (bundle layout).
        #[arg(long)]
        output: PathBuf,
    },
    /// Generate the mask and record the activation vectors of the training clip.
    Record {
        /// Training settings (TOML), for example configs/train-default.toml.
        #[arg(long)]
        config: PathBuf,
        /// Activations file to write (safetensors).
        #[arg(long)]
        output: PathBuf,
    },
    /// Train the flow on recorded activations by maximum likelihood.
    Train {
        #[arg(long)]
        config: PathBuf,
        /// Activations file written by `record`.
        #[arg(long)]
        activations: PathBuf,
        /// Flow file to write (bundle layout).
        #[arg(long)]
        output: PathBuf,
    },
    /// Fit the scores, calibrate the threshold and write the bundle directory.
    Export {
        #[arg(long)]
        config: PathBuf,
        /// Activations file written by `record`.
        #[arg(long)]
        activations: PathBuf,
        /// Flow file written by `train` (or `import-freia`).
        #[arg(long)]
        flow: PathBuf,
        /// Bundle directory to write.
        #[arg(long)]
        output: PathBuf,
    },
    /// Calibrate activation ranges on the training frames of a clip and write an int8
    /// ESPNet (QLinearConv with per-channel weight scales), then compare it with the f32
    /// model on the clip's test frames and print the result as JSON.
    Quantize {
        /// Training settings (TOML) that name the f32 backbone, the clip and its split.
        #[arg(long)]
        config: PathBuf,
        /// Int8 ONNX file to write; the f32 model is the config's `data.backbone`.
        #[arg(long, required_unless_present = "bundle", conflicts_with = "bundle")]
        output: Option<PathBuf>,
        /// Quantise this bundle's backbone instead, write `backbone_int8.onnx` beside it and
        /// record it in the bundle's manifest.
        #[arg(long)]
        bundle: Option<PathBuf>,
        /// Range choice: minmax, mse or percentile:P (P in percent, 50 to 100).
        #[arg(long, default_value = "mse")]
        method: daain_tools::quantize::CalibrationMethod,
        /// Convolutions to quantise: all, or dilated-3x3 (the 3x3 convolutions of stride 1,
        /// which the runtime runs with its own int8 kernel; the others stay f32).
        #[arg(long, value_enum, default_value = "dilated-3x3")]
        convs: daain_tools::quantize::ConvSelection,
        /// Input equalisation strength, 0 (off) to 1: rescales the channels of each
        /// quantised convolution's input against the f32 convolution that produces it.
        #[arg(long, default_value_t = 0.5)]
        equalize: f32,
        /// Leave the biases as they are, without correcting the mean shift that
        /// quantisation causes.
        #[arg(long)]
        no_bias_correction: bool,
        /// Convolutions to keep in f32, by module path (for example encoder.level1.conv).
        #[arg(long, value_delimiter = ',')]
        keep_f32: Vec<String>,
        /// Use every Nth training frame for calibration (1: all of them).
        #[arg(long, default_value_t = 1)]
        calibration_stride: usize,
        /// Also write the f32 model with BatchNorms folded into their convolutions.
        #[arg(long)]
        folded_f32_output: Option<PathBuf>,
        /// Timed runs of each backbone (interleaved) for the speed comparison; 0 skips it.
        #[arg(long, default_value_t = 10)]
        timing_rounds: usize,
    },
    /// Time the DAAIN pipeline as the Python reference runs it (libtorch eager, every
    /// activation map upsampled to the input size before sampling) on preprocessed
    /// inputs, and print per-frame times as JSON.
    ReferenceBench {
        /// Bundle whose mask and flow to use.
        #[arg(long, default_value = "models/default")]
        bundle: PathBuf,
        /// ESPNet weights (.safetensors or .pth).
        #[arg(long, default_value = "models/espnet/espnet_p_2_q_8.safetensors")]
        weights: PathBuf,
        /// Preprocessed inputs: f32 little-endian, n x 3 x 256 x 512.
        #[arg(long)]
        inputs: PathBuf,
        /// libtorch intra-op threads.
        #[arg(long, default_value_t = 1)]
        threads: usize,
        /// Timed passes over the inputs, after one untimed pass.
        #[arg(long, default_value_t = 1)]
        rounds: usize,
    },
    /// Evaluate a bundle: DAAIN and baseline scores on clean held-out frames, perturbed
    /// and attacked versions of them, out-of-distribution footage and benign stills.
    /// Writes results.md, results.csv, frames.csv and PNG plots into the output directory.
    Evaluate {
        /// Evaluation settings (TOML), for example configs/eval-default.toml.
        #[arg(long)]
        config: PathBuf,
        /// Bundle directory; overrides the config's `bundle`.
        #[arg(long)]
        bundle: Option<PathBuf>,
        /// Backbone the detector runs, f32 or int8; overrides the config's `backbone`.
        #[arg(long)]
        backbone: Option<daain::backbone::BackbonePrecision>,
        /// Directory to write the results into.
        #[arg(long)]
        output: PathBuf,
    },
    /// Add the combined plan to a bundle: write plan.onnx (the backbone with the mask
    /// gather and the flow as custom operators of the `ai.daain` domain) and record its
    /// SHA-256 in the manifest. The other files stay as they are.
    ExportPlan {
        /// Bundle directory, for example models/default.
        #[arg(long)]
        bundle: PathBuf,
    },
    /// Build and evaluate one bundle per variant of a training config (mask density,
    /// coupling blocks, augmentation) and write ablation.md and ablation.csv, with every
    /// variant's bundle and evaluation in a directory of its own.
    Ablate {
        /// Ablation settings (TOML), for example configs/ablation.toml.
        #[arg(long)]
        config: PathBuf,
        /// Directory to write the variants and tables into.
        #[arg(long)]
        output: PathBuf,
    },
    /// Train a bundle in one go (record, train and export): generate the mask, record activations of the training clip, train
    /// the flow, fit the scores, calibrate the threshold and write the bundle directory.
    BuildBundle {
        /// Training settings (TOML), for example configs/train-default.toml.
        #[arg(long)]
        config: PathBuf,
        /// Bundle directory to write.
        #[arg(long)]
        output: PathBuf,
    },
}

fn main() -> Result<()> {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    let cli = Cli::parse();
    match cli.command {
        Command::ExportOnnx { weights, output } => export_onnx(&weights, &output),
        Command::BuildBundle { config, output } => build_bundle(&config, &output),
        Command::Record { config, output } => {
            let settings = TrainingConfig::from_path(&config)?;
            training::record_activations(&settings)?.write(&output)?;
            log::info!("wrote activations {}", output.display());
            Ok(())
        }
        Command::Train { config, activations, output } => {
            let settings = TrainingConfig::from_path(&config)?;
            let activations = training::Activations::read(&activations)?;
            let (flow, _) = training::train_flow(&settings, &activations)?;
            flow.write_safetensors(&output)?;
            log::info!("wrote flow {}", output.display());
            Ok(())
        }
        Command::Export { config, activations, flow, output } => {
            let settings = TrainingConfig::from_path(&config)?;
            let activations = training::Activations::read(&activations)?;
            let flow = daain_tools::flow::TchFlow::read_safetensors(&flow, tch::Device::Cpu)?;
            let report = training::export_bundle(&settings, &config, &activations, &flow, &output)?;
            log::info!("wrote bundle {}", output.display());
            println!("{}", serde_json::to_string_pretty(&report)?);
            Ok(())
        }
        Command::ImportFreia { input, clamp, output } => import_freia(&input, clamp, &output),
        Command::ReferenceBench { bundle, weights, inputs, threads, rounds } => {
            let times = daain_tools::reference::run(&bundle, &weights, &inputs, threads, rounds)?;
            println!("{}", serde_json::to_string(&times)?);
            Ok(())
        }
        Command::Quantize {
            config,
            output,
            bundle,
            method,
            convs,
            equalize,
            no_bias_correction,
            keep_f32,
            calibration_stride,
            folded_f32_output,
            timing_rounds,
        } => {
            use daain_tools::quantize;
            let options = quantize::QuantizeOptions {
                method,
                convs,
                equalize,
                bias_correction: !no_bias_correction,
                keep_f32,
            };
            let settings = TrainingConfig::from_path(&config)?;
            let (source, output) = match (&bundle, output) {
                (Some(dir), _) => (dir.join("backbone.onnx"), dir.join(quantize::BUNDLE_INT8_FILE)),
                (None, Some(output)) => (settings.data.backbone.clone(), output),
                (None, None) => anyhow::bail!("pass --output FILE or --bundle DIR"),
            };
            let report = quantize::run(
                &settings,
                &source,
                &options,
                calibration_stride,
                &output,
                folded_f32_output.as_deref(),
                timing_rounds,
            )?;
            if let Some(dir) = &bundle {
                quantize::add_to_bundle(dir, &report)?;
                log::info!("recorded {} in {}", output.display(), dir.join("manifest.json").display());
            }
            println!("{}", serde_json::to_string_pretty(&report)?);
            Ok(())
        }
        Command::Evaluate { config, bundle, backbone, output } => evaluate(&config, bundle, backbone, &output),
        Command::Ablate { config, output } => {
            let settings = daain_tools::ablation::AblationConfig::from_path(&config)?;
            let results = daain_tools::ablation::run(&settings, &config, &output)?;
            log::info!("wrote {} variants into {}", results.len(), output.display());
            Ok(())
        }
        Command::ExportPlan { bundle } => {
            let path = daain_tools::plan::export_plan(&bundle)?;
            log::info!("wrote {} and updated the manifest", path.display());
            Ok(())
        }
    }
}

fn evaluate(
    config_path: &std::path::Path,
    bundle: Option<PathBuf>,
    backbone: Option<daain::backbone::BackbonePrecision>,
    output: &std::path::Path,
) -> Result<()> {
    let mut config = daain_tools::evaluate::EvalConfig::from_path(config_path)?;
    if let Some(backbone) = backbone {
        config.backbone = backbone;
    }
    let bundle_dir = bundle.unwrap_or_else(|| config.bundle.clone());
    let evaluation = daain_tools::evaluate::evaluate(&config, &bundle_dir)
        .with_context(|| format!("failed to evaluate bundle {}", bundle_dir.display()))?;
    daain_tools::evaluate::check_complete(&evaluation)?;
    let command = format!(
        "daain-tools evaluate --config {} --bundle {} --backbone {} --output {}",
        config_path.display(),
        bundle_dir.display(),
        config.backbone,
        output.display()
    );
    let targets = daain_tools::report::write_all(&evaluation, output, &command)?;
    log::info!(
        "wrote {}: mean AUROC {:.3}, mean FPR at 95% TPR {:.3}, clean false alarms {:.3}",
        output.display(),
        targets.mean_auroc,
        targets.mean_fpr_at_95_tpr,
        targets.clean_false_alarm_rate
    );
    Ok(())
}

fn export_onnx(weights_path: &std::path::Path, output: &std::path::Path) -> Result<()> {
    let weights = Weights::load(weights_path)?;
    let op_counts = onnx::export_espnet(&weights, output)
        .with_context(|| format!("failed to export {} to ONNX", weights_path.display()))?;
    log::info!("wrote {}", output.display());
    for (op_type, count) in &op_counts {
        println!("{op_type}\t{count}");
    }
    Ok(())
}

fn build_bundle(config_path: &std::path::Path, output: &std::path::Path) -> Result<()> {
    let config = daain_tools::training::TrainingConfig::from_path(config_path)?;
    let report = daain_tools::training::build_bundle(&config, config_path, output)?;
    log::info!("wrote bundle {}", output.display());
    println!("{}", serde_json::to_string_pretty(&report)?);
    Ok(())
}

fn import_freia(input: &std::path::Path, clamp: f64, output: &std::path::Path) -> Result<()> {
    let flow = daain_tools::flow::TchFlow::import_freia_safetensors(input, clamp, tch::Device::Cpu)
        .with_context(|| format!("failed to import FrEIA flow {}", input.display()))?;
    flow.write_safetensors(output)?;
    let config = flow.config();
    log::info!(
        "wrote {}: {} blocks, dim {}, hidden {}",
        output.display(),
        config.blocks,
        config.dim,
        config.hidden
    );
    Ok(())
}
