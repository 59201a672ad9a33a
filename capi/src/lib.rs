//! C ABI of daain-edge for C and C++ vehicle stacks: create a detector from a bundle,
//! score RGB24 frames synchronously, and receive alerts through a callback.
//!
//! `include/daain.h` declares every function and type and documents the contract:
//! ownership, thread safety and the meaning of each status. The types here mirror the
//! header's, field by field.
//!
//! No panic crosses the boundary: every function runs its body under `catch_unwind` and
//! turns a panic into [`Status::Panic`]. That needs the default `panic = "unwind"`, which
//! every profile of this workspace keeps.

use std::cell::{RefCell, UnsafeCell};
use std::ffi::{c_char, c_void, CStr, CString};
use std::panic::{catch_unwind, resume_unwind, AssertUnwindSafe};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use daain::alert::{alert_due, AlertLevel, LevelTracker};
use daain::bundle::{Bundle, BundleError};
use daain::config::Config;
use daain::pipeline::{Detector, Scores, StageTimings};

/// Version of the ABI this library implements, `DAAIN_ABI_VERSION` in the header. It
/// changes whenever a function signature or a struct layout changes.
pub const ABI_VERSION: u32 = 1;

/// Result of every call, `daain_status` in the header.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Ok = 0,
    NullPointer = 1,
    InvalidArgument = 2,
    Config = 3,
    Bundle = 4,
    Frame = 5,
    Busy = 6,
    Panic = 7,
}

/// Alert level, `daain_level` in the header.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Level {
    Ok = 0,
    Warn = 1,
    Error = 2,
    Stale = 3,
}

impl From<AlertLevel> for Level {
    fn from(level: AlertLevel) -> Self {
        match level {
            AlertLevel::Ok => Level::Ok,
            AlertLevel::Warn => Level::Warn,
            AlertLevel::Error => Level::Error,
            AlertLevel::Stale => Level::Stale,
        }
    }
}

/// Every score of a frame, `daain_scores` in the header.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct FrameScores {
    pub hbos: f64,
    pub hbos_probability: f64,
    pub nll: f64,
    pub euclidean: f64,
    pub mahalanobis: f64,
}

impl FrameScores {
    const NAN: Self = Self {
        hbos: f64::NAN,
        hbos_probability: f64::NAN,
        nll: f64::NAN,
        euclidean: f64::NAN,
        mahalanobis: f64::NAN,
    };
}

impl From<&Scores> for FrameScores {
    fn from(scores: &Scores) -> Self {
        Self {
            hbos: scores.hbos,
            hbos_probability: scores.hbos_probability,
            nll: scores.nll,
            euclidean: scores.euclidean,
            mahalanobis: scores.mahalanobis,
        }
    }
}

/// Time per stage in milliseconds, `daain_timings` in the header.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct Timings {
    pub preprocess_ms: f64,
    pub backbone_ms: f64,
    pub sampling_ms: f64,
    pub flow_ms: f64,
    pub score_ms: f64,
    pub total_ms: f64,
}

/// Outcome of one scored frame, `daain_result` in the header.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct FrameResult {
    pub frame: u64,
    pub timestamp_ns: u64,
    pub score: f64,
    pub threshold: f64,
    pub anomalous: i32,
    pub level: Level,
    pub scores: FrameScores,
    pub timings: Timings,
}

/// One alert, `daain_alert` in the header. `message` points into a string that lives
/// until the callback returns.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct Alert {
    pub frame: u64,
    pub timestamp_ns: u64,
    pub score: f64,
    pub threshold: f64,
    pub level: Level,
    pub previous_level: Level,
    pub message: *const c_char,
}

/// `daain_alert_callback` in the header.
pub type AlertCallback = extern "C" fn(alert: *const Alert, user_data: *mut c_void);

/// The opaque `daain_detector`.
///
/// `busy` is set for the duration of every call that uses the state, so a second call
/// that overlaps it (from another thread, or from inside the alert callback) is rejected
/// instead of creating a second `&mut` to the state.
pub struct DaainDetector {
    busy: AtomicBool,
    state: UnsafeCell<State>,
}

