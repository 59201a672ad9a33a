//! Training-side normalizing flow on libtorch: the same FrEIA `AllInOneBlock` chain as
//! [`daain::flow`], with trainable parameters in a [`nn::VarStore`].
//!
//! The parameters use the runtime layout (see the [`daain::flow`] module docs):
//! `blocks.K.global_scale`, `blocks.K.global_offset`, `blocks.K.subnet.0.{weight,bias}` and
//! `blocks.K.subnet.2.{weight,bias}` are variables of the store, and each block's
//! permutation is a fixed index tensor outside it. [`TchFlow::write_safetensors`] writes the
//! flow file the runtime reads, [`TchFlow::import_freia`] converts a FrEIA state dict, and
//! [`fit_mahalanobis`] fits the runtime's Mahalanobis score on flow outputs.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use anyhow::{bail, ensure, Context, Result};
use daain::flow::{params_from_safetensors, Flow, FlowParams, AFFINE_CLAMPING_METADATA_KEY};
use daain::score::Mahalanobis;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use safetensors::tensor::{Dtype, TensorView};
use tch::{nn, nn::OptimizerConfig, Device, Kind, Tensor};

/// FrEIA's default `affine_clamping`.
pub const DEFAULT_CLAMP: f64 = 2.0;
/// FrEIA's default `global_affine_init`: the activated global scale at initialisation.
const GLOBAL_AFFINE_INIT: f64 = 1.0;
/// Bound of the uniform init of the last subnet layer relative to PyTorch's default
/// `1 / sqrt(fan_in)`, small so that every block starts close to the identity.
const LAST_LAYER_INIT_FACTOR: f64 = 0.01;
/// Names of a block's parameters in both the runtime layout and FrEIA's state dict.
const PARAMETER_NAMES: [&str; 6] = [
    "global_scale",
    "global_offset",
    "subnet.0.weight",
    "subnet.0.bias",
    "subnet.2.weight",
    "subnet.2.bias",
];

/// Shape of a flow: dimension, subnet width, number of blocks and affine clamp.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FlowConfig {
    pub dim: usize,
    pub hidden: usize,
    pub blocks: usize,
    pub clamp: f64,
}

impl FlowConfig {
    fn d1(&self) -> i64 {
        (self.dim - self.dim / 2) as i64
    }

    fn d2(&self) -> i64 {
        (self.dim / 2) as i64
    }

    fn validate(&self) -> Result<()> {
        ensure!(
            self.dim >= 2,
            "flow dimension {} is invalid: it must be at least 2",
            self.dim
        );
        ensure!(
            self.hidden >= 1,
            "subnet width {} is invalid: it must be at least 1",
            self.hidden
        );
        ensure!(
            self.blocks >= 1,
            "block count {} is invalid: it must be at least 1",
            self.blocks
        );
        ensure!(
            self.clamp.is_finite() && self.clamp > 0.0,
            "affine clamp {} is invalid: it must be finite and positive",
            self.clamp
        );
        Ok(())
    }
}

/// Trainable parameters of one block; the tensors are shared with the [`nn::VarStore`].
#[derive(Debug)]
struct TchBlock {
    /// `out[:, i] = v[:, permutation[i]]`, Int64 on the store's device.
    permutation: Tensor,
    global_scale: Tensor,
    global_offset: Tensor,
    subnet_0_weight: Tensor,
    subnet_0_bias: Tensor,
    subnet_2_weight: Tensor,
    subnet_2_bias: Tensor,
}

impl TchBlock {
    fn parameter(&self, name: &str) -> &Tensor {
        match name {
            "global_scale" => &self.global_scale,
            "global_offset" => &self.global_offset,
            "subnet.0.weight" => &self.subnet_0_weight,
            "subnet.0.bias" => &self.subnet_0_bias,
            "subnet.2.weight" => &self.subnet_2_weight,
            "subnet.2.bias" => &self.subnet_2_bias,
            _ => unreachable!("unknown block parameter {name}"),
        }
    }
}

/// Host copies of one block's parameters in the runtime layout.
#[derive(Debug, Clone)]
struct HostBlock {
    permutation: Vec<i64>,
    /// Values per name of [`PARAMETER_NAMES`].
    parameters: BTreeMap<&'static str, Vec<f32>>,
}

