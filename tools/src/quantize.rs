//! Post-training int8 quantisation of the exported ESPNet for tract.
//!
//! tract 0.23 runs integer kernels only for `QLinearConv`, `ConvInteger` and
//! `QLinearMatMul`. A `DequantizeLinear -> Conv -> QuantizeLinear` pattern (QDQ) still
//! runs in f32, and onnxruntime's `com.microsoft` operators (`QLinearAdd`,
//! `QLinearConcat`) do not load. So each quantised convolution quantises its f32 input
//! once (`QuantizeLinear`, shared by every convolution that reads the same value) and
//! then takes one of two forms:
//!
//! ```text
//! output read only by quantised convolutions:  QLinearConv -> int8 output
//! output read by f32 operators:                ConvInteger -> Cast -> Mul (-> Add bias)
//! ```
//!
//! The first form hands the int8 output straight to the next convolutions. The second
//! keeps the exact int32 accumulator and rescales it per output channel, so no output
//! rounding adds to the error of the sums and concatenations after it. Weights are int8
//! with one scale per output channel. PRelu, Add, Concat, BatchNormalization, AveragePool
//! and ConvTranspose stay f32.
//!
//! By default ([`ConvSelection::Dilated3x3`]) only the 3x3 convolutions of stride 1 are
//! quantised, each as `QuantizeLinear -> ConvInteger -> Cast -> Mul -> Add`, which the
//! runtime runs as one int8 operator of its own (`daain::rewrite::qconv3x3`). tract's own
//! int8 convolution spends most of its time in im2col and requantisation passes, so the
//! 1x1 convolutions are faster in f32.
//!
//! Before quantising, every BatchNormalization that directly follows a Conv is folded into
//! that Conv's weights and bias. This also helps the f32 model. Activation ranges come
//! from real frames run through tract in f32 (see [`CalibrationMethod`]). Two more steps
//! reduce the error: [`equalize_inputs`] evens out the channels of the values the
//! quantised convolutions read, and bias correction ([`rewrite`]) removes the mean shift
//! that quantisation causes in each convolution's output.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::Path;

use anyhow::{bail, ensure, Context, Result};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::Serialize;
use tract_onnx::pb;
use tract_onnx::prelude::*;

use daain::backbone::{argmax_classes, Backbone};
use daain::preprocess::{InputConvention, Preprocessor};
use daain::source::Frame;

use crate::onnx::write_model;
use crate::record::{load_backbone, read_video};
use crate::training::{role_of, Role, TrainingConfig};

/// Values kept per calibrated tensor and frame for the percentile and MSE methods.
const SAMPLES_PER_FRAME: usize = 4096;

/// Rule that chooses activation ranges from the calibration values.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
#[serde(rename_all = "kebab-case", tag = "kind")]
pub enum CalibrationMethod {
    /// The smallest and largest value seen.
    MinMax,
    /// The given lower and upper percentiles (in percent, for example 99.99) of the values.
    Percentile { percent: f64 },
    /// The range, shrunk from min/max in steps, with the least mean squared quantisation
    /// error over the sampled values.
    Mse,
}

impl std::str::FromStr for CalibrationMethod {
    type Err = anyhow::Error;

    fn from_str(text: &str) -> Result<Self> {
        match text {
            "minmax" => Ok(Self::MinMax),
            "mse" => Ok(Self::Mse),
            _ => {
                let percent = text
                    .strip_prefix("percentile:")
                    .and_then(|p| p.parse::<f64>().ok())
                    .filter(|p| (50.0..=100.0).contains(p));
                match percent {
                    Some(percent) => Ok(Self::Percentile { percent }),
                    None => bail!(
                        "calibration method {text:?} is invalid: use minmax, mse or \
                         percentile:P with P between 50 and 100 (for example percentile:99.99)"
                    ),
                }
            }
        }
    }
}

/// Convolutions a quantisation turns into int8.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum ConvSelection {
    /// Every convolution not kept in f32.
    All,
    /// Only the 3x3 convolutions of stride 1 with padding equal to the dilation (ESPNet's
    /// dilated pyramids), which the runtime runs with its own int8 kernel. The others,
    /// mostly 1x1, stay f32 and the int8 convolutions quantise their f32 input.
    #[value(name = "dilated-3x3")]
    #[serde(rename = "dilated-3x3")]
    Dilated3x3,
}

/// Settings of one quantisation.
#[derive(Debug, Clone, Serialize)]
pub struct QuantizeOptions {
    pub method: CalibrationMethod,
    pub convs: ConvSelection,
    /// Strength of the input equalisation, 0 (off) to 1 (see [`equalize_inputs`]).
    pub equalize: f32,
    /// Whether each quantised convolution's bias absorbs the mean change of its output
    /// that quantisation causes on the calibration frames (see [`rewrite`]).
    pub bias_correction: bool,
    /// Convolutions that stay f32, named by their weight's module path without
    /// `.weight` (for example `encoder.level1.conv`).
    pub keep_f32: Vec<String>,
}

/// Value range statistics of one tensor over the calibration frames.
#[derive(Debug, Clone, Default)]
pub struct TensorStats {
    pub min: f32,
    pub max: f32,
    /// A random subset of the values, [`SAMPLES_PER_FRAME`] per frame.
    pub samples: Vec<f32>,
    /// Mean of each channel.
    pub channel_mean: Vec<f64>,
    /// Mean square of each channel.
    pub channel_mean_square: Vec<f64>,
    /// Mean of each channel after quantising and dequantising every value with the
    /// parameters given to [`calibrate`], if any.
    pub channel_mean_quantized: Vec<f64>,
}

