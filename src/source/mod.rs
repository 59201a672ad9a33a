//! Frame sources: video files, still images, V4L2 cameras and raw YUYV recordings.
//!
//! Every source implements [`FrameSource`] and writes packed RGB24 pixels at the input's
//! native resolution into a caller-owned [`Frame`], whose pixel buffer is reused from frame
//! to frame. Video and YUYV frames are converted in place. JPEG and PNG decoding (stills,
//! MJPEG) still allocates inside the `image` crate for every frame. [`open_path`] and [`open_source`] pick the
//! source from a path:
//!
//! - `/dev/videoN` or another video4linux character device, such as a link under
//!   `/dev/v4l/by-id/`: [`Camera`] (feature `camera`),
//! - a directory: the JPEG and PNG files in it, in sorted order ([`ImageSequence`]),
//! - a `.jpg`, `.jpeg` or `.png` file, or a list of them: [`ImageSequence`],
//! - any other file: a video file decoded by FFmpeg ([`VideoFile`], feature `ffmpeg`).
//!
//! [`RawFrames`] replays a raw YUYV recording through the same conversion as the camera.
//! It is opened directly because a raw file carries no frame size or rate.

pub mod camera;
pub mod convert;
pub mod images;
pub mod raw;
pub mod reconnect;
#[cfg(feature = "ffmpeg")]
pub mod video;

use std::path::{Path, PathBuf};
use std::time::Duration;

#[cfg(feature = "camera")]
pub use camera::Camera;
pub use camera::{CameraPixelFormat, CameraRequest, CaptureConverter};
pub use convert::ConvertError;
pub use images::ImageSequence;
pub use raw::RawFrames;
pub use reconnect::{Backoff, ReconnectStats, Reconnecting};
#[cfg(feature = "ffmpeg")]
pub use video::VideoFile;

/// One decoded frame: packed RGB24 pixels, row-major with no padding, plus its position
/// in the stream.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Frame {
    /// 0-based position of the frame among the frames the source delivered.
    pub index: u64,
    /// Presentation time relative to the start of the stream.
    pub timestamp: Duration,
    /// Width in pixels.
    pub width: usize,
    /// Height in pixels.
    pub height: usize,
    /// `width * height * 3` bytes, R, G, B per pixel. Sources write into this buffer in place
    /// or swap it with a spare buffer of their own, so its allocation is reused.
    pub data: Vec<u8>,
}

impl Frame {
    /// Creates an empty frame to pass to [`FrameSource::next_frame`].
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets the frame size and resizes `data` to `width * height * 3` bytes, keeping the
    /// allocation when it is already large enough.
    pub fn resize(&mut self, width: usize, height: usize) {
        self.width = width;
        self.height = height;
        self.data.resize(width * height * 3, 0);
    }

    /// Returns the RGB value of the pixel at column `x`, row `y`.
    ///
    /// # Panics
    /// Panics when `x >= width` or `y >= height`.
    pub fn pixel(&self, x: usize, y: usize) -> [u8; 3] {
        assert!(
            x < self.width && y < self.height,
            "pixel ({x}, {y}) outside the frame"
        );
        let offset = (y * self.width + x) * 3;
        [
            self.data[offset],
            self.data[offset + 1],
            self.data[offset + 2],
        ]
    }
}

/// A stream of RGB24 frames.
pub trait FrameSource: Send {
    /// Writes the next frame into `frame`, reusing its buffer. Returns `Ok(true)` when a
    /// frame was written and `Ok(false)` at the end of the stream.
    ///
    /// An error reports damage in the input and does not end the stream by itself: the
    /// caller may call again, and the source continues with the data after the damage or
    /// returns `Ok(false)` when nothing is left. `frame` is left unchanged by an error.
    fn next_frame(&mut self, frame: &mut Frame) -> Result<bool, SourceError>;

    /// Returns a one-line human-readable description: kind, path, size and rate.
    fn describe(&self) -> String;

    /// Returns the frame rate the input declares in frames per second, or `None` when
    /// it declares none.
    fn nominal_frame_rate(&self) -> Option<f64>;
}

