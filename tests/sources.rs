//! Frame sources on real footage: the shipped clips and stills under data/footage and the
//! small recordings under tests/data/sources (tests/data/README.md gives the command that made each).
//! Reference images are the FFmpeg 5.1 command-line tool's own RGB24 decode of the same
//! frame, so these tests compare the Rust decode path against FFmpeg itself.

use std::path::{Path, PathBuf};
use std::time::Duration;

use daain::source::{
    convert, open_path, CameraPixelFormat, CaptureConverter, Frame, FrameSource, ImageSequence,
    RawFrames, SourceError, SourceOptions, SourceSpec,
};

fn footage(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("data/footage")
        .join(name)
}

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data/sources")
        .join(name)
}

/// Loads a reference PNG as packed RGB24 with its width and height.
fn reference_rgb(name: &str) -> (Vec<u8>, usize, usize) {
    let image = image::open(fixture(name))
        .expect("reference image loads")
        .to_rgb8();
    let (width, height) = image.dimensions();
    (image.into_raw(), width as usize, height as usize)
}

/// Largest per-channel difference allowed against a reference frame. The references were
/// converted to RGB by x86_64 FFmpeg. On aarch64, FFmpeg's swscale takes its NEON paths,
/// which round differently: Debian's FFmpeg 5.1 under qemu (Cortex-A72) gave a mean
/// difference of 0.66 to 1.02 and a maximum of 3. A wrong colour range or matrix shifts
/// most pixels by far more than either bound.
#[cfg(not(target_arch = "aarch64"))]
const MAX_DIFFERENCE: u8 = 2;
#[cfg(target_arch = "aarch64")]
const MAX_DIFFERENCE: u8 = 3;
/// Largest mean per-channel difference allowed against a reference frame.
#[cfg(not(target_arch = "aarch64"))]
const MEAN_DIFFERENCE: f64 = 0.1;
#[cfg(target_arch = "aarch64")]
const MEAN_DIFFERENCE: f64 = 1.5;

/// Per-channel absolute differences: maximum, mean, and the share of values above 2.
struct Difference {
    max: u8,
    mean: f64,
    share_above_2: f64,
}

fn difference(actual: &[u8], expected: &[u8]) -> Difference {
    assert_eq!(actual.len(), expected.len(), "buffers differ in length");
    let mut max = 0u8;
    let mut sum = 0u64;
    let mut above_2 = 0usize;
    for (&a, &b) in actual.iter().zip(expected) {
        let delta = a.abs_diff(b);
        max = max.max(delta);
        sum += u64::from(delta);
        if delta > 2 {
            above_2 += 1;
        }
    }
    Difference {
        max,
        mean: sum as f64 / actual.len() as f64,
        share_above_2: above_2 as f64 / actual.len() as f64,
    }
}

fn mean_brightness(frame: &Frame) -> f64 {
    frame
        .data
        .iter()
        .map(|&value| f64::from(value))
        .sum::<f64>()
        / frame.data.len() as f64
}

/// Reads every frame, failing the test on any error.
fn decode_all(source: &mut dyn FrameSource) -> Vec<Frame> {
    let mut frames = Vec::new();
    let mut frame = Frame::new();
    while source.next_frame(&mut frame).expect("frame decodes") {
        frames.push(frame.clone());
    }
    frames
}

fn assert_timestamps(frames: &[Frame], interval: Duration) {
    for (position, frame) in frames.iter().enumerate() {
        assert_eq!(frame.index, position as u64, "frame index");
        let expected = interval * position as u32;
        let error = frame.timestamp.abs_diff(expected);
        assert!(
            error <= Duration::from_micros(100),
            "frame {position}: timestamp {:?}, expected {expected:?}",
            frame.timestamp
        );
    }
}

#[cfg(feature = "ffmpeg")]
mod video {
    use super::*;
    use daain::source::VideoFile;
    use rand::{RngCore, SeedableRng};