/// Affine int8 quantisation: `real = scale * (q - zero_point)`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct QuantParams {
    pub scale: f32,
    pub zero_point: i8,
}

impl QuantParams {
    /// Returns the parameters that map `[lo, hi]` (widened to contain 0, so that zero
    /// padding is exact) onto -128..=127.
    pub fn from_range(lo: f32, hi: f32) -> Self {
        let lo = lo.min(0.0);
        let hi = hi.max(0.0);
        let scale = ((hi - lo) / 255.0).max(1e-8);
        let zero_point = (-128.0 - lo / scale).round().clamp(-128.0, 127.0) as i8;
        Self { scale, zero_point }
    }

    fn quantize(&self, value: f32) -> i8 {
        (value / self.scale + self.zero_point as f32)
            .round()
            .clamp(-128.0, 127.0) as i8
    }

    fn dequantize(&self, q: i8) -> f32 {
        self.scale * (q as f32 - self.zero_point as f32)
    }
}

impl TensorStats {
    /// Returns the quantisation parameters this tensor gets under `method`.
    pub fn params(&self, method: CalibrationMethod) -> QuantParams {
        match method {
            CalibrationMethod::MinMax => QuantParams::from_range(self.min, self.max),
            CalibrationMethod::Percentile { percent } => {
                let mut sorted = self.samples.clone();
                sorted.sort_by(f32::total_cmp);
                let at = |fraction: f64| {
                    let index = ((sorted.len() - 1) as f64 * fraction).round() as usize;
                    sorted[index]
                };
                QuantParams::from_range(at(1.0 - percent / 100.0), at(percent / 100.0))
            }
            CalibrationMethod::Mse => {
                let mut best = (f64::INFINITY, QuantParams::from_range(self.min, self.max));
                for step in 0..=14 {
                    let shrink = 1.0 - 0.05 * step as f32;
                    let params = QuantParams::from_range(self.min * shrink, self.max * shrink);
                    let error: f64 = self
                        .samples
                        .iter()
                        .map(|&v| {
                            let d = (params.dequantize(params.quantize(v)) - v) as f64;
                            d * d
                        })
                        .sum();
                    if error < best.0 {
                        best = (error, params);
                    }
                }
                best.1
            }
        }
    }
}

/// Reads an ONNX model file into its protobuf form.
pub fn read_model(path: &Path) -> Result<pb::ModelProto> {
    tract_onnx::onnx()
        .proto_model_for_path(path)
        .with_context(|| format!("failed to read ONNX model {}", path.display()))
}

fn graph(model: &pb::ModelProto) -> &pb::GraphProto {
    model.graph.as_ref().expect("ONNX model without a graph")
}

fn graph_mut(model: &mut pb::ModelProto) -> &mut pb::GraphProto {
    model.graph.as_mut().expect("ONNX model without a graph")
}

/// Returns the values of an f32 initializer stored as `raw_data` or `float_data`.
fn f32_values(tensor: &pb::TensorProto) -> Result<Vec<f32>> {
    ensure!(
        tensor.data_type == pb::tensor_proto::DataType::Float as i32,
        "initializer {} is not f32",
        tensor.name
    );
    if !tensor.raw_data.is_empty() {
        Ok(tensor
            .raw_data
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect())
    } else {
        Ok(tensor.float_data.clone())
    }
}

fn initializer<'a>(graph: &'a pb::GraphProto, name: &str) -> Option<&'a pb::TensorProto> {
    graph.initializer.iter().find(|t| t.name == name)
}

fn tensor_proto(name: &str, dims: &[usize], data_type: pb::tensor_proto::DataType, raw: Vec<u8>) -> pb::TensorProto {
    pb::TensorProto {
        name: name.to_owned(),
        dims: dims.iter().map(|&d| d as i64).collect(),
        data_type: data_type as i32,
        raw_data: raw,
        ..Default::default()
    }
}

fn f32_tensor(name: &str, dims: &[usize], values: &[f32]) -> pb::TensorProto {
    let raw = values.iter().flat_map(|v| v.to_le_bytes()).collect();
    tensor_proto(name, dims, pb::tensor_proto::DataType::Float, raw)
}

fn i8_tensor(name: &str, dims: &[usize], values: &[i8]) -> pb::TensorProto {
    let raw = values.iter().map(|&v| v as u8).collect();
    tensor_proto(name, dims, pb::tensor_proto::DataType::Int8, raw)
}

fn i32_tensor(name: &str, dims: &[usize], values: &[i32]) -> pb::TensorProto {
    let raw = values.iter().flat_map(|v| v.to_le_bytes()).collect();
    tensor_proto(name, dims, pb::tensor_proto::DataType::Int32, raw)
}

fn float_attribute(node: &pb::NodeProto, name: &str) -> Option<f32> {
    node.attribute.iter().find(|a| a.name == name).map(|a| a.f)
}

/// Returns how many nodes read each value.
fn consumer_counts(graph: &pb::GraphProto) -> HashMap<String, usize> {
    let mut counts = HashMap::new();
    for node in &graph.node {
        for input in &node.input {
            *counts.entry(input.clone()).or_insert(0) += 1;
        }
    }
    counts
}

