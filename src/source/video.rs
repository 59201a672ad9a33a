//! Video files decoded by FFmpeg (through `ffmpeg-next`).
//!
//! The source reads the best video stream of the container and skips all other streams.
//! It decodes with FFmpeg's send/receive API, so frames come out in presentation order
//! even when the stream has B-frames. At the end of the file it drains the decoder, which
//! delivers the frames held back for reordering. swscale converts each
//! frame to RGB24 at its native size, with the YCbCr matrix and range the frame is tagged
//! with (BT.601 limited range when untagged), as the FFmpeg command-line tool does.

use std::path::{Path, PathBuf};
use std::sync::Once;
use std::time::Duration;

use ffmpeg::format::Pixel;
use ffmpeg::software::scaling;
use ffmpeg::util::error::EAGAIN;
use ffmpeg::{codec, decoder, format, frame, media, Packet, Rational};
use ffmpeg_next as ffmpeg;

use super::{timestamp_at, Frame, FrameSource, SourceError};

/// A video file replayed frame by frame.
pub struct VideoFile {
    path: PathBuf,
    input: format::context::Input,
    stream_index: usize,
    time_base: Rational,
    /// Presentation timestamp of the stream start, in `time_base` units; timestamps are
    /// reported relative to it.
    start_pts: Option<i64>,
    decoder: decoder::Video,
    scaler: Option<Scaler>,
    decoded: frame::Video,
    rgb: frame::Video,
    frame_rate: Option<f64>,
    codec_name: &'static str,
    state: DecodeState,
    /// A packet the decoder did not accept yet because its output was full.
    pending_packet: Option<Packet>,
    /// Reason the container could not be read to its end, reported after the decoder has
    /// delivered the frames it still holds.
    read_failure: Option<String>,
    next_index: u64,
    last_timestamp: Option<Duration>,
    /// Frames FFmpeg decoded with concealed errors.
    damaged_frames: u64,
    /// Decoding errors since the last delivered frame.
    consecutive_errors: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum DecodeState {
    /// Packets are read from the container.
    Reading,
    /// The container is exhausted and the decoder got its end-of-stream signal.
    Draining,
    /// Every frame was delivered.
    Finished,
}

/// swscale context together with the input it was set up for.
struct Scaler {
    context: scaling::Context,
    key: ScalerKey,
}

// SAFETY: an SwsContext holds no thread-local state and no reference to other threads.
// `VideoFile` owns it exclusively and uses it only through `&mut self`, so moving it to
// another thread is sound. ffmpeg-next leaves `Send` off because it wraps a raw pointer.
unsafe impl Send for Scaler {}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct ScalerKey {
    format: Pixel,
    width: u32,
    height: u32,
    color_space: ffmpeg::color::Space,
    color_range: ffmpeg::color::Range,
}

/// Consecutive decoding errors, with no frame in between, after which the stream ends.
/// A decoder that fails on every call would otherwise make a caller that retries after
/// errors loop forever.
const MAX_CONSECUTIVE_ERRORS: u32 = 100;

static FFMPEG_INIT: Once = Once::new();

fn init_ffmpeg() {
    FFMPEG_INIT.call_once(|| {
        // ffmpeg-next 9's init always returns Ok. A later version's error would not stop
        // file input, which needs no registration since FFmpeg 5, so it is only logged.
        if let Err(error) = ffmpeg::init() {
            log::warn!("FFmpeg initialisation failed: {error}");
        }
    });
}

impl VideoFile {
    /// Opens `path` and sets up a decoder for its best video stream.
    pub fn open(path: impl AsRef<Path>) -> Result<Self, SourceError> {
        let path = path.as_ref().to_path_buf();
        init_ffmpeg();
        match std::fs::metadata(&path) {
            Ok(_) => {}
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
                return Err(SourceError::NotFound { path });
            }
            Err(error) => {
                return Err(SourceError::Io {
                    path,
                    source: error,
                })
            }
        }

        let input = format::input(&path).map_err(|error| SourceError::NotAVideo {
            path: path.clone(),
            reason: error.to_string(),
        })?;
        let stream = input
            .streams()
            .best(media::Type::Video)
            .ok_or_else(|| SourceError::NoVideoStream { path: path.clone() })?;
        let stream_index = stream.index();
        let time_base = stream.time_base();
        let start_pts = Some(stream.start_time()).filter(|&pts| pts != ffmpeg::ffi::AV_NOPTS_VALUE);
        let frame_count = u64::try_from(stream.frames())
            .ok()
            .filter(|&count| count > 0);
        let frame_rate =
            rational_to_f64(stream.avg_frame_rate()).or_else(|| rational_to_f64(stream.rate()));

