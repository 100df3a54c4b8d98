"""Retrieval evaluation speed: `vlalign.evaluation.retrieval_metrics` against the bare work it cannot avoid.

COCO-5K sized by default: 25,000 captions x 5,000 images, 256-d L2-normalised embeddings, 5 captions per image.
The reference is one bare similarity matmul per direction plus its top-k (k = 10), timed side by side in the same
process (best of `--repeats`); `eval_ratio` = recall@1/5/10 both ways (chunked, several positives) / reference.
Target: eval_ratio <= 1.5. Memory of the chunked evaluation is O(chunk_size x candidates) (see `--chunk_size`).

    python benchmarks/retrieval_eval.py [--device cpu|cuda] [--images 5000] [--captions_per_image 5]

The last output line is one JSON object with the figures.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from vlalign.evaluation import retrieval_metrics


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def best_time(fn, device: torch.device, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--images", type=int, default=5000)
    parser.add_argument("--captions_per_image", type=int, default=5)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--chunk_size", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    device = torch.device(args.device)
    g = torch.Generator().manual_seed(args.seed)
    images = torch.nn.functional.normalize(torch.randn(args.images, args.dim, generator=g), dim=1)
    image_ids = torch.arange(args.images)
    text_ids = image_ids.repeat_interleave(args.captions_per_image)
    # captions near their image, so recall is neither 0 nor 100
    texts = torch.nn.functional.normalize(
        images[text_ids] + 0.35 * torch.randn(len(text_ids), args.dim, generator=g), dim=1
    )
    images, texts = images.to(device), texts.to(device)

    def reference():
        # the unavoidable work: one similarity matmul per direction and its top-10
        (texts @ images.t()).topk(10, dim=1)
        (images @ texts.t()).topk(10, dim=1)

    results = {}

    def evaluate():
        results.update(
            retrieval_metrics(images, texts, image_ids.to(device), text_ids.to(device), chunk_size=args.chunk_size)
        )

    reference()  # warm-up
    evaluate()
    reference_s = best_time(reference, device, args.repeats)
    evaluate_s = best_time(evaluate, device, args.repeats)
    ratio = evaluate_s / reference_s
    print(f"{len(texts):,} captions x {args.images:,} images, dim {args.dim}, device {device}, chunk {args.chunk_size}")
    print(f"| timed | seconds (best of {args.repeats}) |")
    print("|---|---|")
    print(f"| bare matmul + top-10, both directions | {reference_s:.3f} |")
    print(f"| retrieval_metrics (R@1/5/10 both ways) | {evaluate_s:.3f} |")
    print(f"| eval_ratio (target <= 1.5) | {ratio:.2f} |")
    print(
        json.dumps(
            {
                "eval_ratio": round(ratio, 3),
                "reference_seconds": round(reference_s, 4),
                "evaluate_seconds": round(evaluate_s, 4),
                "num_captions": len(texts),
                "num_images": args.images,
                "dim": args.dim,
                "chunk_size": args.chunk_size,
                "device": str(device),
                "i2t_recall@1": results["i2t_recall@1"],
                "t2i_recall@1": results["t2i_recall@1"],
            }
        )
    )


if __name__ == "__main__":
    main()