/// Folds every BatchNormalization whose input is a Conv output read by nothing else into
/// that Conv (`w' = w * s`, `b' = (b - mean) * s + beta` with `s = gamma / sqrt(var + eps)`
/// per output channel) and returns the number folded. The Conv takes over the BatchNorm's
/// output name, so graph outputs and taps keep their names.
pub fn fold_batch_norms(model: &mut pb::ModelProto) -> Result<usize> {
    let graph = graph_mut(model);
    let consumers = consumer_counts(graph);
    let outputs: HashSet<String> = graph.output.iter().map(|o| o.name.clone()).collect();
    let producers: HashMap<String, usize> = graph
        .node
        .iter()
        .enumerate()
        .map(|(i, n)| (n.output[0].clone(), i))
        .collect();
    let mut folded = Vec::new();
    for (bn_index, bn) in graph.node.iter().enumerate() {
        if bn.op_type != "BatchNormalization" {
            continue;
        }
        let Some(&conv_index) = producers.get(&bn.input[0]) else {
            continue;
        };
        let conv = &graph.node[conv_index];
        if conv.op_type != "Conv"
            || consumers.get(&conv.output[0]) != Some(&1)
            || outputs.contains(&conv.output[0])
        {
            continue;
        }
        folded.push((conv_index, bn_index));
    }
    for &(conv_index, bn_index) in &folded {
        let bn = graph.node[bn_index].clone();
        let epsilon = float_attribute(&bn, "epsilon").unwrap_or(1e-5);
        let param = |i: usize| -> Result<Vec<f32>> {
            f32_values(initializer(graph, &bn.input[i]).context("BatchNorm parameter is not an initializer")?)
        };
        let (gamma, beta, mean, var) = (param(1)?, param(2)?, param(3)?, param(4)?);
        let conv = graph.node[conv_index].clone();
        let weight = initializer(graph, &conv.input[1]).context("Conv weight is not an initializer")?;
        let dims: Vec<usize> = weight.dims.iter().map(|&d| d as usize).collect();
        let mut w = f32_values(weight)?;
        let channels = dims[0];
        ensure!(gamma.len() == channels, "BatchNorm {} has {} channels, its Conv {channels}", bn.name, gamma.len());
        let bias = match conv.input.get(2) {
            Some(name) => f32_values(initializer(graph, name).context("Conv bias is not an initializer")?)?,
            None => vec![0.0; channels],
        };
        let per_channel = w.len() / channels;
        let mut new_bias = vec![0.0; channels];
        for o in 0..channels {
            let s = gamma[o] / (var[o] + epsilon).sqrt();
            for v in &mut w[o * per_channel..(o + 1) * per_channel] {
                *v *= s;
            }
            new_bias[o] = (bias[o] - mean[o]) * s + beta[o];
        }
        let weight_name = format!("{}.folded", conv.input[1]);
        let bias_name = format!("{}.folded_bias", conv.input[1]);
        graph.initializer.push(f32_tensor(&weight_name, &dims, &w));
        graph.initializer.push(f32_tensor(&bias_name, &[channels], &new_bias));
        let node = &mut graph.node[conv_index];
        node.input = vec![conv.input[0].clone(), weight_name, bias_name];
        node.output = vec![bn.output[0].clone()];
    }
    let removed: HashSet<usize> = folded.iter().map(|&(_, bn)| bn).collect();
    let mut index = 0;
    graph.node.retain(|_| {
        index += 1;
        !removed.contains(&(index - 1))
    });
    remove_unused_initializers(graph);
    Ok(folded.len())
}

fn remove_unused_initializers(graph: &mut pb::GraphProto) {
    let used: HashSet<String> = graph.node.iter().flat_map(|n| n.input.iter().cloned()).collect();
    graph.initializer.retain(|t| used.contains(&t.name));
}

/// Returns the module path of a Conv node, from its weight initializer's name.
fn conv_path(node: &pb::NodeProto) -> String {
    let weight = &node.input[1];
    let base = weight.strip_suffix(".folded").unwrap_or(weight);
    base.strip_suffix(".weight").unwrap_or(base).to_owned()
}

/// Returns whether `node` is a 3x3 convolution of stride 1, one group and padding equal
/// to its dilation.
fn is_dilated_3x3(graph: &pb::GraphProto, node: &pb::NodeProto) -> bool {
    let ints = |name: &str, default: &[i64]| {
        node.attribute
            .iter()
            .find(|a| a.name == name)
            .map_or_else(|| default.to_vec(), |a| a.ints.clone())
    };
    let group = node.attribute.iter().find(|a| a.name == "group").map_or(1, |a| a.i);
    let dilations = ints("dilations", &[1, 1]);
    let kernel = initializer(graph, &node.input[1]).map(|w| w.dims.clone());
    kernel.is_some_and(|dims| dims.len() == 4 && dims[2..] == [3, 3])
        && ints("strides", &[1, 1]) == [1, 1]
        && group == 1
        && dilations.len() == 2
        && dilations[0] == dilations[1]
        && ints("pads", &[0; 4]) == [dilations[0]; 4]
}

/// Returns the Conv nodes to quantise, and the values to calibrate: their inputs and
/// outputs.
pub fn quantised_convs(model: &pb::ModelProto, options: &QuantizeOptions) -> Result<(Vec<usize>, Vec<String>)> {
    let graph = graph(model);
    let mut known = HashSet::new();
    let mut convs = Vec::new();
    let mut values = Vec::new();
    for (i, node) in graph.node.iter().enumerate() {
        if node.op_type != "Conv" {
            continue;
        }
        let path = conv_path(node);
        known.insert(path.clone());
        if options.keep_f32.contains(&path) {
            continue;
        }
        if options.convs == ConvSelection::Dilated3x3 && !is_dilated_3x3(graph, node) {
            continue;
        }
        convs.push(i);
        for value in [&node.input[0], &node.output[0]] {
            if !values.contains(value) {
                values.push(value.clone());
            }
        }
    }
    for name in &options.keep_f32 {
        ensure!(
            known.contains(name),
            "--keep-f32 names {name:?}, which is no Conv of the model; use a module path such \
             as encoder.level1.conv"
        );
    }
    Ok((convs, values))
}

