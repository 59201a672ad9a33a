//! Pixel conversions of camera formats into packed RGB24.
//!
//! YUYV (YUY2, packed 4:2:2: `Y0 U Y1 V` for each pair of pixels) uses the ITU-R BT.601
//! matrix with limited range (Y in 16..=235, U and V in 16..=240), as FFmpeg assumes for
//! untagged `yuyv422`. Both pixels of a pair share the pair's U and V, without chroma
//! interpolation. MJPEG frames are JPEG images decoded by the `image` crate.
//!
//! NOTE: a camera that sends full-range YUYV gets too much contrast from this conversion.
//! `Camera` logs a warning when the driver reports full range.

use image::codecs::jpeg::JpegDecoder;
use image::{ColorType, DynamicImage, ImageDecoder};

/// Errors of the pixel conversions.
#[derive(Debug, thiserror::Error)]
pub enum ConvertError {
    #[error("invalid YUYV frame width {width}: YUYV stores pixels in pairs, so it must be even")]
    OddWidth { width: usize },

    #[error("invalid YUYV row stride {stride} bytes for width {width}: it must be at least {}", width * 2)]
    StrideTooSmall { stride: usize, width: usize },

    #[error(
        "short YUYV buffer: {actual} bytes, but {width}x{height} with a row stride of {stride} \
         bytes needs {expected}"
    )]
    ShortInput {
        actual: usize,
        expected: usize,
        width: usize,
        height: usize,
        stride: usize,
    },

    #[error("RGB24 output has {actual} bytes, but {width}x{height} needs {expected}")]
    OutputSize {
        actual: usize,
        expected: usize,
        width: usize,
        height: usize,
    },

    #[error("invalid MJPEG frame: {0}")]
    Jpeg(#[source] image::ImageError),
}

/// Converts one 8-bit BT.601 limited-range YCbCr sample to RGB with the integer
/// approximation of ITU-R BT.601 in 8.8 fixed point (coefficients times 256, rounded).
#[inline]
fn ycbcr_to_rgb(y: u8, cb: u8, cr: u8) -> [u8; 3] {
    let c = 298 * (i32::from(y) - 16);
    let d = i32::from(cb) - 128;
    let e = i32::from(cr) - 128;
    let r = (c + 409 * e + 128) >> 8;
    let g = (c - 100 * d - 208 * e + 128) >> 8;
    let b = (c + 516 * d + 128) >> 8;
    [clamp_u8(r), clamp_u8(g), clamp_u8(b)]
}

#[inline]
fn clamp_u8(value: i32) -> u8 {
    value.clamp(0, 255) as u8
}

/// Converts a YUYV frame of `width` x `height` pixels, whose rows start `stride` bytes
/// apart, into packed RGB24 in `rgb` (`width * height * 3` bytes).
pub fn yuyv_to_rgb24(
    yuyv: &[u8],
    width: usize,
    height: usize,
    stride: usize,
    rgb: &mut [u8],
) -> Result<(), ConvertError> {
    if width % 2 != 0 {
        return Err(ConvertError::OddWidth { width });
    }
    if stride < width * 2 {
        return Err(ConvertError::StrideTooSmall { stride, width });
    }
    // The last row needs only its pixels, not the padding after them.
    let expected = if height == 0 {
        0
    } else {
        stride * (height - 1) + width * 2
    };
    if yuyv.len() < expected {
        return Err(ConvertError::ShortInput {
            actual: yuyv.len(),
            expected,
            width,
            height,
            stride,
        });
    }
    let expected_output = width * height * 3;
    if rgb.len() != expected_output {
        return Err(ConvertError::OutputSize {
            actual: rgb.len(),
            expected: expected_output,
            width,
            height,
        });
    }
    if width == 0 {
        return Ok(());
    }

    for (row, rgb_row) in rgb.chunks_exact_mut(width * 3).enumerate() {
        let yuyv_row = &yuyv[row * stride..row * stride + width * 2];
        for (pair, out) in yuyv_row.chunks_exact(4).zip(rgb_row.chunks_exact_mut(6)) {
            let (y0, cb, y1, cr) = (pair[0], pair[1], pair[2], pair[3]);
            out[..3].copy_from_slice(&ycbcr_to_rgb(y0, cb, cr));
            out[3..].copy_from_slice(&ycbcr_to_rgb(y1, cb, cr));
        }
    }
    Ok(())
}