/// Loss and progress after one training epoch.
#[derive(Debug, Clone, Copy)]
pub struct EpochReport {
    pub epoch: usize,
    pub epochs: usize,
    /// Mean negative log-likelihood per dimension over the epoch's batches, in nats.
    pub loss: f64,
}

/// Settings of [`TchFlow::train`].
#[derive(Debug, Clone, Copy)]
pub struct TrainConfig {
    pub epochs: usize,
    pub batch_size: usize,
    pub learning_rate: f64,
    /// L2 penalty of Adam (PyTorch `weight_decay`).
    pub weight_decay: f64,
    /// Seed of the batch shuffling.
    pub seed: u64,
}

/// Normalizing flow of FrEIA `AllInOneBlock`s with parameters in a [`nn::VarStore`].
#[derive(Debug)]
pub struct TchFlow {
    store: nn::VarStore,
    config: FlowConfig,
    blocks: Vec<TchBlock>,
}

impl TchFlow {
    /// Creates a flow initialised like FrEIA, with activated global scale 1, offset 0 and a
    /// random permutation per block. The first subnet layer gets PyTorch's default Linear
    /// init and the last layer one 100 times smaller, so the untrained flow is near the
    /// identity. All randomness comes from `seed`.
    pub fn new(config: FlowConfig, device: Device, seed: u64) -> Result<Self> {
        config.validate()?;
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let d1 = config.d1() as usize;
        let d2 = config.d2() as usize;
        let hidden = config.hidden;
        // FrEIA: global_scale = 2 ln(exp(0.5 * 10 * init) - 1), so 0.1 * softplus_0.5 is init.
        let raw_scale = (2.0 * ((0.5 * 10.0 * GLOBAL_AFFINE_INIT).exp() - 1.0).ln()) as f32;

        let mut host = Vec::with_capacity(config.blocks);
        for _ in 0..config.blocks {
            let mut permutation: Vec<i64> = (0..config.dim as i64).collect();
            permutation.shuffle(&mut rng);
            let first_bound = 1.0 / (d1 as f64).sqrt();
            let last_bound = LAST_LAYER_INIT_FACTOR / (hidden as f64).sqrt();
            let mut uniform = |count: usize, bound: f64| -> Vec<f32> {
                (0..count)
                    .map(|_| rng.gen_range(-bound..=bound) as f32)
                    .collect()
            };
            let parameters = BTreeMap::from([
                ("global_scale", vec![raw_scale; config.dim]),
                ("global_offset", vec![0.0; config.dim]),
                ("subnet.0.weight", uniform(hidden * d1, first_bound)),
                ("subnet.0.bias", uniform(hidden, first_bound)),
                ("subnet.2.weight", uniform(2 * d2 * hidden, last_bound)),
                ("subnet.2.bias", uniform(2 * d2, last_bound)),
            ]);
            host.push(HostBlock {
                permutation,
                parameters,
            });
        }
        Self::from_host(config, device, host)
    }

    fn from_host(config: FlowConfig, device: Device, host: Vec<HostBlock>) -> Result<Self> {
        config.validate()?;
        let store = nn::VarStore::new(device);
        let root = store.root();
        let shapes = block_shapes(&config);
        let mut blocks = Vec::with_capacity(host.len());
        for (k, block) in host.into_iter().enumerate() {
            let variable = |name: &str| -> Result<Tensor> {
                let values = &block.parameters[name];
                let shape = &shapes[name];
                let tensor = Tensor::from_slice(values).reshape(shape.as_slice());
                // A variable name must not contain the path separator '.', so "subnet.0.weight"
                // becomes the components "subnet", "0" and the name "weight", which the store
                // joins to "blocks.K.subnet.0.weight".
                let mut components: Vec<&str> = name.split('.').collect();
                let leaf = components.pop().unwrap_or(name);
                let mut parent = root.sub("blocks").sub(k);
                for component in components {
                    parent = parent.sub(component);
                }
                Ok(parent.f_var_copy(leaf, &tensor)?)
            };
            blocks.push(TchBlock {
                global_scale: variable("global_scale")?,
                global_offset: variable("global_offset")?,
                subnet_0_weight: variable("subnet.0.weight")?,
                subnet_0_bias: variable("subnet.0.bias")?,
                subnet_2_weight: variable("subnet.2.weight")?,
                subnet_2_bias: variable("subnet.2.bias")?,
                permutation: Tensor::from_slice(&block.permutation).to_device(device),
            });
        }
        ensure!(
            blocks.len() == config.blocks,
            "expected {} blocks, got {}",
            config.blocks,
            blocks.len()
        );
        Ok(Self {
            store,
            config,
            blocks,
        })
    }

