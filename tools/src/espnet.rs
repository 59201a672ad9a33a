//! ESPNet (p = 2, q = 8, 20 Cityscapes classes, with the light decoder) on libtorch.
//!
//! The layer structure and parameter names follow `Model.py` of the upstream ESPNet
//! repository (Mehta et al., "ESPNet: Efficient Spatial Pyramid of Dilated Convolutions for
//! Semantic Segmentation", ECCV 2018), so that its state dict `espnet_p_2_q_8.pth` loads
//! unchanged: 189 tensors, convolutions without bias, BatchNorm with eps 1e-3, PReLU after
//! every BatchNorm except the decoder's `br`.
//!
//! Besides the logits the forward pass returns the 20 PReLU outputs listed in [`TAPS`], the
//! activations DAAIN samples.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{anyhow, bail, ensure, Context, Result};
use tch::nn::{self, ModuleT};
use tch::{Device, Kind, Tensor};

use crate::pth;

/// Number of output classes: the 19 Cityscapes training classes and void (class 19).
pub const NUM_CLASSES: usize = 20;
/// Names of the output classes, indexed by Cityscapes train id.
pub const CLASS_NAMES: [&str; NUM_CLASSES] = [
    "road",
    "sidewalk",
    "building",
    "wall",
    "fence",
    "pole",
    "traffic light",
    "traffic sign",
    "vegetation",
    "terrain",
    "sky",
    "person",
    "rider",
    "car",
    "truck",
    "bus",
    "train",
    "motorcycle",
    "bicycle",
    "void",
];
/// Input height the exported network is built for.
pub const INPUT_HEIGHT: usize = 256;
/// Input width the exported network is built for.
pub const INPUT_WIDTH: usize = 512;
/// Number of parameter and buffer tensors of the model.
pub const NUM_WEIGHTS: usize = 189;

/// PReLU outputs returned besides the logits, in forward order: module path and channels.
/// At a 256x512 input, the encoder taps up to `encoder.b1` and the last two decoder taps are
/// 128x256, `encoder.level2_0` to `encoder.b2` and `combine_l2_l3.*` are 64x128, and
/// `encoder.level3_0` to `encoder.b3` are 32x64.
pub const TAPS: &[(&str, usize)] = &[
    ("encoder.level1", 16),
    ("encoder.b1", 19),
    ("encoder.level2_0", 64),
    ("encoder.level2.0", 64),
    ("encoder.level2.1", 64),
    ("encoder.b2", 131),
    ("encoder.level3_0", 128),
    ("encoder.level3.0", 128),
    ("encoder.level3.1", 128),
    ("encoder.level3.2", 128),
    ("encoder.level3.3", 128),
    ("encoder.level3.4", 128),
    ("encoder.level3.5", 128),
    ("encoder.level3.6", 128),
    ("encoder.level3.7", 128),
    ("encoder.b3", 256),
    ("combine_l2_l3.0", 40),
    ("combine_l2_l3.1", 20),
    ("up_l2.1", 20),
    ("conv", 20),
];

/// Returns the spatial downsampling factor of tap `index` of [`TAPS`] relative to the input.
pub fn tap_stride(index: usize) -> usize {
    match index {
        0..=1 => 2,
        2..=5 => 4,
        6..=15 => 8,
        16..=17 => 4,
        _ => 2,
    }
}

/// An f32 tensor in host memory.
#[derive(Debug, Clone, PartialEq)]
pub struct HostTensor {
    pub shape: Vec<usize>,
    /// Row-major elements.
    pub data: Vec<f32>,
}

/// Named model weights in host memory, as read from a `.safetensors` or `.pth` file.
#[derive(Debug, Clone, Default)]
pub struct Weights {
    pub tensors: BTreeMap<String, HostTensor>,
}

impl Weights {
    /// Reads weights from a `.safetensors` file or a PyTorch `.pth` state dict (either
    /// layout), chosen by the file extension. Integer `num_batches_tracked` buffers of newer
    /// PyTorch state dicts are skipped; every other tensor must be float32.
    pub fn load(path: &Path) -> Result<Self> {
        let extension = path
            .extension()
            .and_then(|e| e.to_str())
            .unwrap_or_default();
        match extension {
            "safetensors" => Self::load_safetensors(path),
            "pth" | "pt" => Self::load_pth(path),
            _ => bail!(
                "unknown weight file extension of {}: expected .safetensors, .pth or .pt",
                path.display()
            ),
        }
    }