struct State {
    detector: Detector<'static>,
    tracker: LevelTracker,
    callback: Option<(AlertCallback, *mut c_void)>,
    /// Frames that reached the detector, scored or failed.
    frames: u64,
    /// Set when a panic left the detector in an unknown state.
    poisoned: bool,
    /// Packed copy of the last frame that had row padding, reused between calls.
    packed: Vec<u8>,
}

/// A failed call: its status and the message for `daain_last_error`.
struct Failure {
    status: Status,
    message: String,
}

impl Failure {
    fn new(status: Status, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
        }
    }

    fn null(argument: &str) -> Self {
        Self::new(Status::NullPointer, format!("{argument} is NULL"))
    }
}

thread_local! {
    static LAST_ERROR: RefCell<CString> = RefCell::new(CString::default());
}

fn set_last_error(message: &str) {
    // An interior NUL would end the C string early, so it is written out.
    let message = CString::new(message.replace('\0', "\\0")).expect("NUL bytes were replaced");
    LAST_ERROR.with(|last| *last.borrow_mut() = message);
}

fn panic_message(payload: &(dyn std::any::Any + Send)) -> &str {
    if let Some(message) = payload.downcast_ref::<&str>() {
        message
    } else if let Some(message) = payload.downcast_ref::<String>() {
        message
    } else {
        "no message"
    }
}

/// Runs the body of the exported function `function`, catching panics, and records the
/// message of a failure for `daain_last_error`.
fn call(function: &str, body: impl FnOnce() -> Result<(), Failure>) -> Status {
    let failure = match catch_unwind(AssertUnwindSafe(body)) {
        Ok(Ok(())) => return Status::Ok,
        Ok(Err(failure)) => failure,
        Err(payload) => Failure::new(
            Status::Panic,
            format!(
                "internal error: {}; this is a bug in daain-edge, please report it",
                panic_message(payload.as_ref())
            ),
        ),
    };
    set_last_error(&format!("{function}: {}", failure.message));
    failure.status
}

/// Runs `body` with exclusive access to the detector's state. Marks the detector as
/// poisoned when `body` panics, and passes the panic on to [`call`].
///
/// # Safety
/// `detector` is NULL or a pointer returned by `daain_detector_create` and not yet
/// destroyed.
unsafe fn with_state<R>(
    detector: *mut DaainDetector,
    body: impl FnOnce(&mut State) -> Result<R, Failure>,
) -> Result<R, Failure> {
    // SAFETY: the caller passes NULL or a live detector.
    let handle = unsafe { detector.as_ref() }.ok_or_else(|| Failure::null("detector"))?;
    if handle
        .busy
        .compare_exchange(false, true, Ordering::Acquire, Ordering::Relaxed)
        .is_err()
    {
        return Err(Failure::new(
            Status::Busy,
            "the detector is in use by another call (from another thread or from its own \
             alert callback); use each detector from one thread at a time",
        ));
    }
    let _release = ReleaseOnDrop(&handle.busy);
    // SAFETY: the busy flag was false and is now set by this call, so no other reference
    // to the state exists until `_release` clears it.
    let state = unsafe { &mut *handle.state.get() };
    if state.poisoned {
        return Err(Failure::new(
            Status::Panic,
            "the detector is unusable after an internal error: destroy it and create a new one",
        ));
    }
    match catch_unwind(AssertUnwindSafe(|| body(&mut *state))) {
        Ok(result) => result,
        Err(payload) => {
            state.poisoned = true;
            resume_unwind(payload)
        }
    }
}

/// Clears the busy flag when the call ends, also by a panic.
struct ReleaseOnDrop<'a>(&'a AtomicBool);

impl Drop for ReleaseOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Release);
    }
}

/// Reads a path argument. NULL gives `None`.
///
/// # Safety
/// `path` is NULL or points to a NUL-terminated string.
unsafe fn path_argument(path: *const c_char, argument: &str) -> Result<Option<PathBuf>, Failure> {
    if path.is_null() {
        return Ok(None);
    }
    // SAFETY: the caller passes a NUL-terminated string.
    let bytes = unsafe { CStr::from_ptr(path) }.to_bytes();
    if bytes.is_empty() {
        return Err(Failure::new(
            Status::InvalidArgument,
            format!("{argument} is an empty string: pass a path or NULL"),
        ));
    }
    #[cfg(unix)]
    {
        use std::os::unix::ffi::OsStrExt;
        Ok(Some(PathBuf::from(std::ffi::OsStr::from_bytes(bytes))))
    }
    #[cfg(not(unix))]
    {
        let text = std::str::from_utf8(bytes).map_err(|_| {
            Failure::new(
                Status::InvalidArgument,
                format!("{argument} is not valid UTF-8"),
            )
        })?;
        Ok(Some(PathBuf::from(text)))
    }
}

