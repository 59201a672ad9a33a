//! ONNX export: a small graph builder over tract-onnx's protobuf types, and the ESPNet graph.
//!
//! The ESPNet graph has a fixed input `input` of shape 1x3x256x512 and the outputs `logits`
//! (1x20x256x512) and the 20 PReLU outputs of [`espnet::TAPS`](crate::espnet::TAPS) under
//! their module paths. BatchNorm stays a `BatchNormalization` node (epsilon 1e-3), so every
//! tap is exactly the PReLU output of the PyTorch model. The two input downsamplings of the
//! encoder share their first `AveragePool`.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{ensure, Context, Result};
use prost::Message;
use tract_onnx::pb;

use crate::espnet::{Weights, INPUT_HEIGHT, INPUT_WIDTH, NUM_CLASSES, NUM_WEIGHTS, TAPS};

/// ONNX operator set the graphs are written for.
pub const OPSET_VERSION: i64 = 13;
/// ONNX IR version 7, the IR version of ONNX 1.7 and 1.8 (opsets 12 and 13).
pub const IR_VERSION: i64 = 7;

/// Creates an integer attribute.
pub fn attribute_int(name: &str, value: i64) -> pb::AttributeProto {
    pb::AttributeProto {
        name: name.to_owned(),
        r#type: pb::attribute_proto::AttributeType::Int as i32,
        i: value,
        ..Default::default()
    }
}

/// Creates an attribute holding a list of integers.
pub fn attribute_ints(name: &str, values: &[i64]) -> pb::AttributeProto {
    pb::AttributeProto {
        name: name.to_owned(),
        r#type: pb::attribute_proto::AttributeType::Ints as i32,
        ints: values.to_vec(),
        ..Default::default()
    }
}

/// Creates a float attribute.
pub fn attribute_float(name: &str, value: f32) -> pb::AttributeProto {
    pb::AttributeProto {
        name: name.to_owned(),
        r#type: pb::attribute_proto::AttributeType::Float as i32,
        f: value,
        ..Default::default()
    }
}