        let parameters = stream.parameters();
        let codec_id = parameters.id();
        let codec_name = codec_id.name();
        let unsupported = |error: ffmpeg::Error| SourceError::UnsupportedCodec {
            path: path.clone(),
            codec: codec_name.to_string(),
            reason: error.to_string(),
        };
        let context = codec::context::Context::from_parameters(parameters).map_err(unsupported)?;
        let decoder = context.decoder().video().map_err(unsupported)?;

        log::info!(
            "opened video {}: stream {stream_index}, codec {codec_name}, {}x{} {:?}, \
             {} fps, {} frames",
            path.display(),
            decoder.width(),
            decoder.height(),
            decoder.format(),
            frame_rate.map_or_else(|| "unknown".to_string(), |rate| format!("{rate:.3}")),
            frame_count.map_or_else(|| "unknown".to_string(), |count| count.to_string()),
        );

        Ok(Self {
            path,
            input,
            stream_index,
            time_base,
            start_pts,
            decoder,
            scaler: None,
            decoded: frame::Video::empty(),
            rgb: frame::Video::empty(),
            frame_rate,
            codec_name,
            state: DecodeState::Reading,
            pending_packet: None,
            read_failure: None,
            next_index: 0,
            last_timestamp: None,
            damaged_frames: 0,
            consecutive_errors: 0,
        })
    }