    #[test]
    fn mp4_decodes_all_frames() {
        let mut video = VideoFile::open(footage("solidWhiteRight.mp4")).unwrap();
        assert_eq!(video.nominal_frame_rate(), Some(25.0));
        let frames = decode_all(&mut video);

        assert_eq!(frames.len(), 221);
        for frame in &frames {
            assert_eq!(
                (frame.width, frame.height),
                (960, 540),
                "frame {}",
                frame.index
            );
            assert_eq!(frame.data.len(), 960 * 540 * 3, "frame {}", frame.index);
        }
        assert_timestamps(&frames, Duration::from_millis(40));
        let brightness = mean_brightness(&frames[0]);
        assert!(
            (40.0..200.0).contains(&brightness),
            "first frame brightness {brightness}"
        );
        assert!(
            !video.next_frame(&mut Frame::new()).unwrap(),
            "end of stream repeats"
        );
    }

    #[test]
    fn mp4_first_frame_matches_ffmpeg() {
        let mut video = VideoFile::open(footage("solidWhiteRight.mp4")).unwrap();
        let mut frame = Frame::new();
        assert!(video.next_frame(&mut frame).unwrap());
        let (expected, width, height) = reference_rgb("solidWhiteRight_frame0_ffmpeg_rgb24.png");
        assert_eq!((frame.width, frame.height), (width, height));

        let difference = difference(&frame.data, &expected);
        assert!(difference.max <= MAX_DIFFERENCE, "max difference {}", difference.max);
        assert!(
            difference.mean <= MEAN_DIFFERENCE,
            "mean difference {}",
            difference.mean
        );
    }

    #[test]
    fn video_reuses_frame_buffer() {
        let mut video = VideoFile::open(footage("solidWhiteRight.mp4")).unwrap();
        let mut frame = Frame::new();
        assert!(video.next_frame(&mut frame).unwrap());
        let buffer = frame.data.as_ptr();
        for _ in 0..5 {
            assert!(video.next_frame(&mut frame).unwrap());
            assert_eq!(
                frame.data.as_ptr(),
                buffer,
                "frame {} reallocated",
                frame.index
            );
        }
    }

    #[test]
    fn bframes_in_presentation_order() {
        let mut video = VideoFile::open(fixture("h264_bframes_480x270.mp4")).unwrap();
        let frames = decode_all(&mut video);

        // All 30 frames, including those the decoder holds back for reordering at the end.
        assert_eq!(frames.len(), 30);
        assert_timestamps(&frames, Duration::from_millis(40));
        for (index, name) in [
            (1, "h264_bframes_480x270_frame1_ffmpeg_rgb24.png"),
            (29, "h264_bframes_480x270_frame29_ffmpeg_rgb24.png"),
        ] {
            let (expected, width, height) = reference_rgb(name);
            let frame = &frames[index];
            assert_eq!((frame.width, frame.height), (width, height));
            let difference = difference(&frame.data, &expected);
            assert!(
                difference.max <= MAX_DIFFERENCE,
                "frame {index}: max difference {}",
                difference.max
            );
            assert!(
                difference.mean <= MEAN_DIFFERENCE,
                "frame {index}: mean {}",
                difference.mean
            );
        }
    }

    #[test]
    fn vtest_avi_decodes() {
        let mut video = VideoFile::open(footage("vtest.avi")).unwrap();
        assert_eq!(video.nominal_frame_rate(), Some(10.0));
        let frames = decode_all(&mut video);

        assert_eq!(frames.len(), 795);
        for frame in &frames {
            assert_eq!(
                (frame.width, frame.height),
                (768, 576),
                "frame {}",
                frame.index
            );
        }
        assert_timestamps(&frames, Duration::from_millis(100));
        let brightness = mean_brightness(&frames[0]);
        assert!(
            (40.0..220.0).contains(&brightness),
            "first frame brightness {brightness}"
        );
    }

    #[test]
    fn mjpeg_avi_decodes() {
        let mut video = VideoFile::open(fixture("mjpeg_480x270.avi")).unwrap();
        assert!(video.describe().contains("mjpeg"), "{}", video.describe());
        let frames = decode_all(&mut video);

        assert_eq!(frames.len(), 20);
        for frame in &frames {
            assert_eq!(
                (frame.width, frame.height),
                (480, 270),
                "frame {}",
                frame.index
            );
        }
        assert_timestamps(&frames, Duration::from_millis(40));

        // MJPEG decodes to full-range YCbCr; a wrong range would shift every pixel.
        let (expected, _, _) = reference_rgb("mjpeg_480x270_frame0_ffmpeg_rgb24.png");
        let difference = difference(&frames[0].data, &expected);
        assert!(difference.max <= MAX_DIFFERENCE, "max difference {}", difference.max);
        assert!(
            difference.mean <= MEAN_DIFFERENCE,
            "mean difference {}",
            difference.mean
        );
    }

