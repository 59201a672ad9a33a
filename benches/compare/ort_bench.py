"""One onnxruntime variant of the side-by-side comparison (see run.sh).

Runs the bundle's ESPNet ONNX (all outputs: logits and the 20 taps) on the frames that
`compare_frames --dump-inputs` wrote, and prints one JSON object with per-frame times in
milliseconds and the process's peak resident memory. With --int8, the model is first
quantised with onnxruntime's quantize_static (QOperator format, per-channel int8
weights, activation ranges from the calibration inputs).
"""

import argparse
import json
import resource
import time

import numpy as np
import onnxruntime as ort
from onnxruntime.quantization import (CalibrationDataReader, QuantFormat, QuantType,
                                      quantize_static)

SHAPE = (1, 3, 256, 512)


class Inputs(CalibrationDataReader):
    def __init__(self, frames):
        self.frames = iter(frames)

    def get_next(self):
        frame = next(self.frames, None)
        return None if frame is None else {"input": frame}


def load_inputs(path):
    data = np.fromfile(path, dtype="<f4")
    return [f.reshape(SHAPE) for f in data.reshape(-1, *SHAPE[1:])]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--inputs", help="frames to time")
    parser.add_argument("--calibration-inputs", help="frames to calibrate --quantize-to on")
    parser.add_argument("--quantize-to", help="write the int8 model here and exit")
    parser.add_argument("--precision", default="f32", help="label of the model in the output")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--reference-logits", help="f32 logits (.npy) to compare argmax with")
    parser.add_argument("--save-logits", help="write the logits of every frame (.npy)")
    args = parser.parse_args()

    if args.quantize_to:
        quantize_static(args.model, args.quantize_to,
                        Inputs(load_inputs(args.calibration_inputs)),
                        quant_format=QuantFormat.QOperator, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
        return
    model = args.model
    precision = args.precision
    options = ort.SessionOptions()
    options.intra_op_num_threads = args.threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    session = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
    frames = load_inputs(args.inputs)
    session.run(None, {"input": frames[0]})
    times = []
    logits = []
    for _ in range(args.rounds):
        for frame in frames:
            start = time.perf_counter()
            outputs = session.run(None, {"input": frame})
            times.append((time.perf_counter() - start) * 1e3)
            if len(logits) < len(frames):
                logits.append(outputs[0][0].argmax(axis=0).astype(np.uint8))
    result = {
        "runtime": "onnxruntime " + ort.__version__,
        "precision": precision,
        "threads": args.threads,
        "frame_ms": times,
        "backbone_ms": times,
        "peak_rss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
    }
    if args.save_logits:
        np.save(args.save_logits, np.stack(logits))
    if args.reference_logits:
        reference = np.load(args.reference_logits)
        result["argmax_agreement"] = float((reference == np.stack(logits)).mean())
    print(json.dumps(result))


if __name__ == "__main__":
    main()