impl<S: FrameSource + ?Sized> FrameSource for Box<S> {
    fn next_frame(&mut self, frame: &mut Frame) -> Result<bool, SourceError> {
        (**self).next_frame(frame)
    }

    fn describe(&self) -> String {
        (**self).describe()
    }

    fn nominal_frame_rate(&self) -> Option<f64> {
        (**self).nominal_frame_rate()
    }
}

/// Errors of the frame sources.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("{path}: not found; check the path")]
    NotFound { path: PathBuf },

    #[error("failed to read {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error(
        "{path} is not a readable video file ({reason}); \
         pass a container FFmpeg can open, such as MP4, MKV or AVI"
    )]
    NotAVideo { path: PathBuf, reason: String },

    #[error("{path} contains no video stream; pass a file with a video track")]
    NoVideoStream { path: PathBuf },

    #[error(
        "{path}: no FFmpeg decoder for video codec {codec} ({reason}); \
         re-encode the file to a common codec such as H.264"
    )]
    UnsupportedCodec {
        path: PathBuf,
        codec: String,
        reason: String,
    },

    #[error(
        "{path}: decoding failed at frame {frame_index} ({reason}); \
         the frames before it were delivered"
    )]
    Decode {
        path: PathBuf,
        frame_index: u64,
        reason: String,
    },

    #[error("{path}: converting frame {frame_index} to RGB24 failed: {reason}")]
    Conversion {
        path: PathBuf,
        frame_index: u64,
        reason: String,
    },

    #[error("{path}: frame {frame_index}")]
    Convert {
        path: PathBuf,
        frame_index: u64,
        #[source]
        source: ConvertError,
    },

    #[error("{path}: invalid or unsupported image")]
    Image {
        path: PathBuf,
        #[source]
        source: image::ImageError,
    },

    #[error("{path} contains no .jpg, .jpeg or .png files; pass a directory of still images")]
    NoImages { path: PathBuf },

    #[error(
        "{path} is not a still image (expected .jpg, .jpeg or .png); \
         a list of paths must contain only still images"
    )]
    NotAnImage { path: PathBuf },

    #[error("no input paths given; pass a video file, a directory, still images or /dev/videoN")]
    NoPaths,

    #[error(
        "{path}: truncated raw frame {frame_index}: {actual} of {expected} bytes; \
         check the frame size given for the recording"
    )]
    TruncatedRawFrame {
        path: PathBuf,
        frame_index: u64,
        actual: usize,
        expected: usize,
    },

    #[error("{path}: invalid request: {reason}")]
    InvalidRequest { path: PathBuf, reason: String },

    #[error("camera {path}: {operation} failed")]
    Camera {
        path: PathBuf,
        operation: &'static str,
        #[source]
        source: std::io::Error,
    },

    #[error(
        "camera {path} offers none of the requested pixel formats {requested} \
         (it offers {offered}); request a format it offers"
    )]
    CameraFormat {
        path: PathBuf,
        requested: String,
        offered: String,
    },

    #[error("camera {path}: frame {frame_index}: {reason}")]
    CameraFrame {
        path: PathBuf,
        frame_index: u64,
        reason: String,
    },

    #[error(
        "{path} needs the `{feature}` feature, which this build lacks; \
         rebuild with `--features {feature}`"
    )]
    FeatureDisabled {
        path: PathBuf,
        feature: &'static str,
    },

    #[error(
        "{description}: device lost and not reopened after {attempts} attempts; \
         check the cable and the driver, or raise `camera.reconnect_attempts`"
    )]
    ReconnectFailed {
        description: String,
        attempts: u32,
        #[source]
        source: Box<SourceError>,
    },
}

/// `errno` values with which V4L2 calls fail once the device is unplugged or its driver
/// was unbound: ENODEV (19), ENXIO (6), EIO (5) and ESHUTDOWN (108), from the Linux
/// kernel's include/uapi/asm-generic/errno-base.h and errno.h.
const DEVICE_LOST_ERRNOS: [i32; 4] = [19, 6, 5, 108];

