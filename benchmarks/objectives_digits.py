"""Small-scale, honest reproduction of the objectives' claims on the embedded digits demo.

Trains every configuration below from the same seed for the same number of steps with the demo towers
(training/configs/tcl_digits.yaml), evaluates on the 360 held-out scans, and prints one table (zero-shot accuracy,
R@1 both ways, wall time) followed by a JSON line with all figures:

    python benchmarks/objectives_digits.py [--max_steps 500] [--only infonce_b32,decomposable_b32_running]

Rows: InfoNCE at batch 32 / 64 / 256 (the CLIP loss, in-batch negatives, no momentum); the decomposable
(Bayesian-augmented) loss at batch 32 with Z estimated by a per-sample running average and by a queue; InfoNCE at
batch 64 plus each latent-modality regulariser (feature separation, Brownian bridge, geometric consistency); and
full TCL against its contrastive-only baseline (ALBEF's ITC: momentum distillation + queue, no IMC/LMI/ITM/MLM);
full CODIS (training/configs/codis_digits.yaml) with its own-plan and swapped-plan code targets, with the code usage
of the evaluation images (codes used / perplexity) in the last column.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "training"))

CONTRASTIVE = ["--use_momentum", "false", "--imc_weight", "0", "--lmi_weight", "0", "--itm_weight", "0",
               "--mlm_weight", "0", "--num_fusion_layers", "0"]

CONFIGS: dict[str, tuple[str, list[str]]] = {
    "infonce_b32": ("InfoNCE, batch 32", CONTRASTIVE + ["--per_device_train_batch_size", "32"]),
    "infonce_b64": ("InfoNCE, batch 64", CONTRASTIVE + ["--per_device_train_batch_size", "64"]),
    "infonce_b256": ("InfoNCE, batch 256", CONTRASTIVE + ["--per_device_train_batch_size", "256"]),
    "decomposable_b32_running": (
        "decomposable, batch 32, running-average Z",
        CONTRASTIVE + ["--per_device_train_batch_size", "32", "--contrastive_loss", "decomposable",
                       "--z_estimate", "running"]),
    "decomposable_b32_queue": (
        "decomposable, batch 32, queue Z (1024)",
        CONTRASTIVE + ["--per_device_train_batch_size", "32", "--contrastive_loss", "decomposable",
                       "--z_estimate", "queue", "--queue_size", "1024"]),
    "infonce_b64_sep": ("InfoNCE b64 + feature separation", CONTRASTIVE + [
        "--per_device_train_batch_size", "64", "--use_feature_separation", "true"]),
    "infonce_b64_br": ("InfoNCE b64 + Brownian bridge", CONTRASTIVE + [
        "--per_device_train_batch_size", "64", "--use_brownian_bridge", "true"]),
    "infonce_b64_gc": ("InfoNCE b64 + geometric consistency", CONTRASTIVE + [
        "--per_device_train_batch_size", "64", "--use_geometric_consistency", "true"]),
    "albef_itc_b64": ("contrastive-only baseline (ALBEF ITC), batch 64", [
        "--imc_weight", "0", "--lmi_weight", "0", "--itm_weight", "0", "--mlm_weight", "0",
        "--per_device_train_batch_size", "64"]),
    "tcl_b64": ("full TCL, batch 64", ["--per_device_train_batch_size", "64"]),
    "codis_b64": ("full CODIS, batch 64, own-plan targets", [
        "--per_device_train_batch_size", "64", "--code_targets", "own"]),
    "codis_b64_swapped": ("full CODIS, batch 64, swapped-plan targets (default)", [
        "--per_device_train_batch_size", "64", "--code_targets", "swapped"]),
}
# the demo YAML each configuration starts from (default: the TCL demo's)
CONFIG_FILES = {"codis_b64": "codis_digits.yaml", "codis_b64_swapped": "codis_digits.yaml"}


def run(name: str, extra: list[str], max_steps: int, seed: int) -> dict:
    import train

    with tempfile.TemporaryDirectory() as output_dir:
        start = time.time()
        results = train.main([
            "--config", str(REPO / "training/configs" / CONFIG_FILES.get(name, "tcl_digits.yaml")),
            "--output_dir", output_dir,
            "--max_steps", str(max_steps), "--seed", str(seed), "--logging_steps", str(max(1, max_steps // 5)),
            "--alpha_ramp_steps", str(max(1, max_steps // 6)), *extra,
        ])
        results["wall_seconds"] = round(time.time() - start, 1)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--max_steps", type=int, default=500)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--only", default="", help="comma-separated subset of: " + ", ".join(CONFIGS))
    args = parser.parse_args()
    names = [n for n in args.only.split(",") if n] or list(CONFIGS)
    unknown = [n for n in names if n not in CONFIGS]
    if unknown:
        raise SystemExit(f"unknown configurations {unknown}; choose from {list(CONFIGS)}")

    rows = {}
    for name in names:
        description, extra = CONFIGS[name]
        print(f"== {name}: {description}", flush=True)
        rows[name] = run(name, extra, args.max_steps, args.seed)

    print(f"\nDigits demo, {args.max_steps} steps, seed {args.seed}, test split (360 scans); recall in %")
    header = (f"| {'configuration':52s} | zero-shot acc | i2t R@1 | t2i R@1 | train s | wall s | "
              f"image codes used / perplexity |")
    print(header)
    print("|" + "---|" * 7)
    for name in names:
        r = rows[name]
        codes = (f"{r['image_codes_used']} of {r['codebook_size']} / {r['image_code_perplexity']:.1f}"
                 if "codebook_size" in r else "-")
        print(f"| {CONFIGS[name][0]:52s} | {r['zero_shot_accuracy']:13.1f} | {r['i2t_recall@1']:7.1f} | "
              f"{r['t2i_recall@1']:7.1f} | {r['train_runtime_seconds']:7.1f} | {r['wall_seconds']:6.1f} | "
              f"{codes:29s} |")
    keys = ("zero_shot_accuracy", "i2t_recall@1", "t2i_recall@1", "train_runtime_seconds", "wall_seconds",
            "codebook_size", "image_codes_used", "image_code_perplexity", "text_codes_used", "text_code_perplexity")
    summary = {name: {k: rows[name][k] for k in keys if k in rows[name]} for name in names}
    print(json.dumps({"max_steps": args.max_steps, "seed": args.seed, "results": summary}))


if __name__ == "__main__":
    main()