/// Runs the f32 model on each frame and collects the value statistics of `values`.
///
/// With `params`, it also records the channel means of each value quantised with its
/// parameters, which [`rewrite`] uses to correct the biases.
pub fn calibrate(
    model: &pb::ModelProto,
    values: &[String],
    frames: &[Frame],
    convention: &InputConvention,
    params: Option<&HashMap<String, QuantParams>>,
) -> Result<BTreeMap<String, TensorStats>> {
    use prost::Message;
    let bytes = model.encode_to_vec();
    let shape = [1, 3, convention.height, convention.width];
    let mut inference = tract_onnx::onnx()
        .model_for_read(&mut bytes.as_slice())?
        .with_input_fact(0, f32::fact(shape).into())?;
    let mut outputs = Vec::new();
    for value in values {
        if value != "input" {
            outputs.push(value.clone());
        }
    }
    inference.select_outputs_by_name(&outputs)?;
    let plan = inference.into_optimized()?.into_runnable()?;
    let mut preprocessor = Preprocessor::new(convention.clone());
    let mut input = vec![0.0f32; convention.tensor_len()];
    let mut stats: BTreeMap<String, TensorStats> = values
        .iter()
        .map(|v| {
            let empty = TensorStats {
                min: f32::INFINITY,
                max: f32::NEG_INFINITY,
                samples: Vec::new(),
                channel_mean: Vec::new(),
                channel_mean_square: Vec::new(),
                channel_mean_quantized: Vec::new(),
            };
            (v.clone(), empty)
        })
        .collect();
    let mut rng = ChaCha8Rng::seed_from_u64(8);
    for frame in frames {
        preprocessor.run(&frame.data, frame.width, frame.height, &mut input)?;
        let tensor = Tensor::from_shape(&shape, &input)?;
        let result = plan.run(tvec!(tensor.into()))?;
        let mut record = |name: &str, data: &[f32], channels: usize| {
            let entry = stats.get_mut(name).expect("calibrated value");
            for &v in data {
                entry.min = entry.min.min(v);
                entry.max = entry.max.max(v);
            }
            entry.channel_mean.resize(channels, 0.0);
            entry.channel_mean_square.resize(channels, 0.0);
            entry.channel_mean_quantized.resize(channels, 0.0);
            let plane = data.len() / channels.max(1);
            let weight = 1.0 / (plane.max(1) as f64 * frames.len() as f64);
            let quantization = params.and_then(|p| p.get(name));
            for (c, channel) in data.chunks_exact(plane.max(1)).enumerate() {
                entry.channel_mean[c] += channel.iter().map(|&v| f64::from(v)).sum::<f64>() * weight;
                entry.channel_mean_square[c] +=
                    channel.iter().map(|&v| f64::from(v) * f64::from(v)).sum::<f64>() * weight;
                if let Some(q) = quantization {
                    let sum: f64 = channel.iter().map(|&v| f64::from(q.dequantize(q.quantize(v)))).sum();
                    entry.channel_mean_quantized[c] += sum * weight;
                }
            }
            for _ in 0..SAMPLES_PER_FRAME {
                entry.samples.push(data[rng.gen_range(0..data.len())]);
            }
        };
        if values.iter().any(|v| v == "input") {
            record("input", &input, 3);
        }
        for (name, value) in outputs.iter().zip(result.iter()) {
            let view = value.to_plain_array_view::<f32>()?;
            let data = view.as_slice().context("calibrated value is not contiguous")?;
            let channels = value.shape().get(1).copied().unwrap_or(1);
            record(name, data, channels);
        }
    }
    Ok(stats)
}

