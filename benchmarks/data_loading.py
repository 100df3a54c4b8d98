"""How much of a training step is data loading, at the digits demo's sizes (batch 64, 32x32 scans, the demo towers).

For the TCL demo configuration (EMA teachers: two augmented views) and a plain CLIP configuration of the same towers
(no teachers, no IMC / LMI / ITM / MLM: one augmented view, `ALBEFModel.training_views`), it times, interleaved,
the collation of a batch in the main process (decoding, caption choice, augmentation, tokenising: what
`data_wait_fraction` logs without dataloader workers) and one training step on it (forward + backward + AdamW), and
prints the medians and collation's share of collation + step. The last line is one JSON object.

    python benchmarks/data_loading.py [--steps 20] [--batch 64] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import datasets
import torch
import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "training"))

import train  # noqa: E402

from vlalign.data import ImageTextCollator, build_digits_dataset, build_digits_processor  # noqa: E402

PLAIN_CLIP = dict(
    use_momentum=False, imc_weight=0.0, lmi_weight=0.0, itm_weight=0.0, mlm_weight=0.0, num_fusion_layers=0
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    section = yaml.safe_load((REPO / "training/configs/tcl_digits.yaml").read_text())["model"]
    processor = build_digits_processor(image_size=section["vision_config"]["image_size"])
    rows = build_digits_dataset()["train"].cast_column("image", datasets.Image(decode=False))
    configurations = {"tcl_demo": section, "plain_clip": {**section, **PLAIN_CLIP}}
    setups = {}
    for name, model_section in configurations.items():
        torch.manual_seed(0)
        model = train.build_model(train.RunArguments(), model_section, processor.tokenizer).train()
        collator = ImageTextCollator(
            processor, label_column="label", positives_by="label", two_views=model.training_views == 2, seed=0
        )
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        setups[name] = (model, collator, optimizer)
    times = {name: {"collate": [], "step": []} for name in setups}
    for index in range(args.steps + 1):  # the first round warms up
        start = (index * args.batch) % (len(rows) - args.batch)
        batch_rows = [rows[i] for i in range(start, start + args.batch)]
        for name, (model, collator, optimizer) in setups.items():
            began = time.perf_counter()
            batch = collator(batch_rows)
            collated = time.perf_counter()
            batch = {k: v for k, v in batch.items() if k not in ("num_skipped",)}
            model(**batch).loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if index:
                times[name]["collate"].append(collated - began)
                times[name]["step"].append(time.perf_counter() - collated)
    results = {}
    print(f"batch {args.batch}, {args.steps} interleaved rounds, {args.threads} threads (medians)")
    print("| configuration | views | collation ms | training step ms | collation share of collation + step |")
    print("|---|---:|---:|---:|---:|")
    for name, (model, _, _) in setups.items():
        collate = statistics.median(times[name]["collate"])
        step = statistics.median(times[name]["step"])
        share = collate / (collate + step)
        results[name] = {
            "views": model.training_views,
            "collate_ms": round(1000 * collate, 1),
            "step_ms": round(1000 * step, 1),
            "collation_share": round(share, 3),
        }
        print(f"| {name} | {model.training_views} | {1000 * collate:.1f} | {1000 * step:.1f} | {share:.1%} |")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
