//! Conversion of an RGB frame into ESPNet's input tensor.
//!
//! ESPNet's Cityscapes weights were trained on frames read with OpenCV, so the network
//! expects BGR channel order and the scaling `x = (pixel - mean) / std / 255` with pixel in
//! 0..=255 and the mean and standard deviation given per channel in B, G, R order.
//! Feeding RGB with these constants turns most road pixels into "void".

use serde::{Deserialize, Serialize};

/// Channel order of the network input.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ChannelOrder {
    Rgb,
    Bgr,
}

/// Input convention of the backbone: size, channel order and normalisation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InputConvention {
    /// Network input height in pixels.
    pub height: usize,
    /// Network input width in pixels.
    pub width: usize,
    pub channel_order: ChannelOrder,
    /// Per-channel mean in the network's channel order, in pixel units (0..=255).
    pub mean: [f32; 3],
    /// Per-channel standard deviation in the network's channel order, in pixel units.
    pub std: [f32; 3],
    /// Factor applied after standardisation (ESPNet: 1/255).
    pub scale: f32,
}

impl InputConvention {
    /// Returns the convention of ESPNet's Cityscapes weights at 256x512.
    pub fn espnet_cityscapes() -> Self {
        Self {
            height: 256,
            width: 512,
            channel_order: ChannelOrder::Bgr,
            mean: [72.392_31, 82.908_936, 73.158_4],
            std: [45.319_22, 46.152_893, 44.914_833],
            scale: 1.0 / 255.0,
        }
    }

    /// Returns the number of f32 values of one input tensor (3 x height x width).
    pub fn tensor_len(&self) -> usize {
        3 * self.height * self.width
    }
}

/// One axis of a bilinear resize: for each output index, the two source indices and
/// the weight of the second.
#[derive(Debug, Clone, Default)]
struct AxisTable {
    low: Vec<u32>,
    high: Vec<u32>,
    weight: Vec<f32>,
}

impl AxisTable {
    /// Builds the table with OpenCV's `INTER_LINEAR` sampling positions (pixel centres
    /// aligned, `src = (dst + 0.5) * in / out - 0.5`, clamped at the borders).
    fn new(source_len: usize, target_len: usize) -> Self {
        let ratio = source_len as f64 / target_len as f64;
        let mut table = Self {
            low: Vec::with_capacity(target_len),
            high: Vec::with_capacity(target_len),
            weight: Vec::with_capacity(target_len),
        };
        let last = source_len - 1;
        for i in 0..target_len {
            let position = ((i as f64 + 0.5) * ratio - 0.5).max(0.0);
            let low = (position.floor() as usize).min(last);
            let high = (low + 1).min(last);
            let weight = if low == last {
                0.0
            } else {
                (position - low as f64) as f32
            };
            table.low.push(low as u32);
            table.high.push(high as u32);
            table.weight.push(weight);
        }
        table
    }
}

/// Error for frames the preprocessor cannot convert.
#[derive(Debug, thiserror::Error)]
pub enum PreprocessError {
    #[error("frame of {width}x{height} has {actual} bytes, expected {expected} for packed RGB24")]
    BufferSize {
        width: usize,
        height: usize,
        actual: usize,
        expected: usize,
    },
    #[error("frame size {width}x{height} is invalid: both sides must be at least 1 pixel")]
    EmptyFrame { width: usize, height: usize },
    #[error("output buffer has {actual} values, expected {expected} (3 x height x width)")]
    OutputSize { actual: usize, expected: usize },
}

/// Resizes packed RGB24 frames to the network size and normalises them into a CHW
/// tensor. The resize tables are rebuilt only when the source size changes, so a
/// stream of equally sized frames allocates nothing after the first.
#[derive(Debug, Clone)]
pub struct Preprocessor {
    convention: InputConvention,
    source_size: (usize, usize),
    rows: AxisTable,
    columns: AxisTable,
    /// Per output channel: the RGB index to read, the offset and the factor.
    channel_map: [(usize, f32, f32); 3],
}

impl Preprocessor {
    pub fn new(convention: InputConvention) -> Self {
        let mut channel_map = [(0, 0.0, 0.0); 3];
        for (c, entry) in channel_map.iter_mut().enumerate() {
            let rgb_index = match convention.channel_order {
                ChannelOrder::Rgb => c,
                ChannelOrder::Bgr => 2 - c,
            };
            let factor = convention.scale / convention.std[c];
            *entry = (rgb_index, convention.mean[c], factor);
        }
        Self {
            convention,
            source_size: (0, 0),
            rows: AxisTable::default(),
            columns: AxisTable::default(),
            channel_map,
        }
    }

    pub fn convention(&self) -> &InputConvention {
        &self.convention
    }