/// Rescales the channels of each quantised convolution input that an f32 `Conv` produces
/// and only quantised convolutions read (the reduction `c1` of every ESP block), so that
/// one per-tensor scale suits all of them. Channel `c` of the producer is divided by
/// `s_c = (m_c / m_max)^alpha`, where `m_c` is its root mean square in calibration, and
/// the readers' weights for input channel `c` are multiplied by it. The f32 model
/// computes the same function. `alpha` 1 equalises the activation ranges fully, and
/// smaller values leave more of the range in the activations and less in the weights.
/// Returns the number of values rescaled.
/// NOTE: only graph outputs are protected. A tap on a rescaled value would change, and
/// the shipped taps are block outputs, which are not rescaled.
pub fn equalize_inputs(
    model: &mut pb::ModelProto,
    convs: &[usize],
    stats: &BTreeMap<String, TensorStats>,
    alpha: f32,
) -> Result<usize> {
    ensure!((0.0..=1.0).contains(&alpha), "--equalize {alpha} is invalid: use 0 to 1");
    let graph = graph_mut(model);
    let quantised: HashSet<usize> = convs.iter().copied().collect();
    let graph_outputs: HashSet<String> = graph.output.iter().map(|o| o.name.clone()).collect();
    let mut readers: HashMap<String, Vec<usize>> = HashMap::new();
    let mut producer: HashMap<String, usize> = HashMap::new();
    for (i, node) in graph.node.iter().enumerate() {
        for input in &node.input {
            readers.entry(input.clone()).or_default().push(i);
        }
        for output in &node.output {
            producer.insert(output.clone(), i);
        }
    }
    // Per initializer name, the factor of each channel along `axis` (0: output channels of
    // the producer, divided; 1: input channels of a reader, multiplied).
    let mut changes: Vec<(String, usize, Vec<f32>)> = Vec::new();
    let mut count = 0;
    let mut done = HashSet::new();
    for &conv in convs {
        let value = graph.node[conv].input[0].clone();
        if done.contains(&value) || graph_outputs.contains(&value) {
            continue;
        }
        done.insert(value.clone());
        let Some(&source) = producer.get(&value) else {
            continue;
        };
        let source_node = &graph.node[source];
        if source_node.op_type != "Conv" || quantised.contains(&source) {
            continue;
        }
        let all_quantised = readers[&value].iter().all(|r| quantised.contains(r));
        let Some(value_stats) = stats.get(&value) else {
            continue;
        };
        // Root mean squares: the largest magnitudes gave factors that changed more from
        // one calibration set to another.
        let channel_rms: Vec<f32> =
            value_stats.channel_mean_square.iter().map(|&m| m.sqrt() as f32).collect();
        if !all_quantised || channel_rms.is_empty() {
            continue;
        }
        let largest = channel_rms.iter().copied().fold(0.0f32, f32::max);
        if largest <= 0.0 {
            continue;
        }
        let factors: Vec<f32> = channel_rms
            .iter()
            .map(|&m| (m.max(largest * 1e-3) / largest).powf(alpha))
            .collect();
        // Only plain convolutions whose weights have one slice per channel of the value.
        let weight_dims = |node: usize| {
            initializer(graph, &graph.node[node].input[1]).map(|w| w.dims.clone()).unwrap_or_default()
        };
        let channels = factors.len() as i64;
        let fits = weight_dims(source).first() == Some(&channels)
            && readers[&value].iter().all(|&r| weight_dims(r).get(1) == Some(&channels));
        if !fits {
            continue;
        }
        let inverse: Vec<f32> = factors.iter().map(|f| 1.0 / f).collect();
        changes.push((source_node.input[1].clone(), 0, inverse.clone()));
        if let Some(bias) = source_node.input.get(2) {
            changes.push((bias.clone(), 0, inverse));
        }
        for &reader in &readers[&value] {
            changes.push((graph.node[reader].input[1].clone(), 1, factors.clone()));
        }
        count += 1;
    }
    for (name, axis, factors) in changes {
        let tensor = graph
            .initializer
            .iter_mut()
            .find(|t| t.name == name)
            .with_context(|| format!("initializer {name} not found"))?;
        let dims: Vec<usize> = tensor.dims.iter().map(|&d| d as usize).collect();
        let mut values = f32_values(tensor)?;
        ensure!(
            dims.len() > axis && dims[axis] == factors.len(),
            "initializer {name} has shape {dims:?}, expected {} channels on axis {axis}",
            factors.len()
        );
        let inner: usize = dims[axis + 1..].iter().product();
        for (index, v) in values.iter_mut().enumerate() {
            *v *= factors[(index / inner) % dims[axis]];
        }
        *tensor = f32_tensor(&name, &dims, &values);
    }
    Ok(count)
}

/// Summary of a quantisation, printed by `daain-tools quantize`.
#[derive(Debug, Clone, Serialize)]
pub struct QuantizeSummary {
    pub batch_norms_folded: usize,
    pub convs_quantized: usize,
    pub convs_kept_f32: Vec<String>,
    /// Quantised convolutions that read an int8 value which another quantised
    /// convolution already needed (a shared `QuantizeLinear`) or wrote (`QLinearConv`).
    /// The runtime's int8 operator quantises a shared input again for each reader.
    pub int8_links: usize,
    /// Quantised values whose channels [`equalize_inputs`] rescaled.
    pub inputs_equalized: usize,
    pub calibration_frames: usize,
}