impl SourceError {
    /// Returns whether the error means the capture device went away (unplugged, powered off,
    /// driver reset), so reopening it later may succeed. A damaged frame or a
    /// configuration error is not a lost device.
    pub fn is_device_lost(&self) -> bool {
        match self {
            Self::Camera { source, .. } => {
                source.kind() == std::io::ErrorKind::NotFound
                    || source
                        .raw_os_error()
                        .is_some_and(|code| DEVICE_LOST_ERRNOS.contains(&code))
            }
            Self::NotFound { .. } => true,
            _ => false,
        }
    }
}

/// Settings of the sources that [`open_source`] can create.
#[derive(Debug, Clone, PartialEq)]
pub struct SourceOptions {
    /// Time between consecutive still images, which sets their timestamps.
    pub still_interval: Duration,
    /// Format, size and rate to negotiate with a V4L2 camera.
    pub camera: CameraRequest,
}

impl Default for SourceOptions {
    fn default() -> Self {
        Self {
            still_interval: Duration::from_millis(100),
            camera: CameraRequest::default(),
        }
    }
}

/// The kind of input a path or a list of paths names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SourceSpec {
    /// A video file decoded by FFmpeg.
    Video(PathBuf),
    /// Still images in the given order.
    Stills(Vec<PathBuf>),
    /// The still images of a directory, in sorted order.
    StillDirectory(PathBuf),
    /// A V4L2 capture device.
    Camera(PathBuf),
}

impl SourceSpec {
    /// Classifies one path. Fails with [`SourceError::NotFound`] when it does not exist.
    pub fn from_path(path: impl AsRef<Path>) -> Result<Self, SourceError> {
        let path = path.as_ref();
        let metadata = std::fs::metadata(path).map_err(|error| match error.kind() {
            std::io::ErrorKind::NotFound => SourceError::NotFound {
                path: path.to_path_buf(),
            },
            _ => SourceError::Io {
                path: path.to_path_buf(),
                source: error,
            },
        })?;

        if is_camera_path(path, &metadata) {
            Ok(Self::Camera(path.to_path_buf()))
        } else if metadata.is_dir() {
            Ok(Self::StillDirectory(path.to_path_buf()))
        } else if images::is_still_image_path(path) {
            Ok(Self::Stills(vec![path.to_path_buf()]))
        } else {
            Ok(Self::Video(path.to_path_buf()))
        }
    }

    /// Classifies a list of paths: one path as in [`SourceSpec::from_path`], several only
    /// as still images.
    pub fn from_paths<P: AsRef<Path>>(paths: &[P]) -> Result<Self, SourceError> {
        match paths {
            [] => Err(SourceError::NoPaths),
            [single] => Self::from_path(single),
            several => {
                let mut stills = Vec::with_capacity(several.len());
                for path in several {
                    let path = path.as_ref();
                    if !images::is_still_image_path(path) {
                        return Err(SourceError::NotAnImage {
                            path: path.to_path_buf(),
                        });
                    }
                    stills.push(path.to_path_buf());
                }
                Ok(Self::Stills(stills))
            }
        }
    }
}

/// Character-device major number of Linux video4linux devices (Documentation/admin-guide/
/// devices.txt in the kernel tree).
#[cfg(unix)]
const V4L_MAJOR: u64 = 81;

#[cfg(unix)]
fn is_camera_path(path: &Path, metadata: &std::fs::Metadata) -> bool {
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    // Linux encodes the major number in bits 8..20 and 32..44 of st_rdev.
    let rdev = metadata.rdev();
    let major = ((rdev >> 8) & 0xfff) | ((rdev >> 32) & !0xfff);
    let is_v4l_device = metadata.file_type().is_char_device() && major == V4L_MAJOR;
    is_v4l_device || path.starts_with("/dev/video")
}

#[cfg(not(unix))]
fn is_camera_path(path: &Path, _metadata: &std::fs::Metadata) -> bool {
    path.starts_with("/dev/video")
}

/// Opens the source a [`SourceSpec`] names.
pub fn open_source(
    spec: &SourceSpec,
    options: &SourceOptions,
) -> Result<Box<dyn FrameSource>, SourceError> {
    match spec {
        SourceSpec::Video(path) => open_video(path),
        SourceSpec::Stills(paths) => Ok(Box::new(ImageSequence::from_paths(
            paths.clone(),
            options.still_interval,
        )?)),
        SourceSpec::StillDirectory(path) => Ok(Box::new(ImageSequence::from_directory(
            path,
            options.still_interval,
        )?)),
        SourceSpec::Camera(path) => open_camera(path, &options.camera),
    }
}

