"""Training-step throughput and peak memory of vlalign's plain CLIP configuration against its peers, at the same
towers and batch, measured in one run.

Peers (forward + backward + AdamW step each; same random batch, same learning rate, fp32 unless `--bf16`):

- `vlalign_plain_clip`: `TCLModel` in the configuration `PLAIN_CLIP` of benchmarks/data_loading.py (no EMA teachers,
  no queue, IMC / LMI / ITM / MLM weights 0, no fusion layers: the symmetric InfoNCE of the two towers), built as
  training/train.py builds the digits demo;
- `hf_dual_encoder`: transformers' `VisionTextDualEncoderModel` from the same ViT and BERT configs (random init, no
  download), with its own CLIP loss (`return_loss=True`);
- `open_clip`: `open_clip.CLIP` built from a config dict of the same widths, depths, heads, MLP ratio, patch size,
  image size, vocabulary and context length, with `open_clip.ClipLoss`; skipped, with the reason printed, when
  `open_clip_torch` does not import (it is no dependency of vlalign, and needs a torchvision that imports beside the
  installed torch).

What differs between the towers (the parameter counts in the table show by how much):
- vlalign and the HF dual encoder run the same transformers `ViTModel` / `BertModel` classes from the same configs;
  vlalign builds them without their poolers (the feature is the [CLS] token, as in ALBEF / TCL) and projects with
  biased linear layers, the HF dual encoder keeps ViT's and BERT's poolers (tanh(dense([CLS]))) and projects
  without bias.
- open_clip's native towers are its own code: the ViT's patch convolution has no bias and it adds a pre-transformer
  LayerNorm; the text transformer is pre-LayerNorm (BERT is post-LayerNorm) with no token-type embeddings and no
  embedding LayerNorm, and by open_clip's defaults, kept here, its attention is causal and the feature is the token
  with the highest id (CLIP's end-of-text rule); its position table is the context length long (BERT's is
  `max_position_embeddings`, 32 for the digits). Projections are bias-free matrices.

Timing: one long-lived worker subprocess per peer, driven in turn by this process: each of `--rounds` rounds runs
`--steps_per_round` timed steps of every peer, one peer at a time (the order rotates each round), so machine noise
hits all peers alike; the figures are medians over all timed steps, after `--warmup` untimed steps. Threads are
fixed (`--threads`, also OMP_NUM_THREADS of the workers). Peak memory: on CPU the worker's peak resident set from
just before the model is built (after every import) minus its resident set at that moment: model, gradients, AdamW
state, activations, plus allocator slack, so an upper bound of what training needs (`peak_rss`: Linux's VmHWM,
reset there through /proc/self/clear_refs; `ru_maxrss` would not do, since a child inherits its parent's high-water
mark across fork + exec); on CUDA `torch.cuda.max_memory_allocated` over `memory_allocated` before the build.

Sizes: `--preset digits` (default) is the digits demo's towers (training/configs/tcl_digits.yaml's model section:
32x32 images, 4x4 patches, width 128, 3 layers, 4 heads, MLP 256; the digits tokenizer's 144-token vocabulary,
16-token captions; embed_dim 64); `small` and `base` are benchmarks/train_step.py's presets (width 256 / 4 layers on
64x64 images, and ViT-B/16 + BERT-base; 32-token captions, BERT's 30,522-token vocabulary, embed_dim 256).

    python benchmarks/peers.py [--preset digits|small|base] [--batch 64] [--threads 2] [--rounds 20]
        [--steps_per_round 3] [--device cpu|cuda] [--bf16]

The defaults take about 2 minutes on a 2-core CPU (a digits step at batch 64 is 0.2-0.4 s; start-up of the three
workers about 40 s). The last output line is one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PEERS = ("vlalign_plain_clip", "hf_dual_encoder", "open_clip")


# ----------------------------------------------------------------------------------------------------------------
# sizes


def digits_sizes() -> dict:
    """The digits demo's towers (tcl_digits.yaml) and the digits tokenizer's vocabulary and caption length."""
    import yaml

    from vlalign.data import build_digits_processor

    section = yaml.safe_load((REPO / "training/configs/tcl_digits.yaml").read_text())["model"]
    processor = build_digits_processor(image_size=section["vision_config"]["image_size"])
    tokenizer = processor.tokenizer
    text = dict(section["text_config"], vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id)
    return {
        "vision_config": section["vision_config"],
        "text_config": text,
        "text_len": processor.max_length,
        "cls_token_id": tokenizer.cls_token_id,
        "mask_token_id": tokenizer.mask_token_id,
        "embed_dim": section["embed_dim"],
        "model_section": section,
    }


def preset_sizes(name: str) -> dict:
    """benchmarks/train_step.py's presets, as config dicts."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    import train_step

    p = train_step.PRESETS[name]
    vision, text = train_step.tower_configs(p)
    return {
        "vision_config": vision.to_dict(),
        "text_config": text.to_dict(),
        "text_len": p["text_len"],
        "cls_token_id": 101,
        "mask_token_id": 103,
        "embed_dim": 256,
        "model_section": None,
    }