/// Decodes one MJPEG frame into packed RGB24, resizing `rgb` to fit, and returns its width
/// and height.
///
/// Many USB cameras send MJPEG frames without Huffman tables and rely on the default tables
/// of the JPEG standard (ITU-T T.81 Annex K.3). Such frames get those tables inserted
/// before decoding.
pub fn mjpeg_to_rgb24(jpeg: &[u8], rgb: &mut Vec<u8>) -> Result<(usize, usize), ConvertError> {
    let patched = with_default_huffman_tables(jpeg);
    let data = patched.as_deref().unwrap_or(jpeg);
    let decoder = JpegDecoder::new(std::io::Cursor::new(data)).map_err(ConvertError::Jpeg)?;
    let (width, height) = decoder.dimensions();
    let (width, height) = (width as usize, height as usize);

    if decoder.color_type() == ColorType::Rgb8 {
        rgb.resize(width * height * 3, 0);
        decoder.read_image(rgb).map_err(ConvertError::Jpeg)?;
    } else {
        // Grayscale and CMYK JPEGs: decode in their own layout, then expand to RGB.
        let image = DynamicImage::from_decoder(decoder).map_err(ConvertError::Jpeg)?;
        let converted = image.to_rgb8();
        rgb.clear();
        rgb.extend_from_slice(converted.as_raw());
    }
    Ok((width, height))
}

/// Segment with the four default Huffman tables of ITU-T T.81 Annex K.3 (tables K.3 to K.6),
/// with the table bytes as zune-jpeg 0.5 lists them in `fill_default_mjpeg_tables`.
const DEFAULT_HUFFMAN_SEGMENT: &[u8] = &[
    0xFF, 0xC4, 0x01, 0xA2, // DHT marker, segment length 418
    // Table K.3: DC, luminance (class 0, id 0).
    0x00, 0x00, 0x01, 0x05, 0x01, 0x01, 0x01, 0x01, 0x01, 0x01, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
    0x00, 0x00, 0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x07, 0x08, 0x09, 0x0A, 0x0B,
    // Table K.4: DC, chrominance (class 0, id 1).
    0x01, 0x00, 0x03, 0x01, 0x01, 0x01, 0x01, 0x01, 0x01, 0x01, 0x01, 0x01, 0x00, 0x00, 0x00, 0x00,
    0x00, 0x00, 0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x07, 0x08, 0x09, 0x0A, 0x0B,
    // Table K.5: AC, luminance (class 1, id 0).
    0x10, 0x00, 0x02, 0x01, 0x03, 0x03, 0x02, 0x04, 0x03, 0x05, 0x05, 0x04, 0x04, 0x00, 0x00, 0x01,
    0x7D, 0x01, 0x02, 0x03, 0x00, 0x04, 0x11, 0x05, 0x12, 0x21, 0x31, 0x41, 0x06, 0x13, 0x51, 0x61,
    0x07, 0x22, 0x71, 0x14, 0x32, 0x81, 0x91, 0xA1, 0x08, 0x23, 0x42, 0xB1, 0xC1, 0x15, 0x52, 0xD1,
    0xF0, 0x24, 0x33, 0x62, 0x72, 0x82, 0x09, 0x0A, 0x16, 0x17, 0x18, 0x19, 0x1A, 0x25, 0x26, 0x27,
    0x28, 0x29, 0x2A, 0x34, 0x35, 0x36, 0x37, 0x38, 0x39, 0x3A, 0x43, 0x44, 0x45, 0x46, 0x47, 0x48,
    0x49, 0x4A, 0x53, 0x54, 0x55, 0x56, 0x57, 0x58, 0x59, 0x5A, 0x63, 0x64, 0x65, 0x66, 0x67, 0x68,
    0x69, 0x6A, 0x73, 0x74, 0x75, 0x76, 0x77, 0x78, 0x79, 0x7A, 0x83, 0x84, 0x85, 0x86, 0x87, 0x88,
    0x89, 0x8A, 0x92, 0x93, 0x94, 0x95, 0x96, 0x97, 0x98, 0x99, 0x9A, 0xA2, 0xA3, 0xA4, 0xA5, 0xA6,
    0xA7, 0xA8, 0xA9, 0xAA, 0xB2, 0xB3, 0xB4, 0xB5, 0xB6, 0xB7, 0xB8, 0xB9, 0xBA, 0xC2, 0xC3, 0xC4,
    0xC5, 0xC6, 0xC7, 0xC8, 0xC9, 0xCA, 0xD2, 0xD3, 0xD4, 0xD5, 0xD6, 0xD7, 0xD8, 0xD9, 0xDA, 0xE1,
    0xE2, 0xE3, 0xE4, 0xE5, 0xE6, 0xE7, 0xE8, 0xE9, 0xEA, 0xF1, 0xF2, 0xF3, 0xF4, 0xF5, 0xF6, 0xF7,
    0xF8, 0xF9, 0xFA, // Table K.6: AC, chrominance (class 1, id 1).
    0x11, 0x00, 0x02, 0x01, 0x02, 0x04, 0x04, 0x03, 0x04, 0x07, 0x05, 0x04, 0x04, 0x00, 0x01, 0x02,
    0x77, 0x00, 0x01, 0x02, 0x03, 0x11, 0x04, 0x05, 0x21, 0x31, 0x06, 0x12, 0x41, 0x51, 0x07, 0x61,
    0x71, 0x13, 0x22, 0x32, 0x81, 0x08, 0x14, 0x42, 0x91, 0xA1, 0xB1, 0xC1, 0x09, 0x23, 0x33, 0x52,
    0xF0, 0x15, 0x62, 0x72, 0xD1, 0x0A, 0x16, 0x24, 0x34, 0xE1, 0x25, 0xF1, 0x17, 0x18, 0x19, 0x1A,
    0x26, 0x27, 0x28, 0x29, 0x2A, 0x35, 0x36, 0x37, 0x38, 0x39, 0x3A, 0x43, 0x44, 0x45, 0x46, 0x47,
    0x48, 0x49, 0x4A, 0x53, 0x54, 0x55, 0x56, 0x57, 0x58, 0x59, 0x5A, 0x63, 0x64, 0x65, 0x66, 0x67,
    0x68, 0x69, 0x6A, 0x73, 0x74, 0x75, 0x76, 0x77, 0x78, 0x79, 0x7A, 0x82, 0x83, 0x84, 0x85, 0x86,
    0x87, 0x88, 0x89, 0x8A, 0x92, 0x93, 0x94, 0x95, 0x96, 0x97, 0x98, 0x99, 0x9A, 0xA2, 0xA3, 0xA4,
    0xA5, 0xA6, 0xA7, 0xA8, 0xA9, 0xAA, 0xB2, 0xB3, 0xB4, 0xB5, 0xB6, 0xB7, 0xB8, 0xB9, 0xBA, 0xC2,
    0xC3, 0xC4, 0xC5, 0xC6, 0xC7, 0xC8, 0xC9, 0xCA, 0xD2, 0xD3, 0xD4, 0xD5, 0xD6, 0xD7, 0xD8, 0xD9,
    0xDA, 0xE2, 0xE3, 0xE4, 0xE5, 0xE6, 0xE7, 0xE8, 0xE9, 0xEA, 0xF2, 0xF3, 0xF4, 0xF5, 0xF6, 0xF7,
    0xF8, 0xF9, 0xFA,
];