    pub fn config(&self) -> FlowConfig {
        self.config
    }

    pub fn var_store(&self) -> &nn::VarStore {
        &self.store
    }

    pub fn device(&self) -> Device {
        self.store.device()
    }

    /// Casts every parameter to `kind` (`Kind::Float` or `Kind::Double`); [`TchFlow::forward`]
    /// then computes in that precision.
    pub fn set_kind(&mut self, kind: Kind) -> Result<()> {
        ensure!(
            matches!(kind, Kind::Float | Kind::Double),
            "flow precision {kind:?} is not supported: use Kind::Float or Kind::Double"
        );
        // The block tensors share their storage with the store's variables, so they follow.
        self.store.set_kind(kind);
        Ok(())
    }

    /// Maps `x` (`[n, dim]`) to `z` (`[n, dim]`) and returns `(z, log|det J|)` with the
    /// log-determinant `[n]`, in the store's precision.
    // `+=` on a tch Tensor adds in place, which would overwrite values autograd keeps.
    #[allow(clippy::assign_op_pattern)]
    pub fn forward(&self, x: &Tensor) -> Result<(Tensor, Tensor)> {
        let size = x.size();
        ensure!(
            size.len() == 2 && size[1] == self.config.dim as i64,
            "flow input has shape {size:?}, expected [n, {}]",
            self.config.dim
        );
        let d1 = self.config.d1();
        let d2 = self.config.d2();
        let clamp = self.config.clamp;
        let kind = self.store.kind();
        let mut v = x.to_kind(kind).to_device(self.device());
        let mut log_det = Tensor::zeros([size[0]], (kind, self.device()));
        for block in &self.blocks {
            let x1 = v.narrow(1, 0, d1);
            let x2 = v.narrow(1, d1, d2);
            let hidden = x1
                .linear(&block.subnet_0_weight, Some(&block.subnet_0_bias))
                .relu();
            let a = hidden.linear(&block.subnet_2_weight, Some(&block.subnet_2_bias)) * 0.1;
            let s = a.narrow(1, 0, d2).tanh() * clamp;
            let t = a.narrow(1, d2, d2);
            let coupled = x2 * s.exp() + t;
            log_det = log_det + s.sum_dim_intlist(1, false, kind);

            let scale = activated_scale(&block.global_scale);
            let y = Tensor::cat(&[x1, coupled], 1) * &scale + &block.global_offset;
            v = y.index_select(1, &block.permutation);
            log_det = log_det + scale.log().sum(kind);
        }
        Ok((v, log_det))
    }

    /// Returns the negative log-likelihood `[n]` of the inputs whose images are `z` with
    /// log-determinants `log_det`: `0.5 |z|^2 + 0.5 d ln(2 pi) - log_det`.
    pub fn negative_log_likelihood(z: &Tensor, log_det: &Tensor) -> Tensor {
        let dim = z.size()[1] as f64;
        let squared = z.square().sum_dim_intlist(1, false, z.kind());
        squared * 0.5 + 0.5 * dim * (2.0 * std::f64::consts::PI).ln() - log_det
    }

