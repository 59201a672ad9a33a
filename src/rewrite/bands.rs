//! Element-wise addition and channel concatenation that split rows among tract's threads
//! as the convolutions do, replacing tract's own operators in an optimised plan.
//!
//! ESPNet adds and concatenates the branches of every ESP block. tract 0.23 runs each
//! `Concat` on the plan's thread, and its `Add` splits the flat tensor in its own way. On
//! two threads, each convolution leaves half of the rows of every channel in the cache of
//! the core that computed them, so an operator that reads the whole tensor on one thread
//! fetches half of it from the other core. Measured on the 2-core development machine,
//! such a read runs at about 40% of the speed of a read from the core's own cache, and the
//! additions and concatenations took twice as long on two threads as on one.
//! [`BandAdd`] and [`BandConcat`] read and write the same bands of rows that
//! [`super::for_each_band`] gives the convolutions, so each thread mostly stays in its own
//! core's cache.
//!
//! Unlike the other rewrites, these replace operators of the optimised tract plan, where
//! the shapes are known, rather than nodes of the ONNX graph.

use tract_onnx::prelude::*;
use tract_onnx::tract_core::internal::{DimLike, EvalContext, EvalOp, Op, StaticName, TypedOp};
use tract_onnx::tract_core::ops::array::TypedConcat;
use tract_onnx::tract_core::ops::binary::OptBinUnicast;

/// `a + b` for two f32 tensors of the same shape `[1, C, H, W]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BandAdd;

/// The f32 tensors `[1, C_k, H, W]` concatenated along the channels.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BandConcat;

/// Returns the shape of an f32 tensor `[1, C, H, W]` with known sizes, or `None`.
fn nchw(fact: &TypedFact) -> Option<[usize; 3]> {
    if fact.datum_type != f32::datum_type() || fact.shape.rank() != 4 {
        return None;
    }
    let dims: Vec<usize> = fact
        .shape
        .iter()
        .map(|d| d.to_usize().ok())
        .collect::<Option<_>>()?;
    (dims[0] == 1).then_some([dims[1], dims[2], dims[3]])
}

/// Replaces each f32 `Add` of two tensors of the same NCHW shape by [`BandAdd`] and each
/// channel `Concat` of f32 NCHW tensors of the same size by [`BandConcat`] in an optimised
/// plan. Returns the number of additions and concatenations replaced.
pub fn replace_band_ops(model: &mut TypedModel) -> TractResult<(usize, usize)> {
    let (mut adds, mut concats) = (0, 0);
    for id in 0..model.nodes().len() {
        let node = model.node(id);
        let shapes: Vec<Option<[usize; 3]>> = node
            .inputs
            .iter()
            .map(|&outlet| Ok(nchw(model.outlet_fact(outlet)?)))
            .collect::<TractResult<_>>()?;
        let Some(shapes) = shapes.into_iter().collect::<Option<Vec<_>>>() else {
            continue;
        };
        let is_add = node
            .op_as::<OptBinUnicast>()
            .is_some_and(|op| op.binop.name() == "Add")
            && shapes.len() == 2
            && shapes[0] == shapes[1];
        let is_concat = node.op_as::<TypedConcat>().is_some_and(|op| op.axis == 1)
            && !shapes.is_empty()
            && shapes.iter().all(|s| s[1..] == shapes[0][1..]);
        if is_add {
            model.node_mut(id).op = Box::new(BandAdd);
            adds += 1;
        } else if is_concat {
            model.node_mut(id).op = Box::new(BandConcat);
            concats += 1;
        }
    }
    Ok((adds, concats))
}

/// Returns the shape of an f32 tensor `[1, C, H, W]` as `[C, H, W]`.
fn nchw_shape(op_name: &str, tensor: &Tensor) -> TractResult<[usize; 3]> {
    let shape = tensor.shape();
    anyhow::ensure!(
        tensor.datum_type() == f32::datum_type() && shape.len() == 4 && shape[0] == 1,
        "{op_name} input has type {:?} and shape {shape:?}, expected f32 [1, C, H, W]",
        tensor.datum_type()
    );
    Ok([shape[1], shape[2], shape[3]])
}