# ----------------------------------------------------------------------------------------------------------------
# builders (run in the workers)


def build_vlalign(sizes: dict):
    from data_loading import PLAIN_CLIP

    from vlalign import TCLConfig, TCLModel

    # the same fields training/train.py's build_model gives the digits demo (its model section, the tokenizer's
    # vocabulary and special ids), with the plain CLIP switches on top
    # (the LMI grid only has to divide the patch grid: LMI is off here)
    section = sizes["model_section"] or {"embed_dim": sizes["embed_dim"], "lmi_image_grid": 1}
    overrides = {k: v for k, v in section.items() if k not in ("vision_config", "text_config", "model_type")}
    config = TCLConfig(
        vision_config=dict(sizes["vision_config"]),
        text_config=dict(sizes["text_config"]),
        mask_token_id=sizes["mask_token_id"],
        **{**overrides, **PLAIN_CLIP},
    )
    model = TCLModel(config)

    def loss_fn(batch):
        return model(**batch, return_loss=True).loss

    return model, loss_fn


def build_hf_dual_encoder(sizes: dict):
    from transformers import AutoConfig, VisionTextDualEncoderConfig, VisionTextDualEncoderModel

    vision = AutoConfig.for_model(**sizes["vision_config"])
    text = AutoConfig.for_model(**sizes["text_config"])
    config = VisionTextDualEncoderConfig.from_vision_text_configs(vision, text, projection_dim=sizes["embed_dim"])
    model = VisionTextDualEncoderModel(config=config)

    def loss_fn(batch):
        return model(**batch, return_loss=True).loss

    return model, loss_fn


def open_clip_configs(sizes: dict) -> tuple[dict, dict]:
    """open_clip's vision / text config dicts with the HF configs' widths, depths, heads, MLP ratio and sizes."""
    v, t = sizes["vision_config"], sizes["text_config"]
    vision_cfg = dict(
        layers=v["num_hidden_layers"],
        width=v["hidden_size"],
        head_width=v["hidden_size"] // v["num_attention_heads"],
        mlp_ratio=v["intermediate_size"] / v["hidden_size"],
        patch_size=v["patch_size"],
        image_size=v["image_size"],
    )
    text_cfg = dict(
        context_length=sizes["text_len"],
        vocab_size=t["vocab_size"],
        width=t["hidden_size"],
        heads=t["num_attention_heads"],
        layers=t["num_hidden_layers"],
        mlp_ratio=t["intermediate_size"] / t["hidden_size"],
    )
    return vision_cfg, text_cfg


def build_open_clip(sizes: dict):
    import open_clip

    vision_cfg, text_cfg = open_clip_configs(sizes)
    model = open_clip.CLIP(sizes["embed_dim"], vision_cfg=vision_cfg, text_cfg=text_cfg, output_dict=True)
    loss = open_clip.ClipLoss()

    def loss_fn(batch):
        out = model(image=batch["pixel_values"], text=batch["input_ids"])
        return loss(out["image_features"], out["text_features"], out["logit_scale"])

    return model, loss_fn


BUILDERS = {"vlalign_plain_clip": build_vlalign, "hf_dual_encoder": build_hf_dual_encoder, "open_clip": build_open_clip}


def parameter_groups(peer: str, model) -> dict:
    """Parameter counts of the vision tower, the text tower and the rest (projections, temperature)."""
    if peer == "open_clip":

        def group(name):
            if name.startswith("visual.") and name != "visual.proj":
                return "vision"
            if name.split(".")[0] in ("token_embedding", "positional_embedding", "transformer", "ln_final"):
                return "text"
            return "heads"
    else:

        def group(name):
            return {"vision_model": "vision", "text_model": "text"}.get(name.split(".")[0], "heads")

    counts = {"vision": 0, "text": 0, "heads": 0}
    for name, parameter in model.named_parameters():
        counts[group(name)] += parameter.numel()
    counts["total"] = sum(counts.values())
    return counts