/// Formats an error with its chain of causes, `outer: inner: innermost`.
fn error_chain(error: impl std::error::Error + Send + Sync + 'static) -> String {
    format!("{:#}", anyhow::Error::new(error))
}

/// Returns [`ABI_VERSION`], so a program can check that the library it loaded matches the
/// header it was compiled with.
#[no_mangle]
pub extern "C" fn daain_abi_version() -> u32 {
    ABI_VERSION
}

/// Returns the message of the last failed call on this thread, or an empty string when no
/// call on this thread has failed. The pointer stays valid until the next failed call on
/// this thread.
#[no_mangle]
pub extern "C" fn daain_last_error() -> *const c_char {
    LAST_ERROR.with(|last| last.borrow().as_ptr())
}

/// Returns the name of a level (`"OK"`, `"WARN"`, `"ERROR"`, `"STALE"`), or `"UNKNOWN"`
/// for a value outside the enum. Takes the raw value so that no invalid enum value is
/// ever materialised in Rust.
#[no_mangle]
pub extern "C" fn daain_level_name(level: i32) -> *const c_char {
    let name: &'static CStr = match level {
        0 => c"OK",
        1 => c"WARN",
        2 => c"ERROR",
        3 => c"STALE",
        _ => c"UNKNOWN",
    };
    name.as_ptr()
}

/// Returns the name of a status, such as `"DAAIN_ERROR_BUNDLE"`, or `"UNKNOWN"`.
#[no_mangle]
pub extern "C" fn daain_status_name(status: i32) -> *const c_char {
    let name: &'static CStr = match status {
        0 => c"DAAIN_OK",
        1 => c"DAAIN_ERROR_NULL_POINTER",
        2 => c"DAAIN_ERROR_INVALID_ARGUMENT",
        3 => c"DAAIN_ERROR_CONFIG",
        4 => c"DAAIN_ERROR_BUNDLE",
        5 => c"DAAIN_ERROR_FRAME",
        6 => c"DAAIN_ERROR_BUSY",
        7 => c"DAAIN_ERROR_PANIC",
        _ => c"UNKNOWN",
    };
    name.as_ptr()
}

/// Opens a bundle, loads its backbone and creates a detector. See the header.
///
/// # Safety
/// `bundle_dir` and `config_path` are NULL or NUL-terminated strings, and `out` is NULL or
/// valid for a pointer write.
#[no_mangle]
pub unsafe extern "C" fn daain_detector_create(
    bundle_dir: *const c_char,
    config_path: *const c_char,
    out: *mut *mut DaainDetector,
) -> Status {
    call("daain_detector_create", || {
        if out.is_null() {
            return Err(Failure::null("out"));
        }
        // SAFETY: `out` is non-null, and the header requires it to be valid for writes.
        // Writing NULL first leaves NULL in it on every failure below.
        unsafe { out.write(std::ptr::null_mut()) };
        // SAFETY: both strings are NULL or NUL-terminated.
        let bundle_dir = unsafe { path_argument(bundle_dir, "bundle_dir") }?;
        let config_path = unsafe { path_argument(config_path, "config_path") }?;

        let config = match &config_path {
            Some(path) => {
                Config::from_path(path).map_err(|e| Failure::new(Status::Config, error_chain(e)))?
            }
            None => Config::default(),
        };
        let bundle_dir = bundle_dir
            .or_else(|| config.bundle.clone())
            .ok_or_else(|| {
                Failure::new(
                    Status::NullPointer,
                    "bundle_dir is NULL and no config names a bundle: pass the bundle directory",
                )
            })?;
        let bundle = Bundle::open(&bundle_dir).map_err(|e| match e {
            // The library's own message names the CLI's --bundle option.
            BundleError::MissingDirectory(dir) => Failure::new(
                Status::Bundle,
                format!(
                    "bundle directory {} not found: pass bundle_dir, a directory made by \
                     `daain-tools export` such as models/default",
                    dir.display()
                ),
            ),
            other => Failure::new(Status::Bundle, error_chain(other)),
        })?;
        let options = daain::pipeline::DetectorOptions {
            threshold: config.detector.threshold,
            precision: config.detector.backbone,
            threads: config.detector.threads,
            execution: config.detector.execution,
        };
        let detector = Detector::with_options(&bundle, &options)
            .map_err(|e| {
                Failure::new(
                    Status::Bundle,
                    format!("bundle {}: {}", bundle_dir.display(), error_chain(e)),
                )
            })?
            .into_owned();
        let state = State {
            detector,
            tracker: LevelTracker::new(config.alerts.raise_after, config.alerts.clear_after),
            callback: None,
            frames: 0,
            poisoned: false,
            packed: Vec::new(),
        };
        let handle = Box::new(DaainDetector {
            busy: AtomicBool::new(false),
            state: UnsafeCell::new(state),
        });
        // SAFETY: checked non-NULL above.
        unsafe { out.write(Box::into_raw(handle)) };
        Ok(())
    })
}