impl BandAdd {
    /// Writes `a + b` into `output`, all three `channels x height x width`; `a` is `None`
    /// when it is `output` itself.
    pub fn run(
        output: &mut [f32],
        a: Option<&[f32]>,
        b: &[f32],
        channels: usize,
        height: usize,
        width: usize,
    ) {
        assert_eq!(output.len(), b.len(), "band add lengths");
        assert!(a.is_none_or(|a| a.len() == b.len()), "band add lengths");
        let plane = height * width;
        super::for_each_band(output, channels, height, width, |mut band| {
            let rows = band.rows();
            let part = |data: &'_ [f32], c: usize| -> std::ops::Range<usize> {
                let start = c * plane + rows.start * width;
                debug_assert!(start + rows.len() * width <= data.len());
                start..start + rows.len() * width
            };
            for c in 0..channels {
                let b = &b[part(b, c)];
                let target = band.plane(c);
                match a {
                    Some(a) => {
                        for ((t, a), b) in target.iter_mut().zip(&a[part(a, c)]).zip(b) {
                            *t = *a + *b;
                        }
                    }
                    None => {
                        for (t, b) in target.iter_mut().zip(b) {
                            *t += *b;
                        }
                    }
                }
            }
        });
    }
}

impl BandConcat {
    /// Writes `inputs`, each `channels x height x width` with its own channel count, one
    /// after the other into `output`.
    pub fn run(inputs: &[(&[f32], usize)], height: usize, width: usize, output: &mut [f32]) {
        let channels: usize = inputs.iter().map(|(_, c)| c).sum();
        let plane = height * width;
        assert!(
            inputs.iter().all(|(data, c)| data.len() == c * plane),
            "band concat input lengths"
        );
        super::for_each_band(output, channels, height, width, |mut band| {
            let rows = band.rows();
            let mut first = 0;
            for (data, count) in inputs {
                for c in 0..*count {
                    let source = &data[c * plane + rows.start * width..][..rows.len() * width];
                    band.plane(first + c).copy_from_slice(source);
                }
                first += count;
            }
        });
    }
}

impl Op for BandAdd {
    fn name(&self) -> StaticName {
        "BandAdd".into()
    }

    tract_onnx::tract_core::op_as_typed_op!();
}

impl EvalOp for BandAdd {
    tract_onnx::tract_core::op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        anyhow::ensure!(
            inputs.len() == 2,
            "BandAdd has {} inputs, expected 2",
            inputs.len()
        );
        let mut inputs = inputs.into_iter();
        let (a, b) = (inputs.next().unwrap(), inputs.next().unwrap());
        let [channels, height, width] = nchw_shape("BandAdd", &a)?;
        anyhow::ensure!(
            a.shape() == b.shape(),
            "BandAdd inputs have shapes {:?} and {:?}, expected the same",
            a.shape(),
            b.shape()
        );
        let shape = [1, channels, height, width];
        // In place when the plan holds the only reference to one of the inputs (addition
        // commutes), else into a new tensor; either way one pass over the values.
        let (a, b) = (a.into_arc_tensor(), b.into_arc_tensor());
        let (mut output, a, b) = match Arc::try_unwrap(a) {
            Ok(a) => (a, None, b),
            Err(a) => match Arc::try_unwrap(b) {
                Ok(b) => (b, None, a),
                Err(b) => {
                    // SAFETY: `run` writes every value of the output.
                    let output = unsafe { Tensor::uninitialized::<f32>(&shape)? };
                    (output, Some(a), b)
                }
            },
        };
        {
            let mut target = output.try_as_plain_ram_mut()?;
            let a_view = a.as_ref().map(|a| a.try_as_plain_ram()).transpose()?;
            let a_slice = a_view.as_ref().map(|v| v.as_slice::<f32>()).transpose()?;
            let source = b.try_as_plain_ram()?;
            BandAdd::run(
                target.as_slice_mut::<f32>()?,
                a_slice,
                source.as_slice::<f32>()?,
                channels,
                height,
                width,
            );
        }
        Ok(tvec!(output.into_tvalue()))
    }
}

