"""What the trainer's per-step guards cost next to a full TCL training step (VLAlignTrainer):

- `snapshot`: the copy of what a step's forwards change besides gradients (EMA teachers, queues, running statistics:
  `model.forward_updated_tensors()`), kept so that a step skipped for non-finite values changes nothing; taken before
  every step unless `stop_on_nonfinite` is set;
- `parameter_check`: the finite check of the trained parameters after the optimizer step (one fused norm, one sync).

Prints their median times as shares of the median step time (forward + backward + AdamW, towers and batch as
benchmarks/train_step.py), and the snapshot's memory next to the model's. The last line is one JSON object.

    python benchmarks/step_guard.py [--device cpu|cuda] [--preset small|base] [--batch 32]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_step import PRESETS, batch_for, build, step_fn, sync  # noqa: E402


def median_seconds(fn, steps: int, device) -> float:
    times = []
    for _ in range(steps):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--preset", default="small", choices=sorted(PRESETS))
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = build("tcl_full", PRESETS[args.preset]).to(device).train()
    batch = batch_for("tcl_full", PRESETS[args.preset], args.batch, device)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    step = step_fn(model, batch, optimizer, bf16=False, device=device)
    step()  # warm-up

    tensors = model.forward_updated_tensors()
    trained = [p for p in model.parameters() if p.requires_grad]

    def snapshot():
        return [t.detach().clone() for t in tensors]

    def parameter_check():
        return bool(torch.isfinite(torch.stack([n.float() for n in torch._foreach_norm(trained)]).sum()))

    step_s = median_seconds(step, args.steps, device)
    snapshot_s = median_seconds(snapshot, args.steps, device)
    check_s = median_seconds(parameter_check, args.steps, device)
    snapshot_mb = sum(t.numel() * t.element_size() for t in tensors) / 2**20
    model_mb = sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers())) / 2**20
    result = {
        "device": str(device),
        "preset": args.preset,
        "batch": args.batch,
        "step_ms": round(1e3 * step_s, 2),
        "snapshot_ms": round(1e3 * snapshot_s, 3),
        "parameter_check_ms": round(1e3 * check_s, 3),
        "snapshot_share_of_step": round(snapshot_s / step_s, 4),
        "parameter_check_share_of_step": round(check_s / step_s, 4),
        "snapshot_mb": round(snapshot_mb, 1),
        "model_mb": round(model_mb, 1),
    }
    print(
        f"full TCL step {result['step_ms']} ms; snapshot {result['snapshot_ms']} ms "
        f"({100 * result['snapshot_share_of_step']:.2f}% of a step, {result['snapshot_mb']} MiB beside "
        f"{result['model_mb']} MiB of model); parameter check {result['parameter_check_ms']} ms "
        f"({100 * result['parameter_check_share_of_step']:.2f}%)"
    )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