/// Rewrites the quantised Conv nodes with the calibrated ranges, as `QuantizeLinear ->
/// QLinearConv` or `QuantizeLinear -> ConvInteger -> Cast -> Mul (-> Add)` (see the
/// module documentation).
///
/// With `correct_bias`, each convolution's bias gets the difference between the mean
/// output of the f32 convolution and that of the quantised one on the calibration frames,
/// so that quantisation does not shift the outputs on average. Both means come from the
/// channel means of the input before and after quantisation, leaving out border effects.
/// NOTE: counting every tap as inside the image overstates the correction of the outer
/// kernel rows where the dilation is large against the height (16 at 32 rows in level 3).
fn rewrite(
    model: &mut pb::ModelProto,
    convs: &[usize],
    stats: &BTreeMap<String, TensorStats>,
    method: CalibrationMethod,
    correct_bias: bool,
) -> Result<usize> {
    let graph = graph_mut(model);
    let conv_set: HashSet<usize> = convs.iter().copied().collect();
    let params: HashMap<&String, QuantParams> = stats.iter().map(|(k, s)| (k, s.params(method))).collect();
    // Values produced by a quantised conv and read only by quantised convs need no f32 form.
    let mut readers: HashMap<String, Vec<usize>> = HashMap::new();
    for (i, node) in graph.node.iter().enumerate() {
        for input in &node.input {
            readers.entry(input.clone()).or_default().push(i);
        }
    }
    let graph_outputs: HashSet<String> = graph.output.iter().map(|o| o.name.clone()).collect();
    let int8_only = |value: &String| {
        !graph_outputs.contains(value)
            && readers.get(value).is_some_and(|r| r.iter().all(|i| conv_set.contains(i)))
    };

    let mut nodes = Vec::new();
    let mut initializers = Vec::new();
    let mut quantized: HashMap<String, String> = HashMap::new();
    let mut int8_links = 0;
    let add_params = |initializers: &mut Vec<pb::TensorProto>, value: &str, p: QuantParams| {
        initializers.push(f32_tensor(&format!("{value}.scale"), &[], &[p.scale]));
        initializers.push(i8_tensor(&format!("{value}.zero_point"), &[], &[p.zero_point]));
    };
    let old_nodes = std::mem::take(&mut graph.node);
    for (i, node) in old_nodes.into_iter().enumerate() {
        if !conv_set.contains(&i) {
            nodes.push(node);
            continue;
        }
        let x = node.input[0].clone();
        let y = node.output[0].clone();
        let x_params = params[&x];
        let y_params = params[&y];
        let x_q = match quantized.get(&x) {
            Some(name) => {
                int8_links += 1;
                name.clone()
            }
            None => {
                let name = format!("{x}.q");
                add_params(&mut initializers, &x, x_params);
                nodes.push(pb::NodeProto {
                    name: format!("{}.quantize_input", node.name),
                    op_type: "QuantizeLinear".into(),
                    input: vec![x.clone(), format!("{x}.scale"), format!("{x}.zero_point")],
                    output: vec![name.clone()],
                    ..Default::default()
                });
                quantized.insert(x.clone(), name.clone());
                name
            }
        };

        let weight = initializer(graph, &node.input[1]).context("Conv weight is not an initializer")?;
        let dims: Vec<usize> = weight.dims.iter().map(|&d| d as usize).collect();
        let w = f32_values(weight)?;
        let channels = dims[0];
        let per_channel = w.len() / channels;
        let mut w_scale = vec![0f32; channels];
        let mut w_q = vec![0i8; w.len()];
        for o in 0..channels {
            let row = &w[o * per_channel..(o + 1) * per_channel];
            let max_abs = row.iter().fold(0f32, |m, v| m.max(v.abs()));
            let scale = (max_abs / 127.0).max(1e-12);
            w_scale[o] = scale;
            for (q, v) in w_q[o * per_channel..].iter_mut().zip(row) {
                *q = (v / scale).round().clamp(-127.0, 127.0) as i8;
            }
        }
        let mut bias = match node.input.get(2) {
            Some(name) => f32_values(initializer(graph, name).context("Conv bias is not an initializer")?)?,
            None => vec![0.0; channels],
        };
        let x_stats = &stats[&x];
        let kernel_size: usize = dims[2..].iter().product();
        if correct_bias && x_stats.channel_mean_quantized.len() == dims[1] {
            for (o, b) in bias.iter_mut().enumerate() {
                let mut correction = 0.0f64;
                for i in 0..dims[1] {
                    let taps = (o * dims[1] + i) * kernel_size..(o * dims[1] + i + 1) * kernel_size;
                    let exact: f64 = w[taps.clone()].iter().map(|&v| f64::from(v)).sum();
                    let quantised: f64 =
                        w_q[taps].iter().map(|&q| f64::from(q) * f64::from(w_scale[o])).sum();
                    correction += exact * x_stats.channel_mean[i] - quantised * x_stats.channel_mean_quantized[i];
                }
                *b += correction as f32;
            }
        }
        let w_name = &node.input[1];
        initializers.push(i8_tensor(&format!("{w_name}.q"), &dims, &w_q));
        initializers.push(i8_tensor(&format!("{w_name}.zero_point"), &[channels], &vec![0; channels]));
        if int8_only(&y) {
            // The output feeds only quantised convolutions: requantise it in the kernel.
            let bias_q: Vec<i32> = bias
                .iter()
                .zip(&w_scale)
                .map(|(b, ws)| (b / (x_params.scale * ws)).round() as i32)
                .collect();
            initializers.push(f32_tensor(&format!("{w_name}.scale"), &[channels], &w_scale));
            initializers.push(i32_tensor(&format!("{w_name}.bias_q"), &[channels], &bias_q));
            add_params(&mut initializers, &y, y_params);
            let y_q = format!("{y}.q");
            nodes.push(pb::NodeProto {
                name: node.name.clone(),
                op_type: "QLinearConv".into(),
                input: vec![
                    x_q,
                    format!("{x}.scale"),
                    format!("{x}.zero_point"),
                    format!("{w_name}.q"),
                    format!("{w_name}.scale"),
                    format!("{w_name}.zero_point"),
                    format!("{y}.scale"),
                    format!("{y}.zero_point"),
                    format!("{w_name}.bias_q"),
                ],
                output: vec![y_q.clone()],
                attribute: node.attribute.clone(),
                ..Default::default()
            });
            quantized.insert(y.clone(), y_q);
            continue;
        }
        // The output goes to f32 operators: keep the exact int32 accumulator and scale it
        // per channel (`ConvInteger -> Cast -> Mul -> Add`), so that no output rounding
        // adds to the error of the sums and concatenations that follow.
        let accumulator = format!("{y}.accumulator");
        nodes.push(pb::NodeProto {
            name: node.name.clone(),
            op_type: "ConvInteger".into(),
            input: vec![
                x_q,
                format!("{w_name}.q"),
                format!("{x}.zero_point"),
                format!("{w_name}.zero_point"),
            ],
            output: vec![accumulator.clone()],
            attribute: node.attribute.clone(),
            ..Default::default()
        });
        nodes.push(pb::NodeProto {
            name: format!("{}.to_f32", node.name),
            op_type: "Cast".into(),
            input: vec![accumulator.clone()],
            output: vec![format!("{accumulator}.f32")],
            attribute: vec![crate::onnx::attribute_int("to", pb::tensor_proto::DataType::Float as i64)],
            ..Default::default()
        });
        let output_scale: Vec<f32> = w_scale.iter().map(|ws| ws * x_params.scale).collect();
        initializers.push(f32_tensor(&format!("{w_name}.output_scale"), &[1, channels, 1, 1], &output_scale));
        let has_bias = bias.iter().any(|&b| b != 0.0);
        let scaled = if has_bias { format!("{y}.scaled") } else { y.clone() };
        nodes.push(pb::NodeProto {
            name: format!("{}.rescale", node.name),
            op_type: "Mul".into(),
            input: vec![format!("{accumulator}.f32"), format!("{w_name}.output_scale")],
            output: vec![scaled.clone()],
            ..Default::default()
        });
        if has_bias {
            initializers.push(f32_tensor(&format!("{w_name}.output_bias"), &[1, channels, 1, 1], &bias));
            nodes.push(pb::NodeProto {
                // Not `.bias`: tract names a node of its own that way when it lowers the
                // `ConvInteger`.
                name: format!("{}.add_bias", node.name),
                op_type: "Add".into(),
                input: vec![scaled, format!("{w_name}.output_bias")],
                output: vec![y.clone()],
                ..Default::default()
            });
        }
    }
    graph.node = nodes;
    graph.initializer.extend(initializers);
    remove_unused_initializers(graph);
    Ok(int8_links)
}

