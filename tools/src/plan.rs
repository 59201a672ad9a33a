//! Export of the combined plan: the bundle's backbone graph extended by the mask gather
//! and the flow's coupling blocks as custom operators, layout in `daain::plan`.

use std::path::{Path, PathBuf};

use anyhow::{ensure, Context, Result};
use tract_onnx::pb;

use daain::bundle::{sha256_hex, Bundle, FileEntry, Manifest, MANIFEST_FILE};
use daain::flow::Flow;
use daain::plan::{
    CombinedPlan, PlanSpec, COUPLING_OP, DOMAIN, DOMAIN_VERSION, FLOW_OUTPUT, FLOW_SHA256_KEY,
    GATHER_OP, LOG_DET_OUTPUT, MASK_SHA256_KEY, SAMPLE_OUTPUT,
};

use crate::onnx::{attribute_float, attribute_int, read_model, write_model, GraphBuilder};

/// File name of the combined plan inside a bundle.
pub const PLAN_FILE: &str = "plan.onnx";

/// Converts values to the INT32 initializers of the plan, naming the tensor when one
/// does not fit.
fn to_i32(name: &str, values: impl IntoIterator<Item = u32>) -> Result<Vec<i32>> {
    values
        .into_iter()
        .map(|v| i32::try_from(v).with_context(|| format!("{name}: value {v} exceeds INT32")))
        .collect()
}

/// Builds the combined model from the backbone model, the mask points and the flow.
///
/// The outputs are the backbone's logits output `logits`, then [`SAMPLE_OUTPUT`],
/// [`FLOW_OUTPUT`] and [`LOG_DET_OUTPUT`]. The flow weights are the f32 values the
/// runtime evaluates (F16 subnet tensors already widened), so the plan computes the same
/// flow as the bundle.
pub fn plan_model(
    backbone: pb::ModelProto,
    manifest: &Manifest,
    points: &[[u32; 3]],
    flow: &Flow<'_>,
) -> Result<pb::ModelProto> {
    let graph = backbone.graph.context("the backbone model has no graph")?;
    let logits_name = &manifest.backbone.logits;
    ensure!(
        graph.output.iter().any(|output| &output.name == logits_name),
        "the backbone has no output `{logits_name}`"
    );
    ensure!(
        points.len() == flow.dim(),
        "the mask has {} points, the flow dimension is {}",
        points.len(),
        flow.dim()
    );
    let mut builder = GraphBuilder::from_graph(graph);
    // The taps stay values of the graph, read by the gather, but are no outputs.
    builder.retain_outputs(&[logits_name]);

    let points_name = "daain.mask.points";
    let flat = to_i32(points_name, points.iter().flatten().copied())?;
    builder.initializer_i32(points_name, &[points.len(), 3], &flat)?;
    let mut gather_inputs = vec![points_name];
    gather_inputs.extend(manifest.backbone.taps.iter().map(|tap| tap.name.as_str()));
    builder.custom_node(
        DOMAIN,
        DOMAIN_VERSION,
        GATHER_OP,
        &gather_inputs,
        &[SAMPLE_OUTPUT],
        vec![
            attribute_int("input_height", manifest.input.height as i64),
            attribute_int("input_width", manifest.input.width as i64),
        ],
    );

    let zero = "daain.flow.log_det.zero";
    builder.initializer(zero, &[], &[0.0])?;
    let mut x = SAMPLE_OUTPUT.to_owned();
    let mut log_det = zero.to_owned();
    let last = flow.blocks().len() - 1;
    for (k, block) in flow.blocks().iter().enumerate() {
        let params = block.params();
        let prefix = format!("daain.flow.blocks.{k}");
        let name = |tensor: &str| format!("{prefix}.{tensor}");
        let permutation = to_i32(&name("permutation"), params.permutation.iter().copied())?;
        builder.initializer_i32(&name("permutation"), &[flow.dim()], &permutation)?;
        let d1 = block.d1();
        let d2 = block.d2();
        let hidden = flow.hidden();
        let f32_tensors: [(&str, Vec<usize>, &[f32]); 6] = [
            ("global_scale", vec![flow.dim()], params.global_scale),
            ("global_offset", vec![flow.dim()], params.global_offset),
            ("subnet.0.weight", vec![hidden, d1], params.subnet_0_weight),
            ("subnet.0.bias", vec![hidden], params.subnet_0_bias),
            ("subnet.2.weight", vec![2 * d2, hidden], params.subnet_2_weight),
            ("subnet.2.bias", vec![2 * d2], params.subnet_2_bias),
        ];
        for (tensor, shape, values) in &f32_tensors {
            builder.initializer(&name(tensor), shape, values)?;
        }
        let (y, log_det_out) = if k == last {
            (FLOW_OUTPUT.to_owned(), LOG_DET_OUTPUT.to_owned())
        } else {
            (name("output"), name("log_det"))
        };
        let weight_names: Vec<String> = std::iter::once(name("permutation"))
            .chain(f32_tensors.iter().map(|(tensor, _, _)| name(tensor)))
            .collect();
        let mut inputs = vec![x.as_str(), log_det.as_str()];
        inputs.extend(weight_names.iter().map(String::as_str));
        builder.custom_node(
            DOMAIN,
            DOMAIN_VERSION,
            COUPLING_OP,
            &inputs,
            &[&y, &log_det_out],
            vec![attribute_float("clamp", flow.clamp())],
        );
        x = y;
        log_det = log_det_out;
    }
    builder.output(SAMPLE_OUTPUT, &[flow.dim()]);
    builder.output(FLOW_OUTPUT, &[flow.dim()]);
    builder.typed_output(LOG_DET_OUTPUT, pb::tensor_proto::DataType::Float, &[]);
    let mut model = builder.into_model("daain-tools");
    // The runtime compares these with the manifest, so that a plan left behind by a
    // retrained mask or flow is rejected instead of silently disagreeing with the bundle.
    for (key, value) in [
        (MASK_SHA256_KEY, &manifest.mask.file.sha256),
        (FLOW_SHA256_KEY, &manifest.flow.file.sha256),
    ] {
        model.metadata_props.push(pb::StringStringEntryProto {
            key: key.to_owned(),
            value: value.clone(),
        });
    }
    Ok(model)
}