    fn load_safetensors(path: &Path) -> Result<Self> {
        let bytes =
            std::fs::read(path).with_context(|| format!("failed to read {}", path.display()))?;
        let file = safetensors::SafeTensors::deserialize(&bytes)
            .with_context(|| format!("invalid safetensors file {}", path.display()))?;
        let mut tensors = BTreeMap::new();
        for (name, view) in file.tensors() {
            ensure!(
                view.dtype() == safetensors::Dtype::F32,
                "tensor `{name}` in {} has dtype {:?}, expected F32",
                path.display(),
                view.dtype()
            );
            let data = view
                .data()
                .chunks_exact(4)
                .map(|chunk| f32::from_le_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]))
                .collect();
            tensors.insert(
                name,
                HostTensor {
                    shape: view.shape().to_vec(),
                    data,
                },
            );
        }
        Ok(Self { tensors })
    }

    fn load_pth(path: &Path) -> Result<Self> {
        let state_dict = pth::load(path)?;
        let mut tensors = BTreeMap::new();
        for (name, tensor) in state_dict.tensors {
            if name.ends_with("num_batches_tracked") && tensor.dtype != pth::DType::F32 {
                continue;
            }
            let data = tensor
                .to_f32()
                .with_context(|| format!("tensor `{name}` in {}", path.display()))?;
            tensors.insert(
                name,
                HostTensor {
                    shape: tensor.shape,
                    data,
                },
            );
        }
        Ok(Self { tensors })
    }

    /// Returns the tensor `name`, checking that it has `shape`.
    pub fn get(&self, name: &str, shape: &[usize]) -> Result<&HostTensor> {
        let tensor = self.tensors.get(name).ok_or_else(|| {
            anyhow!("weight `{name}` not found; check that the file is an ESPNet p=2 q=8 state dict")
        })?;
        ensure!(
            tensor.shape == shape,
            "weight `{name}` has shape {:?}, expected {shape:?}",
            tensor.shape
        );
        Ok(tensor)
    }
}

/// BatchNorm of the upstream model: eps 1e-3, evaluated with its running statistics.
fn batch_norm(path: nn::Path, channels: usize) -> nn::BatchNorm {
    let config = nn::BatchNormConfig {
        eps: 1e-3,
        ..Default::default()
    };
    nn::batch_norm2d(path, channels as i64, config)
}

/// Convolution without bias, padding `(kernel - 1) / 2 * dilation` (C and CDilated upstream).
fn conv(
    path: nn::Path,
    input: usize,
    output: usize,
    kernel: usize,
    stride: usize,
    dilation: usize,
) -> nn::Conv2D {
    let config = nn::ConvConfig {
        stride: stride as i64,
        padding: ((kernel - 1) / 2 * dilation) as i64,
        dilation: dilation as i64,
        bias: false,
        ..Default::default()
    };
    nn::conv2d(path, input as i64, output as i64, kernel as i64, config)
}

/// 2x2 transposed convolution with stride 2 and no bias.
fn up_conv(path: nn::Path, channels: usize) -> nn::ConvTranspose2D {
    let config = nn::ConvTransposeConfig {
        stride: 2,
        bias: false,
        ..Default::default()
    };
    nn::conv_transpose2d(path, channels as i64, channels as i64, 2, config)
}

/// PReLU slopes, one per channel (`nn.PReLU(channels)` upstream).
fn prelu(path: nn::Path, channels: usize) -> Tensor {
    path.var("weight", &[channels as i64], nn::Init::Const(0.25))
}

/// Collects the PReLU outputs during a forward pass.
type Taps = Vec<Tensor>;

/// BatchNorm and PReLU (`BR` upstream).
#[derive(Debug)]
struct Br {
    bn: nn::BatchNorm,
    act: Tensor,
}

impl Br {
    fn new(path: nn::Path, channels: usize) -> Self {
        Self {
            bn: batch_norm(&path / "bn", channels),
            act: prelu(&path / "act", channels),
        }
    }