/// Quantises `model` with ranges calibrated on `frames` and returns the int8 model.
pub fn quantize_model(
    mut model: pb::ModelProto,
    frames: &[Frame],
    convention: &InputConvention,
    options: &QuantizeOptions,
) -> Result<(pb::ModelProto, QuantizeSummary)> {
    ensure!(!frames.is_empty(), "no calibration frames: the clip split left none");
    let batch_norms_folded = fold_batch_norms(&mut model)?;
    let (convs, values) = quantised_convs(&model, options)?;
    log::info!(
        "calibrating {} values of {} convolutions on {} frames",
        values.len(),
        convs.len(),
        frames.len()
    );
    let mut stats = calibrate(&model, &values, frames, convention, None)?;
    ensure!(
        (0.0..=1.0).contains(&options.equalize),
        "--equalize {} is invalid: use 0 (off) to 1",
        options.equalize
    );
    let equalized = if options.equalize > 0.0 {
        let count = equalize_inputs(&mut model, &convs, &stats, options.equalize)?;
        stats = calibrate(&model, &values, frames, convention, None)?;
        count
    } else {
        0
    };
    if options.bias_correction {
        let params: HashMap<String, QuantParams> =
            stats.iter().map(|(k, s)| (k.clone(), s.params(options.method))).collect();
        stats = calibrate(&model, &values, frames, convention, Some(&params))?;
    }
    let int8_links = rewrite(&mut model, &convs, &stats, options.method, options.bias_correction)?;
    let summary = QuantizeSummary {
        batch_norms_folded,
        convs_quantized: convs.len(),
        convs_kept_f32: options.keep_f32.clone(),
        int8_links,
        inputs_equalized: equalized,
        calibration_frames: frames.len(),
    };
    Ok((model, summary))
}

/// Writes the model with BatchNorms folded into their Convs and nothing quantised.
pub fn write_folded_f32(mut model: pb::ModelProto, path: &Path) -> Result<usize> {
    let folded = fold_batch_norms(&mut model)?;
    write_model(&model, path)?;
    Ok(folded)
}

/// Agreement of an int8 backbone with the f32 one on the same frames.
#[derive(Debug, Clone, Serialize)]
pub struct Agreement {
    pub frames: usize,
    /// Share of pixels whose argmax class is the same, over all frames.
    pub argmax_agreement: f64,
    /// The lowest per-frame share.
    pub min_frame_agreement: f64,
    /// Per tap: root mean square of the difference divided by the f32 tap's RMS.
    pub tap_relative_rms_error: Vec<(String, f64)>,
}

/// Runs both backbones on every frame and compares logits argmax and taps.
pub fn compare_backbones(
    reference: &mut Backbone,
    candidate: &mut Backbone,
    frames: &[Frame],
    convention: &InputConvention,
) -> Result<Agreement> {
    ensure!(!frames.is_empty(), "no frames to compare on");
    let mut preprocessor = Preprocessor::new(convention.clone());
    let mut input = vec![0.0f32; convention.tensor_len()];
    let classes = reference.logits_shape()[1];
    let plane = convention.height * convention.width;
    let (mut class_a, mut class_b) = (vec![0u8; plane], vec![0u8; plane]);
    let taps = reference.taps().to_vec();
    let mut tap_error = vec![(0f64, 0f64); taps.len()];
    let (mut agreeing, mut min_frame) = (0usize, 1f64);
    for frame in frames {
        preprocessor.run(&frame.data, frame.width, frame.height, &mut input)?;
        let a = reference.run(&input)?;
        let b = candidate.run(&input)?;
        argmax_classes(a.logits(), classes, &mut class_a);
        argmax_classes(b.logits(), classes, &mut class_b);
        let same = class_a.iter().zip(&class_b).filter(|(x, y)| x == y).count();
        agreeing += same;
        min_frame = min_frame.min(same as f64 / plane as f64);
        for ((ta, tb), error) in a.taps().zip(b.taps()).zip(&mut tap_error) {
            for (x, y) in ta.iter().zip(tb) {
                error.0 += ((x - y) as f64).powi(2);
                error.1 += (*x as f64).powi(2);
            }
        }
    }
    Ok(Agreement {
        frames: frames.len(),
        argmax_agreement: agreeing as f64 / (plane * frames.len()) as f64,
        min_frame_agreement: min_frame,
        tap_relative_rms_error: taps
            .iter()
            .zip(&tap_error)
            .map(|(tap, (diff, norm))| (tap.name.clone(), (diff / norm.max(1e-30)).sqrt()))
            .collect(),
    })
}

