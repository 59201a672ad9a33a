//! V4L2 cameras (through the `v4l` crate) and the capture-buffer conversion they share with
//! [`RawFrames`](super::RawFrames).
//!
//! [`Camera`] negotiates YUYV or MJPEG at the requested size and rate, streams through
//! memory-mapped driver buffers, and stamps each frame with the driver's buffer timestamp
//! relative to the first frame. YUYV is preferred when no format is requested, because it
//! needs no JPEG decoding. USB 2 cameras often reach their full rate at large sizes only
//! with MJPEG, so request MJPEG for those.
//!
//! NOTE: the device path (`Camera::open` and `Camera::next_frame`) has not run against a
//! real camera. The build machine has no `/dev/video*` device, so only the conversion
//! ([`CaptureConverter`], tested on YUYV and MJPEG recordings of real footage) is tested.

use std::path::Path;
use std::time::Duration;

use super::convert::{mjpeg_to_rgb24, yuyv_to_rgb24, ConvertError};
use super::Frame;

/// Pixel format of camera buffers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CameraPixelFormat {
    /// Packed YCbCr 4:2:2, `Y0 U Y1 V`, BT.601 limited range.
    Yuyv,
    /// One JPEG image per buffer.
    Mjpeg,
}

impl CameraPixelFormat {
    /// Returns the V4L2 fourcc code of the format.
    pub fn fourcc(self) -> [u8; 4] {
        match self {
            Self::Yuyv => *b"YUYV",
            Self::Mjpeg => *b"MJPG",
        }
    }
}

/// Capture settings requested from a camera. The driver may adjust size and rate; the
/// values it grants are logged, and frames carry the granted size.
#[derive(Debug, Clone, PartialEq)]
pub struct CameraRequest {
    /// Frame width in pixels.
    pub width: u32,
    /// Frame height in pixels.
    pub height: u32,
    /// Frames per second; 0 keeps the driver's current rate.
    pub frame_rate: u32,
    /// Pixel format; `None` takes YUYV when offered, else MJPEG.
    pub pixel_format: Option<CameraPixelFormat>,
    /// Number of memory-mapped driver buffers.
    pub buffer_count: u32,
    /// Time to wait for one frame before `next_frame` fails.
    pub timeout: Duration,
}

impl Default for CameraRequest {
    fn default() -> Self {
        Self {
            width: 1280,
            height: 720,
            frame_rate: 30,
            pixel_format: None,
            buffer_count: 4,
            timeout: Duration::from_secs(2),
        }
    }
}

/// Conversion of capture buffers into frames, with a spare pixel buffer so that a frame
/// is only replaced once its buffer decoded completely.
#[derive(Debug, Default)]
pub struct CaptureConverter {
    spare: Vec<u8>,
}

impl CaptureConverter {
    /// Creates a converter; its spare buffer grows on the first MJPEG frame.
    pub fn new() -> Self {
        Self::default()
    }

    /// Converts one capture buffer of `format` into `frame`'s pixels and size. `stride` is
    /// the distance between YUYV rows in bytes (V4L2 `bytesperline`). MJPEG frames carry
    /// their own size, which wins over `width` x `height`.
    ///
    /// On error `frame` is left unchanged.
    pub fn write(
        &mut self,
        format: CameraPixelFormat,
        buffer: &[u8],
        width: usize,
        height: usize,
        stride: usize,
        frame: &mut Frame,
    ) -> Result<(), ConvertError> {
        match format {
            CameraPixelFormat::Yuyv => {
                // yuyv_to_rgb24 checks every size before it writes a pixel, so on error only
                // the size has to be restored.
                let previous = (frame.width, frame.height);
                frame.resize(width, height);
                let result = yuyv_to_rgb24(buffer, width, height, stride, &mut frame.data);
                if result.is_err() {
                    frame.resize(previous.0, previous.1);
                }
                result
            }
            CameraPixelFormat::Mjpeg => {
                let (decoded_width, decoded_height) = mjpeg_to_rgb24(buffer, &mut self.spare)?;
                std::mem::swap(&mut frame.data, &mut self.spare);
                frame.width = decoded_width;
                frame.height = decoded_height;
                Ok(())
            }
        }
    }
}

