"""Summarises the runs of benches/compare/run.sh: per-frame median and p99 latency and
peak RSS of each variant as ratios to onnxruntime f32, as a Markdown table on stdout and
as two PNG bar charts."""

import argparse
import json
import pathlib

import numpy as np

VARIANTS = [
    ("tract_f32", "tract f32 (whole detector)"),
    ("tract_int8", "tract int8 (whole detector)"),
    ("ort_f32", "onnxruntime f32 (backbone)"),
    ("ort_int8", "onnxruntime int8 (backbone)"),
    ("reference", "reference style, libtorch eager (whole pipeline)"),
]


def load(path):
    runs = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    frame = np.concatenate([r["frame_ms"] for r in runs])
    backbone = np.concatenate([r["backbone_ms"] for r in runs])
    after = [r.get("after_backbone_ms") for r in runs]
    after = np.concatenate(after) if all(a is not None for a in after) else None
    return {
        "frame": frame,
        "backbone": backbone,
        "after": after,
        "rss_mib": max(r["peak_rss_kib"] or 0 for r in runs) / 1024,
        "agreement": runs[-1].get("argmax_agreement"),
        "runtime": runs[-1]["runtime"],
    }


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("directory", type=pathlib.Path)
    parser.add_argument("--threads", type=int, required=True)
    parser.add_argument("--plots", type=pathlib.Path)
    args = parser.parse_args()
    results = {key: load(args.directory / f"{key}.jsonl") for key, _ in VARIANTS}
    base = results["ort_f32"]
    base_median = np.median(base["frame"])
    base_p99 = np.percentile(base["frame"], 99)
    print(f"threads: {args.threads}, frames per variant: {len(base['frame'])}")
    print()
    print("| variant | median ms | p99 ms | median / ort f32 | p99 / ort f32 "
          "| peak RSS MiB | RSS / ort f32 | after backbone, share of frame |")
    print("|---|---|---|---|---|---|---|---|")
    for key, label in VARIANTS:
        r = results[key]
        median = np.median(r["frame"])
        p99 = np.percentile(r["frame"], 99)
        share = "" if r["after"] is None else f"{np.median(r['after']) / median:.2%}"
        print(f"| {label} | {median:.1f} | {p99:.1f} | {median / base_median:.2f}x "
              f"| {p99 / base_p99:.2f}x | {r['rss_mib']:.0f} | "
              f"{r['rss_mib'] / base['rss_mib']:.2f}x | {share} |")
    agreement = results["ort_int8"]["agreement"]
    if agreement is not None:
        print()
        print(f"onnxruntime int8 argmax agreement with onnxruntime f32: {agreement:.2%}")
    ref = np.median(results["reference"]["frame"])
    for key in ("tract_f32", "tract_int8"):
        print(f"reference style / {key}: {ref / np.median(results[key]['frame']):.1f}x")

    if args.plots:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        labels = [label.split(" (")[0] for _, label in VARIANTS]
        medians = [np.median(results[k]["frame"]) / base_median for k, _ in VARIANTS]
        p99s = [np.percentile(results[k]["frame"], 99) / base_p99 for k, _ in VARIANTS]
        x = np.arange(len(labels))
        fig, ax = plt.subplots(figsize=(8, 4))
        ax.bar(x - 0.2, medians, 0.4, label="median")
        ax.bar(x + 0.2, p99s, 0.4, label="p99")
        ax.axhline(1.0, color="grey", linewidth=0.8)
        ax.set_yscale("log")
        ax.set_xticks(x, labels, rotation=15)
        ax.set_ylabel("per-frame latency / onnxruntime f32")
        ax.set_title(f"ESPNet 256x512, {args.threads} thread(s), same frames, interleaved")
        ax.legend()
        fig.tight_layout()
        fig.savefig(args.plots / f"compare-latency-{args.threads}t.png", dpi=100)
        fig, ax = plt.subplots(figsize=(8, 4))
        ax.bar(x, [results[k]["rss_mib"] for k, _ in VARIANTS])
        ax.set_xticks(x, labels, rotation=15)
        ax.set_ylabel("peak RSS (MiB)")
        ax.set_title(f"Peak resident memory per process, {args.threads} thread(s)")
        fig.tight_layout()
        fig.savefig(args.plots / f"compare-memory-{args.threads}t.png", dpi=100)


if __name__ == "__main__":
    main()