    /// Trains by maximum likelihood with Adam on the rows of `data` (`[n, dim]`), in
    /// shuffled batches, and calls `progress` after each epoch. Returns the epoch losses.
    ///
    /// Stops with an error when a batch loss is not finite, naming the epoch.
    pub fn train(
        &mut self,
        data: &Tensor,
        settings: TrainConfig,
        mut progress: impl FnMut(EpochReport),
    ) -> Result<Vec<f64>> {
        let size = data.size();
        ensure!(
            size.len() == 2 && size[1] == self.config.dim as i64,
            "training data has shape {size:?}, expected [n, {}]",
            self.config.dim
        );
        let rows = size[0] as usize;
        ensure!(rows > 0, "training data has no rows");
        ensure!(settings.epochs > 0, "epoch count must be at least 1");
        ensure!(settings.batch_size > 0, "batch size must be at least 1");
        ensure!(
            settings.learning_rate.is_finite() && settings.learning_rate > 0.0,
            "learning rate {} is invalid: it must be finite and positive",
            settings.learning_rate
        );
        ensure!(
            settings.weight_decay.is_finite() && settings.weight_decay >= 0.0,
            "weight decay {} is invalid: it must be finite and not negative",
            settings.weight_decay
        );

        let data = data.to_kind(self.store.kind()).to_device(self.device());
        let mut optimizer = nn::Adam::default()
            .wd(settings.weight_decay)
            .build(&self.store, settings.learning_rate)?;
        let mut rng = ChaCha8Rng::seed_from_u64(settings.seed);
        let mut order: Vec<i64> = (0..rows as i64).collect();
        let dim = self.config.dim as f64;
        let mut losses = Vec::with_capacity(settings.epochs);

        for epoch in 0..settings.epochs {
            order.shuffle(&mut rng);
            let mut loss_sum = 0.0;
            let mut batches = 0usize;
            for batch in order.chunks(settings.batch_size) {
                let index = Tensor::from_slice(batch).to_device(self.device());
                let x = data.index_select(0, &index);
                let (z, log_det) = self.forward(&x)?;
                let loss = Self::negative_log_likelihood(&z, &log_det).mean(Kind::Double) / dim;
                let value = loss.double_value(&[]);
                ensure!(
                    value.is_finite(),
                    "training diverged in epoch {epoch}: the batch loss is {value}; lower the \
                     learning rate"
                );
                optimizer.backward_step(&loss);
                loss_sum += value;
                batches += 1;
            }
            let loss = loss_sum / batches as f64;
            losses.push(loss);
            progress(EpochReport {
                epoch,
                epochs: settings.epochs,
                loss,
            });
        }
        Ok(losses)
    }

    fn host_blocks(&self) -> Result<Vec<HostBlock>> {
        tch::no_grad(|| {
            self.blocks
                .iter()
                .map(|block| {
                    let permutation =
                        Vec::<i64>::try_from(&block.permutation.to_device(Device::Cpu))?;
                    let mut parameters = BTreeMap::new();
                    for name in PARAMETER_NAMES {
                        let tensor = block
                            .parameter(name)
                            .to_device(Device::Cpu)
                            .to_kind(Kind::Float);
                        parameters.insert(name, Vec::<f32>::try_from(&tensor.flatten(0, -1))?);
                    }
                    Ok(HostBlock {
                        permutation,
                        parameters,
                    })
                })
                .collect()
        })
    }

    /// Writes the flow file in the runtime layout (F32 parameters, I32 permutations, the
    /// clamp in the header metadata), checking first that the runtime accepts the values.
    pub fn write_safetensors(&self, path: impl AsRef<Path>) -> Result<()> {
        let path = path.as_ref();
        let host = self.host_blocks()?;
        let shapes = block_shapes(&self.config);
        let mut named: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = Vec::new();
        for (k, block) in host.iter().enumerate() {
            let permutation: Vec<i32> = block.permutation.iter().map(|&p| p as i32).collect();
            named.push((
                format!("blocks.{k}.permutation"),
                Dtype::I32,
                vec![self.config.dim],
                bytemuck::cast_slice(&permutation).to_vec(),
            ));
            for name in PARAMETER_NAMES {
                let shape = shapes[name].iter().map(|&n| n as usize).collect();
                let bytes = bytemuck::cast_slice(&block.parameters[name]).to_vec();
                named.push((format!("blocks.{k}.{name}"), Dtype::F32, shape, bytes));
            }
        }
        let views = named
            .iter()
            .map(|(name, dtype, shape, bytes)| {
                Ok((name.clone(), TensorView::new(*dtype, shape.clone(), bytes)?))
            })
            .collect::<Result<Vec<_>>>()?;
        let metadata = HashMap::from([(
            AFFINE_CLAMPING_METADATA_KEY.to_string(),
            self.config.clamp.to_string(),
        )]);
        let bytes = safetensors::serialize(views, &Some(metadata))?;

        let aligned = AlignedBytes::new(&bytes);
        let params = params_from_safetensors(aligned.bytes())?;
        Flow::from_params(params).context("the trained flow has parameters the runtime rejects")?;
        std::fs::write(path, &bytes)
            .with_context(|| format!("failed to write {}", path.display()))?;
        Ok(())
    }

