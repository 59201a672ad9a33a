#!/usr/bin/env bash
# Counts the aarch64 instructions that daain-edge executes per frame, under qemu-user with
# an emulated Cortex-A72 and the instruction-counting plugin in insn-count/.
#
# Usage: targets/insn-count.sh [ONNX] [FRAMES]
#
# ONNX is the backbone to measure (default: the default bundle's backbone.onnx). Any other
# model runs in a temporary copy of the default bundle, so it must have the default
# backbone's input, logits and taps. FRAMES (default 4) is the number of frames measured.
#
# The deploy build of `daain run` scores the shipped dashcam clip twice, once for 1 frame
# and once for 1 + FRAMES frames. The difference, divided by FRAMES, is the cost of a
# frame without the start-up (model loading and optimisation, first-frame setup). It is
# reported for the whole process (FFmpeg's decoding threads included) and for the busiest
# thread, which is the detection thread (preprocessing, ESPNet, sampling, flow, scores).
# DAAIN_INSN_PROFILE selects another cargo profile than `deploy` (`dev`: only the
# dependencies are optimised). DAAIN_INSN_BINARY measures an aarch64 daain binary that is
# built already, such as the one `cargo test` leaves in target/.../debug. Prepare the
# machine with cross-setup.sh first.
set -euo pipefail
cd "$(dirname "$0")/.."
source targets/cross-env.sh
select_rust_toolchain aarch64-unknown-linux-gnu
profile="${DAAIN_INSN_PROFILE:-deploy}"

TARGET=aarch64-unknown-linux-gnu
onnx="${1:-models/default/backbone.onnx}"
frames="${2:-4}"
if [ ! -f "$onnx" ]; then
    echo "insn-count: ONNX model $onnx not found; pass the path of a backbone exported by daain-tools" >&2
    exit 1
fi
if ! [[ "$frames" =~ ^[1-9][0-9]*$ ]]; then
    echo "insn-count: FRAMES must be a positive integer, got $frames" >&2
    exit 1
fi

work="$CARGO_TARGET_DIR/insn-count"
mkdir -p "$work"
plugin="$work/libinsn_count.so"
gcc -O2 -Wall -Wextra -shared -fPIC -fvisibility=hidden -o "$plugin" targets/insn-count/insn_count.c

if [ -n "${DAAIN_INSN_BINARY:-}" ]; then
    binary="$DAAIN_INSN_BINARY"
    profile="given binary"
elif ! cargo build --profile "$profile" --target "$TARGET"; then
    exit 1
elif [ "$profile" = dev ]; then
    binary="$CARGO_TARGET_DIR/$TARGET/debug/daain"
else
    binary="$CARGO_TARGET_DIR/$TARGET/$profile/daain"
fi

# A copy of the default bundle with the measured backbone and its hash in the manifest.
bundle="$work/bundle"
rm -rf "$bundle"
cp -r models/default "$bundle"
cp "$onnx" "$bundle/backbone.onnx"
python3 - "$bundle" <<'PYTHON'
import hashlib, json, pathlib, sys
bundle = pathlib.Path(sys.argv[1])
manifest = json.loads((bundle / "manifest.json").read_text())
digest = hashlib.sha256((bundle / manifest["backbone"]["file"]).read_bytes()).hexdigest()
manifest["backbone"]["sha256"] = digest
(bundle / "manifest.json").write_text(json.dumps(manifest, indent=2))
PYTHON

# Runs the binary on COUNT frames and writes the plugin's counts to FILE.
count_instructions() {
    local count=$1 file=$2
    DAAIN_QEMU_ARGS="${DAAIN_QEMU_ARGS:-} -plugin $plugin,out=$file" RUST_LOG=warn \
        targets/qemu-aarch64-runner.sh "$binary" run --video data/footage/solidWhiteRight.mp4 \
        --bundle "$bundle" --max-frames "$count" --json >/dev/null
}
count_instructions 1 "$work/counts-1.txt"
count_instructions $((1 + frames)) "$work/counts-n.txt"

python3 - "$work/counts-1.txt" "$work/counts-n.txt" "$frames" "$onnx" "$profile" <<'PYTHON'
import sys
def read(path):
    threads, total = {}, 0
    for line in open(path):
        fields = line.split()
        if fields[0] == "vcpu":
            threads[int(fields[1])] = int(fields[2])
        else:
            total = int(fields[1])
    return threads, total
(threads_1, total_1), (threads_n, total_n) = read(sys.argv[1]), read(sys.argv[2])
frames, onnx, profile = int(sys.argv[3]), sys.argv[4], sys.argv[5]
busiest = max(threads_n, key=lambda vcpu: threads_n[vcpu] - threads_1.get(vcpu, 0))
per_frame = (total_n - total_1) / frames
busiest_per_frame = (threads_n[busiest] - threads_1.get(busiest, 0)) / frames
print(f"model: {onnx}, profile: {profile}")
print(f"start-up and first frame: {total_1 / 1e9:.3f} G instructions")
print(f"per frame, whole process: {per_frame / 1e9:.3f} G instructions ({frames} frames)")
print(f"per frame, detection thread (vCPU {busiest}): {busiest_per_frame / 1e9:.3f} G instructions")
PYTHON
