"""Peak memory and step time of one training step with and without gradient caching.

    python benchmarks/grad_cache_memory.py [--device cpu|cuda] [--chunk_size 128] [--batch_sizes 128,1024]

Model: the contrastive-only TCL configuration (CLIP loss, no momentum / fusion) with 4-layer, width-256 towers
on 32x32 images (64 patches) and 16-token captions. Each (batch size, caching) point runs in a fresh
subprocess, so the peaks do not contaminate each other. Memory is the step's peak *above* the memory held
before the step (model, optimizer-free, inputs): on CUDA `torch.cuda.max_memory_allocated`, on CPU the growth of
the process's peak resident set (`ru_maxrss`), which also counts allocator slack, so CPU figures are upper bounds.
Time is the median of 3 steps after a warm-up step.

Targets (docs/issue 3): with caching, peak(1024) / peak(128) <= 1.5, and the cached step at 1024 within 1.3x of
8x the uncached step at 128. The last line is a JSON object with every figure and the ratios.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time


def measure(batch: int, chunk: int | None, device: str, threads: int) -> dict:
    import resource

    import torch

    from vlalign import TCLConfig, TCLModel

    torch.manual_seed(0)
    torch.set_num_threads(threads)
    width = 256
    config = TCLConfig(
        vision_config=dict(
            model_type="vit",
            image_size=32,
            patch_size=4,
            hidden_size=width,
            num_hidden_layers=4,
            num_attention_heads=4,
            intermediate_size=4 * width,
        ),
        text_config=dict(
            model_type="bert",
            vocab_size=1000,
            hidden_size=width,
            num_hidden_layers=4,
            num_attention_heads=4,
            intermediate_size=4 * width,
            max_position_embeddings=32,
        ),
        num_fusion_layers=0,
        use_momentum=False,
        imc_weight=0.0,
        lmi_weight=0.0,
        itm_weight=0.0,
        mlm_weight=0.0,
        embed_dim=128,
        lmi_image_grid=4,
    )
    model = TCLModel(config).to(device).train()
    g = torch.Generator().manual_seed(1)
    inputs = {
        "input_ids": torch.randint(5, 1000, (batch, 16), generator=g).to(device),
        "attention_mask": torch.ones(batch, 16, dtype=torch.long, device=device),
        "pixel_values": torch.randn(batch, 3, 32, 32, generator=g).to(device),
    }

    def step():
        model.zero_grad(set_to_none=False)
        if chunk:
            model.gradient_cached_backward(**inputs, chunk_size=chunk)
        else:
            model(**inputs, return_loss=True).loss.backward()
        if device == "cuda":
            torch.cuda.synchronize()

    # gradients allocated once before measuring, so both modes start from the same resident state
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    step()
    times = []
    for _ in range(3):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    if device == "cuda":
        peak = torch.cuda.max_memory_allocated() - before
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
    return {"batch": batch, "chunk": chunk, "peak_mib": peak / 2**20, "step_seconds": statistics.median(times)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--chunk_size", type=int, default=128)
    parser.add_argument("--batch_sizes", default="128,1024")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        batch, chunk = (int(x) for x in args.worker.split(","))
        print(json.dumps(measure(batch, chunk or None, args.device, args.threads)))
        return

    small, large = (int(x) for x in args.batch_sizes.split(","))
    results = {}
    for batch in (small, large):
        for chunk in (0, args.chunk_size):
            out = subprocess.run(
                [
                    sys.executable,
                    __file__,
                    "--device",
                    args.device,
                    "--threads",
                    str(args.threads),
                    "--worker",
                    f"{batch},{chunk}",
                ],
                capture_output=True,
                text=True,
                check=True,
            )
            results[(batch, bool(chunk))] = json.loads(out.stdout.strip().splitlines()[-1])

    print(f"device {args.device}, chunk size {args.chunk_size}; peak = step memory above the pre-step baseline")
    print("| batch | gradient cache | peak MiB | step s |")
    print("|---|---|---|---|")
    for (batch, cached), r in results.items():
        print(f"| {batch} | {'yes' if cached else 'no'} | {r['peak_mib']:.0f} | {r['step_seconds']:.3f} |")
    scale = large / small
    figures = {
        "device": args.device,
        "chunk_size": args.chunk_size,
        "peak_mib": {f"{b}_{'cached' if c else 'uncached'}": round(r["peak_mib"], 1) for (b, c), r in results.items()},
        "step_seconds": {
            f"{b}_{'cached' if c else 'uncached'}": round(r["step_seconds"], 4) for (b, c), r in results.items()
        },
        "cached_peak_ratio_large_over_small": round(
            results[(large, True)]["peak_mib"] / results[(small, True)]["peak_mib"], 3
        ),
        "uncached_peak_ratio_large_over_small": round(
            results[(large, False)]["peak_mib"] / results[(small, False)]["peak_mib"], 3
        ),
        "cached_large_time_over_scaled_uncached_small": round(
            results[(large, True)]["step_seconds"] / (scale * results[(small, False)]["step_seconds"]), 3
        ),
    }
    print(
        f"cached peak({large})/peak({small}) = {figures['cached_peak_ratio_large_over_small']} (target <= 1.5); "
        f"uncached: {figures['uncached_peak_ratio_large_over_small']}"
    )
    print(
        f"cached step({large}) / ({scale:g} x uncached step({small})) = "
        f"{figures['cached_large_time_over_scaled_uncached_small']} (target <= 1.3)"
    )
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