    #[test]
    fn truncated_mp4_keeps_earlier_frames() {
        let full_path = footage("solidWhiteRight.mp4");
        let bytes = std::fs::read(&full_path).unwrap();
        let directory = tempfile::tempdir().unwrap();
        let truncated_path = directory.path().join("truncated.mp4");
        std::fs::write(&truncated_path, &bytes[..bytes.len() * 6 / 10]).unwrap();

        let mut truncated = VideoFile::open(&truncated_path).unwrap();
        let mut frames = Vec::new();
        let mut errors = Vec::new();
        let mut frame = Frame::new();
        // Bounded: a source that never ends fails the test instead of hanging it.
        for _ in 0..1000 {
            match truncated.next_frame(&mut frame) {
                Ok(true) => frames.push(frame.clone()),
                Ok(false) => break,
                Err(error) => errors.push(error),
            }
        }
        assert!(!truncated.next_frame(&mut frame).unwrap(), "stream ended");
        for error in &errors {
            let SourceError::Decode { frame_index, .. } = error else {
                panic!("unexpected error kind: {error}");
            };
            assert!(*frame_index <= frames.len() as u64, "{error}");
            assert!(error.to_string().contains("truncated.mp4"), "{error}");
        }

        // 60 % of the bytes hold more than half of the frames; the file ends inside one.
        assert!(frames.len() > 110, "only {} frames delivered", frames.len());
        assert!(
            frames.len() < 221,
            "{} frames from a truncated file",
            frames.len()
        );
        assert_timestamps(&frames, Duration::from_millis(40));

        // Every frame but the last one cut off matches the intact file.
        let mut intact = VideoFile::open(&full_path).unwrap();
        let mut reference = Frame::new();
        for delivered in &frames[..frames.len() - 1] {
            assert!(intact.next_frame(&mut reference).unwrap());
            assert!(
                delivered.data == reference.data,
                "frame {} differs",
                delivered.index
            );
        }
    }

    #[test]
    fn damaged_mp4_continues_after_damage() {
        let mut bytes = std::fs::read(footage("solidWhiteRight.mp4")).unwrap();
        let middle = bytes.len() / 2;
        rand_chacha::ChaCha8Rng::seed_from_u64(11).fill_bytes(&mut bytes[middle..middle + 8192]);
        let directory = tempfile::tempdir().unwrap();
        let path = directory.path().join("damaged.mp4");
        std::fs::write(&path, &bytes).unwrap();

        let mut video = VideoFile::open(&path).unwrap();
        let mut frames = Vec::new();
        let mut errors = Vec::new();
        let mut frame = Frame::new();
        for _ in 0..1000 {
            match video.next_frame(&mut frame) {
                Ok(true) => frames.push((frame.index, frame.timestamp)),
                Ok(false) => break,
                Err(error) => errors.push(error),
            }
        }
        assert!(!video.next_frame(&mut frame).unwrap(), "stream ended");
        for error in &errors {
            assert!(matches!(error, SourceError::Decode { .. }), "{error}");
        }

        // The container index is intact, so FFmpeg resynchronises after the damaged bytes:
        // at most the frames of the damaged packets and those predicted from them are lost.
        assert!(
            frames.len() >= 200,
            "only {} frames delivered",
            frames.len()
        );
        for pair in frames.windows(2) {
            assert_eq!(pair[1].0, pair[0].0 + 1, "frame indices are consecutive");
            assert!(
                pair[1].1 > pair[0].1,
                "timestamps increase at frame {}",
                pair[1].0
            );
        }
    }

    #[test]
    fn random_bytes_rejected() {
        let directory = tempfile::tempdir().unwrap();
        let path = directory.path().join("noise.mp4");
        let mut bytes = vec![0u8; 64 * 1024];
        rand_chacha::ChaCha8Rng::seed_from_u64(7).fill_bytes(&mut bytes);
        std::fs::write(&path, &bytes).unwrap();

        let error = VideoFile::open(&path)
            .err()
            .expect("random bytes are no video");
        assert!(matches!(error, SourceError::NotAVideo { .. }), "{error}");
        assert!(error.to_string().contains("noise.mp4"), "{error}");

        let error = open_path(&path, &SourceOptions::default()).err().unwrap();
        assert!(matches!(error, SourceError::NotAVideo { .. }), "{error}");
    }