impl TypedOp for BandAdd {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        Ok(tvec!(inputs[0].datum_type.fact(inputs[0].shape.clone())))
    }

    tract_onnx::tract_core::as_op!();
}

impl Op for BandConcat {
    fn name(&self) -> StaticName {
        "BandConcat".into()
    }

    tract_onnx::tract_core::op_as_typed_op!();
}

impl EvalOp for BandConcat {
    tract_onnx::tract_core::op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        anyhow::ensure!(!inputs.is_empty(), "BandConcat has no input");
        let mut channels = 0;
        let [_, height, width] = nchw_shape("BandConcat", &inputs[0])?;
        for input in &inputs {
            let [c, h, w] = nchw_shape("BandConcat", input)?;
            anyhow::ensure!(
                (h, w) == (height, width),
                "BandConcat input has size {h}x{w}, expected {height}x{width} as the first"
            );
            channels += c;
        }
        let views = inputs
            .iter()
            .map(|input| input.try_as_plain_ram())
            .collect::<TractResult<TVec<_>>>()?;
        let slices = views
            .iter()
            .zip(&inputs)
            .map(|(view, input)| Ok((view.as_slice::<f32>()?, input.shape()[1])))
            .collect::<TractResult<TVec<_>>>()?;
        // SAFETY: `run` writes every value of the output, one input channel each.
        let mut output = unsafe { Tensor::uninitialized::<f32>(&[1, channels, height, width])? };
        {
            let mut target = output.try_as_plain_ram_mut()?;
            BandConcat::run(&slices, height, width, target.as_slice_mut::<f32>()?);
        }
        Ok(tvec!(output.into_tvalue()))
    }
}