/// Checks that a request can be negotiated at all, before the device is touched.
#[cfg_attr(not(feature = "camera"), allow(dead_code))]
pub(crate) fn check_request(
    path: &Path,
    request: &CameraRequest,
) -> Result<(), super::SourceError> {
    let reason = if request.width == 0 || request.height == 0 {
        Some(format!(
            "frame size {}x{} is empty; request a positive width and height",
            request.width, request.height
        ))
    } else if request.buffer_count == 0 {
        Some("buffer count is 0; request at least 2 buffers".to_string())
    } else if request.timeout.is_zero() {
        Some("frame timeout is zero; request a positive timeout".to_string())
    } else {
        None
    };
    match reason {
        Some(reason) => Err(super::SourceError::InvalidRequest {
            path: path.to_path_buf(),
            reason,
        }),
        None => Ok(()),
    }
}

#[cfg(feature = "camera")]
pub use device::Camera;

#[cfg(feature = "camera")]
mod device {
    use std::path::{Path, PathBuf};
    use std::time::Duration;

    use v4l::buffer::{Flags, Type};
    use v4l::format::quantization::Quantization;
    use v4l::io::mmap::Stream;
    use v4l::io::traits::CaptureStream;
    use v4l::video::capture::Parameters;
    use v4l::video::Capture;
    use v4l::{Device, FourCC};

    use super::{check_request, CameraPixelFormat, CameraRequest, CaptureConverter};
    use crate::source::{Frame, FrameSource, SourceError};

    /// A V4L2 capture device streaming through memory-mapped buffers.
    pub struct Camera {
        path: PathBuf,
        /// Kept open for the lifetime of the stream, which shares its file descriptor.
        _device: Device,
        stream: Stream<'static>,
        pixel_format: CameraPixelFormat,
        converter: CaptureConverter,
        width: usize,
        height: usize,
        stride: usize,
        frame_rate: Option<f64>,
        card: String,
        next_index: u64,
        first_timestamp: Option<Duration>,
        last_sequence: Option<u32>,
        dropped_frames: u64,
    }

    impl Camera {
        /// Opens the device at `path` and negotiates the requested format, size and rate.
        pub fn open(path: impl AsRef<Path>, request: &CameraRequest) -> Result<Self, SourceError> {
            let path = path.as_ref().to_path_buf();
            check_request(&path, request)?;
            let camera_error = |operation: &'static str| {
                let path = path.clone();
                move |source: std::io::Error| SourceError::Camera {
                    path,
                    operation,
                    source,
                }
            };
            if !path.exists() {
                return Err(SourceError::NotFound { path });
            }

            let device = Device::with_path(&path).map_err(camera_error("opening the device"))?;
            let capabilities = device
                .query_caps()
                .map_err(camera_error("querying capabilities"))?;
            let offered: Vec<FourCC> = device
                .enum_formats()
                .map_err(camera_error("listing pixel formats"))?
                .into_iter()
                .map(|description| description.fourcc)
                .collect();

            let candidates = match request.pixel_format {
                Some(format) => vec![format],
                None => vec![CameraPixelFormat::Yuyv, CameraPixelFormat::Mjpeg],
            };
            let format_error = || SourceError::CameraFormat {
                path: path.clone(),
                requested: fourcc_list(
                    candidates
                        .iter()
                        .map(|format| FourCC::new(&format.fourcc())),
                ),
                offered: fourcc_list(offered.iter().copied()),
            };
            let pixel_format = candidates
                .iter()
                .copied()
                .find(|format| offered.contains(&FourCC::new(&format.fourcc())))
                .ok_or_else(format_error)?;