    /// Reads a flow file in the runtime layout, validated by the runtime's reader, into a
    /// store on `device`.
    pub fn read_safetensors(path: impl AsRef<Path>, device: Device) -> Result<Self> {
        let path = path.as_ref();
        let bytes =
            std::fs::read(path).with_context(|| format!("failed to read {}", path.display()))?;
        let aligned = AlignedBytes::new(&bytes);
        let params = params_from_safetensors(aligned.bytes())
            .with_context(|| format!("{} is not a valid flow file", path.display()))?;
        Flow::from_params(params.clone())
            .with_context(|| format!("{} holds invalid flow parameters", path.display()))?;
        Self::from_runtime_params(&params, device)
    }

    fn from_runtime_params(params: &FlowParams<'_>, device: Device) -> Result<Self> {
        let config = FlowConfig {
            dim: params.dim,
            hidden: params.hidden,
            blocks: params.blocks.len(),
            clamp: f64::from(params.clamp),
        };
        let host = params
            .blocks
            .iter()
            .map(|block| HostBlock {
                permutation: block.permutation.iter().map(|&p| i64::from(p)).collect(),
                parameters: BTreeMap::from([
                    ("global_scale", block.global_scale.to_vec()),
                    ("global_offset", block.global_offset.to_vec()),
                    ("subnet.0.weight", block.subnet_0_weight.to_vec()),
                    ("subnet.0.bias", block.subnet_0_bias.to_vec()),
                    ("subnet.2.weight", block.subnet_2_weight.to_vec()),
                    ("subnet.2.bias", block.subnet_2_bias.to_vec()),
                ]),
            })
            .collect();
        Self::from_host(config, device, host)
    }

    /// Converts a FrEIA `SequenceINN` state dict of `AllInOneBlock`s into this layout.
    ///
    /// Keys are `module_list.K.<name>` behind an optional common prefix such as `flow.`;
    /// other keys are ignored. Every block needs `global_scale` and `global_offset`
    /// (`[1, d]`), `subnet.0.*`, `subnet.2.*` and `w_perm` (`[d, d]`), which must be a
    /// permutation matrix. Blocks with Householder reflections (`vk_householder`) are
    /// rejected. `clamp` is FrEIA's `affine_clamping`, which the state dict does not hold.
    ///
    /// NOTE: a state dict does not show whether the blocks were built with `gin_block=True`
    /// or another global affine type than SOFTPLUS; such a flow imports without error and
    /// computes the wrong function.
    pub fn import_freia(named: &[(String, Tensor)], clamp: f64, device: Device) -> Result<Self> {
        let mut by_block: BTreeMap<usize, HashMap<String, &Tensor>> = BTreeMap::new();
        let mut prefixes = std::collections::BTreeSet::new();
        for (key, tensor) in named {
            let Some(position) = key.find("module_list.") else {
                continue;
            };
            let (prefix, rest) = key.split_at(position);
            let rest = &rest["module_list.".len()..];
            let Some((index, name)) = rest.split_once('.') else {
                continue;
            };
            let index: usize = index
                .parse()
                .with_context(|| format!("state dict key `{key}` has a non-numeric block index"))?;
            ensure!(
                name != "vk_householder",
                "state dict key `{key}`: learned Householder permutations are not supported"
            );
            prefixes.insert(prefix.to_string());
            by_block
                .entry(index)
                .or_default()
                .insert(name.to_string(), tensor);
        }
        ensure!(
            !by_block.is_empty(),
            "state dict has no `module_list.K.*` keys of a FrEIA SequenceINN"
        );
        ensure!(
            prefixes.len() == 1,
            "state dict mixes the key prefixes {prefixes:?}; pass one flow"
        );
        let prefix = prefixes.into_iter().next().unwrap_or_default();
        let count = by_block.len();
        ensure!(
            by_block.keys().copied().eq(0..count),
            "state dict blocks are {:?}, expected 0..{count} without gaps",
            by_block.keys().collect::<Vec<_>>()
        );

        let get = |k: usize, name: &str| -> Result<Tensor> {
            let tensor = by_block[&k]
                .get(name)
                .with_context(|| format!("state dict has no `{prefix}module_list.{k}.{name}`"))?;
            Ok(tensor.to_device(Device::Cpu).to_kind(Kind::Float))
        };
        let first = get(0, "w_perm")?;
        let dim = first.size()[0] as usize;
        let hidden = get(0, "subnet.0.weight")?.size()[0] as usize;
        let config = FlowConfig {
            dim,
            hidden,
            blocks: count,
            clamp,
        };
        config.validate()?;
        let shapes = block_shapes(&config);

        let mut host = Vec::with_capacity(count);
        for k in 0..count {
            let w_perm = get(k, "w_perm")?;
            let permutation = permutation_from_matrix(&w_perm, dim).with_context(|| {
                format!("`{prefix}module_list.{k}.w_perm` is not a permutation matrix")
            })?;
            let mut parameters = BTreeMap::new();
            for name in PARAMETER_NAMES {
                let tensor = get(k, name)?;
                let expected = &shapes[name];
                let numel: i64 = expected.iter().product();
                // FrEIA stores global_scale and global_offset as [1, d] for 1-D input.
                let size = tensor.size();
                let squeezed: Vec<i64> = size.iter().copied().filter(|&n| n != 1).collect();
                let wanted: Vec<i64> = expected.iter().copied().filter(|&n| n != 1).collect();
                ensure!(
                    size == *expected || squeezed == wanted,
                    "`{prefix}module_list.{k}.{name}` has shape {size:?}, expected {expected:?}"
                );
                ensure!(
                    tensor.numel() as i64 == numel,
                    "`{prefix}module_list.{k}.{name}` has the wrong size"
                );
                parameters.insert(name, Vec::<f32>::try_from(&tensor.flatten(0, -1))?);
            }
            host.push(HostBlock {
                permutation,
                parameters,
            });
        }
        Self::from_host(config, device, host)
    }