impl TypedOp for BandConcat {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        let mut shape: TVec<TDim> = inputs[0].shape.iter().cloned().collect();
        shape[1] = inputs.iter().map(|fact| fact.shape[1].clone()).sum();
        Ok(tvec!(inputs[0].datum_type.fact(shape)))
    }

    tract_onnx::tract_core::as_op!();
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Runs `f` as a plan on `threads` threads would: on the pool, with tract's executor.
    fn on_threads(threads: usize, f: impl FnOnce() + Send) {
        use tract_onnx::tract_core::tract_linalg::multithread::{
            multithread_tract_scope, Executor,
        };
        let pool = std::sync::Arc::new(
            rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap(),
        );
        let executor = Executor::MultiThread(pool.clone());
        pool.install(|| multithread_tract_scope(executor, f));
    }

    #[test]
    fn bands_on_several_threads_cover_every_row_once() {
        for threads in [2, 3, 5] {
            for (channels, height, width) in [(1, 1, 3), (2, 2, 1), (3, 7, 5), (4, 16, 8)] {
                let len = channels * height * width;
                let a: Vec<f32> = (0..len).map(|i| i as f32).collect();
                let b: Vec<f32> = (0..len).map(|i| (i * 3) as f32).collect();
                let mut sum = vec![f32::NAN; len];
                let mut stacked = vec![f32::NAN; 2 * len];
                on_threads(threads, || {
                    BandAdd::run(&mut sum, Some(&a), &b, channels, height, width);
                    let inputs = [(a.as_slice(), channels), (b.as_slice(), channels)];
                    BandConcat::run(&inputs, height, width, &mut stacked);
                });
                let expected: Vec<f32> = (0..len).map(|i| (i * 4) as f32).collect();
                assert_eq!(
                    sum, expected,
                    "{threads} threads, {channels}x{height}x{width}"
                );
                assert_eq!(stacked, [a.clone(), b].concat(), "{threads} threads");
            }
        }
    }

    /// The convolutions split output rows, and the quantising or padding copy input rows,
    /// among the threads; every split must give the values of one thread.
    #[test]
    fn convolutions_on_several_threads_equal_one_thread() {
        use crate::rewrite::conv3x3::{Conv3x3, Geometry};
        use crate::rewrite::deconv::Deconv2x2;
        use crate::rewrite::qconv3x3::{Input, InputQuantization, QConv3x3};

        let (inputs, outputs) = (6, 5);
        let value = |i: usize| ((i * 7919) % 113) as f32 / 113.0 - 0.4;
        let weight: Vec<f32> = (0..outputs * inputs * 9).map(value).collect();
        let weight_i8: Vec<i8> = (0..outputs * inputs * 9)
            .map(|i| ((i * 37) % 255) as i8)
            .collect();
        let deconv_weight: Vec<f32> = (0..inputs * outputs * 4).map(value).collect();
        let bias: Vec<f32> = (0..outputs).map(value).collect();
        let scale = vec![0.01; outputs];
        let quantization = Some(InputQuantization { scale: 0.02 });
        let conv =
            Conv3x3::from_onnx_weight(&weight, Some(&bias), inputs, outputs, Geometry::Dilated(2))
                .unwrap();
        let strided =
            Conv3x3::from_onnx_weight(&weight, None, inputs, outputs, Geometry::Strided).unwrap();
        let qconv = QConv3x3::new(
            &weight_i8,
            inputs,
            outputs,
            3,
            -5,
            quantization,
            scale,
            bias,
        )
        .unwrap();
        let deconv = Deconv2x2::from_onnx_weight(&deconv_weight, inputs, outputs).unwrap();
        for (height, width) in [(1, 1), (3, 5), (7, 9), (11, 20)] {
            let input: Vec<f32> = (0..inputs * height * width).map(value).collect();
            let run_all = || {
                let plane = height * width;
                let (h2, w2) = (height.div_ceil(2), width.div_ceil(2));
                let mut results = vec![
                    vec![0.0; outputs * plane],
                    vec![0.0; outputs * h2 * w2],
                    vec![0.0; outputs * plane],
                    vec![0.0; outputs * 4 * plane],
                ];
                conv.run(&input, height, width, &mut results[0]);
                strided.run(&input, height, width, &mut results[1]);
                qconv.run(Input::F32(&input), height, width, &mut results[2]);
                deconv.run(&input, height, width, &mut results[3]);
                results
            };
            let expected = run_all();
            for threads in [2, 3] {
                let mut actual = Vec::new();
                on_threads(threads, || actual = run_all());
                assert_eq!(actual, expected, "{threads} threads, {height}x{width}");
            }
        }
    }

    proptest! {
        #[test]
        fn band_add_adds(
            (channels, height, width, a, b) in (1usize..6, 1usize..9, 1usize..9)
                .prop_flat_map(|(c, h, w)| {
                    let values = prop::collection::vec(-1e3f32..1e3, c * h * w);
                    (Just(c), Just(h), Just(w), values.clone(), values)
                })
        ) {
            let mut in_place = a.clone();
            BandAdd::run(&mut in_place, None, &b, channels, height, width);
            let mut fresh = vec![f32::NAN; a.len()];
            BandAdd::run(&mut fresh, Some(&a), &b, channels, height, width);
            for (((s, f), a), b) in in_place.iter().zip(&fresh).zip(&a).zip(&b) {
                prop_assert_eq!(s.to_bits(), (a + b).to_bits());
                prop_assert_eq!(f.to_bits(), (a + b).to_bits());
            }
        }

        #[test]
        fn band_concat_stacks_channels(
            (counts, height, width) in (prop::collection::vec(1usize..4, 1..5), 1usize..7, 1usize..7)
        ) {
            let plane = height * width;
            let inputs: Vec<Vec<f32>> = counts
                .iter()
                .enumerate()
                .map(|(k, &c)| (0..c * plane).map(|i| (k * 1000 + i) as f32).collect())
                .collect();
            let slices: Vec<(&[f32], usize)> =
                inputs.iter().zip(&counts).map(|(v, &c)| (v.as_slice(), c)).collect();
            let mut output = vec![f32::NAN; counts.iter().sum::<usize>() * plane];
            BandConcat::run(&slices, height, width, &mut output);
            let expected: Vec<f32> = inputs.concat();
            prop_assert_eq!(output, expected);
        }
    }
}
