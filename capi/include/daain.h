/*
 * daain.h: C ABI of daain-edge, which scores each camera frame given to a segmentation
 * network (ESPNet) for anomalous or adversarial input with DAAIN (activations sampled
 * at a fixed mask, a normalizing flow, an outlier score and a calibrated threshold).
 *
 * Build the library with `cargo build --release -p daain-capi`, which writes
 * target/release/libdaain_capi.so and libdaain_capi.a. Link with -ldaain_capi. The
 * static library also needs the system libraries that
 * `cargo rustc --release -p daain-capi --crate-type staticlib -- --print native-static-libs`
 * lists.
 *
 * Usage: create a detector from a bundle directory, optionally register an alert
 * callback, call daain_score_rgb once per frame, and destroy the detector.
 *
 * Errors: every function that can fail returns a daain_status. DAAIN_OK is 0 and every
 * error is non-zero. On an error, daain_last_error() returns a message that names the
 * function, the value that failed and what to do. Output arguments are left unchanged
 * on an error, except where a function documents otherwise. No Rust panic crosses this
 * boundary: an internal error returns DAAIN_ERROR_PANIC.
 *
 * Ownership: a detector belongs to the caller from daain_detector_create until
 * daain_detector_destroy. The library never takes ownership of frame buffers or of
 * user_data and keeps no pointer to them after a call returns. Strings the library
 * returns are owned by the library.
 *
 * Thread safety: a detector may move between threads, but only one call may use it at
 * a time. An overlapping call (from a second thread, or from the detector's own alert
 * callback) is rejected with DAAIN_ERROR_BUSY. daain_detector_destroy must not overlap
 * any other call on the same detector, and that case cannot be detected. Separate
 * detectors are independent and may be used from different threads at the same time.
 * daain_last_error is per thread.
 */
#ifndef DAAIN_H
#define DAAIN_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* Version of the ABI this header describes; compare with daain_abi_version(). */
#define DAAIN_ABI_VERSION 1u

typedef enum daain_status {
    DAAIN_OK = 0,
    /* A required pointer argument is NULL. */
    DAAIN_ERROR_NULL_POINTER = 1,
    /* An argument has an invalid value: an empty frame, a stride smaller than a row, a
     * buffer smaller than the frame, an empty path. */
    DAAIN_ERROR_INVALID_ARGUMENT = 2,
    /* The config file could not be read or is invalid. */
    DAAIN_ERROR_CONFIG = 3,
    /* The bundle is missing, altered or invalid, or its backbone does not load. */
    DAAIN_ERROR_BUNDLE = 4,
    /* The frame could not be scored. The result is filled with level ERROR and a NaN
     * score, and the level and alerts are updated as for any frame. */
    DAAIN_ERROR_FRAME = 5,
    /* The detector is in use by another call. */
    DAAIN_ERROR_BUSY = 6,
    /* Internal error, a bug in the library. The detector involved is unusable: every
     * later call on it returns this status, and it must be destroyed. */
    DAAIN_ERROR_PANIC = 7
} daain_status;

/* Alert level after a frame, with the hysteresis of the config's `alerts.raise_after`
 * and `alerts.clear_after`. */
typedef enum daain_level {
    /* The input looks like the training data. */
    DAAIN_LEVEL_OK = 0,
    /* Scores above the threshold: anomalous or adversarial input. */
    DAAIN_LEVEL_WARN = 1,
    /* The last frame could not be scored. */
    DAAIN_LEVEL_ERROR = 2,
    /* No frame within the watchdog period. Only the `daain run` frame loop has a
     * watchdog, so daain_score_rgb never reports this level. */
    DAAIN_LEVEL_STALE = 3
} daain_level;

/* Opaque detector: the bundle's backbone, mask, flow and scores, plus the alert level. */
typedef struct daain_detector daain_detector;

/* Every score computed for a frame; higher is more anomalous. NaN when the frame could
 * not be scored. */
typedef struct daain_scores {
    /* HBOS decision value. */
    double hbos;
    /* PyOD's predict_proba outlier probability of the HBOS decision value, 0 to 1. */
    double hbos_probability;
    /* Negative log-likelihood under the flow, in nats. */
    double nll;
    /* Distance of the flow output from the origin. */
    double euclidean;
    double mahalanobis;
} daain_scores;

/* Time spent in each stage of one daain_score_rgb call, in milliseconds. */
typedef struct daain_timings {
    double preprocess_ms;
    double backbone_ms;
    double sampling_ms;
    double flow_ms;
    double score_ms;
    /* The whole call up to the alert callback, including the copy of a padded frame. */
    double total_ms;
} daain_timings;

