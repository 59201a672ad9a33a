//! Reading the flow file layout described in the [module docs](super).

use std::borrow::Cow;
use std::collections::HashMap;

use safetensors::tensor::{Dtype, Metadata, TensorInfo};
use safetensors::SafeTensors;

use super::{BlockTensors, FlowError, FlowParams, FREIA_DEFAULT_CLAMP};

/// Header metadata key holding the affine clamp as a decimal string.
pub const AFFINE_CLAMPING_METADATA_KEY: &str = "affine_clamping";

const BLOCK_TENSORS: [&str; 7] = [
    "permutation",
    "global_scale",
    "global_offset",
    "subnet.0.weight",
    "subnet.0.bias",
    "subnet.2.weight",
    "subnet.2.bias",
];

/// Reads the flow parameters from a safetensors file in the flow file layout, borrowing the
/// tensor data from `bytes`.
///
/// Checks that the blocks are numbered from 0 without gaps, that no other tensors are
/// present, and every dtype, shape and alignment. The values themselves are checked by
/// [`Flow::new`](super::Flow::new). The subnet tensors may be F16. They are widened to
/// owned f32 copies, while F32 tensors stay borrowed.
pub fn params_from_safetensors(bytes: &[u8]) -> Result<FlowParams<'_>, FlowError> {
    let (header_len, metadata) = SafeTensors::read_metadata(bytes)
        .map_err(|error| FlowError::Safetensors(error.to_string()))?;
    let data = &bytes[8 + header_len..];
    let reader = Reader {
        metadata: &metadata,
        data,
    };

    let block_count = (0..)
        .take_while(|k| metadata.info(&format!("blocks.{k}.permutation")).is_some())
        .count();
    if block_count == 0 {
        return Err(FlowError::MissingTensor {
            name: "blocks.0.permutation".into(),
        });
    }
    for name in metadata.tensors().keys() {
        if !is_block_tensor(name, block_count) {
            return Err(FlowError::UnexpectedTensor { name: name.clone() });
        }
    }

    let first = reader.info("blocks.0.permutation")?;
    let dim = match first.shape.as_slice() {
        [dim] => *dim,
        other => {
            return Err(FlowError::Shape {
                name: "blocks.0.permutation".into(),
                expected: vec![0],
                actual: other.to_vec(),
            })
        }
    };
    let hidden = match reader.info("blocks.0.subnet.0.weight")?.shape.as_slice() {
        [hidden, _] => *hidden,
        other => {
            return Err(FlowError::Shape {
                name: "blocks.0.subnet.0.weight".into(),
                expected: vec![0, dim - dim / 2],
                actual: other.to_vec(),
            })
        }
    };
    let d1 = dim - dim / 2;
    let d2 = dim / 2;

    let mut blocks = Vec::with_capacity(block_count);
    for k in 0..block_count {
        let name = |tensor: &str| format!("blocks.{k}.{tensor}");
        let permutation: &[i32] = reader.slice(&name("permutation"), Dtype::I32, &[dim])?;
        blocks.push(BlockTensors {
            // I32 and u32 share size and alignment; a negative index turns into a value of
            // at least 2^31, which Flow::new rejects as out of range.
            permutation: bytemuck::cast_slice(permutation),
            global_scale: reader.slice(&name("global_scale"), Dtype::F32, &[dim])?,
            global_offset: reader.slice(&name("global_offset"), Dtype::F32, &[dim])?,
            subnet_0_weight: reader.weights(&name("subnet.0.weight"), &[hidden, d1])?,
            subnet_0_bias: reader.weights(&name("subnet.0.bias"), &[hidden])?,
            subnet_2_weight: reader.weights(&name("subnet.2.weight"), &[2 * d2, hidden])?,
            subnet_2_bias: reader.weights(&name("subnet.2.bias"), &[2 * d2])?,
        });
    }

    let clamp = read_clamp(metadata.metadata())?;
    Ok(FlowParams {
        dim,
        hidden,
        clamp,
        blocks,
    })
}

fn is_block_tensor(name: &str, block_count: usize) -> bool {
    let Some(rest) = name.strip_prefix("blocks.") else {
        return false;
    };
    let Some((index, tensor)) = rest.split_once('.') else {
        return false;
    };
    let index_is_valid = index
        .parse::<usize>()
        .is_ok_and(|k| k < block_count && k.to_string() == index);
    index_is_valid && BLOCK_TENSORS.contains(&tensor)
}

fn read_clamp(metadata: &Option<HashMap<String, String>>) -> Result<f32, FlowError> {
    let Some(value) = metadata
        .as_ref()
        .and_then(|m| m.get(AFFINE_CLAMPING_METADATA_KEY))
    else {
        return Ok(FREIA_DEFAULT_CLAMP);
    };
    value
        .trim()
        .parse::<f32>()
        .map_err(|error| FlowError::InvalidMetadata {
            key: AFFINE_CLAMPING_METADATA_KEY,
            value: value.clone(),
            reason: error.to_string(),
        })
}

struct Reader<'m, 'a> {
    metadata: &'m Metadata,
    data: &'a [u8],
}

impl<'a> Reader<'_, 'a> {
    fn info(&self, name: &str) -> Result<&TensorInfo, FlowError> {
        self.metadata
            .info(name)
            .ok_or_else(|| FlowError::MissingTensor { name: name.into() })
    }

    fn slice<T: bytemuck::Pod>(
        &self,
        name: &str,
        dtype: Dtype,
        shape: &[usize],
    ) -> Result<&'a [T], FlowError> {
        let info = self.info(name)?;
        if info.dtype != dtype {
            return Err(FlowError::Dtype {
                name: name.into(),
                expected: dtype_name(dtype),
                actual: format!("{:?}", info.dtype),
            });
        }
        let bytes = self.bytes(name, info, shape)?;
        bytemuck::try_cast_slice(bytes).map_err(|_| FlowError::Unaligned { name: name.into() })
    }

    /// Reads an F32 tensor as a borrowed slice, or an F16 tensor as an owned f32 copy.
    fn weights(&self, name: &str, shape: &[usize]) -> Result<Cow<'a, [f32]>, FlowError> {
        let info = self.info(name)?;
        match info.dtype {
            Dtype::F32 => self.slice(name, Dtype::F32, shape).map(Cow::Borrowed),
            // Decoding byte pairs needs no alignment, unlike a cast to [f16].
            Dtype::F16 => Ok(Cow::Owned(
                self.bytes(name, info, shape)?
                    .chunks_exact(2)
                    .map(|pair| half::f16::from_le_bytes([pair[0], pair[1]]).to_f32())
                    .collect(),
            )),
            other => Err(FlowError::Dtype {
                name: name.into(),
                expected: "F32 or F16",
                actual: format!("{other:?}"),
            }),
        }
    }

    /// Returns the raw data of a tensor after checking its shape.
    fn bytes(&self, name: &str, info: &TensorInfo, shape: &[usize]) -> Result<&'a [u8], FlowError> {
        if info.shape != shape {
            return Err(FlowError::Shape {
                name: name.into(),
                expected: shape.to_vec(),
                actual: info.shape.clone(),
            });
        }
        // read_metadata has checked that the offsets lie inside the buffer and match the
        // shape and dtype.
        let (start, end) = info.data_offsets;
        Ok(&self.data[start..end])
    }
}

fn dtype_name(dtype: Dtype) -> &'static str {
    match dtype {
        Dtype::I32 => "I32",
        Dtype::F32 => "F32",
        Dtype::F16 => "F16",
        _ => "another dtype",
    }
}
