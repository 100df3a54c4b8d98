"""Training-step cost of vlalign against transformers' plain dual encoder, measured side by side.

1. `overhead_ratio`: TCLModel in its contrastive-only configuration (no momentum, no queue, no ITM/MLM, no fusion
   layers: the CLIP loss) against `transformers.VisionTextDualEncoderModel` with identical ViT and BERT configs, same
   batch, same precision; forward + backward + AdamW step. Target <= 1.05.
2. `tcl_flops_efficiency`: achieved FLOP/s of full TCL (momentum teachers, queues, CMA + IMC + LMI, ITM, MLM)
   divided by that of the plain dual encoder; FLOPs counted with `torch.utils.flop_counter.FlopCounterMode` over one
   step. Target >= 0.9 (the extra objectives may cost their FLOPs, nothing more).

Step times are medians of `--steps` steps after warm-up, the configurations interleaved so that machine noise hits
all of them alike. Defaults are small towers so that the script runs in a few minutes on a 2-core CPU; `--preset base`
gives ViT-B/16 + BERT-base. `--compile` adds full TCL with its towers compiled (`TCLModel.compile_encoders()`,
inductor; the Trainer does the same with `torch_compile=True`) and reports `compile_speedup` (eager / compiled step
time); compilation happens during the (longer) warm-up and is not timed.

`--patch_dropout P` times only plain CLIP (the contrastive-only configuration above) at patch dropout 0 and at P
(FLIP: the student vision tower runs on the [CLS] token and max(1, int(N * (1 - P))) of its N patch tokens),
interleaved, and reports `patch_dropout_speedup` (step time at 0 / step time at P).

    python benchmarks/train_step.py [--device cpu|cuda] [--preset small|base] [--batch 32] [--bf16] [--compile]
    python benchmarks/train_step.py --patch_dropout 0.5 [--device cpu|cuda] [--preset small|base] [--bf16]

The last output line is one JSON object with the figures.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from torch.utils.flop_counter import FlopCounterMode
from transformers import BertConfig, VisionTextDualEncoderConfig, VisionTextDualEncoderModel, ViTConfig

from vlalign import TCLConfig, TCLModel

PRESETS = {
    "small": dict(image=64, patch=8, width=256, layers=4, heads=4, text_len=32, vocab=30522),
    "base": dict(image=224, patch=16, width=768, layers=12, heads=12, text_len=32, vocab=30522),
}


def tower_configs(p: dict) -> tuple[ViTConfig, BertConfig]:
    vision = ViTConfig(
        image_size=p["image"],
        patch_size=p["patch"],
        hidden_size=p["width"],
        num_hidden_layers=p["layers"],
        num_attention_heads=p["heads"],
        intermediate_size=4 * p["width"],
        attn_implementation="sdpa",
    )
    text = BertConfig(
        hidden_size=p["width"],
        num_hidden_layers=p["layers"],
        num_attention_heads=p["heads"],
        intermediate_size=4 * p["width"],
        vocab_size=p["vocab"],
        attn_implementation="sdpa",
    )
    return vision, text


def build(kind: str, p: dict, fusion_layers: int = 2, patch_dropout: float = 0.0):
    if kind.endswith("_compiled"):
        model = build(kind[: -len("_compiled")], p, fusion_layers)
        model.compile_encoders()
        return model
    vision, text = tower_configs(p)
    if kind == "dual_encoder":
        config = VisionTextDualEncoderConfig.from_vision_text_configs(vision, text, projection_dim=256)
        return VisionTextDualEncoderModel(config=config)
    if kind in ("tcl_contrastive", "tcl_contrastive_patch_dropout"):
        config = TCLConfig(
            vision_config=vision.to_dict(),
            text_config=text.to_dict(),
            num_fusion_layers=0,
            use_momentum=False,
            imc_weight=0.0,
            lmi_weight=0.0,
            itm_weight=0.0,
            mlm_weight=0.0,
            embed_dim=256,
            patch_dropout=patch_dropout if kind == "tcl_contrastive_patch_dropout" else 0.0,
        )
        return TCLModel(config)
    text = BertConfig(**{**text.to_dict(), "num_hidden_layers": p["layers"] + fusion_layers})
    grid = p["image"] // p["patch"]
    config = TCLConfig(
        vision_config=vision.to_dict(),
        text_config=text.to_dict(),
        num_fusion_layers=fusion_layers,
        embed_dim=256,
        queue_size=4096,
        lmi_image_grid=2 if grid % 2 == 0 else 1,
    )
    return TCLModel(config)


def batch_for(kind: str, p: dict, size: int, device: torch.device, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1000, p["vocab"], (size, p["text_len"]), generator=g)
    ids[:, 0] = 101
    batch = {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "pixel_values": torch.randn(size, 3, p["image"], p["image"], generator=g),
    }
    if kind.startswith("tcl_full"):
        batch["pixel_values_view2"] = torch.randn(size, 3, p["image"], p["image"], generator=g)
    batch["return_loss"] = True
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}


def step_fn(model, batch, optimizer, bf16: bool, device: torch.device):
    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def dense_bf16_peak_tflops(device: torch.device) -> float | None:
    """Dense (no sparsity) bf16 tensor-core peak of known GPUs, from the vendors' data sheets; None if unknown."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, tflops in (("H100 PCIe", 756.0), ("H200", 989.0), ("H100", 989.0), ("A100", 312.0)):  # first match
        if key in name:
            return tflops
    return None


