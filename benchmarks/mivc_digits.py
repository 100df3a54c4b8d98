"""MIVC pooling modes against the concatenation baseline on the multi-view digits task.

Trains the demo model (training/configs/mivc_digits.yaml: tiny ViT + tiny Llama from scratch) once per pooling mode
from the same seed for the same number of steps, evaluates greedy exact-match accuracy on the 400 test items (held-out
scans) and the mean pooling weight given to clean and to degraded images, and prints one table followed by a JSON
line with all figures:

    python benchmarks/mivc_digits.py [--max_steps 600] [--only attention,concatenate]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "training"))

MODES = ("mean", "max", "attention", "gated_attention", "concatenate")


def run(mode: str, max_steps: int, seed: int) -> dict:
    import train

    with tempfile.TemporaryDirectory() as output_dir:
        start = time.time()
        results = train.main(
            [
                "--config",
                str(REPO / "training/configs/mivc_digits.yaml"),
                "--output_dir",
                output_dir,
                "--max_steps",
                str(max_steps),
                "--seed",
                str(seed),
                "--logging_steps",
                str(max(1, max_steps // 5)),
                "--pooling_mode",
                mode,
            ]
        )
        results["wall_seconds"] = round(time.time() - start, 1)
    return results


def _fmt(value) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--max_steps", type=int, default=600)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--only", default="", help="comma-separated subset of: " + ", ".join(MODES))
    args = parser.parse_args()
    modes = [m for m in args.only.split(",") if m] or list(MODES)
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        raise SystemExit(f"unknown modes {unknown}; choose from {list(MODES)}")
    rows = {}
    for mode in modes:
        print(f"== {mode}", flush=True)
        rows[mode] = run(mode, args.max_steps, args.seed)

    print(f"\nMulti-view digits, {args.max_steps} steps, seed {args.seed}, 400 test items (held-out scans)")
    print(
        "| pooling | exact match % | mean weight, clean images | mean weight, degraded images | equal-weight "
        "reference | train s |"
    )
    print("|" + "---|" * 6)
    for mode in modes:
        r = rows[mode]
        print(
            f"| {mode} | {r['exact_match_accuracy']:.1f} | {_fmt(r.get('mean_weight_clean_images'))} | "
            f"{_fmt(r.get('mean_weight_degraded_images'))} | {_fmt(r.get('uniform_weight_reference'))} | "
            f"{r['train_runtime_seconds']:.0f} |"
        )
    keys = (
        "exact_match_accuracy",
        "mean_weight_clean_images",
        "mean_weight_degraded_images",
        "uniform_weight_reference",
        "train_runtime_seconds",
        "wall_seconds",
    )
    print(
        json.dumps(
            {
                "max_steps": args.max_steps,
                "seed": args.seed,
                "results": {m: {k: rows[m][k] for k in keys if k in rows[m]} for m in modes},
            }
        )
    )


if __name__ == "__main__":
    main()