    /// Returns the path the video was opened from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn decode_error(&self, reason: String) -> SourceError {
        SourceError::Decode {
            path: self.path.clone(),
            frame_index: self.next_index,
            reason,
        }
    }

    /// Counts a decoding error. Too many in a row end the stream: the decoder is drained
    /// so that the frames it contains are still delivered, and a further error stops it.
    fn count_error(&mut self, reason: String) -> SourceError {
        self.consecutive_errors += 1;
        if self.consecutive_errors >= MAX_CONSECUTIVE_ERRORS {
            if self.state == DecodeState::Reading {
                log::error!(
                    "{}: {MAX_CONSECUTIVE_ERRORS} decoding errors in a row after frame {}; \
                     ending the stream",
                    self.path.display(),
                    self.next_index
                );
                if self.start_draining().is_err() {
                    self.state = DecodeState::Finished;
                }
            } else {
                self.state = DecodeState::Finished;
            }
        }
        self.decode_error(reason)
    }

    /// Reads one packet and sends it to the decoder when it belongs to the video stream.
    /// At the end of the container, or when reading fails, switches to draining.
    fn feed_decoder(&mut self) -> Result<(), SourceError> {
        let packet = match self.pending_packet.take() {
            Some(packet) => packet,
            None => {
                let mut packet = Packet::empty();
                match packet.read(&mut self.input) {
                    Ok(()) => {}
                    Err(ffmpeg::Error::Eof) => return self.start_draining(),
                    Err(ffmpeg::Error::Other { errno }) if errno == EAGAIN => return Ok(()),
                    Err(error) => {
                        // The FFmpeg command-line tool also ends an input at its first
                        // read error. The frames decoded so far are still delivered.
                        log::warn!(
                            "{}: reading the container failed after {} frames: {error}",
                            self.path.display(),
                            self.next_index
                        );
                        self.read_failure = Some(format!("reading the container failed: {error}"));
                        return self.start_draining();
                    }
                }
                if packet.stream() != self.stream_index {
                    return Ok(());
                }
                packet
            }
        };

        match self.decoder.send_packet(&packet) {
            Ok(()) => Ok(()),
            Err(ffmpeg::Error::Other { errno }) if errno == EAGAIN => {
                self.pending_packet = Some(packet);
                Ok(())
            }
            Err(error) => Err(self.count_error(format!("invalid packet: {error}"))),
        }
    }

    fn start_draining(&mut self) -> Result<(), SourceError> {
        self.state = DecodeState::Draining;
        self.pending_packet = None;
        self.decoder
            .send_eof()
            .map_err(|error| self.decode_error(format!("flushing the decoder failed: {error}")))
    }

    /// Ends the stream: reports a read failure once, then `Ok(false)`.
    fn finish(&mut self) -> Result<bool, SourceError> {
        if self.state != DecodeState::Finished {
            self.state = DecodeState::Finished;
            log::info!(
                "{}: end of video after {} frames ({} with concealed decoding errors)",
                self.path.display(),
                self.next_index,
                self.damaged_frames
            );
        }
        match self.read_failure.take() {
            Some(reason) => Err(self.decode_error(reason)),
            None => Ok(false),
        }
    }

    /// Converts the decoded frame into `frame` and advances the frame index.
    fn deliver(&mut self, frame: &mut Frame) -> Result<(), SourceError> {
        if self.decoded.is_corrupt() || self.decoded.has_decode_errors() {
            if self.damaged_frames == 0 {
                log::warn!(
                    "{}: frame {} decoded with concealed errors; later ones are counted",
                    self.path.display(),
                    self.next_index
                );
            }
            self.damaged_frames += 1;
        }

        self.convert_to_rgb()?;
        let width = self.rgb.width() as usize;
        let height = self.rgb.height() as usize;
        let stride = self.rgb.stride(0);
        let row_bytes = width * 3;

        let timestamp = self.timestamp_of_decoded();
        frame.resize(width, height);
        let source = self.rgb.data(0);
        for (row, target) in frame.data.chunks_exact_mut(row_bytes).enumerate() {
            target.copy_from_slice(&source[row * stride..row * stride + row_bytes]);
        }
        frame.index = self.next_index;
        frame.timestamp = timestamp;
        self.consecutive_errors = 0;
        self.last_timestamp = Some(timestamp);
        self.next_index += 1;
        Ok(())
    }

    fn convert_to_rgb(&mut self) -> Result<(), SourceError> {
        // swscale warns about the deprecated full-range "J" formats, so they are passed as
        // their plain counterparts with the range given explicitly.
        let (format, full_range) = plain_pixel_format(self.decoded.format());
        if full_range {
            self.decoded.set_format(format);
            self.decoded.set_color_range(ffmpeg::color::Range::JPEG);
        }
        let key = ScalerKey {
            format,
            width: self.decoded.width(),
            height: self.decoded.height(),
            color_space: self.decoded.color_space(),
            color_range: self.decoded.color_range(),
        };
        if self.scaler.as_ref().map(|scaler| scaler.key) != Some(key) {
            if self.scaler.is_some() {
                log::info!(
                    "{}: frame {} changes the input to {}x{} {:?}",
                    self.path.display(),
                    self.next_index,
                    key.width,
                    key.height,
                    key.format
                );
            }
            self.scaler = Some(self.create_scaler(key)?);
            // The RGB frame is allocated by the first conversion at the new size.
            self.rgb = frame::Video::empty();
        }
        let scaler = self.scaler.as_mut().expect("scaler was created above");
        scaler
            .context
            .run(&self.decoded, &mut self.rgb)
            .map_err(|error| SourceError::Conversion {
                path: self.path.clone(),
                frame_index: self.next_index,
                reason: error.to_string(),
            })
    }

    fn create_scaler(&self, key: ScalerKey) -> Result<Scaler, SourceError> {
        let conversion_error = |reason: String| SourceError::Conversion {
            path: self.path.clone(),
            frame_index: self.next_index,
            reason,
        };
        if key.width == 0 || key.height == 0 || key.format == Pixel::None {
            return Err(conversion_error(format!(
                "the decoder returned an empty frame ({}x{} {:?})",
                key.width, key.height, key.format
            )));
        }
        // Bicubic is the FFmpeg command-line tool's default. Without resizing it only
        // affects chroma upsampling.
        let mut context = scaling::Context::get(
            key.format,
            key.width,
            key.height,
            Pixel::RGB24,
            key.width,
            key.height,
            scaling::Flags::BICUBIC,
        )
        .map_err(|error| {
            conversion_error(format!(
                "swscale rejects {:?} to RGB24: {error}",
                key.format
            ))
        })?;

        let full_range_input = key.color_range == ffmpeg::color::Range::JPEG;
        // SAFETY: the context pointer comes from a successful sws_getContext and is owned by
        // `context`. sws_getCoefficients returns a pointer to a static table of four ints for
        // any argument, and sws_setColorspaceDetails copies the tables it is given.
        let status = unsafe {
            let coefficients = ffmpeg::ffi::sws_getCoefficients(ffmpeg::ffi::AVColorSpace::from(
                key.color_space,
            ) as std::ffi::c_int);
            let rgb_coefficients =
                ffmpeg::ffi::sws_getCoefficients(ffmpeg::ffi::SWS_CS_DEFAULT as std::ffi::c_int);
            ffmpeg::ffi::sws_setColorspaceDetails(
                context.as_mut_ptr(),
                coefficients,
                std::ffi::c_int::from(full_range_input),
                rgb_coefficients,
                1,
                0,
                1 << 16,
                1 << 16,
            )
        };
        if status < 0 {
            // RGB and gray inputs have no YCbCr matrix, so swscale ignores the request.
            log::debug!(
                "{}: swscale kept its default colour details for {:?} ({status})",
                self.path.display(),
                key.format
            );
        }
        Ok(Scaler { context, key })
    }

    /// Returns the presentation time of the decoded frame relative to the stream start.
    /// A frame without a timestamp gets the previous one plus one frame interval.
    fn timestamp_of_decoded(&self) -> Duration {
        let pts = self.decoded.timestamp().or_else(|| self.decoded.pts());
        if let Some(pts) = pts {
            let relative = i128::from(pts) - i128::from(self.start_pts.unwrap_or(0));
            let numerator = i128::from(self.time_base.numerator());
            let denominator = i128::from(self.time_base.denominator());
            if denominator > 0 && numerator > 0 {
                let nanos = (relative.max(0) * numerator * 1_000_000_000) / denominator;
                return Duration::from_nanos(u64::try_from(nanos).unwrap_or(u64::MAX));
            }
        }
        let rate = self.frame_rate.unwrap_or(25.0);
        match self.last_timestamp {
            Some(last) => last + Duration::from_secs_f64(1.0 / rate),
            None => timestamp_at(self.next_index, rate),
        }
    }
}

