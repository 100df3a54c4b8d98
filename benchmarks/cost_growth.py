"""How one training step's time and peak memory grow with the sizes that the objectives scale with.

Dimensions (small towers on CPU: ViT and BERT of width 64, 2 layers, 2 heads, 32x32 images in 8x8 patches (16 patch
tokens), 8-token captions, embed_dim 64; the ALBEF-style models add 1 fusion layer):

- `batch_cached`: the batch, 64 -> 4,096, of the contrastive-only (plain CLIP) TCL configuration with gradient
  caching (`model.gradient_cached_backward`, what `ContrastiveTrainingArguments.gradient_cache_chunk_size` turns on)
  in chunks of `--chunk_size` (64) rows: activations stay those of one chunk; the in-batch logits, B x B, are computed
  over blocks of rows above 1M of them;
- `batch_lmi_cached`: the same with TCL's local mutual information term (`lmi_weight=1`, the student-locals variant
  of the configuration without teachers) up to 2,048: its B x B x P logits (P locals per item), blocked likewise;
- `queue`: the feature-queue length, 1k -> 64k, of full TCL (EMA teachers, CMA + IMC + LMI, ITM, MLM), batch 64;
- `codebook`: the CODIS codebook size K, 64 -> 4,000 (IPOT, 50 iterations: an N x K plan per modality each step),
  batch 64, queue 1,024;
- `mivc_images`: images per item, 1 -> 16, of MIVC (training/configs/mivc_digits.yaml's towers: ViT and Llama of
  width 64, 16 visual tokens per image; attention pooling), 32 items of 16 visual + 8 text tokens;
- `mivc_images_concatenate`: the same with `pooling_mode="concatenate"`, the baseline that gives the LM every image's
  tokens (the LM sequence grows with the images).

Each point runs in a fresh process (forked from this one after the imports, so that imports are paid once): build,
gradients and AdamW state allocated (one optimizer step on zero gradients), then `--steps` timed training steps
(forward + backward + AdamW step) after one warm-up; time is their median. Peak memory is the process's peak resident
set over the warm-up and timed steps minus its resident set just before them (Linux VmHWM, reset through
/proc/self/clear_refs): the step's transient memory (activations, logits, temporaries). The model, gradients, AdamW
state, queues and the batch's inputs are excluded, and reported apart as `state MiB`. The tables give each point's
ratios to the first point of its dimension and the empirical exponent, the least-squares slope of log(cost) over
log(size), over all points and over the last two (the asymptotic one; constant overheads flatten the first points).

    python benchmarks/cost_growth.py [--threads 2] [--steps 5] [--only queue,codebook] [--quick]

The full run takes about a minute on a 2-core CPU; `--quick` (two small points per dimension, one step) a few
seconds per dimension. The last output line is one JSON object with every figure.

Results, and which term dominates at the papers' sizes: BENCHMARKS.md, "Cost as the work grows".
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))

from peers import peak_rss, reset_peak_rss  # noqa: E402

WIDTH, LAYERS, HEADS, IMAGE, PATCH, TEXT_LEN, VOCAB, EMBED = 64, 2, 2, 32, 8, 8, 1000, 64

DIMENSIONS = {
    # name: (what varies, full points, quick points)
    "batch_cached": ("batch", (64, 256, 1024, 4096), (16, 32)),
    "batch_lmi_cached": ("batch", (64, 256, 1024, 2048), (16, 32)),
    "queue": ("queue size", (1024, 4096, 16384, 65536), (256, 1024)),
    "codebook": ("codebook size", (64, 256, 1000, 4000), (16, 64)),
    "mivc_images": ("images per item", (1, 2, 4, 8, 16), (1, 2)),
    "mivc_images_concatenate": ("images per item", (1, 2, 4, 8, 16), (1, 2)),
}


# ----------------------------------------------------------------------------------------------------------------
# builders: each returns (model, one training step's forward + backward as a function)


def tower_configs(text_layers: int) -> tuple[dict, dict]:
    vision = dict(
        model_type="vit",
        image_size=IMAGE,
        patch_size=PATCH,
        hidden_size=WIDTH,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        intermediate_size=4 * WIDTH,
    )
    text = dict(
        model_type="bert",
        vocab_size=VOCAB,
        hidden_size=WIDTH,
        num_hidden_layers=text_layers,
        num_attention_heads=HEADS,
        intermediate_size=4 * WIDTH,
        max_position_embeddings=32,
    )
    return vision, text


def contrastive_batch(size: int, two_views: bool) -> dict:
    import torch

    g = torch.Generator().manual_seed(1)
    ids = torch.randint(5, VOCAB, (size, TEXT_LEN), generator=g)
    ids[:, 0] = 2
    batch = {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "pixel_values": torch.randn(size, 3, IMAGE, IMAGE, generator=g),
    }
    if two_views:
        batch["pixel_values_view2"] = torch.randn(size, 3, IMAGE, IMAGE, generator=g)
    return batch


def build_cached_clip(batch: int, chunk: int, lmi: bool):
    from data_loading import PLAIN_CLIP

    from vlalign import TCLConfig, TCLModel

    vision, text = tower_configs(LAYERS)
    switches = {**PLAIN_CLIP, "lmi_weight": 1.0 if lmi else 0.0}
    config = TCLConfig(vision_config=vision, text_config=text, embed_dim=EMBED, lmi_image_grid=4, **switches)
    model = TCLModel(config)
    inputs = contrastive_batch(batch, two_views=False)

    def forward_backward():
        model.gradient_cached_backward(**inputs, chunk_size=min(chunk, batch))

    return model, forward_backward


def build_full_model(config_class, model_class, **fields):
    """Full TCL or CODIS (EMA teachers, queues, every objective, one fusion layer), batch 64 with two views."""
    vision, text = tower_configs(LAYERS + 1)
    config = config_class(
        vision_config=vision, text_config=text, num_fusion_layers=1, embed_dim=EMBED, mask_token_id=4, **fields
    )
    model = model_class(config)
    inputs = contrastive_batch(64, two_views=True)

    def forward_backward():
        model(**inputs, return_loss=True).loss.backward()

    return model, forward_backward


def build_mivc(images: int, mode: str):
    import torch
    import yaml

    from vlalign import MIVCConfig, MIVCForConditionalGeneration

    section = yaml.safe_load((REPO / "training/configs/mivc_digits.yaml").read_text())["model"]
    image_token_id, vocab = 150, 160
    text = dict(section["text_config"], vocab_size=vocab, max_position_embeddings=512, bos_token_id=2, eos_token_id=3)
    fields = {k: v for k, v in section.items() if k not in ("model_type", "vision_config", "text_config")}
    config = MIVCConfig(
        vision_config=section["vision_config"],
        text_config=text,
        **{**fields, "pooling_mode": mode, "image_token_id": image_token_id},
    )
    model = MIVCForConditionalGeneration(config)
    items, words = 32, 8
    visual = config.image_seq_length * (images if mode == "concatenate" else 1)
    g = torch.Generator().manual_seed(1)
    ids = torch.cat(
        [
            torch.full((items, 1), 2),
            torch.full((items, visual), image_token_id),
            torch.randint(5, image_token_id, (items, words), generator=g),
        ],
        dim=1,
    )
    labels = torch.full_like(ids, -100)
    labels[:, -2:] = ids[:, -2:]  # the answer: the last words
    size = config.vision_config.image_size
    inputs = {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "pixel_values": torch.randn(items, images, 3, size, size, generator=g),
        "labels": labels,
    }

    def forward_backward():
        model(**inputs).loss.backward()

    return model, forward_backward


def build(dimension: str, value: int, chunk: int):
    if dimension in ("batch_cached", "batch_lmi_cached"):
        return build_cached_clip(value, chunk, lmi=dimension == "batch_lmi_cached")
    from vlalign import CODISConfig, CODISModel, TCLConfig, TCLModel

    if dimension == "queue":
        return build_full_model(TCLConfig, TCLModel, queue_size=value, lmi_image_grid=2)
    if dimension == "codebook":
        return build_full_model(CODISConfig, CODISModel, queue_size=1024, codebook_size=value)
    return build_mivc(value, "concatenate" if dimension == "mivc_images_concatenate" else "attention")


# ----------------------------------------------------------------------------------------------------------------
# one point, in its own process


def measure(dimension: str, value: int, chunk: int, steps: int, threads: int) -> dict:
    import torch

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    started = reset_peak_rss()
    model, forward_backward = build(dimension, value, chunk)
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4)
    # gradients and AdamW state exist before the baseline, so that the peak is the step's own memory
    for p in trainable:
        p.grad = torch.zeros_like(p)
    optimizer.step()
    optimizer.zero_grad(set_to_none=False)

    def step() -> float:
        start = time.perf_counter()
        forward_backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=False)
        return time.perf_counter() - start

    resident = reset_peak_rss()
    step()  # warm-up
    times = [step() for _ in range(steps)]
    return {
        "value": value,
        "step_seconds": statistics.median(times),
        "peak_mib": (peak_rss() - resident) / 2**20,
        "state_mib": (resident - started) / 2**20,
    }


def _child(connection, *args) -> None:
    try:
        connection.send(measure(*args))
    except Exception as error:  # noqa: BLE001 - reported by the parent with the point that failed
        connection.send({"error": f"{type(error).__name__}: {error}"})
    connection.close()


def run_point(context, *args) -> dict:
    receiver, sender = context.Pipe(duplex=False)
    process = context.Process(target=_child, args=(sender, *args))
    process.start()
    sender.close()
    try:
        result = receiver.recv()
    except EOFError:
        result = {"error": "the process ended without a result"}
    process.join()
    if "error" in result:
        raise SystemExit(f"point {args[:2]} failed: {result['error']} (exit code {process.exitcode})")
    return result


def slope(xs, ys) -> float | None:
    """Least-squares slope of log(y) over log(x)."""
    points = [(math.log(x), math.log(y)) for x, y in zip(xs, ys) if x > 0 and y > 0]
    if len(points) < 2:
        return None
    mean_x = sum(p[0] for p in points) / len(points)
    mean_y = sum(p[1] for p in points) / len(points)
    spread = sum((p[0] - mean_x) ** 2 for p in points)
    return sum((p[0] - mean_x) * (p[1] - mean_y) for p in points) / spread


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per point (median)")
    parser.add_argument("--chunk_size", type=int, default=64, help="gradient-cache chunk of the batch dimensions")
    parser.add_argument("--only", default="", help="comma-separated subset of: " + ", ".join(DIMENSIONS))
    parser.add_argument("--quick", action="store_true", help="two small points per dimension, one step: a smoke run")
    parser.add_argument("--points", default="", help="comma-separated sizes instead of the defaults (with one --only)")
    args = parser.parse_args()
    dimensions = [d for d in args.only.split(",") if d] or list(DIMENSIONS)
    unknown = [d for d in dimensions if d not in DIMENSIONS]
    if unknown:
        raise SystemExit(f"unknown dimensions {unknown}; choose from {list(DIMENSIONS)}")
    if args.points and len(dimensions) != 1:
        raise SystemExit("--points needs exactly one dimension in --only")
    steps = 1 if args.quick else args.steps
    chunk = 8 if args.quick else args.chunk_size

    # imported once here; every point's process is forked from this one (before any torch operation has started
    # a thread pool), so that it starts with the imports done and its own clean memory reading
    import torch  # noqa: F401
    from data_loading import PLAIN_CLIP  # noqa: F401

    import vlalign  # noqa: F401

    methods = multiprocessing.get_all_start_methods()
    context = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
    began = time.perf_counter()
    results = {}
    for dimension in dimensions:
        what, full, quick = DIMENSIONS[dimension]
        points = []
        sizes = [int(v) for v in args.points.split(",")] if args.points else quick if args.quick else full
        for value in sizes:
            points.append(run_point(context, dimension, value, chunk, steps, args.threads))
            print(
                f"  {dimension} {value}: {points[-1]['step_seconds']:.3f} s, {points[-1]['peak_mib']:.0f} MiB",
                file=sys.stderr,
                flush=True,
            )
        values = [p["value"] for p in points]
        results[dimension] = {
            "varies": what,
            "points": [{k: round(v, 4) if isinstance(v, float) else v for k, v in p.items()} for p in points],
            "time_exponent": slope(values, [p["step_seconds"] for p in points]),
            "time_exponent_last_two": slope(values[-2:], [p["step_seconds"] for p in points[-2:]]),
            "memory_exponent": slope(values, [p["peak_mib"] for p in points]),
            "memory_exponent_last_two": slope(values[-2:], [p["peak_mib"] for p in points[-2:]]),
        }
    print(
        f"{args.threads} threads, median of {steps} steps per point, gradient-cache chunk {chunk}; peak = the step's "
        "peak RSS above the resident model, gradients, AdamW state and queues (state MiB: their size)"
    )
    for dimension, r in results.items():
        first = r["points"][0]
        print(f"\n{dimension} ({r['varies']})")
        print("| size | step s | x first | peak MiB | x first | state MiB |")
        print("|---:|---:|---:|---:|---:|---:|")
        for p in r["points"]:
            time_ratio = p["step_seconds"] / first["step_seconds"]
            memory_ratio = p["peak_mib"] / first["peak_mib"] if first["peak_mib"] > 0 else float("nan")
            print(
                f"| {p['value']:,} | {p['step_seconds']:.3f} | {time_ratio:.2f} | {p['peak_mib']:.0f} | "
                f"{memory_ratio:.2f} | {p['state_mib']:.0f} |"
            )
        print(
            f"exponent (log-log slope) time: {_fmt(r['time_exponent'])} "
            f"(last two points {_fmt(r['time_exponent_last_two'])}); "
            f"peak memory: {_fmt(r['memory_exponent'])} (last two {_fmt(r['memory_exponent_last_two'])})"
        )
    for r in results.values():
        for key in ("time_exponent", "time_exponent_last_two", "memory_exponent", "memory_exponent_last_two"):
            r[key] = None if r[key] is None else round(r[key], 3)
    print(
        json.dumps(
            {
                "threads": args.threads,
                "steps": steps,
                "chunk_size": chunk,
                "quick": args.quick,
                "wall_seconds": round(time.perf_counter() - began, 1),
                "dimensions": results,
            }
        )
    )


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"


if __name__ == "__main__":
    main()