    fn forward(&self, x: &Tensor, taps: &mut Taps) -> Tensor {
        let y = self.bn.forward_t(x, false).prelu(&self.act);
        taps.push(y.shallow_clone());
        y
    }
}

/// Convolution, BatchNorm and PReLU (`CBR` upstream).
#[derive(Debug)]
struct Cbr {
    conv: nn::Conv2D,
    br: Br,
}

impl Cbr {
    fn new(path: nn::Path, input: usize, output: usize, kernel: usize, stride: usize) -> Self {
        Self {
            conv: conv(&path / "conv", input, output, kernel, stride, 1),
            br: Br::new(path, output),
        }
    }

    fn forward(&self, x: &Tensor, taps: &mut Taps) -> Tensor {
        self.br.forward(&x.apply(&self.conv), taps)
    }
}

/// The spatial pyramid of an ESP block: a reduction convolution `c1`, then five dilated 3x3
/// convolutions with dilations 1, 2, 4, 8, 16, summed hierarchically and concatenated.
#[derive(Debug)]
struct SpatialPyramid {
    c1: nn::Conv2D,
    d1: nn::Conv2D,
    d2: nn::Conv2D,
    d4: nn::Conv2D,
    d8: nn::Conv2D,
    d16: nn::Conv2D,
}

impl SpatialPyramid {
    /// `c1_kernel` and `c1_stride` are 3 and 2 in DownSamplerB, 1 and 1 in the residual block.
    fn new(
        path: &nn::Path,
        input: usize,
        output: usize,
        c1_kernel: usize,
        c1_stride: usize,
    ) -> Self {
        let n = output / 5;
        let n1 = output - 4 * n;
        let dilated =
            |name: &str, out: usize, d: usize| conv(path / name / "conv", n, out, 3, 1, d);
        Self {
            c1: conv(path / "c1" / "conv", input, n, c1_kernel, c1_stride, 1),
            d1: dilated("d1", n1, 1),
            d2: dilated("d2", n, 2),
            d4: dilated("d4", n, 4),
            d8: dilated("d8", n, 8),
            d16: dilated("d16", n, 16),
        }
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        let reduced = x.apply(&self.c1);
        let d1 = reduced.apply(&self.d1);
        let add1 = reduced.apply(&self.d2);
        let add2 = &add1 + reduced.apply(&self.d4);
        let add3 = &add2 + reduced.apply(&self.d8);
        let add4 = &add3 + reduced.apply(&self.d16);
        Tensor::cat(&[d1, add1, add2, add3, add4], 1)
    }
}

/// Strided ESP block (`DownSamplerB` upstream): halves height and width.
#[derive(Debug)]
struct DownSampler {
    pyramid: SpatialPyramid,
    br: Br,
}

impl DownSampler {
    fn new(path: nn::Path, input: usize, output: usize) -> Self {
        Self {
            pyramid: SpatialPyramid::new(&path, input, output, 3, 2),
            br: Br::new(path, output),
        }
    }

    fn forward(&self, x: &Tensor, taps: &mut Taps) -> Tensor {
        self.br.forward(&self.pyramid.forward(x), taps)
    }
}

/// ESP block (`DilatedParllelResidualBlockB` upstream), residual when `add` is set.
#[derive(Debug)]
struct EspBlock {
    pyramid: SpatialPyramid,
    bn: Br,
    add: bool,
}

impl EspBlock {
    fn new(path: nn::Path, input: usize, output: usize, add: bool) -> Self {
        Self {
            pyramid: SpatialPyramid::new(&path, input, output, 1, 1),
            bn: Br::new(&path / "bn", output),
            add,
        }
    }

    fn forward(&self, x: &Tensor, taps: &mut Taps) -> Tensor {
        let combined = self.pyramid.forward(x);
        let combined = if self.add { x + combined } else { combined };
        self.bn.forward(&combined, taps)
    }
}

/// Average pooling 3x3, stride 2, padding 1, zero padding counted (`InputProjectionA`).
fn downsample_input(x: &Tensor) -> Tensor {
    x.avg_pool2d([3, 3], [2, 2], [1, 1], false, true, None::<i64>)
}

