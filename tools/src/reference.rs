//! The DAAIN pipeline as the published Python implementation runs it, on libtorch (the
//! kernels behind PyTorch eager mode): ESPNet with every PReLU output kept (as forward
//! hooks keep them), each activation map upsampled to the input size (nearest neighbour)
//! and stacked, the mask points read from the stacked maps, then the flow and its
//! negative log-likelihood. `benches/compare/run.sh` times it against the runtime, which
//! reads only the sampled elements and never builds the upsampled maps.

use std::path::Path;
use std::time::Instant;

use anyhow::{ensure, Result};
use serde::Serialize;
use tch::{Device, Tensor};

use daain::bundle::Bundle;

use crate::espnet::Espnet;
use crate::flow::TchFlow;

/// Per-frame times of the reference pipeline, in milliseconds.
#[derive(Debug, Clone, Serialize)]
pub struct ReferenceTimes {
    pub runtime: String,
    pub threads: usize,
    pub frame_ms: Vec<f64>,
    pub backbone_ms: Vec<f64>,
    pub after_backbone_ms: Vec<f64>,
    /// Negative log-likelihood of each frame of the first round.
    pub nll: Vec<f64>,
    pub peak_rss_kib: Option<u64>,
}

/// Returns the peak resident set size of this process in KiB (Linux `VmHWM`).
fn peak_rss_kib() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// Runs the reference pipeline of `bundle` on the preprocessed inputs in `inputs` (f32,
/// little-endian, `n x 3 x H x W`) with `threads` libtorch threads.
pub fn run(bundle_dir: &Path, weights: &Path, inputs: &Path, threads: usize, rounds: usize) -> Result<ReferenceTimes> {
    tch::set_num_threads(threads as i32);
    tch::set_num_interop_threads(1);
    let bundle = Bundle::open(bundle_dir)?;
    let manifest = bundle.manifest();
    let (height, width) = (manifest.input.height as i64, manifest.input.width as i64);
    let espnet = Espnet::load(weights)?;
    let flow = TchFlow::read_safetensors(bundle_dir.join(&manifest.flow.file.file), Device::Cpu)?;
    let points = bundle.mask_points()?;
    // Flat indices of the mask points in the stacked, upsampled maps.
    let plane = height * width;
    let indices: Vec<i64> = points
        .iter()
        .map(|&[c, y, x]| c as i64 * plane + y as i64 * width + x as i64)
        .collect();
    let indices = Tensor::from_slice(&indices);

    let bytes = std::fs::read(inputs)?;
    let frame_len = (3 * plane) as usize;
    ensure!(
        !bytes.is_empty() && bytes.len() % (frame_len * 4) == 0,
        "{} holds {} bytes, not a whole number of 3x{height}x{width} f32 frames",
        inputs.display(),
        bytes.len()
    );
    let values: Vec<f32> = bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    let frames: Vec<Tensor> = values
        .chunks_exact(frame_len)
        .map(|f| Tensor::from_slice(f).reshape([1, 3, height, width]))
        .collect();

    let mut times = ReferenceTimes {
        runtime: "libtorch eager (tch)".to_owned(),
        threads,
        frame_ms: Vec::new(),
        backbone_ms: Vec::new(),
        after_backbone_ms: Vec::new(),
        nll: Vec::new(),
        peak_rss_kib: None,
    };
    tch::no_grad(|| -> Result<()> {
        for round in 0..=rounds {
            for frame in &frames {
                let start = Instant::now();
                let (_logits, taps) = espnet.forward_with_taps(frame)?;
                let backbone_done = Instant::now();
                let upsampled: Vec<Tensor> = taps
                    .iter()
                    .map(|t| t.upsample_nearest2d([height, width], None::<f64>, None::<f64>))
                    .collect();
                let stacked = Tensor::cat(&upsampled, 1).reshape([-1]);
                let sample = stacked.index_select(0, &indices).reshape([1, -1]);
                let (z, log_det) = flow.forward(&sample)?;
                let nll = TchFlow::negative_log_likelihood(&z, &log_det).double_value(&[0]);
                let done = Instant::now();
                // Round 0 warms up and is not timed.
                if round == 0 {
                    times.nll.push(nll);
                    continue;
                }
                times.frame_ms.push((done - start).as_secs_f64() * 1e3);
                times.backbone_ms.push((backbone_done - start).as_secs_f64() * 1e3);
                times.after_backbone_ms.push((done - backbone_done).as_secs_f64() * 1e3);
            }
        }
        Ok(())
    })?;
    times.peak_rss_kib = peak_rss_kib();
    Ok(times)
}
