/*
 * Scores real frames through the C ABI and checks alerts and error paths.
 *
 * Usage: alerts BUNDLE_DIR CONFIG FRAME_LIST MISSING_DIR
 *
 * FRAME_LIST has one frame per line, "NAME PATH WIDTH HEIGHT", where PATH contains packed
 * RGB24 pixels. MISSING_DIR is a path where no bundle exists. Prints one line per
 * result, alert and check, and exits with status 1 when a check fails.
 */
#include <inttypes.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "daain.h"

#define MAX_FRAMES 16
#define MAX_ALERTS 64

static int failures = 0;

static void check(int condition, const char *what) {
    printf("check %s %s\n", condition ? "pass" : "FAIL", what);
    if (!condition) {
        failures++;
    }
}

struct alert_log {
    daain_detector *detector;
    int count;
    daain_level levels[MAX_ALERTS];
    daain_level previous[MAX_ALERTS];
    uint64_t frames[MAX_ALERTS];
    /* Statuses of calls on the detector made from inside the callback. */
    daain_status reentrant_score;
    daain_status reentrant_destroy;
};

static void on_alert(const daain_alert *alert, void *user_data) {
    struct alert_log *log = user_data;
    printf("alert frame=%" PRIu64 " level=%s previous=%s score=%.6f threshold=%.6f message=\"%s\"\n",
           alert->frame, daain_level_name(alert->level), daain_level_name(alert->previous_level),
           alert->score, alert->threshold, alert->message);
    if (log->count < MAX_ALERTS) {
        log->levels[log->count] = alert->level;
        log->previous[log->count] = alert->previous_level;
        log->frames[log->count] = alert->frame;
    }
    log->count++;

    /* The detector is busy for the whole daain_score_rgb call, callback included. */
    uint8_t pixel[3] = {0, 0, 0};
    daain_result ignored;
    log->reentrant_score = daain_score_rgb(log->detector, pixel, 3, 1, 1, 3, 0, &ignored);
    log->reentrant_destroy = daain_detector_destroy(log->detector);
}

struct frame {
    char name[64];
    uint8_t *pixels;
    size_t len;
    uint32_t width;
    uint32_t height;
};

static int read_frames(const char *list_path, struct frame *frames, int *count) {
    FILE *list = fopen(list_path, "r");
    if (list == NULL) {
        fprintf(stderr, "cannot open frame list %s\n", list_path);
        return 0;
    }
    char path[4096];
    *count = 0;
    while (*count < MAX_FRAMES) {
        struct frame *frame = &frames[*count];
        if (fscanf(list, "%63s %4095s %" SCNu32 " %" SCNu32, frame->name, path, &frame->width,
                   &frame->height) != 4) {
            break;
        }
        frame->len = (size_t)frame->width * frame->height * 3;
        frame->pixels = malloc(frame->len);
        FILE *file = fopen(path, "rb");
        if (frame->pixels == NULL || file == NULL ||
            fread(frame->pixels, 1, frame->len, file) != frame->len) {
            fprintf(stderr, "cannot read %zu bytes of frame %s from %s\n", frame->len,
                    frame->name, path);
            fclose(list);
            return 0;
        }
        fclose(file);
        (*count)++;
    }
    fclose(list);
    return 1;
}

static void print_result(const char *name, daain_status status, const daain_result *result) {
    printf("result name=%s status=%s frame=%" PRIu64 " timestamp_ns=%" PRIu64
           " score=%.6f threshold=%.6f anomalous=%d level=%s nll=%.6f hbos_probability=%.6f"
           " backbone_ms=%.3f total_ms=%.3f\n",
           name, daain_status_name(status), result->frame, result->timestamp_ns, result->score,
           result->threshold, result->anomalous, daain_level_name(result->level),
           result->scores.nll, result->scores.hbos_probability, result->timings.backbone_ms,
           result->timings.total_ms);
}

/* Error paths that need no detector, or only the missing bundle. */
static void check_errors_without_detector(const char *missing_dir) {
    uint8_t pixel[3] = {0, 0, 0};
    daain_result result;

    daain_status status = daain_score_rgb(NULL, pixel, 3, 1, 1, 3, 0, &result);
    printf("error null_detector status=%s message=\"%s\"\n", daain_status_name(status),
           daain_last_error());
    check(status == DAAIN_ERROR_NULL_POINTER, "null detector is rejected");
    check(strstr(daain_last_error(), "detector is NULL") != NULL, "null detector message");

    daain_detector *detector = (daain_detector *)&result; /* must be overwritten with NULL */
    status = daain_detector_create(missing_dir, NULL, &detector);
    printf("error missing_bundle status=%s message=\"%s\"\n", daain_status_name(status),
           daain_last_error());
    check(status == DAAIN_ERROR_BUNDLE, "missing bundle is rejected");
    check(detector == NULL, "missing bundle leaves no detector");
    check(strstr(daain_last_error(), missing_dir) != NULL, "missing bundle message names it");

    status = daain_detector_create(NULL, NULL, &detector);
    check(status == DAAIN_ERROR_NULL_POINTER, "no bundle directory and no config is rejected");
    status = daain_detector_create(missing_dir, NULL, NULL);
    check(status == DAAIN_ERROR_NULL_POINTER, "null out pointer is rejected");
    check(daain_detector_destroy(NULL) == DAAIN_OK, "destroying NULL does nothing");
}