            let mut format = device
                .format()
                .map_err(camera_error("reading the format"))?;
            format.width = request.width;
            format.height = request.height;
            format.fourcc = FourCC::new(&pixel_format.fourcc());
            let granted = device
                .set_format(&format)
                .map_err(camera_error("setting the format"))?;
            if granted.fourcc != format.fourcc {
                return Err(format_error());
            }
            if pixel_format == CameraPixelFormat::Yuyv
                && matches!(granted.quantization, Quantization::FullRange)
            {
                log::warn!(
                    "camera {} reports full-range YUYV, but the conversion assumes limited \
                     range (16..=235), so frames get too much contrast; request MJPEG instead",
                    path.display()
                );
            }
            if (granted.width, granted.height) != (request.width, request.height) {
                log::warn!(
                    "camera {}: requested {}x{}, the driver granted {}x{}",
                    path.display(),
                    request.width,
                    request.height,
                    granted.width,
                    granted.height
                );
            }

            let frame_rate = if request.frame_rate > 0 {
                let parameters = device
                    .set_params(&Parameters::with_fps(request.frame_rate))
                    .map_err(camera_error("setting the frame rate"))?;
                interval_to_rate(
                    parameters.interval.numerator,
                    parameters.interval.denominator,
                )
            } else {
                let parameters = device
                    .params()
                    .map_err(camera_error("reading the frame rate"))?;
                interval_to_rate(
                    parameters.interval.numerator,
                    parameters.interval.denominator,
                )
            };

            let mut stream =
                Stream::with_buffers(&device, Type::VideoCapture, request.buffer_count)
                    .map_err(camera_error("allocating memory-mapped buffers"))?;
            stream.set_timeout(request.timeout);

            let width = granted.width as usize;
            let height = granted.height as usize;
            // Some drivers report bytesperline 0 for packed formats.
            let stride = match granted.stride as usize {
                0 => width * 2,
                stride => stride,
            };
            log::info!(
                "opened camera {} ({}, driver {}): {} {}x{}, {} fps, {} buffers",
                path.display(),
                capabilities.card,
                capabilities.driver,
                granted.fourcc,
                width,
                height,
                frame_rate.map_or_else(|| "unknown".to_string(), |rate| format!("{rate:.2}")),
                request.buffer_count
            );

            Ok(Self {
                path,
                _device: device,
                stream,
                pixel_format,
                converter: CaptureConverter::new(),
                width,
                height,
                stride,
                frame_rate,
                card: capabilities.card,
                next_index: 0,
                first_timestamp: None,
                last_sequence: None,
                dropped_frames: 0,
            })
        }