impl FrameSource for VideoFile {
    fn next_frame(&mut self, frame: &mut Frame) -> Result<bool, SourceError> {
        loop {
            if self.state == DecodeState::Finished {
                return self.finish();
            }
            match self.decoder.receive_frame(&mut self.decoded) {
                Ok(()) => {
                    self.deliver(frame)?;
                    return Ok(true);
                }
                Err(ffmpeg::Error::Other { errno }) if errno == EAGAIN => {}
                Err(ffmpeg::Error::Eof) => return self.finish(),
                Err(error) => return Err(self.count_error(error.to_string())),
            }
            match self.state {
                DecodeState::Reading => self.feed_decoder()?,
                // A drained decoder returns end of stream, never "needs input"; stop anyway
                // rather than loop.
                DecodeState::Draining | DecodeState::Finished => return self.finish(),
            }
        }
    }

    fn describe(&self) -> String {
        format!(
            "video file {} ({} {}x{}, {})",
            self.path.display(),
            self.codec_name,
            self.decoder.width(),
            self.decoder.height(),
            self.frame_rate.map_or_else(
                || "unknown rate".to_string(),
                |rate| format!("{rate:.3} fps")
            ),
        )
    }

    fn nominal_frame_rate(&self) -> Option<f64> {
        self.frame_rate
    }
}

/// Maps a deprecated full-range YUVJ pixel format to the plain format with the same layout,
/// and returns whether it was one.
fn plain_pixel_format(format: Pixel) -> (Pixel, bool) {
    match format {
        Pixel::YUVJ420P => (Pixel::YUV420P, true),
        Pixel::YUVJ422P => (Pixel::YUV422P, true),
        Pixel::YUVJ444P => (Pixel::YUV444P, true),
        Pixel::YUVJ440P => (Pixel::YUV440P, true),
        Pixel::YUVJ411P => (Pixel::YUV411P, true),
        other => (other, false),
    }
}

fn rational_to_f64(value: Rational) -> Option<f64> {
    let (numerator, denominator) = (value.numerator(), value.denominator());
    (numerator > 0 && denominator > 0).then(|| f64::from(numerator) / f64::from(denominator))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn footage(name: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("data/footage")
            .join(name)
    }

    #[test]
    fn open_reports_stream_details() {
        let video = VideoFile::open(footage("solidWhiteRight.mp4")).unwrap();
        assert_eq!(video.nominal_frame_rate(), Some(25.0));
        let description = video.describe();
        assert!(description.contains("h264"), "{description}");
        assert!(description.contains("960x540"), "{description}");
    }

    #[test]
    fn audio_only_file_has_no_video_stream() {
        let directory = tempfile::tempdir().unwrap();
        let audio = directory.path().join("tone.wav");
        write_wav(&audio);
        let error = VideoFile::open(&audio)
            .err()
            .expect("a WAV file has no video stream");
        assert!(
            matches!(error, SourceError::NoVideoStream { .. }),
            "{error}"
        );
        assert!(error.to_string().contains("tone.wav"), "{error}");
    }

    /// Writes 0.1 s of silence as 16-bit mono PCM at 8 kHz.
    fn write_wav(path: &Path) {
        let samples = 800u32;
        let data_bytes = samples * 2;
        let mut bytes = Vec::new();
        bytes.extend_from_slice(b"RIFF");
        bytes.extend_from_slice(&(36 + data_bytes).to_le_bytes());
        bytes.extend_from_slice(b"WAVEfmt ");
        bytes.extend_from_slice(&16u32.to_le_bytes());
        bytes.extend_from_slice(&1u16.to_le_bytes()); // PCM
        bytes.extend_from_slice(&1u16.to_le_bytes()); // mono
        bytes.extend_from_slice(&8000u32.to_le_bytes());
        bytes.extend_from_slice(&16000u32.to_le_bytes()); // byte rate
        bytes.extend_from_slice(&2u16.to_le_bytes()); // block align
        bytes.extend_from_slice(&16u16.to_le_bytes()); // bits per sample
        bytes.extend_from_slice(b"data");
        bytes.extend_from_slice(&data_bytes.to_le_bytes());
        bytes.resize(bytes.len() + data_bytes as usize, 0);
        std::fs::write(path, bytes).unwrap();
    }
}