/// Destroys a detector. NULL is accepted and does nothing. See the header.
///
/// # Safety
/// `detector` is NULL or a live detector that no other call is using.
#[no_mangle]
pub unsafe extern "C" fn daain_detector_destroy(detector: *mut DaainDetector) -> Status {
    call("daain_detector_destroy", || {
        if detector.is_null() {
            return Ok(());
        }
        // SAFETY: a live detector, per the contract.
        let handle = unsafe { &*detector };
        if handle.busy.load(Ordering::Acquire) {
            return Err(Failure::new(
                Status::Busy,
                "the detector is in use (destroy called from its alert callback or during \
                 another call): destroy it after that call returns",
            ));
        }
        // SAFETY: the pointer came from `Box::into_raw` in `daain_detector_create`, and the
        // caller gives up every use of it with this call.
        drop(unsafe { Box::from_raw(detector) });
        Ok(())
    })
}

/// Sets or, with a NULL `callback`, removes the alert callback. See the header.
///
/// # Safety
/// `detector` is NULL or a live detector.
#[no_mangle]
pub unsafe extern "C" fn daain_set_alert_callback(
    detector: *mut DaainDetector,
    callback: Option<AlertCallback>,
    user_data: *mut c_void,
) -> Status {
    call("daain_set_alert_callback", || {
        // SAFETY: NULL or a live detector, per the contract.
        unsafe {
            with_state(detector, |state| {
                state.callback = callback.map(|callback| (callback, user_data));
                Ok(())
            })
        }
    })
}

/// Checks the frame arguments and returns the number of bytes the frame spans.
fn frame_span(rgb_len: usize, width: u32, height: u32, stride: usize) -> Result<usize, Failure> {
    let invalid = |message: String| Failure::new(Status::InvalidArgument, message);
    if width == 0 || height == 0 {
        return Err(invalid(format!(
            "frame size {width}x{height} is empty: pass the width and height in pixels"
        )));
    }
    let row = width as usize * 3;
    if stride < row {
        return Err(invalid(format!(
            "stride {stride} is smaller than one row of {width} RGB24 pixels ({row} bytes): \
             pass the distance between rows in bytes, at least width * 3"
        )));
    }
    let span = stride
        .checked_mul(height as usize - 1)
        .and_then(|rows| rows.checked_add(row))
        .ok_or_else(|| {
            invalid(format!(
                "a {width}x{height} frame with stride {stride} spans more bytes than fit in size_t"
            ))
        })?;
    if rgb_len < span {
        return Err(invalid(format!(
            "rgb_len {rgb_len} is smaller than the {span} bytes a {width}x{height} frame with \
             stride {stride} spans"
        )));
    }
    Ok(span)
}