    /// Reads a FrEIA state dict saved as safetensors and converts it with
    /// [`TchFlow::import_freia`].
    pub fn import_freia_safetensors(
        path: impl AsRef<Path>,
        clamp: f64,
        device: Device,
    ) -> Result<Self> {
        let path = path.as_ref();
        let named = Tensor::read_safetensors(path)
            .with_context(|| format!("failed to read {}", path.display()))?;
        Self::import_freia(&named, clamp, device)
    }
}

/// FrEIA's SOFTPLUS global scale `0.1 * Softplus(beta = 0.5)`, written as
/// `0.2 * softplus(0.5 x)` so that PyTorch's threshold applies to `0.5 x` as in FrEIA.
fn activated_scale(raw: &Tensor) -> Tensor {
    (raw * 0.5).softplus() * 0.2
}

fn block_shapes(config: &FlowConfig) -> HashMap<&'static str, Vec<i64>> {
    let dim = config.dim as i64;
    let hidden = config.hidden as i64;
    HashMap::from([
        ("global_scale", vec![dim]),
        ("global_offset", vec![dim]),
        ("subnet.0.weight", vec![hidden, config.d1()]),
        ("subnet.0.bias", vec![hidden]),
        ("subnet.2.weight", vec![2 * config.d2(), hidden]),
        ("subnet.2.bias", vec![2 * config.d2()]),
    ])
}

/// Turns a `[d, d]` 0/1 matrix with one 1 per row and column into `permutation` with
/// `w[i, permutation[i]] = 1`.
fn permutation_from_matrix(matrix: &Tensor, dim: usize) -> Result<Vec<i64>> {
    let size = matrix.size();
    ensure!(
        size == [dim as i64, dim as i64],
        "shape {size:?}, expected [{dim}, {dim}]"
    );
    let values = Vec::<f32>::try_from(&matrix.flatten(0, -1))?;
    let mut permutation = Vec::with_capacity(dim);
    let mut column_used = vec![false; dim];
    for (i, row) in values.chunks_exact(dim).enumerate() {
        let mut one = None;
        for (j, &value) in row.iter().enumerate() {
            if value == 1.0 {
                if one.is_some() {
                    bail!("row {i} has more than one 1");
                }
                one = Some(j);
            } else if value != 0.0 {
                bail!("entry [{i}, {j}] is {value}, expected 0 or 1 (soft permutations are not supported)");
            }
        }
        let j = one.with_context(|| format!("row {i} has no 1"))?;
        ensure!(!column_used[j], "column {j} has more than one 1");
        column_used[j] = true;
        permutation.push(j as i64);
    }
    Ok(permutation)
}

/// A copy of a byte buffer whose start is aligned to 8 bytes, so borrowed f32 and i32
/// tensor data from a safetensors file written by the safetensors serializer is aligned.
struct AlignedBytes {
    storage: Vec<u64>,
    len: usize,
}