/* Argument checks on a live detector; none of these counts as a frame. */
static void check_frame_arguments(daain_detector *detector, const struct frame *frame) {
    daain_result result;
    daain_status status = daain_score_rgb(detector, frame->pixels, frame->len, frame->width,
                                          frame->height, frame->width * 3 - 1, 0, &result);
    printf("error short_stride status=%s message=\"%s\"\n", daain_status_name(status),
           daain_last_error());
    check(status == DAAIN_ERROR_INVALID_ARGUMENT, "stride below a row is rejected");

    status = daain_score_rgb(detector, frame->pixels, frame->len - 1, frame->width,
                             frame->height, frame->width * 3, 0, &result);
    printf("error short_buffer status=%s message=\"%s\"\n", daain_status_name(status),
           daain_last_error());
    check(status == DAAIN_ERROR_INVALID_ARGUMENT, "buffer smaller than the frame is rejected");
    check(strstr(daain_last_error(), "rgb_len") != NULL, "short buffer message names rgb_len");

    status = daain_score_rgb(detector, frame->pixels, frame->len, 0, frame->height,
                             frame->width * 3, 0, &result);
    check(status == DAAIN_ERROR_INVALID_ARGUMENT, "zero width is rejected");
    status = daain_score_rgb(detector, NULL, frame->len, frame->width, frame->height,
                             frame->width * 3, 0, &result);
    check(status == DAAIN_ERROR_NULL_POINTER, "null pixels are rejected");
    status = daain_score_rgb(detector, frame->pixels, frame->len, frame->width, frame->height,
                             frame->width * 3, 0, NULL);
    check(status == DAAIN_ERROR_NULL_POINTER, "null result is rejected");
}

/* Scores `frame` copied into rows padded to a larger stride, which must give the packed
 * frame's score. */
static void check_padded_stride(daain_detector *detector, const struct frame *frame,
                                double packed_score) {
    size_t row = (size_t)frame->width * 3;
    size_t stride = row + 13;
    size_t len = stride * frame->height;
    uint8_t *padded = malloc(len);
    if (padded == NULL) {
        check(0, "padded frame allocated");
        return;
    }
    memset(padded, 0xAB, len);
    for (uint32_t y = 0; y < frame->height; y++) {
        memcpy(padded + y * stride, frame->pixels + y * row, row);
    }
    daain_result result;
    daain_status status = daain_score_rgb(detector, padded, len, frame->width, frame->height,
                                          stride, 0, &result);
    print_result("padded", status, &result);
    check(status == DAAIN_OK, "padded frame is scored");
    check(result.score == packed_score, "padded stride gives the packed frame's score");
    free(padded);
}

int main(int argc, char **argv) {
    if (argc != 5) {
        fprintf(stderr, "usage: %s BUNDLE_DIR CONFIG FRAME_LIST MISSING_DIR\n", argv[0]);
        return 2;
    }
    const char *bundle_dir = argv[1];
    const char *config = argv[2];
    struct frame frames[MAX_FRAMES];
    int frame_count = 0;
    if (!read_frames(argv[3], frames, &frame_count) || frame_count < 2) {
        fprintf(stderr, "need at least 2 frames in %s\n", argv[3]);
        return 2;
    }

    check(daain_abi_version() == DAAIN_ABI_VERSION, "library ABI matches the header");
    check(strcmp(daain_last_error(), "") == 0, "no error before any call");
    check_errors_without_detector(argv[4]);

    daain_detector *detector = NULL;
    daain_status status = daain_detector_create(bundle_dir, config, &detector);
    if (status != DAAIN_OK) {
        printf("error create status=%s message=\"%s\"\n", daain_status_name(status),
               daain_last_error());
        check(0, "detector is created from the bundle");
        return 1;
    }
    struct alert_log log;
    memset(&log, 0, sizeof log);
    log.detector = detector;
    check(daain_set_alert_callback(detector, on_alert, &log) == DAAIN_OK, "callback is set");
    check_frame_arguments(detector, &frames[0]);

    double first_score = NAN;
    int flipped_anomalous = 0;
    for (int i = 0; i < frame_count; i++) {
        const struct frame *frame = &frames[i];
        daain_result result;
        uint64_t timestamp_ns = (uint64_t)i * 33333333u;
        status = daain_score_rgb(detector, frame->pixels, frame->len, frame->width,
                                 frame->height, frame->width * 3, timestamp_ns, &result);
        print_result(frame->name, status, &result);
        check(status == DAAIN_OK, "frame is scored");
        check(result.frame == (uint64_t)i, "frames are counted from 0");
        check(result.timestamp_ns == timestamp_ns, "timestamp is passed through");
        check(isfinite(result.score), "score is finite");
        if (i == 0) {
            first_score = result.score;
        }
        if (strncmp(frame->name, "flipped", 7) == 0) {
            flipped_anomalous |= result.anomalous;
        }
    }
    check(flipped_anomalous, "a flipped frame is anomalous");
    check(log.count >= 1, "at least one alert arrived through the callback");
    int warned = 0;
    for (int i = 0; i < log.count && i < MAX_ALERTS; i++) {
        warned |= log.levels[i] == DAAIN_LEVEL_WARN && log.previous[i] == DAAIN_LEVEL_OK;
    }
    check(warned, "an alert reports the rise from OK to WARN");
    check(log.reentrant_score == DAAIN_ERROR_BUSY, "scoring from the callback is rejected");
    check(log.reentrant_destroy == DAAIN_ERROR_BUSY, "destroying from the callback is rejected");

    check_padded_stride(detector, &frames[0], first_score);

    check(daain_set_alert_callback(detector, NULL, NULL) == DAAIN_OK, "callback is removed");
    check(daain_detector_destroy(detector) == DAAIN_OK, "detector is destroyed");
    for (int i = 0; i < frame_count; i++) {
        free(frames[i].pixels);
    }
    printf("summary frames=%d alerts=%d failures=%d\n", frame_count, log.count, failures);
    return failures == 0 ? 0 : 1;
}
