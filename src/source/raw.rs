//! Replay of raw YUYV recordings, such as `ffmpeg -f v4l2 -input_format yuyv422 -i /dev/video0
//! -f rawvideo capture.yuyv` or `v4l2-ctl --stream-to`, through the camera's conversion.

use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::camera::{CameraPixelFormat, CaptureConverter};
use super::{timestamp_at, Frame, FrameSource, SourceError};

/// Frames of a headerless YUYV file: `width * height * 2` bytes per frame, rows without
/// padding. Frame `i` has the timestamp `i / frame_rate`.
pub struct RawFrames {
    path: PathBuf,
    file: File,
    width: usize,
    height: usize,
    frame_rate: f64,
    buffer: Vec<u8>,
    converter: CaptureConverter,
    next_index: u64,
    finished: bool,
}

impl RawFrames {
    /// Opens a YUYV recording of `width` x `height` frames at `frame_rate` frames per second.
    pub fn open_yuyv(
        path: impl AsRef<Path>,
        width: usize,
        height: usize,
        frame_rate: f64,
    ) -> Result<Self, SourceError> {
        let path = path.as_ref().to_path_buf();
        let invalid = |reason: String| SourceError::InvalidRequest {
            path: path.clone(),
            reason,
        };
        if width == 0 || height == 0 || width % 2 != 0 {
            return Err(invalid(format!(
                "frame size {width}x{height} is invalid for YUYV; \
                 give a positive even width and a positive height"
            )));
        }
        if !(frame_rate.is_finite() && frame_rate > 0.0) {
            return Err(invalid(format!(
                "frame rate {frame_rate} is invalid; give a positive number of frames per second"
            )));
        }
        let file = File::open(&path).map_err(|source| match source.kind() {
            std::io::ErrorKind::NotFound => SourceError::NotFound { path: path.clone() },
            _ => SourceError::Io {
                path: path.clone(),
                source,
            },
        })?;
        let frame_bytes = width * height * 2;
        if let Ok(metadata) = file.metadata() {
            let length = metadata.len();
            if length % frame_bytes as u64 != 0 {
                log::warn!(
                    "{}: length {length} is not a multiple of the {frame_bytes}-byte frame size \
                     of {width}x{height} YUYV; the last frame is truncated",
                    path.display()
                );
            }
        }
        Ok(Self {
            path,
            file,
            width,
            height,
            frame_rate,
            buffer: vec![0; frame_bytes],
            converter: CaptureConverter::new(),
            next_index: 0,
            finished: false,
        })
    }

    /// Reads up to one frame of bytes and returns how many were read.
    fn read_frame_bytes(&mut self) -> Result<usize, SourceError> {
        let mut filled = 0;
        while filled < self.buffer.len() {
            match self.file.read(&mut self.buffer[filled..]) {
                Ok(0) => break,
                Ok(count) => filled += count,
                Err(error) if error.kind() == std::io::ErrorKind::Interrupted => {}
                Err(source) => {
                    return Err(SourceError::Io {
                        path: self.path.clone(),
                        source,
                    })
                }
            }
        }
        Ok(filled)
    }
}

impl FrameSource for RawFrames {
    fn next_frame(&mut self, frame: &mut Frame) -> Result<bool, SourceError> {
        if self.finished {
            return Ok(false);
        }
        let filled = self.read_frame_bytes()?;
        if filled < self.buffer.len() {
            self.finished = true;
            if filled == 0 {
                return Ok(false);
            }
            return Err(SourceError::TruncatedRawFrame {
                path: self.path.clone(),
                frame_index: self.next_index,
                actual: filled,
                expected: self.buffer.len(),
            });
        }

        let index = self.next_index;
        self.converter
            .write(
                CameraPixelFormat::Yuyv,
                &self.buffer,
                self.width,
                self.height,
                self.width * 2,
                frame,
            )
            .map_err(|source| SourceError::Convert {
                path: self.path.clone(),
                frame_index: index,
                source,
            })?;
        frame.index = index;
        frame.timestamp = timestamp_at(index, self.frame_rate);
        self.next_index += 1;
        Ok(true)
    }

    fn describe(&self) -> String {
        format!(
            "raw YUYV recording {} ({}x{}, {} fps)",
            self.path.display(),
            self.width,
            self.height,
            self.frame_rate
        )
    }

    fn nominal_frame_rate(&self) -> Option<f64> {
        Some(self.frame_rate)
    }
}

impl RawFrames {
    /// Returns the time between frames.
    pub fn frame_interval(&self) -> Duration {
        Duration::from_secs_f64(1.0 / self.frame_rate)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejects_odd_width_and_bad_rate() {
        let error = RawFrames::open_yuyv("/nonexistent.yuyv", 3, 2, 25.0)
            .err()
            .unwrap();
        assert!(error.to_string().contains("3x2"), "{error}");
        let error = RawFrames::open_yuyv("/nonexistent.yuyv", 4, 2, 0.0)
            .err()
            .unwrap();
        assert!(error.to_string().contains("frame rate 0"), "{error}");
        let error = RawFrames::open_yuyv("/nonexistent.yuyv", 4, 2, 25.0)
            .err()
            .unwrap();
        assert!(matches!(error, SourceError::NotFound { .. }), "{error}");
    }

    #[test]
    fn truncated_last_frame() {
        let directory = tempfile::tempdir().unwrap();
        let path = directory.path().join("two.yuyv");
        // One full 2x1 frame (black, white) and half of a second one.
        std::fs::write(&path, [16, 128, 235, 128, 16, 128]).unwrap();
        let mut raw = RawFrames::open_yuyv(&path, 2, 1, 10.0).unwrap();
        let mut frame = Frame::new();
        assert!(raw.next_frame(&mut frame).unwrap());
        assert_eq!(frame.data, vec![0, 0, 0, 255, 255, 255]);
        let error = raw.next_frame(&mut frame).unwrap_err();
        assert!(
            matches!(
                error,
                SourceError::TruncatedRawFrame {
                    frame_index: 1,
                    actual: 2,
                    ..
                }
            ),
            "{error}"
        );
        assert!(!raw.next_frame(&mut frame).unwrap());
    }
}