/// Classifies `path` with [`SourceSpec::from_path`] and opens that source.
pub fn open_path(
    path: impl AsRef<Path>,
    options: &SourceOptions,
) -> Result<Box<dyn FrameSource>, SourceError> {
    open_source(&SourceSpec::from_path(path)?, options)
}

#[cfg(feature = "ffmpeg")]
fn open_video(path: &Path) -> Result<Box<dyn FrameSource>, SourceError> {
    Ok(Box::new(VideoFile::open(path)?))
}

#[cfg(not(feature = "ffmpeg"))]
fn open_video(path: &Path) -> Result<Box<dyn FrameSource>, SourceError> {
    Err(SourceError::FeatureDisabled {
        path: path.to_path_buf(),
        feature: "ffmpeg",
    })
}

#[cfg(feature = "camera")]
fn open_camera(path: &Path, request: &CameraRequest) -> Result<Box<dyn FrameSource>, SourceError> {
    Ok(Box::new(Camera::open(path, request)?))
}

#[cfg(not(feature = "camera"))]
fn open_camera(path: &Path, _request: &CameraRequest) -> Result<Box<dyn FrameSource>, SourceError> {
    Err(SourceError::FeatureDisabled {
        path: path.to_path_buf(),
        feature: "camera",
    })
}

/// Converts a frame count and rate into the timestamp of that frame.
pub(crate) fn timestamp_at(index: u64, frames_per_second: f64) -> Duration {
    Duration::from_secs_f64(index as f64 / frames_per_second)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn assert_send<T: Send>() {}

    #[test]
    fn sources_are_send() {
        assert_send::<Box<dyn FrameSource>>();
        assert_send::<ImageSequence>();
        assert_send::<RawFrames>();
        #[cfg(feature = "ffmpeg")]
        assert_send::<VideoFile>();
        #[cfg(feature = "camera")]
        assert_send::<Camera>();
    }

    #[test]
    fn frame_resize_keeps_allocation() {
        let mut frame = Frame::new();
        frame.resize(4, 2);
        assert_eq!(frame.data.len(), 24);
        let capacity = frame.data.capacity();
        frame.resize(2, 2);
        assert_eq!(frame.data.len(), 12);
        assert_eq!(frame.data.capacity(), capacity);
    }

    #[test]
    fn spec_of_missing_path() {
        let error = SourceSpec::from_path("/nonexistent/clip.mp4").unwrap_err();
        assert!(matches!(error, SourceError::NotFound { .. }), "{error}");
        assert!(
            error.to_string().contains("/nonexistent/clip.mp4"),
            "{error}"
        );
    }

    #[test]
    fn spec_classifies_paths() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("data/footage");
        let video = root.join("solidWhiteRight.mp4");
        let still = root.join("test1.jpg");
        assert_eq!(
            SourceSpec::from_path(&video).unwrap(),
            SourceSpec::Video(video.clone())
        );
        assert_eq!(
            SourceSpec::from_path(&still).unwrap(),
            SourceSpec::Stills(vec![still.clone()])
        );
        assert_eq!(
            SourceSpec::from_path(&root).unwrap(),
            SourceSpec::StillDirectory(root.clone())
        );
        // A character device that is not a video4linux device is no camera.
        assert_eq!(
            SourceSpec::from_path("/dev/null").unwrap(),
            SourceSpec::Video(PathBuf::from("/dev/null"))
        );
    }

    #[test]
    fn spec_list_rejects_video() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("data/footage");
        let paths = [root.join("test1.jpg"), root.join("solidWhiteRight.mp4")];
        let error = SourceSpec::from_paths(&paths).unwrap_err();
        assert!(matches!(error, SourceError::NotAnImage { .. }), "{error}");
        let empty: [PathBuf; 0] = [];
        assert!(matches!(
            SourceSpec::from_paths(&empty).unwrap_err(),
            SourceError::NoPaths
        ));
    }
}