/// Scores one RGB24 frame. See the header.
///
/// # Safety
/// `detector` is NULL or a live detector, `rgb` is NULL or readable for `rgb_len` bytes,
/// and `out` is NULL or valid for a write of one `daain_result`.
#[no_mangle]
#[allow(clippy::too_many_arguments)]
pub unsafe extern "C" fn daain_score_rgb(
    detector: *mut DaainDetector,
    rgb: *const u8,
    rgb_len: usize,
    width: u32,
    height: u32,
    stride: usize,
    timestamp_ns: u64,
    out: *mut FrameResult,
) -> Status {
    call("daain_score_rgb", || {
        let started = Instant::now();
        if detector.is_null() {
            return Err(Failure::null("detector"));
        }
        if rgb.is_null() {
            return Err(Failure::null("rgb"));
        }
        if out.is_null() {
            return Err(Failure::null("out"));
        }
        let span = frame_span(rgb_len, width, height, stride)?;
        // SAFETY: the caller guarantees `rgb_len` readable bytes, and `span <= rgb_len`.
        let bytes = unsafe { std::slice::from_raw_parts(rgb, span) };
        // SAFETY: a live detector, per the contract.
        unsafe {
            with_state(detector, |state| {
                let frame = Frame {
                    bytes,
                    width: width as usize,
                    height: height as usize,
                    stride,
                    timestamp_ns,
                };
                state.score(&frame, started, out)
            })
        }
    })
}

/// The frame arguments of one `daain_score_rgb` call, after checking.
struct Frame<'a> {
    bytes: &'a [u8],
    width: usize,
    height: usize,
    stride: usize,
    timestamp_ns: u64,
}

impl State {
    /// Scores the frame, writes the result to `out`, updates the level and calls the alert
    /// callback when an alert is due.
    fn score(
        &mut self,
        frame: &Frame<'_>,
        started: Instant,
        out: *mut FrameResult,
    ) -> Result<(), Failure> {
        let row = frame.width * 3;
        let pixels = if frame.stride == row {
            frame.bytes
        } else {
            self.packed.clear();
            for line in frame.bytes.chunks(frame.stride).take(frame.height) {
                self.packed.extend_from_slice(&line[..row]);
            }
            &self.packed
        };
        let mut timings = StageTimings::default();
        let scored = self
            .detector
            .sample_rgb(pixels, frame.width, frame.height, false, &mut timings)
            .and_then(|()| self.detector.score_sample(&mut timings));

        let index = self.frames;
        self.frames += 1;
        let threshold = self.detector.threshold();
        let previous = self.tracker.level();
        let (score, scores, anomalous, level, failure) = match scored {
            Ok(scores) => {
                let score = scores.get(self.detector.score_kind());
                let anomalous = score > threshold;
                let level = self.tracker.update(anomalous);
                (score, FrameScores::from(&scores), anomalous, level, None)
            }
            Err(error) => {
                let message = format!("frame {index} could not be scored: {}", error_chain(error));
                let level = self.tracker.fail();
                (f64::NAN, FrameScores::NAN, true, level, Some(message))
            }
        };
        let result = FrameResult {
            frame: index,
            timestamp_ns: frame.timestamp_ns,
            score,
            threshold,
            anomalous: i32::from(anomalous),
            level: level.into(),
            scores,
            timings: Timings {
                preprocess_ms: timings.preprocess_ms,
                backbone_ms: timings.backbone_ms,
                sampling_ms: timings.sampling_ms,
                flow_ms: timings.flow_ms,
                score_ms: timings.score_ms,
                total_ms: started.elapsed().as_secs_f64() * 1e3,
            },
        };
        // SAFETY: `out` was checked non-NULL and is valid for one write, per the contract.
        unsafe { out.write(result) };

        if alert_due(previous, level) {
            self.send_alert(&result, previous, failure.as_deref().unwrap_or(""));
        }
        match failure {
            None => Ok(()),
            Some(message) => Err(Failure::new(Status::Frame, message)),
        }
    }

    fn send_alert(&self, result: &FrameResult, previous: AlertLevel, message: &str) {
        let Some((callback, user_data)) = self.callback else {
            return;
        };
        let message = CString::new(message.replace('\0', "\\0")).expect("NUL bytes were replaced");
        let alert = Alert {
            frame: result.frame,
            timestamp_ns: result.timestamp_ns,
            score: result.score,
            threshold: result.threshold,
            level: result.level,
            previous_level: previous.into(),
            message: message.as_ptr(),
        };
        callback(&alert, user_data);
    }
}