/// ESPNet-C encoder. `sample1` and `sample2` (the input downsampled by 2 and 4) have no
/// parameters and are computed inline.
#[derive(Debug)]
struct Encoder {
    level1: Cbr,
    b1: Br,
    level2_0: DownSampler,
    level2: Vec<EspBlock>,
    b2: Br,
    level3_0: DownSampler,
    level3: Vec<EspBlock>,
    b3: Br,
    classifier: nn::Conv2D,
}

impl Encoder {
    fn new(path: nn::Path) -> Self {
        let level2 = &path / "level2";
        let level3 = &path / "level3";
        Self {
            level1: Cbr::new(&path / "level1", 3, 16, 3, 2),
            b1: Br::new(&path / "b1", 16 + 3),
            level2_0: DownSampler::new(&path / "level2_0", 16 + 3, 64),
            level2: (0..2)
                .map(|i| EspBlock::new(&level2 / i, 64, 64, true))
                .collect(),
            b2: Br::new(&path / "b2", 128 + 3),
            level3_0: DownSampler::new(&path / "level3_0", 128 + 3, 128),
            level3: (0..8)
                .map(|i| EspBlock::new(&level3 / i, 128, 128, true))
                .collect(),
            b3: Br::new(&path / "b3", 256),
            classifier: conv(&path / "classifier" / "conv", 256, NUM_CLASSES, 1, 1, 1),
        }
    }
}

/// ESPNet with the light decoder: the encoder and the decoder layers.
#[derive(Debug)]
struct Layers {
    encoder: Encoder,
    level3_c: nn::Conv2D,
    br: nn::BatchNorm,
    conv: Cbr,
    up_l3: nn::ConvTranspose2D,
    combine_l2_l3_br: Br,
    combine_l2_l3_block: EspBlock,
    up_l2_conv: nn::ConvTranspose2D,
    up_l2_br: Br,
    classifier: nn::ConvTranspose2D,
}

impl Layers {
    fn new(root: nn::Path) -> Self {
        let classes = NUM_CLASSES;
        let combine = &root / "combine_l2_l3";
        let up_l2 = &root / "up_l2";
        Self {
            encoder: Encoder::new(&root / "encoder"),
            level3_c: conv(&root / "level3_C" / "conv", 128 + 3, classes, 1, 1, 1),
            br: batch_norm(&root / "br", classes),
            // Upstream `Model.py` declares `CBR(16 + classes, ...)`, because it concatenates
            // the upsampled decoder output with the 16 channels of `encoder.level1`, not the
            // 19 of `encoder.b1`. The released weights have 36 input channels accordingly.
            conv: Cbr::new(&root / "conv", 16 + classes, classes, 3, 1),
            up_l3: up_conv(&root / "up_l3" / 0, classes),
            combine_l2_l3_br: Br::new(&combine / 0, 2 * classes),
            combine_l2_l3_block: EspBlock::new(&combine / 1, 2 * classes, classes, false),
            up_l2_conv: up_conv(&up_l2 / 0, classes),
            up_l2_br: Br::new(&up_l2 / 1, classes),
            classifier: up_conv(&root / "classifier", classes),
        }
    }
}

/// ESPNet with the light decoder, weights loaded and frozen, on the CPU.
#[derive(Debug)]
pub struct Espnet {
    var_store: nn::VarStore,
    layers: Layers,
}

impl Espnet {
    /// Builds the model and copies `weights` into it. Fails unless `weights` has exactly
    /// the model's 189 tensors with matching shapes.
    pub fn new(weights: &Weights) -> Result<Self> {
        let var_store = nn::VarStore::new(Device::Cpu);
        let layers = Layers::new(var_store.root());
        let mut model = Self { var_store, layers };
        model.copy_weights(weights)?;
        model.var_store.freeze();
        Ok(model)
    }

    /// Reads weights with [`Weights::load`] and builds the model.
    pub fn load(path: &Path) -> Result<Self> {
        let weights = Weights::load(path)?;
        Self::new(&weights).with_context(|| format!("invalid ESPNet weights in {}", path.display()))
    }