def print_top_operators(step, steps: int, rows: int = 12) -> None:
    """Where a step's time goes, by operator (self time, share of the total)."""
    from torch.profiler import profile

    with profile() as prof:
        for _ in range(steps):
            step()
    events = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)
    total = sum(e.self_cpu_time_total for e in events) or 1
    print(f"full TCL, top operators over {steps} steps (self CPU time share):")
    for event in events[:rows]:
        print(f"  {event.key:<50} {100 * event.self_cpu_time_total / total:5.1f}%  ({event.count} calls)")


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--preset", default="small", choices=sorted(PRESETS))
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--compile", action="store_true", help="also time full TCL with compiled towers")
    parser.add_argument("--compile_warmup", type=int, default=8, help="warm-up steps of the compiled model")
    parser.add_argument(
        "--profile",
        action="store_true",
        help="also print the top operators of 3 full-TCL steps (torch.profiler, self time)",
    )
    parser.add_argument(
        "--patch_dropout",
        type=float,
        default=None,
        help="time only plain CLIP at patch dropout 0 and at this share (in (0, 1)), and report the speed-up",
    )
    parser.add_argument(
        "--peak_tflops",
        type=float,
        default=None,
        help="the device's dense peak TFLOP/s at the run's precision, for MFU (default: known GPUs "
        "in bf16: H100 / H200 SXM 989)",
    )
    args = parser.parse_args()
    device = torch.device(args.device)
    p = PRESETS[args.preset]
    if args.patch_dropout is not None:
        if not 0 < args.patch_dropout < 1:
            parser.error(f"--patch_dropout must be in (0, 1), got {args.patch_dropout}")
        if args.compile or args.profile:
            parser.error("--patch_dropout times plain CLIP only: without --compile / --profile")
        kinds = ("tcl_contrastive", "tcl_contrastive_patch_dropout")
    else:
        kinds = ("dual_encoder", "tcl_contrastive", "tcl_full") + (("tcl_full_compiled",) if args.compile else ())
    runs = {}
    for kind in kinds:
        torch.manual_seed(0)
        model = build(kind, p, patch_dropout=args.patch_dropout or 0.0).to(device).train()
        batch = batch_for(kind, p, args.batch, device)
        optimizer = torch.optim.AdamW([q for q in model.parameters() if q.requires_grad], lr=1e-4)
        step = step_fn(model, batch, optimizer, args.bf16, device)
        if kind.endswith("_compiled"):  # the same arithmetic as its eager twin (counted there)
            flops = runs[kind[: -len("_compiled")]]["flops"]
        else:
            with FlopCounterMode(display=False) as counter:
                step()
            flops = counter.get_total_flops()
        runs[kind] = {"step": step, "flops": flops, "times": []}
        # a compiled model compiles its forward and backward graphs over the first steps (and after a shape change)
        for _ in range(args.compile_warmup if kind.endswith("_compiled") else args.warmup):
            step()
    for _ in range(args.steps):  # interleaved: noise hits every configuration alike
        for kind in kinds:
            sync(device)
            start = time.perf_counter()
            runs[kind]["step"]()
            sync(device)
            runs[kind]["times"].append(time.perf_counter() - start)
    table = {}
    for kind in kinds:
        median = statistics.median(runs[kind]["times"])
        table[kind] = {
            "step_seconds": median,
            "flops": runs[kind]["flops"],
            "flops_per_second": runs[kind]["flops"] / median,
            "samples_per_second": args.batch / median,
        }
    peak = args.peak_tflops or (dense_bf16_peak_tflops(device) if args.bf16 else None)
    print(f"preset {args.preset}, batch {args.batch}, device {device}, bf16 {args.bf16}, median of {args.steps} steps")
    print("| configuration | step s | samples/s | GFLOP / step | achieved GFLOP/s | MFU |")
    print("|---|---|---|---|---|---|")
    for kind in kinds:
        row = table[kind]
        row["mfu"] = row["flops_per_second"] / (peak * 1e12) if peak else None
        mfu = f"{100 * row['mfu']:.1f}%" if peak else "n/a (no --peak_tflops)"
        print(
            f"| {kind} | {row['step_seconds']:.3f} | {row['samples_per_second']:.1f} | {row['flops'] / 1e9:.1f} | "
            f"{row['flops_per_second'] / 1e9:.1f} | {mfu} |"
        )
    figures = {}
    if args.patch_dropout is not None:
        speedup = table["tcl_contrastive"]["step_seconds"] / table["tcl_contrastive_patch_dropout"]["step_seconds"]
        figures = {"patch_dropout": args.patch_dropout, "patch_dropout_speedup": round(speedup, 4)}
        print(
            f"patch_dropout_speedup (plain CLIP step time at patch dropout 0 / at {args.patch_dropout}): {speedup:.3f}"
        )
    else:
        overhead = table["tcl_contrastive"]["step_seconds"] / table["dual_encoder"]["step_seconds"]
        efficiency = table["tcl_full"]["flops_per_second"] / table["dual_encoder"]["flops_per_second"]
        figures = {"overhead_ratio": round(overhead, 4), "tcl_flops_efficiency": round(efficiency, 4)}
        print(f"overhead_ratio (tcl_contrastive / dual_encoder step time, target <= 1.05): {overhead:.3f}")
        print(f"tcl_flops_efficiency (full TCL / dual encoder achieved FLOP/s, target >= 0.9): {efficiency:.3f}")
    extra = {}
    if args.compile:
        extra["compile_speedup"] = round(
            table["tcl_full"]["step_seconds"] / table["tcl_full_compiled"]["step_seconds"], 4
        )
        print(f"compile_speedup (full TCL eager / compiled towers step time): {extra['compile_speedup']:.3f}")
    if args.profile:
        print_top_operators(runs["tcl_full"]["step"], steps=3)
    print(
        json.dumps(
            {
                **figures,
                **extra,
                "preset": args.preset,
                "batch": args.batch,
                "device": str(device),
                "bf16": args.bf16,
                "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                "peak_tflops": peak,
                "configurations": {
                    k: {
                        "step_seconds": round(v["step_seconds"], 4),
                        "samples_per_second": round(v["samples_per_second"], 2),
                        "gflops_per_step": round(v["flops"] / 1e9, 2),
                        "mfu": None if v["mfu"] is None else round(v["mfu"], 4),
                    }
                    for k, v in table.items()
                },
            }
        )
    )


if __name__ == "__main__":
    main()
