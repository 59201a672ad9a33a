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
    /// Add the combined plan to a bundle: write plan.onnx (the backbone with the mask
    /// gather and the flow as custom operators of the `ai.daain` domain) and record its
    /// SHA-256 in the manifest. The other files stay as they are.
    ExportPlan {
        /// Bundle directory, for example models/default.
        #[arg(long)]
        bundle: PathBuf,
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
        Command::ExportPlan { bundle } => {
            let path = daain_tools::plan::export_plan(&bundle)?;
            log::info!("wrote {} and updated the manifest", path.display());
            Ok(())
        }
    }
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