/// Median time of one backbone run, in milliseconds, for each of the given backbones.
/// The runs are interleaved (one of each per round), so that load from other processes
/// affects all of them alike.
pub fn time_backbones(
    backbones: &mut [&mut Backbone],
    input: &[f32],
    rounds: usize,
) -> Result<Vec<f64>> {
    let mut times = vec![Vec::with_capacity(rounds); backbones.len()];
    for backbone in backbones.iter_mut() {
        backbone.run(input)?;
    }
    for _ in 0..rounds {
        for (backbone, samples) in backbones.iter_mut().zip(&mut times) {
            let start = std::time::Instant::now();
            backbone.run(input)?;
            samples.push(start.elapsed().as_secs_f64() * 1e3);
        }
    }
    Ok(times
        .into_iter()
        .map(|mut samples| {
            samples.sort_by(f64::total_cmp);
            samples[samples.len() / 2]
        })
        .collect())
}

/// Result of `daain-tools quantize`.
#[derive(Debug, Clone, Serialize)]
pub struct QuantizeReport {
    pub options: QuantizeOptions,
    pub summary: QuantizeSummary,
    /// Int8 against f32 on the clip's test frames.
    pub agreement: Agreement,
    /// Median backbone time per frame in milliseconds: f32 as exported, f32 with
    /// BatchNorms folded, int8. Measured interleaved in one process.
    pub median_ms: Option<[f64; 3]>,
}

/// Quantises the f32 backbone `source` on every `stride`-th training frame of the clip
/// that `config` names, writes it to `output`, and compares it with the f32 model on the
/// clip's test frames.
pub fn run(
    config: &TrainingConfig,
    source: &Path,
    options: &QuantizeOptions,
    stride: usize,
    output: &Path,
    folded_f32_output: Option<&Path>,
    timing_rounds: usize,
) -> Result<QuantizeReport> {
    ensure!(stride > 0, "--calibration-stride 0 is invalid: use 1 or more");
    let convention = InputConvention::espnet_cityscapes();
    let mut frames = read_video(&config.data.video)?;
    if let Some(max) = config.data.max_frames {
        frames.truncate(max);
    }
    let role = |i: usize| role_of(i, config.data.chunk_frames, &config.data.pattern);
    let train: Vec<Frame> = frames
        .iter()
        .enumerate()
        .filter(|(i, _)| role(*i) == Role::Train)
        .map(|(_, f)| f.clone())
        .step_by(stride)
        .collect();
    let test: Vec<Frame> = frames
        .iter()
        .enumerate()
        .filter(|(i, _)| role(*i) == Role::Test)
        .map(|(_, f)| f.clone())
        .collect();
    let model = read_model(source)?;
    let (quantized, summary) = quantize_model(model.clone(), &train, &convention, options)?;
    write_model(&quantized, output)?;
    log::info!("wrote {}", output.display());

    let taps = config.taps();
    let mut reference = load_backbone(source, "logits", &taps, &convention)?;
    let mut candidate = load_backbone(output, "logits", &taps, &convention)?;
    let agreement = compare_backbones(&mut reference, &mut candidate, &test, &convention)?;

    let folded_path = match folded_f32_output {
        Some(path) => path.to_owned(),
        None => std::env::temp_dir().join(format!("daain-folded-{}.onnx", std::process::id())),
    };
    write_folded_f32(model, &folded_path)?;
    let median_ms = if timing_rounds > 0 {
        let mut folded = load_backbone(&folded_path, "logits", &taps, &convention)?;
        let mut input = vec![0.0f32; convention.tensor_len()];
        Preprocessor::new(convention.clone()).run(&test[0].data, test[0].width, test[0].height, &mut input)?;
        let t = time_backbones(&mut [&mut reference, &mut folded, &mut candidate], &input, timing_rounds)?;
        Some([t[0], t[1], t[2]])
    } else {
        None
    };
    if folded_f32_output.is_none() {
        std::fs::remove_file(&folded_path).ok();
    }
    Ok(QuantizeReport {
        options: options.clone(),
        summary,
        agreement,
        median_ms,
    })
}

/// File name of the int8 backbone inside a bundle.
pub const BUNDLE_INT8_FILE: &str = "backbone_int8.onnx";

/// Records the int8 backbone `bundle/backbone_int8.onnx` with its hash and the
/// quantisation report in the bundle's manifest.
pub fn add_to_bundle(bundle: &Path, report: &QuantizeReport) -> Result<()> {
    use daain::bundle::{sha256_hex, FileEntry, Manifest, QuantizedBackboneManifest, MANIFEST_FILE};
    let manifest_path = bundle.join(MANIFEST_FILE);
    let text = std::fs::read_to_string(&manifest_path)
        .with_context(|| format!("failed to read {}", manifest_path.display()))?;
    let mut manifest: Manifest = serde_json::from_str(&text)
        .with_context(|| format!("bundle manifest {} is invalid", manifest_path.display()))?;
    let bytes = std::fs::read(bundle.join(BUNDLE_INT8_FILE))?;
    manifest.backbone.int8 = Some(QuantizedBackboneManifest {
        file: FileEntry {
            file: BUNDLE_INT8_FILE.to_owned(),
            sha256: sha256_hex(&bytes),
        },
        quantization: serde_json::json!({
            "options": report.options,
            "summary": report.summary,
            "test_frames_argmax_agreement": report.agreement.argmax_agreement,
            "test_frames_min_frame_agreement": report.agreement.min_frame_agreement,
            "tool": format!("daain-tools {}", env!("CARGO_PKG_VERSION")),
        }),
    });
    let text = serde_json::to_string_pretty(&manifest)?;
    std::fs::write(&manifest_path, text + "\n")?;
    Ok(())
}