def make_batch(sizes: dict, batch: int, device) -> dict:
    import torch

    g = torch.Generator().manual_seed(0)
    vision = sizes["vision_config"]
    ids = torch.randint(5, sizes["text_config"]["vocab_size"], (batch, sizes["text_len"]), generator=g)
    ids[:, 0] = sizes["cls_token_id"]
    return {
        "input_ids": ids.to(device),
        "attention_mask": torch.ones_like(ids).to(device),
        "pixel_values": torch.randn(batch, 3, vision["image_size"], vision["image_size"], generator=g).to(device),
    }


# ----------------------------------------------------------------------------------------------------------------
# worker: builds one peer, then runs steps when asked (one JSON line per request and answer)


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def reset_peak_rss() -> int:
    """Start a new peak-RSS window here; returns the resident set (bytes) at its start. Linux: VmHWM is reset
    through /proc/self/clear_refs. Elsewhere (no /proc) the window is the process's life so far (`ru_maxrss`)."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return _status_kib("VmRSS") * 1024
    except OSError:
        return peak_rss()


def peak_rss() -> int:
    """The process's peak resident set in bytes since `reset_peak_rss` (Linux) or since it started."""
    try:
        return _status_kib("VmHWM") * 1024
    except OSError:
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, KiB on Linux


def import_for(peer: str) -> None:
    """What a peer's builder imports, imported before the memory baseline is taken: transformers imports its model
    classes lazily, on first use, and those modules alone weigh over 100 MiB of resident memory."""
    import torch  # noqa: F401

    if peer == "vlalign_plain_clip":
        sys.path.insert(0, str(REPO / "training"))
        sys.path.insert(0, str(REPO / "benchmarks"))
        import data_loading  # noqa: F401
        from transformers import BertModel, ViTModel  # noqa: F401

        from vlalign import TCLConfig, TCLModel  # noqa: F401
    elif peer == "hf_dual_encoder":
        from transformers import BertModel, VisionTextDualEncoderModel, ViTModel  # noqa: F401
    else:
        import open_clip  # noqa: F401


def worker(peer: str, args) -> None:
    channel = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # anything a library prints goes to stderr, not into the protocol

    def send(message: dict) -> None:
        channel.write(json.dumps(message) + "\n")

    try:
        import_for(peer)
    except Exception as error:  # noqa: BLE001 - any import failure means: skip this peer
        send({"skipped": f"{type(error).__name__}: {error}"})
        return
    import torch

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    sizes = json.loads(args.sizes)
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
    else:
        before = reset_peak_rss()
    torch.manual_seed(0)
    model, loss_fn = BUILDERS[peer](sizes)
    model = model.to(device).train()
    batch = make_batch(sizes, args.batch, device)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def step() -> float:
        if cuda:
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16):
            loss = loss_fn(batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize(device)
        return time.perf_counter() - start

    for _ in range(args.warmup):
        step()
    attention = "torch.nn.MultiheadAttention"  # open_clip's native towers
    if hasattr(model, "vision_model"):
        attention = {part: getattr(model, part).config._attn_implementation for part in ("vision_model", "text_model")}
    send(
        {
            "ready": True,
            "parameters": parameter_groups(peer, model),
            "attention": attention,
        }
    )
    for line in sys.stdin:
        request = json.loads(line)
        if request["op"] == "steps":
            send({"times": [step() for _ in range(request["count"])]})
        elif request["op"] == "report":
            if cuda:
                peak = torch.cuda.max_memory_allocated(device) - before
            else:
                peak = peak_rss() - before
            send({"peak_mib": peak / 2**20})
            return


# ----------------------------------------------------------------------------------------------------------------
# driver


def start_worker(peer: str, args, sizes: dict) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    command = [sys.executable, __file__, "--worker", peer, "--sizes", json.dumps(sizes)]
    for name in ("batch", "threads", "warmup", "device"):
        command += [f"--{name}", str(getattr(args, name))]
    if args.bf16:
        command.append("--bf16")
    return subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1, env=env)