    #[test]
    fn missing_video_rejected() {
        let path = footage("no_such_clip.mp4");
        let error = VideoFile::open(&path).err().expect("missing file");
        assert!(matches!(error, SourceError::NotFound { .. }), "{error}");
        assert!(error.to_string().contains("no_such_clip.mp4"), "{error}");

        let error = open_path(&path, &SourceOptions::default()).err().unwrap();
        assert!(matches!(error, SourceError::NotFound { .. }), "{error}");
    }

    #[test]
    fn open_path_picks_video() {
        let mut source = open_path(footage("vtest.avi"), &SourceOptions::default()).unwrap();
        assert!(
            source.describe().starts_with("video file"),
            "{}",
            source.describe()
        );
        let mut frame = Frame::new();
        assert!(source.next_frame(&mut frame).unwrap());
        assert_eq!((frame.width, frame.height), (768, 576));
    }
}

#[test]
fn stills_from_footage_directory() {
    let interval = Duration::from_millis(250);
    let mut stills = ImageSequence::from_directory(footage(""), interval).unwrap();
    let names: Vec<String> = stills
        .paths()
        .iter()
        .map(|path| path.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    assert_eq!(
        names,
        [
            "solidWhiteCurve.jpg",
            "solidYellowCurve.jpg",
            "test1.jpg",
            "test3.jpg",
            "test5.jpg",
            "whiteCarLaneSwitch.jpg"
        ]
    );
    assert_eq!(stills.nominal_frame_rate(), Some(4.0));

    let frames = decode_all(&mut stills);
    let sizes: Vec<(usize, usize)> = frames
        .iter()
        .map(|frame| (frame.width, frame.height))
        .collect();
    assert_eq!(
        sizes,
        [
            (960, 540),
            (960, 540),
            (1280, 720),
            (1280, 720),
            (1280, 720),
            (960, 540)
        ]
    );
    assert_timestamps(&frames, interval);
    for frame in &frames {
        let brightness = mean_brightness(frame);
        assert!(
            (30.0..220.0).contains(&brightness),
            "still {}: {brightness}",
            frame.index
        );
    }
}

#[test]
fn still_list_keeps_order() {
    let paths = [footage("test5.jpg"), footage("solidWhiteCurve.jpg")];
    let spec = SourceSpec::from_paths(&paths).unwrap();
    let options = SourceOptions::default();
    let mut source = daain::source::open_source(&spec, &options).unwrap();
    let frames = decode_all(&mut source);
    assert_eq!(frames.len(), 2);
    assert_eq!((frames[0].width, frames[0].height), (1280, 720));
    assert_eq!((frames[1].width, frames[1].height), (960, 540));
    assert_eq!(frames[1].timestamp, options.still_interval);
}

#[test]
fn missing_still_rejected() {
    let error = ImageSequence::from_paths(vec![footage("gone.jpg")], Duration::from_millis(40))
        .unwrap_err();
    assert!(matches!(error, SourceError::NotFound { .. }), "{error}");
    assert!(error.to_string().contains("gone.jpg"), "{error}");
}

#[test]
fn yuyv_recording_matches_ffmpeg() {
    let mut raw =
        RawFrames::open_yuyv(fixture("yuyv422_320x180_3frames.raw"), 320, 180, 30.0).unwrap();
    let frames = decode_all(&mut raw);
    assert_eq!(frames.len(), 3);
    assert_timestamps(&frames, Duration::from_secs_f64(1.0 / 30.0));

    // FFmpeg with exact rounding and per-pair chroma computes what convert.rs computes.
    let (accurate, width, height) =
        reference_rgb("yuyv422_320x180_frame0_ffmpeg_accurate_rgb24.png");
    assert_eq!((frames[0].width, frames[0].height), (width, height));
    let exact = difference(&frames[0].data, &accurate);
    assert!(exact.max <= 1, "max difference {}", exact.max);
    assert!(exact.mean <= 0.1, "mean difference {}", exact.mean);

    // FFmpeg's default conversion takes a faster path that comes out about 1.4 levels darker.
    let (default, _, _) = reference_rgb("yuyv422_320x180_frame0_ffmpeg_rgb24.png");
    let fast = difference(&frames[0].data, &default);
    assert!(fast.max <= 3, "max difference {}", fast.max);
    assert!(fast.mean <= 2.0, "mean difference {}", fast.mean);
}

#[test]
fn mjpeg_frame_matches_ffmpeg() {
    let jpeg = std::fs::read(fixture("mjpeg_320x180.jpg")).unwrap();
    let mut frame = Frame::new();
    convert::mjpeg_to_rgb24(&jpeg, &mut frame.data).unwrap();
    let (expected, _, _) = reference_rgb("mjpeg_320x180_ffmpeg_rgb24.png");

    let difference = difference(&frame.data, &expected);
    assert!(difference.max <= 12, "max difference {}", difference.max);
    assert!(
        difference.mean <= 1.5,
        "mean difference {}",
        difference.mean
    );
    assert!(
        difference.share_above_2 <= 0.1,
        "share above 2: {}",
        difference.share_above_2
    );
}

/// Removes every DHT (Huffman table) segment from a baseline JPEG, as many USB cameras send
/// their MJPEG frames.
fn strip_huffman_tables(jpeg: &[u8]) -> Vec<u8> {
    let mut stripped = jpeg[..2].to_vec();
    let mut position = 2;
    while position + 4 <= jpeg.len() {
        assert_eq!(jpeg[position], 0xFF, "segment marker at {position}");
        let marker = jpeg[position + 1];
        if marker == 0xDA {
            stripped.extend_from_slice(&jpeg[position..]);
            return stripped;
        }
        let length = usize::from(u16::from_be_bytes([jpeg[position + 2], jpeg[position + 3]]));
        if marker != 0xC4 {
            stripped.extend_from_slice(&jpeg[position..position + 2 + length]);
        }
        position += 2 + length;
    }
    panic!("no start-of-scan marker");
}

#[test]
fn mjpeg_without_huffman_tables() {
    let jpeg = std::fs::read(fixture("mjpeg_320x180.jpg")).unwrap();
    let stripped = strip_huffman_tables(&jpeg);
    assert!(
        stripped.len() < jpeg.len(),
        "fixture has Huffman tables to strip"
    );

    let mut with_tables = Vec::new();
    let mut without_tables = Vec::new();
    let size = convert::mjpeg_to_rgb24(&jpeg, &mut with_tables).unwrap();
    let stripped_size = convert::mjpeg_to_rgb24(&stripped, &mut without_tables).unwrap();
    assert_eq!(size, (320, 180));
    assert_eq!(stripped_size, size);
    assert!(
        with_tables == without_tables,
        "default tables decode differently"
    );
}

#[test]
fn mjpeg_capture_through_camera_path() {
    let jpeg = std::fs::read(fixture("mjpeg_320x180.jpg")).unwrap();
    let mut frame = Frame::new();
    let mut converter = CaptureConverter::new();
    // The negotiated size is ignored for MJPEG: the JPEG header gives the size.
    converter
        .write(CameraPixelFormat::Mjpeg, &jpeg, 640, 480, 0, &mut frame)
        .unwrap();
    assert_eq!((frame.width, frame.height), (320, 180));
    assert_eq!(frame.data.len(), 320 * 180 * 3);
}

#[test]
fn truncated_yuyv_recording() {
    let bytes = std::fs::read(fixture("yuyv422_320x180_3frames.raw")).unwrap();
    let directory = tempfile::tempdir().unwrap();
    let path = directory.path().join("cut.yuyv");
    let frame_bytes = 320 * 180 * 2;
    std::fs::write(&path, &bytes[..frame_bytes + 1000]).unwrap();

    let mut raw = RawFrames::open_yuyv(&path, 320, 180, 30.0).unwrap();
    let mut frame = Frame::new();
    assert!(raw.next_frame(&mut frame).unwrap());
    let error = raw.next_frame(&mut frame).unwrap_err();
    assert!(
        matches!(
            error,
            SourceError::TruncatedRawFrame {
                frame_index: 1,
                actual: 1000,
                ..
            }
        ),
        "{error}"
    );
    assert!(error.to_string().contains("cut.yuyv"), "{error}");
    assert!(!raw.next_frame(&mut frame).unwrap());
}