/// Writes `plan.onnx` into a bundle directory from its backbone, mask and flow, checks
/// that the runtime loads it, and then records its SHA-256 in the manifest. Returns the
/// plan's path. A plan already in the bundle is replaced only once the new one loads.
pub fn export_plan(bundle_dir: &Path) -> Result<PathBuf> {
    let bundle = Bundle::open(bundle_dir)
        .with_context(|| format!("failed to open bundle {}", bundle_dir.display()))?;
    let manifest = bundle.manifest().clone();
    let backbone = read_model(&bundle.backbone_path())?;
    let points = bundle.mask_points()?;
    let flow = bundle.flow()?;
    let model = plan_model(backbone, &manifest, &points, &flow)?;
    drop(flow);
    drop(bundle);

    let path = bundle_dir.join(PLAN_FILE);
    let staged = bundle_dir.join(format!("{PLAN_FILE}.new"));
    write_model(&model, &staged)?;
    let loaded = CombinedPlan::load(&PlanSpec {
        path: staged.clone(),
        input_height: manifest.input.height,
        input_width: manifest.input.width,
        logits: manifest.backbone.logits.clone(),
        dim: manifest.flow.dim,
        threads: 1,
        mask_sha256: manifest.mask.file.sha256.clone(),
        flow_sha256: manifest.flow.file.sha256.clone(),
    });
    if let Err(error) = loaded {
        // Best effort: the error below matters more than a leftover staging file.
        let _ = std::fs::remove_file(&staged);
        return Err(error).with_context(|| {
            format!("the runtime failed to load the exported plan {}", staged.display())
        });
    }
    std::fs::rename(&staged, &path).with_context(|| {
        format!("failed to move {} to {}", staged.display(), path.display())
    })?;

    let bytes = std::fs::read(&path).with_context(|| format!("failed to read {}", path.display()))?;
    let mut manifest = manifest;
    manifest.plan = Some(FileEntry {
        file: PLAN_FILE.to_owned(),
        sha256: sha256_hex(&bytes),
    });
    let text = serde_json::to_string_pretty(&manifest)?;
    let manifest_path = bundle_dir.join(MANIFEST_FILE);
    std::fs::write(&manifest_path, text + "\n")
        .with_context(|| format!("failed to write {}", manifest_path.display()))?;
    Ok(path)
}