def ask(process: subprocess.Popen, request: dict | None = None) -> dict:
    if request is not None:
        process.stdin.write(json.dumps(request) + "\n")
        process.stdin.flush()
    line = process.stdout.readline()
    if not line:
        raise RuntimeError(f"worker {process.args[3]} ended without answering (exit code {process.wait()})")
    return json.loads(line)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="digits", choices=("digits", "small", "base"))
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--steps_per_round", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast (all peers)")
    parser.add_argument("--only", default="", help="comma-separated subset of: " + ", ".join(PEERS))
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--sizes", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args)
        return

    peers = [p for p in args.only.split(",") if p] or list(PEERS)
    unknown = [p for p in peers if p not in PEERS]
    if unknown:
        raise SystemExit(f"unknown peers {unknown}; choose from {list(PEERS)}")
    sizes = digits_sizes() if args.preset == "digits" else preset_sizes(args.preset)
    # workers are started (and build their models) one after another, so that start-up does not overlap timing
    workers, info, skipped = {}, {}, {}
    for peer in peers:
        process = start_worker(peer, args, sizes)
        answer = ask(process)
        if "skipped" in answer:
            skipped[peer] = answer["skipped"]
            process.wait()
            print(f"{peer}: skipped, it does not import here ({answer['skipped']})", file=sys.stderr)
            continue
        workers[peer], info[peer] = process, answer
    if "vlalign_plain_clip" not in workers:
        raise SystemExit("vlalign_plain_clip must be among the peers (the ratios are relative to it)")
    times = {peer: [] for peer in workers}
    order = list(workers)
    began = time.perf_counter()
    for index in range(args.rounds):
        shift = index % len(order)
        for peer in order[shift:] + order[:shift]:
            times[peer] += ask(workers[peer], {"op": "steps", "count": args.steps_per_round})["times"]
    timing_seconds = time.perf_counter() - began
    results = {}
    for peer, process in workers.items():
        peak = ask(process, {"op": "report"})["peak_mib"]
        process.wait()
        step = statistics.median(times[peer])
        results[peer] = {
            "step_seconds": round(step, 5),
            "samples_per_second": round(args.batch / step, 2),
            "peak_mib": round(peak, 1),
            "parameters": info[peer]["parameters"],
            "attention": info[peer]["attention"],
        }
    ours = results["vlalign_plain_clip"]
    for row in results.values():
        row["vlalign_throughput_ratio"] = round(ours["samples_per_second"] / row["samples_per_second"], 4)
        row["vlalign_peak_memory_ratio"] = round(ours["peak_mib"] / row["peak_mib"], 4) if row["peak_mib"] else None

    memory = "CUDA max_memory_allocated" if args.device.startswith("cuda") else "peak RSS growth over pre-build"
    print(
        f"preset {args.preset}, batch {args.batch}, device {args.device}, {args.threads} threads, bf16 {args.bf16}; "
        f"median of {args.rounds} interleaved rounds x {args.steps_per_round} steps; peak = {memory}"
    )
    print(
        "| peer | samples/s | step ms | peak MiB | vlalign / peer samples/s | vlalign / peer peak | parameters "
        "(vision + text + heads) |"
    )
    print("|---|---:|---:|---:|---:|---:|---|")
    for peer, row in results.items():
        p = row["parameters"]
        ratio_peak = "-" if row["vlalign_peak_memory_ratio"] is None else f"{row['vlalign_peak_memory_ratio']:.2f}"
        print(
            f"| {peer} | {row['samples_per_second']:.1f} | {1000 * row['step_seconds']:.1f} | {row['peak_mib']:.0f} | "
            f"{row['vlalign_throughput_ratio']:.2f} | {ratio_peak} | {p['total']:,} ({p['vision']:,} + "
            f"{p['text']:,} + {p['heads']:,}) |"
        )
    for peer, reason in skipped.items():
        print(f"{peer}: skipped ({reason})")
    print(
        json.dumps(
            {
                "preset": args.preset,
                "batch": args.batch,
                "device": args.device,
                "threads": args.threads,
                "bf16": args.bf16,
                "rounds": args.rounds,
                "steps_per_round": args.steps_per_round,
                "timing_seconds": round(timing_seconds, 1),
                "peers": results,
                "skipped": skipped,
                "versions": versions(),
            }
        )
    )


def versions() -> dict:
    """Versions of what was measured (open_clip_torch only where it is installed)."""
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for package in ("torch", "torchvision", "transformers", "open_clip_torch", "vlalign"):
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            found[package] = None
    return found


if __name__ == "__main__":
    main()