    /// Writes the network input for one packed RGB24 frame of `width` x `height` into
    /// `output` (CHW, length `3 * convention.height * convention.width`).
    pub fn run(
        &mut self,
        rgb: &[u8],
        width: usize,
        height: usize,
        output: &mut [f32],
    ) -> Result<(), PreprocessError> {
        if width == 0 || height == 0 {
            return Err(PreprocessError::EmptyFrame { width, height });
        }
        let expected = width * height * 3;
        if rgb.len() != expected {
            return Err(PreprocessError::BufferSize {
                width,
                height,
                actual: rgb.len(),
                expected,
            });
        }
        let (out_h, out_w) = (self.convention.height, self.convention.width);
        if output.len() != 3 * out_h * out_w {
            return Err(PreprocessError::OutputSize {
                actual: output.len(),
                expected: 3 * out_h * out_w,
            });
        }
        if self.source_size != (width, height) {
            self.rows = AxisTable::new(height, out_h);
            self.columns = AxisTable::new(width, out_w);
            self.source_size = (width, height);
        }

        let stride = width * 3;
        let (rows, columns, channel_map) = (&self.rows, &self.columns, &self.channel_map);
        // Bands of rows go to the threads of tract's pool when the caller runs this on it
        // (`Backbone::write_input`), and are the rows the first convolution reads there.
        crate::rewrite::for_each_band(output, 3, out_h, out_w, |mut band| {
            for y in band.rows() {
                let row_low = rows.low[y] as usize * stride;
                let row_high = rows.high[y] as usize * stride;
                let wy = rows.weight[y];
                let mut targets: [&mut [f32]; 3] = band.planes_row(0, y);
                for x in 0..out_w {
                    let col_low = columns.low[x] as usize * 3;
                    let col_high = columns.high[x] as usize * 3;
                    let wx = columns.weight[x];
                    for (target, &(rgb_index, mean, factor)) in targets.iter_mut().zip(channel_map)
                    {
                        let p00 = rgb[row_low + col_low + rgb_index] as f32;
                        let p01 = rgb[row_low + col_high + rgb_index] as f32;
                        let p10 = rgb[row_high + col_low + rgb_index] as f32;
                        let p11 = rgb[row_high + col_high + rgb_index] as f32;
                        let top = p00 + (p01 - p00) * wx;
                        let bottom = p10 + (p11 - p10) * wx;
                        let pixel = top + (bottom - top) * wy;
                        target[x] = (pixel - mean) * factor;
                    }
                }
            }
        });
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn small_convention(order: ChannelOrder) -> InputConvention {
        InputConvention {
            height: 2,
            width: 2,
            channel_order: order,
            mean: [10.0, 20.0, 30.0],
            std: [1.0, 2.0, 4.0],
            scale: 1.0,
        }
    }

    #[test]
    fn same_size_keeps_pixels_and_swaps_to_bgr() {
        // 2x2 frame, pixel (r, g, b) = (100 + i, 50 + i, 200 + i) for pixel index i.
        let mut rgb = Vec::new();
        for i in 0..4u8 {
            rgb.extend_from_slice(&[100 + i, 50 + i, 200 + i]);
        }
        let mut pre = Preprocessor::new(small_convention(ChannelOrder::Bgr));
        let mut out = vec![0.0; 12];
        pre.run(&rgb, 2, 2, &mut out).unwrap();
        for i in 0..4 {
            let i_f = i as f32;
            assert_eq!(out[i], (200.0 + i_f - 10.0) / 1.0, "blue plane, pixel {i}");
            assert_eq!(
                out[4 + i],
                (50.0 + i_f - 20.0) / 2.0,
                "green plane, pixel {i}"
            );
            assert_eq!(
                out[8 + i],
                (100.0 + i_f - 30.0) / 4.0,
                "red plane, pixel {i}"
            );
        }
    }

    #[test]
    fn downscale_by_two_averages_pairs() {
        // 4x1 grey ramp 0, 100, 200, 250 resized to 2x1: OpenCV samples at 0.5 and 2.5.
        let rgb: Vec<u8> = [0u8, 100, 200, 250]
            .iter()
            .flat_map(|&v| [v, v, v])
            .collect();
        let mut convention = small_convention(ChannelOrder::Rgb);
        convention.height = 1;
        convention.mean = [0.0; 3];
        convention.std = [1.0; 3];
        let mut pre = Preprocessor::new(convention);
        let mut out = vec![0.0; 6];
        pre.run(&rgb, 4, 1, &mut out).unwrap();
        assert_eq!(out[0], 50.0);
        assert_eq!(out[1], 225.0);
    }

    #[test]
    fn wrong_buffer_size_is_rejected() {
        let mut pre = Preprocessor::new(small_convention(ChannelOrder::Bgr));
        let mut out = vec![0.0; 12];
        let err = pre.run(&[0u8; 11], 2, 2, &mut out).unwrap_err();
        assert!(err.to_string().contains("11 bytes"), "{err}");
        let err = pre.run(&[], 0, 2, &mut out).unwrap_err();
        assert!(err.to_string().contains("0x2"), "{err}");
    }
}