impl AlignedBytes {
    fn new(bytes: &[u8]) -> Self {
        let mut storage = vec![0u64; bytes.len().div_ceil(8)];
        bytemuck::cast_slice_mut::<u64, u8>(&mut storage)[..bytes.len()].copy_from_slice(bytes);
        Self {
            storage,
            len: bytes.len(),
        }
    }

    fn bytes(&self) -> &[u8] {
        &bytemuck::cast_slice::<u64, u8>(&self.storage)[..self.len]
    }
}

/// Parameters of [`daain::score::Mahalanobis`] fitted on flow outputs.
#[derive(Debug, Clone)]
pub struct MahalanobisFit {
    pub mean: Vec<f32>,
    /// `[k][dim]`, principal components by decreasing variance.
    pub components: Vec<f32>,
    pub variances: Vec<f64>,
    pub residual_variance: f64,
}

impl MahalanobisFit {
    /// Builds the runtime score, which validates the parameters.
    pub fn into_score(self) -> Result<Mahalanobis> {
        Ok(Mahalanobis::new(
            self.mean,
            self.components,
            self.variances,
            self.residual_variance,
        )?)
    }
}

/// Relative ridge added to every variance, as a fraction of the mean variance, so that
/// directions with no spread in the training data get a finite score.
const MAHALANOBIS_RIDGE: f64 = 1e-6;