    fn copy_weights(&mut self, weights: &Weights) -> Result<()> {
        let variables = self.var_store.variables();
        ensure!(
            variables.len() == NUM_WEIGHTS,
            "the model defines {} tensors, expected {NUM_WEIGHTS}",
            variables.len()
        );
        let unexpected: Vec<&str> = weights
            .tensors
            .keys()
            .filter(|name| !variables.contains_key(name.as_str()))
            .map(String::as_str)
            .collect();
        ensure!(
            unexpected.is_empty(),
            "{} weights are not part of ESPNet p=2 q=8, e.g. {:?}",
            unexpected.len(),
            &unexpected[..unexpected.len().min(5)]
        );
        tch::no_grad(|| -> Result<()> {
            for (name, mut variable) in variables {
                let shape: Vec<usize> = variable.size().iter().map(|&d| d as usize).collect();
                let tensor = weights.get(&name, &shape)?;
                let source = Tensor::from_slice(&tensor.data).reshape(variable.size());
                variable.copy_(&source);
            }
            Ok(())
        })
    }

    /// Returns the variable store that owns the (frozen) parameters.
    pub fn var_store(&self) -> &nn::VarStore {
        &self.var_store
    }

    /// Computes the logits, `[N, 20, H, W]`, of an input `[N, 3, H, W]` prepared by
    /// `daain::preprocess` (H and W multiples of 8). Differentiable with respect to `input`.
    pub fn forward(&self, input: &Tensor) -> Result<Tensor> {
        Ok(self.forward_with_taps(input)?.0)
    }

    /// Computes the logits and the 20 PReLU outputs of [`TAPS`], in that order.
    pub fn forward_with_taps(&self, input: &Tensor) -> Result<(Tensor, Vec<Tensor>)> {
        check_input(input)?;
        let mut taps = Vec::with_capacity(TAPS.len());
        let logits = self.forward_impl(input, &mut taps);
        debug_assert_eq!(taps.len(), TAPS.len());
        Ok((logits, taps))
    }

    fn forward_impl(&self, x: &Tensor, taps: &mut Taps) -> Tensor {
        let encoded = self.encode(x, taps);
        self.decode(&encoded, &encoded.output2_cat, taps)
    }

    /// Computes the mean softmax over `passes` forward passes with dropout at rate `p`
    /// on the 256 encoder features that `encoder.classifier` reads, `[N, 20, H, W]`.
    ///
    /// The released weights have no dropout layer, so this inserts one for Monte Carlo
    /// dropout (Gal and Ghahramani, 2016). The encoder runs once, because everything
    /// before the dropout is deterministic; only the classifier and the decoder run
    /// `passes` times. Draws come from libtorch's global generator (`tch::manual_seed`).
    pub fn mc_dropout_probabilities(&self, input: &Tensor, p: f64, passes: usize) -> Result<Tensor> {
        check_input(input)?;
        ensure!(passes > 0, "Monte Carlo dropout needs at least 1 pass, got {passes}");
        ensure!(
            (0.0..1.0).contains(&p),
            "invalid dropout rate {p}: expected a value in [0, 1)"
        );
        tch::no_grad(|| {
            let mut taps = Vec::with_capacity(TAPS.len());
            let encoded = self.encode(input, &mut taps);
            let mut sum: Option<Tensor> = None;
            for _ in 0..passes {
                taps.clear();
                let features = encoded.output2_cat.dropout(p, true);
                let probabilities = self
                    .decode(&encoded, &features, &mut taps)
                    .softmax(1, Kind::Float);
                sum = Some(match sum {
                    Some(total) => total + probabilities,
                    None => probabilities,
                });
            }
            Ok(sum.expect("at least one pass") / passes as f64)
        })
    }