/// Creates the type of an f32 tensor with a fixed shape.
fn tensor_value_info(name: &str, shape: &[usize]) -> pb::ValueInfoProto {
    let dim = shape
        .iter()
        .map(|&d| pb::tensor_shape_proto::Dimension {
            value: Some(pb::tensor_shape_proto::dimension::Value::DimValue(d as i64)),
            ..Default::default()
        })
        .collect();
    let tensor_type = pb::type_proto::Tensor {
        elem_type: pb::tensor_proto::DataType::Float as i32,
        shape: Some(pb::TensorShapeProto { dim }),
    };
    pb::ValueInfoProto {
        name: name.to_owned(),
        r#type: Some(pb::TypeProto {
            value: Some(pb::type_proto::Value::TensorType(tensor_type)),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// Builder of one ONNX graph of f32 tensors, with nodes in the default (`ai.onnx`)
/// domain or in custom domains.
#[derive(Debug, Default)]
pub struct GraphBuilder {
    graph: pb::GraphProto,
    /// Number of nodes per operator type.
    op_counts: BTreeMap<String, usize>,
    /// Custom operator domains the nodes use, with their operator set versions.
    custom_domains: BTreeMap<String, i64>,
}

impl GraphBuilder {
    /// Starts an empty graph called `name`.
    pub fn new(name: &str) -> Self {
        Self {
            graph: pb::GraphProto {
                name: name.to_owned(),
                ..Default::default()
            },
            ..Default::default()
        }
    }

    /// Continues an existing graph, such as the graph of a model read from a file.
    pub fn from_graph(graph: pb::GraphProto) -> Self {
        Self {
            graph,
            ..Default::default()
        }
    }

    /// Declares a graph input of type f32 with a fixed shape.
    pub fn input(&mut self, name: &str, shape: &[usize]) {
        self.graph.input.push(tensor_value_info(name, shape));
    }

    /// Declares the value `name` as a graph output of type f32 with a fixed shape.
    pub fn output(&mut self, name: &str, shape: &[usize]) {
        self.graph.output.push(tensor_value_info(name, shape));
    }

    /// Adds an f32 constant stored as little-endian `raw_data`.
    pub fn initializer(&mut self, name: &str, shape: &[usize], data: &[f32]) -> Result<()> {
        let bytes = data.iter().flat_map(|v| v.to_le_bytes()).collect();
        self.raw_initializer(name, shape, pb::tensor_proto::DataType::Float, data.len(), bytes)
    }

    /// Adds a constant of `count` values of type `data_type` whose little-endian bytes are
    /// `raw_data`, after checking the count against `shape`.
    fn raw_initializer(
        &mut self,
        name: &str,
        shape: &[usize],
        data_type: pb::tensor_proto::DataType,
        count: usize,
        raw_data: Vec<u8>,
    ) -> Result<()> {
        let numel: usize = shape.iter().product();
        ensure!(
            numel == count,
            "initializer `{name}` has {count} values, but its shape {shape:?} needs {numel}"
        );
        self.graph.initializer.push(pb::TensorProto {
            name: name.to_owned(),
            dims: shape.iter().map(|&d| d as i64).collect(),
            data_type: data_type as i32,
            raw_data,
            ..Default::default()
        });
        Ok(())
    }

    /// Keeps only the graph outputs named in `names`, in their current order.
    pub fn retain_outputs(&mut self, names: &[&str]) {
        self.graph
            .output
            .retain(|output| names.contains(&output.name.as_str()));
    }

    /// Declares the value `name` as a graph output of the given element type and fixed
    /// shape (an empty shape is a scalar).
    pub fn typed_output(&mut self, name: &str, element: pb::tensor_proto::DataType, shape: &[usize]) {
        let mut info = tensor_value_info(name, shape);
        if let Some(pb::type_proto::Value::TensorType(tensor)) =
            info.r#type.as_mut().and_then(|t| t.value.as_mut())
        {
            tensor.elem_type = element as i32;
        }
        self.graph.output.push(info);
    }

    /// Adds an i32 constant stored as little-endian `raw_data`.
    pub fn initializer_i32(&mut self, name: &str, shape: &[usize], data: &[i32]) -> Result<()> {
        let bytes = data.iter().flat_map(|v| v.to_le_bytes()).collect();
        self.raw_initializer(name, shape, pb::tensor_proto::DataType::Int32, data.len(), bytes)
    }

    /// Adds a node of a custom operator domain with any number of outputs. The model
    /// imports `domain` at `version`.
    pub fn custom_node(
        &mut self,
        domain: &str,
        version: i64,
        op_type: &str,
        inputs: &[&str],
        outputs: &[&str],
        attributes: Vec<pb::AttributeProto>,
    ) {
        self.custom_domains.insert(domain.to_owned(), version);
        let count = self.op_counts.entry(op_type.to_owned()).or_default();
        *count += 1;
        self.graph.node.push(pb::NodeProto {
            name: format!("{op_type}_{count}"),
            op_type: op_type.to_owned(),
            domain: domain.to_owned(),
            input: inputs.iter().map(|&i| i.to_owned()).collect(),
            output: outputs.iter().map(|&o| o.to_owned()).collect(),
            attribute: attributes,
            ..Default::default()
        });
    }

    /// Adds a node with one output and returns the output's name.
    pub fn node(
        &mut self,
        op_type: &str,
        inputs: &[&str],
        output: &str,
        attributes: Vec<pb::AttributeProto>,
    ) -> String {
        let count = self.op_counts.entry(op_type.to_owned()).or_default();
        *count += 1;
        self.graph.node.push(pb::NodeProto {
            name: format!("{op_type}_{count}"),
            op_type: op_type.to_owned(),
            input: inputs.iter().map(|&i| i.to_owned()).collect(),
            output: vec![output.to_owned()],
            attribute: attributes,
            ..Default::default()
        });
        output.to_owned()
    }

    /// Returns the number of nodes per operator type.
    pub fn op_counts(&self) -> &BTreeMap<String, usize> {
        &self.op_counts
    }

    /// Wraps the graph into a model for [`OPSET_VERSION`] and [`IR_VERSION`], importing
    /// the custom domains its nodes use.
    pub fn into_model(self, producer_name: &str) -> pb::ModelProto {
        let mut opset_import = vec![pb::OperatorSetIdProto {
            domain: String::new(),
            version: OPSET_VERSION,
        }];
        for (domain, version) in self.custom_domains {
            opset_import.push(pb::OperatorSetIdProto { domain, version });
        }
        pb::ModelProto {
            ir_version: IR_VERSION,
            opset_import,
            producer_name: producer_name.to_owned(),
            producer_version: env!("CARGO_PKG_VERSION").to_owned(),
            graph: Some(self.graph),
            ..Default::default()
        }
    }
}

/// Reads a model from a binary protobuf file.
pub fn read_model(path: &Path) -> Result<pb::ModelProto> {
    let bytes = std::fs::read(path)
        .with_context(|| format!("failed to read ONNX model {}", path.display()))?;
    pb::ModelProto::decode(bytes.as_slice())
        .with_context(|| format!("{} is not a valid ONNX model", path.display()))
}

/// Writes a model as a binary protobuf file.
pub fn write_model(model: &pb::ModelProto, path: &Path) -> Result<()> {
    std::fs::write(path, model.encode_to_vec())
        .with_context(|| format!("failed to write ONNX model {}", path.display()))
}

/// An intermediate value of the ESPNet graph: its name and NCHW shape.
#[derive(Debug, Clone)]
struct Feature {
    name: String,
    shape: [usize; 4],
}

/// Emits the ESPNet layers into a graph, reading their weights by module path.
struct EspnetExporter<'a> {
    builder: GraphBuilder,
    weights: &'a Weights,
    /// Number of weight tensors written so far.
    used_weights: usize,
    /// Counter for the names of intermediate values.
    next_value: usize,
}

impl<'a> EspnetExporter<'a> {
    fn value_name(&mut self, prefix: &str) -> String {
        self.next_value += 1;
        format!("{prefix}/{}", self.next_value)
    }

    /// Adds the weight `name` as an initializer after checking its shape.
    fn weight(&mut self, name: &str, shape: &[usize]) -> Result<String> {
        let weights = self.weights;
        let tensor = weights.get(name, shape)?;
        self.builder.initializer(name, shape, &tensor.data)?;
        self.used_weights += 1;
        Ok(name.to_owned())
    }

    /// Convolution without bias and with padding `(kernel - 1) / 2 * dilation`; the weight
    /// is `{path}.weight`.
    fn conv(
        &mut self,
        path: &str,
        x: &Feature,
        output: usize,
        kernel: usize,
        stride: usize,
        dilation: usize,
    ) -> Result<Feature> {
        let [n, input, height, width] = x.shape;
        let weight = self.weight(&format!("{path}.weight"), &[output, input, kernel, kernel])?;
        let pad = (kernel - 1) / 2 * dilation;
        let out_size = |size: usize| (size + 2 * pad - dilation * (kernel - 1) - 1) / stride + 1;
        let name = self.value_name(path);
        let attributes = vec![
            attribute_ints("kernel_shape", &[kernel as i64, kernel as i64]),
            attribute_ints("strides", &[stride as i64, stride as i64]),
            attribute_ints("pads", &[pad as i64; 4]),
            attribute_ints("dilations", &[dilation as i64, dilation as i64]),
            attribute_int("group", 1),
        ];
        self.builder
            .node("Conv", &[&x.name, &weight], &name, attributes);
        Ok(Feature {
            name,
            shape: [n, output, out_size(height), out_size(width)],
        })
    }

    /// 2x2 transposed convolution with stride 2 and no bias; the weight is `{path}.weight`.
    fn up_conv(&mut self, path: &str, x: &Feature) -> Result<Feature> {
        let [n, channels, height, width] = x.shape;
        let weight = self.weight(&format!("{path}.weight"), &[channels, channels, 2, 2])?;
        let name = self.value_name(path);
        let attributes = vec![
            attribute_ints("kernel_shape", &[2, 2]),
            attribute_ints("strides", &[2, 2]),
        ];
        self.builder
            .node("ConvTranspose", &[&x.name, &weight], &name, attributes);
        Ok(Feature {
            name,
            shape: [n, channels, 2 * height, 2 * width],
        })
    }

    /// BatchNorm in inference mode with eps 1e-3 and the parameters under `path`.
    fn batch_norm(&mut self, path: &str, x: &Feature) -> Result<Feature> {
        let channels = [x.shape[1]];
        let scale = self.weight(&format!("{path}.weight"), &channels)?;
        let bias = self.weight(&format!("{path}.bias"), &channels)?;
        let mean = self.weight(&format!("{path}.running_mean"), &channels)?;
        let var = self.weight(&format!("{path}.running_var"), &channels)?;
        let name = self.value_name(path);
        let attributes = vec![attribute_float("epsilon", 1e-3)];
        let inputs = [x.name.as_str(), &scale, &bias, &mean, &var];
        self.builder
            .node("BatchNormalization", &inputs, &name, attributes);
        Ok(Feature {
            name,
            shape: x.shape,
        })
    }

    /// BatchNorm `{path}.bn` then PReLU `{path}.act` (BR upstream). The output is named
    /// `output_name` and declared a graph output.
    fn br(&mut self, path: &str, x: &Feature, output_name: &str) -> Result<Feature> {
        let normalized = self.batch_norm(&format!("{path}.bn"), x)?;
        let channels = x.shape[1];
        let slope_name = format!("{path}.act.weight");
        let weights = self.weights;
        let slope = weights.get(&slope_name, &[channels])?;
        self.builder
            .initializer(&slope_name, &[channels, 1, 1], &slope.data)?;
        self.used_weights += 1;
        self.builder.node(
            "PRelu",
            &[&normalized.name, &slope_name],
            output_name,
            Vec::new(),
        );
        self.builder.output(output_name, &x.shape);
        Ok(Feature {
            name: output_name.to_owned(),
            shape: x.shape,
        })
    }

    fn add(&mut self, prefix: &str, a: &Feature, b: &Feature) -> Result<Feature> {
        ensure!(
            a.shape == b.shape,
            "Add of shapes {:?} and {:?} in {prefix}",
            a.shape,
            b.shape
        );
        let name = self.value_name(prefix);
        self.builder
            .node("Add", &[&a.name, &b.name], &name, Vec::new());
        Ok(Feature {
            name,
            shape: a.shape,
        })
    }

    fn concat(&mut self, prefix: &str, parts: &[&Feature]) -> Result<Feature> {
        let [n, _, height, width] = parts[0].shape;
        let mut channels = 0;
        for part in parts {
            ensure!(
                part.shape[0] == n && part.shape[2] == height && part.shape[3] == width,
                "Concat of shapes {:?} and {:?} in {prefix}",
                parts[0].shape,
                part.shape
            );
            channels += part.shape[1];
        }
        let name = self.value_name(prefix);
        let inputs: Vec<&str> = parts.iter().map(|p| p.name.as_str()).collect();
        self.builder
            .node("Concat", &inputs, &name, vec![attribute_int("axis", 1)]);
        Ok(Feature {
            name,
            shape: [n, channels, height, width],
        })
    }

    /// Average pooling 3x3, stride 2, padding 1, padding counted (InputProjectionA).
    fn average_pool(&mut self, prefix: &str, x: &Feature) -> Feature {
        let [n, channels, height, width] = x.shape;
        let name = self.value_name(prefix);
        let attributes = vec![
            attribute_ints("kernel_shape", &[3, 3]),
            attribute_ints("strides", &[2, 2]),
            attribute_ints("pads", &[1, 1, 1, 1]),
            attribute_int("count_include_pad", 1),
        ];
        self.builder
            .node("AveragePool", &[&x.name], &name, attributes);
        Feature {
            name,
            shape: [n, channels, (height + 1) / 2, (width + 1) / 2],
        }
    }

    /// Convolution, BatchNorm and PReLU under `path` (CBR upstream); `path` is the tap name.
    fn cbr(
        &mut self,
        path: &str,
        x: &Feature,
        output: usize,
        kernel: usize,
        stride: usize,
    ) -> Result<Feature> {
        let convolved = self.conv(&format!("{path}.conv"), x, output, kernel, stride, 1)?;
        self.br(path, &convolved, path)
    }

    /// The ESP spatial pyramid: `c1` reduction, dilated convolutions `d1` to `d16`, the
    /// hierarchical sums and their concatenation.
    fn spatial_pyramid(
        &mut self,
        path: &str,
        x: &Feature,
        output: usize,
        c1_kernel: usize,
        c1_stride: usize,
    ) -> Result<Feature> {
        let n = output / 5;
        let n1 = output - 4 * n;
        let reduced = self.conv(&format!("{path}.c1.conv"), x, n, c1_kernel, c1_stride, 1)?;
        let d1 = self.conv(&format!("{path}.d1.conv"), &reduced, n1, 3, 1, 1)?;
        let add1 = self.conv(&format!("{path}.d2.conv"), &reduced, n, 3, 1, 2)?;
        let d4 = self.conv(&format!("{path}.d4.conv"), &reduced, n, 3, 1, 4)?;
        let add2 = self.add(path, &add1, &d4)?;
        let d8 = self.conv(&format!("{path}.d8.conv"), &reduced, n, 3, 1, 8)?;
        let add3 = self.add(path, &add2, &d8)?;
        let d16 = self.conv(&format!("{path}.d16.conv"), &reduced, n, 3, 1, 16)?;
        let add4 = self.add(path, &add3, &d16)?;
        self.concat(path, &[&d1, &add1, &add2, &add3, &add4])
    }

    /// DownSamplerB: strided pyramid, then BatchNorm `{path}.bn` and PReLU `{path}.act`.
    fn down_sampler(&mut self, path: &str, x: &Feature, output: usize) -> Result<Feature> {
        let combined = self.spatial_pyramid(path, x, output, 3, 2)?;
        self.br(path, &combined, path)
    }

    /// DilatedParllelResidualBlockB: pyramid, optional residual sum, then BR `{path}.bn`.
    fn esp_block(&mut self, path: &str, x: &Feature, output: usize, add: bool) -> Result<Feature> {
        let mut combined = self.spatial_pyramid(path, x, output, 1, 1)?;
        if add {
            combined = self.add(path, x, &combined)?;
        }
        self.br(&format!("{path}.bn"), &combined, path)
    }

    /// Emits the whole network, following `Espnet::forward_with_taps`.
    fn build(&mut self) -> Result<Feature> {
        let input = Feature {
            name: "input".to_owned(),
            shape: [1, 3, INPUT_HEIGHT, INPUT_WIDTH],
        };
        self.builder.input(&input.name, &input.shape);
        let classes = NUM_CLASSES;

        let output0 = self.cbr("encoder.level1", &input, 16, 3, 2)?;
        let inp1 = self.average_pool("encoder.sample1", &input);
        let inp2 = self.average_pool("encoder.sample2", &inp1);

        let cat = self.concat("encoder.b1", &[&output0, &inp1])?;
        let output0_cat = self.br("encoder.b1", &cat, "encoder.b1")?;
        let output1_0 = self.down_sampler("encoder.level2_0", &output0_cat, 64)?;
        let mut output1 = output1_0.clone();
        for i in 0..2 {
            output1 = self.esp_block(&format!("encoder.level2.{i}"), &output1, 64, true)?;
        }
        let cat = self.concat("encoder.b2", &[&output1, &output1_0, &inp2])?;
        let output1_cat = self.br("encoder.b2", &cat, "encoder.b2")?;

        let output2_0 = self.down_sampler("encoder.level3_0", &output1_cat, 128)?;
        let mut output2 = output2_0.clone();
        for i in 0..8 {
            output2 = self.esp_block(&format!("encoder.level3.{i}"), &output2, 128, true)?;
        }
        let cat = self.concat("encoder.b3", &[&output2_0, &output2])?;
        let output2_cat = self.br("encoder.b3", &cat, "encoder.b3")?;

        let encoder_logits =
            self.conv("encoder.classifier.conv", &output2_cat, classes, 1, 1, 1)?;
        let normalized = self.batch_norm("br", &encoder_logits)?;
        let output2_c = self.up_conv("up_l3.0", &normalized)?;
        let output1_c = self.conv("level3_C.conv", &output1_cat, classes, 1, 1, 1)?;

        let cat = self.concat("combine_l2_l3", &[&output1_c, &output2_c])?;
        let combined = self.br("combine_l2_l3.0", &cat, "combine_l2_l3.0")?;
        let combined = self.esp_block("combine_l2_l3.1", &combined, classes, false)?;
        let upsampled = self.up_conv("up_l2.0", &combined)?;
        let comb_l2_l3 = self.br("up_l2.1", &upsampled, "up_l2.1")?;

        let cat = self.concat("conv", &[&comb_l2_l3, &output0])?;
        let concat_features = self.cbr("conv", &cat, classes, 3, 1)?;
        let logits = self.up_conv("classifier", &concat_features)?;
        Ok(logits)
    }
}

/// Counts of the exported ONNX operators, by operator type.
pub type OpCounts = BTreeMap<String, usize>;

/// Builds the ESPNet ONNX model for a 1x3x256x512 input from `weights` (the 189 tensors of
/// the PyTorch state dict) and returns it with its operator counts.
pub fn espnet_model(weights: &Weights) -> Result<(pb::ModelProto, OpCounts)> {
    let mut exporter = EspnetExporter {
        builder: GraphBuilder::new("espnet_p2_q8"),
        weights,
        used_weights: 0,
        next_value: 0,
    };
    let logits = exporter.build()?;
    ensure!(
        logits.shape == [1, NUM_CLASSES, INPUT_HEIGHT, INPUT_WIDTH],
        "logits have shape {:?}, expected [1, {NUM_CLASSES}, {INPUT_HEIGHT}, {INPUT_WIDTH}]",
        logits.shape
    );
    ensure!(
        exporter.used_weights == NUM_WEIGHTS && weights.tensors.len() == NUM_WEIGHTS,
        "the graph uses {} weights of {} given, expected all {NUM_WEIGHTS}",
        exporter.used_weights,
        weights.tensors.len()
    );
    // The logits are the last node's output; rename it so the graph output is `logits`.
    let mut builder = exporter.builder;
    let last = builder.graph.node.last_mut().expect("the graph has nodes");
    last.output[0] = "logits".to_owned();
    builder.output("logits", &logits.shape);

    // Graph outputs in the order `logits`, then the taps in `TAPS` order.
    let outputs = std::mem::take(&mut builder.graph.output);
    let mut ordered = vec![outputs
        .iter()
        .find(|o| o.name == "logits")
        .cloned()
        .expect("logits output")];
    for (tap, _) in TAPS {
        let output = outputs.iter().find(|o| o.name == *tap).cloned();
        ordered.push(output.with_context(|| format!("tap `{tap}` is not a graph output"))?);
    }
    ensure!(
        ordered.len() == outputs.len(),
        "the graph has {} outputs, expected {}",
        outputs.len(),
        ordered.len()
    );
    builder.graph.output = ordered;

    let op_counts = builder.op_counts().clone();
    Ok((builder.into_model("daain-tools"), op_counts))
}

/// Writes ESPNet as an ONNX file (see [`espnet_model`]) and returns its operator counts.
pub fn export_espnet(weights: &Weights, path: &Path) -> Result<OpCounts> {
    let (model, op_counts) = espnet_model(weights)?;
    write_model(&model, path)?;
    Ok(op_counts)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn initializer_size_is_checked() {
        let mut builder = GraphBuilder::new("g");
        let error = builder.initializer("w", &[2, 3], &[0.0; 5]).unwrap_err();
        assert!(error.to_string().contains("`w` has 5 values"), "{error}");
    }

    #[test]
    fn node_counts_by_op_type() {
        let mut builder = GraphBuilder::new("g");
        builder.node("Add", &["a", "b"], "c", Vec::new());
        builder.node("Add", &["c", "b"], "d", Vec::new());
        builder.node("Relu", &["d"], "e", Vec::new());
        assert_eq!(builder.op_counts()["Add"], 2);
        assert_eq!(builder.op_counts()["Relu"], 1);
    }
}