/* Outcome of one frame. */
typedef struct daain_result {
    /* 0-based index among the frames this detector scored or failed to score. Calls
     * rejected for their arguments do not count. */
    uint64_t frame;
    /* The timestamp passed with the frame. */
    uint64_t timestamp_ns;
    /* The score the bundle's threshold applies to (see the bundle manifest's
     * score.kind); NaN when the frame could not be scored. */
    double score;
    double threshold;
    /* 1 when score > threshold or the frame could not be scored, else 0. */
    int32_t anomalous;
    /* Level after this frame. */
    daain_level level;
    daain_scores scores;
    daain_timings timings;
} daain_result;

/* One alert. Sent for every frame whose level is not OK, and for the frame on which the
 * level returns to OK. */
typedef struct daain_alert {
    uint64_t frame;
    uint64_t timestamp_ns;
    /* NaN for an ERROR alert. */
    double score;
    double threshold;
    daain_level level;
    daain_level previous_level;
    /* Cause of an ERROR alert, "" otherwise. Valid only until the callback returns. */
    const char *message;
} daain_alert;

/* Alert callback. Called synchronously on the thread that calls daain_score_rgb, before
 * that call returns, with a pointer valid only during the callback. It must not throw a
 * C++ exception or longjmp out, and calls on the same detector from inside it return
 * DAAIN_ERROR_BUSY. */
typedef void (*daain_alert_callback)(const daain_alert *alert, void *user_data);

/* Returns DAAIN_ABI_VERSION of the library that is loaded. */
uint32_t daain_abi_version(void);

/* Returns the message of the last failed call on the calling thread, or "" when none
 * has failed. Successful calls leave it unchanged. The string stays valid until the
 * next failed call on the same thread; copy it to keep it. Never returns NULL. */
const char *daain_last_error(void);

/* Returns "OK", "WARN", "ERROR" or "STALE", or "UNKNOWN" for another value. */
const char *daain_level_name(daain_level level);

/* Returns the enumerator's name, such as "DAAIN_ERROR_BUNDLE", or "UNKNOWN". */
const char *daain_status_name(daain_status status);

/* Opens the bundle directory `bundle_dir` (a directory made by `daain-tools export`,
 * such as models/default), checks every file's SHA-256 against its manifest, loads the
 * backbone and writes a new detector to *out.
 *
 * `config_path` is a TOML runtime config (see configs/default.toml) or NULL for the
 * defaults. The detector uses its `bundle` key when `bundle_dir` is NULL,
 * `detector.threshold`, `alerts.raise_after` and `alerts.clear_after`. Relative paths
 * resolve against the working directory.
 *
 * Sets *out to NULL first, so *out is NULL after any error. */
daain_status daain_detector_create(const char *bundle_dir, const char *config_path,
                                   daain_detector **out);

/* Destroys a detector and frees everything it owns. NULL is accepted and does nothing.
 * Returns DAAIN_ERROR_BUSY, and destroys nothing, when called from the detector's own
 * alert callback. */
daain_status daain_detector_destroy(daain_detector *detector);

/* Sets the alert callback and the user_data passed to it, replacing any earlier one.
 * A NULL callback removes it. */
daain_status daain_set_alert_callback(daain_detector *detector,
                                      daain_alert_callback callback, void *user_data);

/* Scores one frame of RGB24 pixels (R, G, B bytes per pixel) synchronously: ESPNet and
 * the detector run on the calling thread, so the call blocks for one full detection.
 *
 * `rgb` points to `height` rows of `width` pixels, `stride` bytes apart (stride >=
 * width * 3; larger for padded rows). `rgb_len` is the size of the buffer, at least
 * stride * (height - 1) + width * 3 bytes. Frames of any size are resized to the
 * backbone's input. `timestamp_ns` is passed through to the result and alerts.
 *
 * Writes the outcome to *out, updates the alert level, and calls the alert callback
 * when an alert is due. Returns DAAIN_ERROR_FRAME, with *out filled, when the detector
 * could not score the frame. */
daain_status daain_score_rgb(daain_detector *detector, const uint8_t *rgb, size_t rgb_len,
                             uint32_t width, uint32_t height, size_t stride,
                             uint64_t timestamp_ns, daain_result *out);

#ifdef __cplusplus
}
#endif

#endif /* DAAIN_H */