    fn encode(&self, x: &Tensor, taps: &mut Taps) -> Encoded {
        let layers = &self.layers;
        let encoder = &layers.encoder;
        let output0 = encoder.level1.forward(x, taps);
        let inp1 = downsample_input(x);
        let inp2 = downsample_input(&inp1);

        let output0_cat = encoder
            .b1
            .forward(&Tensor::cat(&[&output0, &inp1], 1), taps);
        let output1_0 = encoder.level2_0.forward(&output0_cat, taps);
        let mut output1 = output1_0.shallow_clone();
        for block in &encoder.level2 {
            output1 = block.forward(&output1, taps);
        }
        let output1_cat = encoder
            .b2
            .forward(&Tensor::cat(&[&output1, &output1_0, &inp2], 1), taps);

        let output2_0 = encoder.level3_0.forward(&output1_cat, taps);
        let mut output2 = output2_0.shallow_clone();
        for block in &encoder.level3 {
            output2 = block.forward(&output2, taps);
        }
        let output2_cat = encoder
            .b3
            .forward(&Tensor::cat(&[&output2_0, &output2], 1), taps);
        Encoded {
            output0,
            output1_cat,
            output2_cat,
        }
    }

    /// Runs `encoder.classifier` on `features` (the encoder's `output2_cat`, possibly
    /// with dropout applied) and the decoder on the result.
    fn decode(&self, encoded: &Encoded, features: &Tensor, taps: &mut Taps) -> Tensor {
        let layers = &self.layers;
        let output2_c = layers
            .br
            .forward_t(&features.apply(&layers.encoder.classifier), false)
            .apply(&layers.up_l3);
        let output1_c = encoded.output1_cat.apply(&layers.level3_c);
        let combined = Tensor::cat(&[&output1_c, &output2_c], 1);
        let combined = layers.combine_l2_l3_br.forward(&combined, taps);
        let combined = layers.combine_l2_l3_block.forward(&combined, taps);
        let comb_l2_l3 = layers
            .up_l2_br
            .forward(&combined.apply(&layers.up_l2_conv), taps);

        let concat_features = layers
            .conv
            .forward(&Tensor::cat(&[&comb_l2_l3, &encoded.output0], 1), taps);
        concat_features.apply(&layers.classifier)
    }
}

/// Encoder outputs that the decoder reads.
struct Encoded {
    /// `encoder.level1` output, 16 channels at half the input size.
    output0: Tensor,
    /// `encoder.b2` output, 131 channels at a quarter of the input size.
    output1_cat: Tensor,
    /// `encoder.b3` output, 256 channels at an eighth of the input size.
    output2_cat: Tensor,
}

fn check_input(input: &Tensor) -> Result<()> {
    let size = input.size();
    ensure!(
        size.len() == 4 && size[1] == 3,
        "ESPNet input has shape {size:?}, expected [N, 3, H, W]"
    );
    ensure!(
        size[2] % 8 == 0 && size[3] % 8 == 0 && size[2] > 0 && size[3] > 0,
        "ESPNet input is {}x{}; height and width must be positive multiples of 8",
        size[2],
        size[3]
    );
    ensure!(
        input.kind() == Kind::Float,
        "ESPNet input has kind {:?}, expected Float",
        input.kind()
    );
    ensure!(
        input.device() == Device::Cpu,
        "ESPNet input is on {:?}, expected the CPU",
        input.device()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tap_channels_sum() {
        let total: usize = TAPS.iter().map(|(_, channels)| channels).sum();
        assert_eq!(total, 16 + 19 + 64 * 3 + 131 + 128 * 9 + 256 + 40 + 20 * 3);
    }

    #[test]
    fn forward_is_differentiable_in_input() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../models/espnet/espnet_p_2_q_8.safetensors");
        let model = Espnet::load(&path).unwrap();
        let input =
            Tensor::zeros([1, 3, 64, 64], (Kind::Float, Device::Cpu)).set_requires_grad(true);
        let logits = model.forward(&input).unwrap();
        assert_eq!(logits.size(), [1, 20, 64, 64]);
        logits.sum(Kind::Float).backward();
        let gradient = input.grad();
        assert!(gradient.defined(), "no gradient reached the input");
        assert!(gradient.abs().sum(Kind::Float).double_value(&[]) > 0.0);
        for (name, variable) in model.var_store().variables() {
            assert!(!variable.requires_grad(), "weight {name} is not frozen");
        }
    }

    #[test]
    fn input_shape_is_checked() {
        let input = Tensor::zeros([1, 3, 250, 512], (Kind::Float, Device::Cpu));
        let error = check_input(&input).unwrap_err();
        assert!(error.to_string().contains("250x512"), "{error}");
    }
}