        /// Counts frames the driver dropped, from gaps in the buffer sequence numbers.
        fn track_sequence(&mut self, sequence: u32) {
            if let Some(last) = self.last_sequence {
                let gap = sequence.wrapping_sub(last).wrapping_sub(1);
                if gap > 0 && gap < u32::MAX / 2 {
                    self.dropped_frames += u64::from(gap);
                    log::warn!(
                        "camera {}: driver dropped {gap} frames before frame {} ({} in total)",
                        self.path.display(),
                        self.next_index,
                        self.dropped_frames
                    );
                }
            }
            self.last_sequence = Some(sequence);
        }
    }

    impl FrameSource for Camera {
        fn next_frame(&mut self, frame: &mut Frame) -> Result<bool, SourceError> {
            let frame_index = self.next_index;
            let (buffer, metadata) =
                CaptureStream::next(&mut self.stream).map_err(|source| SourceError::Camera {
                    path: self.path.clone(),
                    operation: "dequeuing a buffer",
                    source,
                })?;
            let flags = metadata.flags;
            let sequence = metadata.sequence;
            let timestamp = Duration::new(
                u64::try_from(metadata.timestamp.sec).unwrap_or(0),
                u32::try_from(metadata.timestamp.usec * 1000).unwrap_or(0),
            );
            let used = (metadata.bytesused as usize).min(buffer.len());
            let payload = &buffer[..used];

            let frame_error = |reason: String| SourceError::CameraFrame {
                path: self.path.clone(),
                frame_index,
                reason,
            };
            if flags.contains(Flags::ERROR) {
                return Err(frame_error(
                    "the driver marked the buffer as damaged; the frame is skipped".to_string(),
                ));
            }
            self.converter
                .write(
                    self.pixel_format,
                    payload,
                    self.width,
                    self.height,
                    self.stride,
                    frame,
                )
                .map_err(|source| SourceError::Convert {
                    path: self.path.clone(),
                    frame_index,
                    source,
                })?;

            self.track_sequence(sequence);
            let first = *self.first_timestamp.get_or_insert(timestamp);
            frame.index = frame_index;
            frame.timestamp = timestamp.saturating_sub(first);
            self.next_index += 1;
            Ok(true)
        }

        fn describe(&self) -> String {
            format!(
                "camera {} ({}, {:?} {}x{}, {})",
                self.path.display(),
                self.card,
                self.pixel_format,
                self.width,
                self.height,
                self.frame_rate.map_or_else(
                    || "unknown rate".to_string(),
                    |rate| format!("{rate:.2} fps")
                )
            )
        }

        fn nominal_frame_rate(&self) -> Option<f64> {
            self.frame_rate
        }
    }

    /// Converts a V4L2 frame interval (seconds per frame as a fraction) to frames per second.
    fn interval_to_rate(numerator: u32, denominator: u32) -> Option<f64> {
        (numerator > 0 && denominator > 0).then(|| f64::from(denominator) / f64::from(numerator))
    }

    fn fourcc_list(codes: impl Iterator<Item = FourCC>) -> String {
        let names: Vec<String> = codes.map(|code| code.to_string()).collect();
        if names.is_empty() {
            "nothing".to_string()
        } else {
            names.join(", ")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    #[cfg(feature = "camera")]
    use crate::source::SourceError;

    #[test]
    fn request_checks() {
        let path = Path::new("/dev/video0");
        assert!(check_request(path, &CameraRequest::default()).is_ok());
        let empty = CameraRequest {
            width: 0,
            ..CameraRequest::default()
        };
        let error = check_request(path, &empty).unwrap_err();
        assert!(error.to_string().contains("0x720"), "{error}");
        let no_buffers = CameraRequest {
            buffer_count: 0,
            ..CameraRequest::default()
        };
        assert!(check_request(path, &no_buffers).is_err());
    }

    #[test]
    fn failed_capture_keeps_frame() {
        let mut converter = CaptureConverter::new();
        let mut frame = Frame::new();
        let yuyv = [16, 128, 235, 128];
        let black_white = vec![0, 0, 0, 255, 255, 255];
        converter
            .write(CameraPixelFormat::Yuyv, &yuyv, 2, 1, 4, &mut frame)
            .unwrap();
        assert_eq!((frame.width, frame.height), (2, 1));
        assert_eq!(frame.data, black_white);

        let error = converter.write(CameraPixelFormat::Yuyv, &yuyv, 4, 2, 8, &mut frame);
        assert!(error.is_err());
        assert_eq!((frame.width, frame.height), (2, 1));
        assert_eq!(frame.data, black_white);

        let error = converter.write(CameraPixelFormat::Mjpeg, b"garbage", 2, 1, 4, &mut frame);
        assert!(error.is_err());
        assert_eq!((frame.width, frame.height), (2, 1));
        assert_eq!(frame.data, black_white);
    }

    #[cfg(feature = "camera")]
    #[test]
    fn open_rejects_non_camera() {
        let error = Camera::open("/dev/null", &CameraRequest::default())
            .err()
            .expect("/dev/null is no V4L2 device");
        assert!(error.to_string().contains("/dev/null"), "{error}");
    }

    #[cfg(feature = "camera")]
    #[test]
    fn open_missing_device() {
        let error = Camera::open("/dev/video99", &CameraRequest::default())
            .err()
            .expect("no such device");
        assert!(matches!(error, SourceError::NotFound { .. }), "{error}");
    }
}
