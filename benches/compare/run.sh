#!/usr/bin/env bash
# Side-by-side per-frame latency and peak memory of five ways to run ESPNet (p=2, q=8) at
# 256x512 on the same frames of data/footage/solidWhiteRight.mp4 with the same thread
# count: tract f32 and int8 (the whole daain detector), onnxruntime f32 and int8
# (quantize_static; backbone only), and the reference DAAIN pipeline style (libtorch
# eager, every activation map upsampled to the input size before sampling, flow in torch).
# Each variant runs in its own process, so that peak RSS is its own, and the variants
# take turns for ROUNDS rounds, so that load from other processes hits all of them alike.
#
# Usage: benches/compare/run.sh [THREADS] [FRAMES] [ROUNDS]   (defaults 1, 20, 3)
# Needs: tools/setup.sh done (libtorch, FFmpeg), python3 with venv; installs onnxruntime,
# onnx, numpy and matplotlib from PyPI into target/compare-venv on first use.
# Writes target/compare/*.jsonl, prints a Markdown table, and draws
# docs/img/compare-latency-Nt.png and docs/img/compare-memory-Nt.png (N: THREADS).
set -euo pipefail
cd "$(dirname "$0")/../.."
THREADS=${1:-1}
FRAMES=${2:-20}
ROUNDS=${3:-3}
OUT=target/compare
VENV=target/compare-venv
mkdir -p "$OUT" docs/img
if [ ! -x "$VENV/bin/python" ]; then
    python3 -m venv "$VENV"
    "$VENV/bin/pip" install --quiet onnxruntime onnx numpy matplotlib
fi
PY="$VENV/bin/python"
source tools/env.sh
cargo build --release --example compare_frames -p daain-edge
cargo build --release -p daain-tools
TRACT=target/release/examples/compare_frames
TOOLS=target/release/daain-tools

"$TRACT" --frames "$FRAMES" --dump-inputs "$OUT/inputs.f32" \
    --dump-calibration "$OUT/calibration.f32" > /dev/null
"$PY" benches/compare/ort_bench.py --model models/default/backbone.onnx \
    --calibration-inputs "$OUT/calibration.f32" --quantize-to "$OUT/ort_int8.onnx"

rm -f "$OUT"/*.jsonl
for round in $(seq "$ROUNDS"); do
    echo "round $round of $ROUNDS" >&2
    "$TRACT" --precision f32 --threads "$THREADS" --frames "$FRAMES" >> "$OUT/tract_f32.jsonl"
    "$TRACT" --precision int8 --threads "$THREADS" --frames "$FRAMES" >> "$OUT/tract_int8.jsonl"
    "$PY" benches/compare/ort_bench.py --model models/default/backbone.onnx \
        --inputs "$OUT/inputs.f32" --threads "$THREADS" \
        --save-logits "$OUT/ort_f32_classes.npy" >> "$OUT/ort_f32.jsonl"
    "$PY" benches/compare/ort_bench.py --model "$OUT/ort_int8.onnx" --precision int8 \
        --inputs "$OUT/inputs.f32" --threads "$THREADS" \
        --reference-logits "$OUT/ort_f32_classes.npy" >> "$OUT/ort_int8.jsonl"
    "$TOOLS" reference-bench --inputs "$OUT/inputs.f32" --threads "$THREADS" \
        >> "$OUT/reference.jsonl"
done
"$PY" benches/compare/report.py "$OUT" --threads "$THREADS" --plots docs/img