const MARKER_DHT: u8 = 0xC4;
const MARKER_SOS: u8 = 0xDA;
const MARKER_SOI: u8 = 0xD8;

/// Returns a copy of `jpeg` with the default Huffman tables inserted before the first
/// start-of-scan marker, or `None` when the header already defines Huffman tables or cannot
/// be parsed (the decoder then reports the problem itself).
fn with_default_huffman_tables(jpeg: &[u8]) -> Option<Vec<u8>> {
    if jpeg.len() < 4 || jpeg[0] != 0xFF || jpeg[1] != MARKER_SOI {
        return None;
    }
    let mut position = 2;
    loop {
        if *jpeg.get(position)? != 0xFF {
            return None;
        }
        // Markers may be preceded by any number of 0xFF fill bytes.
        while position < jpeg.len() && jpeg[position] == 0xFF {
            position += 1;
        }
        let marker = *jpeg.get(position)?;
        let marker_start = position - 1;
        position += 1;
        match marker {
            MARKER_DHT => return None,
            MARKER_SOS => {
                let mut patched = Vec::with_capacity(jpeg.len() + DEFAULT_HUFFMAN_SEGMENT.len());
                patched.extend_from_slice(&jpeg[..marker_start]);
                patched.extend_from_slice(DEFAULT_HUFFMAN_SEGMENT);
                patched.extend_from_slice(&jpeg[marker_start..]);
                return Some(patched);
            }
            // Standalone markers carry no length field.
            0x01 | 0xD0..=0xD7 => {}
            _ => {
                let length_bytes = jpeg.get(position..position + 2)?;
                let length = usize::from(u16::from_be_bytes([length_bytes[0], length_bytes[1]]));
                position += length;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn yuyv_reference_colours() {
        // Limited-range black, white and BT.601 red (Y 81, Cb 90, Cr 240).
        let yuyv = [16, 128, 235, 128, 81, 90, 81, 240];
        let mut rgb = [0u8; 12];
        yuyv_to_rgb24(&yuyv, 4, 1, 8, &mut rgb).unwrap();
        assert_eq!(&rgb[0..3], &[0, 0, 0]);
        assert_eq!(&rgb[3..6], &[255, 255, 255]);
        for channel in 0..3 {
            let expected = [255, 0, 0][channel];
            let actual = i32::from(rgb[6 + channel]);
            assert!((actual - expected).abs() <= 2, "red pixel {:?}", &rgb[6..9]);
            assert_eq!(rgb[6 + channel], rgb[9 + channel]);
        }
    }

    #[test]
    fn yuyv_skips_row_padding() {
        // Two rows of two pixels with four padding bytes per row.
        let yuyv = [16, 128, 16, 128, 9, 9, 9, 9, 235, 128, 235, 128];
        let mut rgb = [7u8; 12];
        yuyv_to_rgb24(&yuyv, 2, 2, 8, &mut rgb).unwrap();
        assert_eq!(&rgb[..6], &[0; 6]);
        assert_eq!(&rgb[6..], &[255; 6]);
    }

    #[test]
    fn yuyv_rejects_bad_geometry() {
        let mut rgb = [0u8; 9];
        let odd = yuyv_to_rgb24(&[0; 6], 3, 1, 6, &mut rgb).unwrap_err();
        assert!(matches!(odd, ConvertError::OddWidth { width: 3 }), "{odd}");

        let mut rgb = [0u8; 12];
        let stride = yuyv_to_rgb24(&[0; 8], 4, 1, 6, &mut rgb).unwrap_err();
        assert!(
            matches!(stride, ConvertError::StrideTooSmall { .. }),
            "{stride}"
        );

        let short = yuyv_to_rgb24(&[0; 7], 4, 1, 8, &mut rgb).unwrap_err();
        assert!(
            matches!(short, ConvertError::ShortInput { expected: 8, .. }),
            "{short}"
        );

        let mut small = [0u8; 11];
        let output = yuyv_to_rgb24(&[0; 8], 4, 1, 8, &mut small).unwrap_err();
        assert!(
            matches!(output, ConvertError::OutputSize { .. }),
            "{output}"
        );
    }

    #[test]
    fn default_tables_segment_length() {
        let length = u16::from_be_bytes([DEFAULT_HUFFMAN_SEGMENT[2], DEFAULT_HUFFMAN_SEGMENT[3]]);
        assert_eq!(usize::from(length) + 2, DEFAULT_HUFFMAN_SEGMENT.len());
    }

    #[test]
    fn default_tables_only_when_missing() {
        // SOI, an APP0 segment of length 4, SOS.
        let without = [
            0xFF, 0xD8, 0xFF, 0xE0, 0x00, 0x04, 0xAA, 0xBB, 0xFF, 0xDA, 0x00,
        ];
        let patched = with_default_huffman_tables(&without).unwrap();
        assert_eq!(&patched[..8], &without[..8]);
        assert_eq!(
            &patched[8..8 + DEFAULT_HUFFMAN_SEGMENT.len()],
            DEFAULT_HUFFMAN_SEGMENT
        );
        assert_eq!(&patched[8 + DEFAULT_HUFFMAN_SEGMENT.len()..], &without[8..]);

        let with = [0xFF, 0xD8, 0xFF, 0xC4, 0x00, 0x02, 0xFF, 0xDA, 0x00];
        assert!(with_default_huffman_tables(&with).is_none());
        assert!(with_default_huffman_tables(&[0x00, 0x01, 0x02, 0x03]).is_none());
        assert!(with_default_huffman_tables(&[0xFF, 0xD8, 0xFF, 0xE0, 0x00]).is_none());
    }

    #[test]
    fn mjpeg_rejects_garbage() {
        let mut rgb = Vec::new();
        let error = mjpeg_to_rgb24(b"not a jpeg at all", &mut rgb).unwrap_err();
        assert!(matches!(error, ConvertError::Jpeg(_)), "{error}");
    }
}