/// Fits a low-rank-plus-isotropic Gaussian to the rows of `z` (`[n, dim]`): the mean, the
/// `k` leading principal components with their variances, and the mean variance of the
/// remaining directions. Uses the `dim x dim` covariance when `n > dim` and the `n x n`
/// Gram matrix otherwise, in f64, and adds a ridge of `1e-6` times the mean variance.
pub fn fit_mahalanobis(z: &Tensor, k: usize) -> Result<MahalanobisFit> {
    let size = z.size();
    ensure!(
        size.len() == 2,
        "flow outputs have shape {size:?}, expected [n, dim]"
    );
    let (n, dim) = (size[0] as usize, size[1] as usize);
    ensure!(n >= 2, "Mahalanobis fit needs at least 2 rows, got {n}");
    ensure!(
        k < dim && k < n,
        "component count {k} is invalid: it must be below the dimension {dim} and the row count {n}"
    );
    tch::no_grad(|| {
        let z = z.to_device(Device::Cpu).to_kind(Kind::Double);
        ensure!(
            z.isfinite().all().int64_value(&[]) == 1,
            "flow outputs contain NaN or infinite values"
        );
        let mean = z.mean_dim(0, true, Kind::Double);
        let centred = &z - &mean;
        let denominator = (n - 1) as f64;
        let total_variance = centred.square().sum(Kind::Double).double_value(&[]) / denominator;
        let ridge = MAHALANOBIS_RIDGE * (total_variance / dim as f64).max(f64::MIN_POSITIVE);

        // Both branches give the leading eigenpairs of the covariance, descending.
        let (eigenvalues, eigenvectors) = if n > dim {
            let covariance = centred.transpose(0, 1).matmul(&centred) / denominator;
            let (values, vectors) = covariance.linalg_eigh("L");
            let top = values.flip([0]).narrow(0, 0, k as i64);
            let top_vectors = vectors.flip([1]).narrow(1, 0, k as i64).transpose(0, 1);
            (top, top_vectors)
        } else {
            let gram = centred.matmul(&centred.transpose(0, 1)) / denominator;
            let (values, vectors) = gram.linalg_eigh("L");
            let top = values.flip([0]).narrow(0, 0, k as i64);
            let top_vectors = vectors.flip([1]).narrow(1, 0, k as i64);
            // u = C^T v / |C^T v| maps a Gram eigenvector to the covariance eigenvector.
            let components = centred.transpose(0, 1).matmul(&top_vectors);
            let norms = components
                .square()
                .sum_dim_intlist(0, true, Kind::Double)
                .sqrt();
            (
                top,
                (components / norms.clamp_min(f64::MIN_POSITIVE)).transpose(0, 1),
            )
        };

        let variances: Vec<f64> = Vec::<f64>::try_from(&eigenvalues)?
            .into_iter()
            .map(|v| v.max(0.0) + ridge)
            .collect();
        let explained: f64 = variances.iter().map(|v| v - ridge).sum();
        let residual_variance = (total_variance - explained).max(0.0) / (dim - k) as f64 + ridge;
        let components = Vec::<f32>::try_from(
            &eigenvectors
                .contiguous()
                .flatten(0, -1)
                .to_kind(Kind::Float),
        )?;
        let mean = Vec::<f32>::try_from(&mean.flatten(0, -1).to_kind(Kind::Float))?;
        Ok(MahalanobisFit {
            mean,
            components,
            variances,
            residual_variance,
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Rows with variances 9, 4 and 1 along three random orthogonal directions, plus noise
    /// of standard deviation 0.1 in every direction.
    fn structured_rows(rows: usize, dim: usize, seed: u64) -> Tensor {
        tch::manual_seed(seed as i64);
        let random = Tensor::randn([dim as i64, dim as i64], (Kind::Double, Device::Cpu));
        let basis = Tensor::linalg_qr(&random, "reduced").0;
        let scales = Tensor::from_slice(&[3.0f64, 2.0, 1.0]);
        let strong = Tensor::randn([rows as i64, 3], (Kind::Double, Device::Cpu)) * scales;
        let noise = Tensor::randn([rows as i64, dim as i64], (Kind::Double, Device::Cpu)) * 0.1;
        strong.matmul(&basis.narrow(1, 0, 3).transpose(0, 1)) + noise + 2.0
    }

    /// On its training rows the score averages `(n - 1) / n * dim` up to the ridge, because
    /// each fitted variance is the mean squared projection on its direction.
    fn assert_mean_score(rows: usize, dim: usize, k: usize) {
        let z = structured_rows(rows, dim, 5);
        let fit = fit_mahalanobis(&z, k).unwrap();
        assert_eq!(fit.mean.len(), dim);
        assert_eq!(fit.components.len(), k * dim);
        assert!(
            fit.variances.windows(2).all(|pair| pair[0] >= pair[1]),
            "{:?}",
            fit.variances
        );
        let score = fit.into_score().unwrap();
        let values = Vec::<f32>::try_from(&z.to_kind(Kind::Float).flatten(0, -1)).unwrap();
        let mean: f64 = values
            .chunks_exact(dim)
            .map(|row| score.score(row).unwrap())
            .sum::<f64>()
            / rows as f64;
        let expected = (rows - 1) as f64 / rows as f64 * dim as f64;
        assert!(
            (mean - expected).abs() < 1e-3 * expected,
            "mean score {mean}, expected {expected}"
        );
    }

    #[test]
    fn mahalanobis_covariance_branch() {
        assert_mean_score(400, 20, 3);
    }

    #[test]
    fn mahalanobis_gram_branch() {
        assert_mean_score(30, 50, 3);
    }

    #[test]
    fn mahalanobis_rejects_too_many_components() {
        let z = structured_rows(10, 20, 1);
        assert!(fit_mahalanobis(&z, 10).is_err());
        assert!(fit_mahalanobis(&z, 20).is_err());
    }

    #[test]
    fn new_flow_starts_near_identity() {
        let config = FlowConfig {
            dim: 9,
            hidden: 4,
            blocks: 3,
            clamp: DEFAULT_CLAMP,
        };
        let flow = TchFlow::new(config, Device::Cpu, 1).unwrap();
        let x = Tensor::randn([5, 9], (Kind::Float, Device::Cpu));
        let (z, log_det) = tch::no_grad(|| flow.forward(&x)).unwrap();
        // The permutations only reorder, so the norms match up to the small last layers.
        let norm_x = x.square().sum(Kind::Double).double_value(&[]);
        let norm_z = z.square().sum(Kind::Double).double_value(&[]);
        assert!(
            (norm_x - norm_z).abs() < 0.05 * norm_x,
            "|x|^2 = {norm_x}, |z|^2 = {norm_z}"
        );
        let max_log_det = log_det.abs().max().double_value(&[]);
        assert!(max_log_det < 0.05, "log|det J| up to {max_log_det}");
    }

    #[test]
    fn forward_rejects_wrong_width() {
        let config = FlowConfig {
            dim: 9,
            hidden: 4,
            blocks: 1,
            clamp: DEFAULT_CLAMP,
        };
        let flow = TchFlow::new(config, Device::Cpu, 1).unwrap();
        let error = flow
            .forward(&Tensor::zeros([2, 8], (Kind::Float, Device::Cpu)))
            .unwrap_err();
        assert!(error.to_string().contains("expected [n, 9]"), "{error}");
    }
}
