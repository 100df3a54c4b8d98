"""Evaluation of vlalign models: the metrics, and running them on a model.

- Metrics (pure torch, no model): cross-modal retrieval Recall@k both ways (`retrieval_metrics`, in query chunks so
  that COCO-5K sized sets, 25,000 captions x 5,000 images, need O(chunk_size x N) memory instead of the full
  N_txt x N_img similarity matrix; optional re-ranking of the top candidates), CLIP-style zero-shot classification
  from prompt ensembles (`zero_shot_classifier`, `zero_shot_metrics`: top-1, top-5, mean per-class recall; the
  template sets per dataset, `ZERO_SHOT_TEMPLATE_SETS`), codebook usage and purity, exact-match
  answers, and the "alignment not started" test of the cross-modal losses. `RETRIEVAL_METRIC_PATH` is the
  `evaluate` metric script of `retrieval_metrics` shipped in the package.
- Evaluation inputs: `build_eval_inputs` decodes an eval split into `EvalInputs` (bad images skipped and counted).
- Running a model: `embed_images` / `embed_texts`, `evaluate_model` (retrieval, zero-shot, ITM re-rank of the top
  candidates, codebook usage: what `ContrastiveTrainer.evaluate` and `python -m vlalign.evaluate` report),
  `retrieval_examples` (for the model card's picture), and for MIVC `predict_multi_image`, `evaluate_mivc`,
  `multi_image_examples`.

Conventions of the metrics
--------------------------
* Embeddings are used *as given*: callers pass L2-normalised embeddings (cosine similarity is the
  dot product). Nothing is normalised here, so unnormalised inputs are ranked by raw dot product.
* Recall@k and accuracy are returned as percentages in [0, 100].
* Ties in similarity are broken by ``torch.topk``'s order, which is implementation-defined; with
  continuous embeddings ties have probability zero.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets
import torch
from PIL import Image
from tqdm.auto import tqdm

from .data.collators import _to_id
from .data.decoding import DataIssueCounts, _time_to_warn, _usable_captions, decode_image
from .data.digits import DIGIT_ZERO_SHOT_TEMPLATES, GENERIC_ZERO_SHOT_TEMPLATES
from .data.sources import ROW_ID_COLUMN, DataArguments

__all__ = [
    "ALIGNMENT_STUCK_FRACTION",
    "CODE_COLLAPSE_PERPLEXITY",
    "RETRIEVAL_METRIC_PATH",
    "EvalInputs",
    "alignment_not_started",
    "answers_match",
    "build_eval_inputs",
    "chunked_similarity_topk",
    "class_prompts",
    "code_purity",
    "code_usage",
    "codebook_metrics",
    "embed_images",
    "embed_texts",
    "eval_mode",
    "evaluate_mivc",
    "evaluate_model",
    "multi_image_examples",
    "predict_multi_image",
    "retrieval_examples",
    "retrieval_metric_inputs",
    "retrieval_metrics",
    "ZERO_SHOT_TEMPLATE_SETS",
    "zero_shot_accuracy",
    "zero_shot_classifier",
    "zero_shot_metrics",
    "zero_shot_templates_for",
]

logger = logging.getLogger("vlalign.evaluation")

RerankFn = Callable[[torch.Tensor, torch.Tensor, str], torch.Tensor]

# The `evaluate` metric script of `retrieval_metrics` shipped inside the package (a directory holding
# `retrieval_recall.py`): `evaluate.load(RETRIEVAL_METRIC_PATH)`. An absolute path, so evaluate never looks on the Hub.
RETRIEVAL_METRIC_PATH = str(Path(__file__).resolve().parent / "evaluate_metrics" / "retrieval_recall")


def _compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    dtype = tensors[0].dtype
    for t in tensors[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    if not dtype.is_floating_point:
        return torch.float32
    # CPU half/bfloat16 matmuls are slow or imprecise; ranking is cheap to do in float32.
    if dtype in (torch.float16, torch.bfloat16) and tensors[0].device.type == "cpu":
        return torch.float32
    return dtype


def _similarity_buffer(n_queries: int, candidates: torch.Tensor, chunk_size: int, dtype: torch.dtype) -> torch.Tensor:
    """The one ``min(chunk_size, N_q) x N_c`` similarity buffer that every query chunk is written into. Reusing it
    keeps the peak memory fixed and is faster on CPU than a fresh allocation per chunk, whose pages the kernel has
    to map and zero again each time (about 0.1 s per 400 MB chunk on the development machine)."""
    return torch.empty((min(chunk_size, n_queries), candidates.shape[0]), dtype=dtype, device=candidates.device)


def _chunk_similarities(query_chunk: torch.Tensor, candidates: torch.Tensor, buffer: torch.Tensor) -> torch.Tensor:
    """``query_chunk @ candidates.T`` written into the leading rows of `buffer` (overwritten by the next chunk)."""
    return torch.matmul(query_chunk.to(buffer.dtype), candidates.T, out=buffer[: query_chunk.shape[0]])


@torch.no_grad()
def chunked_similarity_topk(
    queries: torch.Tensor,
    candidates: torch.Tensor,
    k: int,
    chunk_size: int = 1024,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-``k`` candidates by dot-product similarity for every query, computed in query chunks.

    Args:
        queries: ``(N_q, d)`` tensor.
        candidates: ``(N_c, d)`` tensor (same device as ``queries``).
        k: number of neighbours; clipped to ``N_c``.
        chunk_size: queries per matmul. Peak extra memory is ``chunk_size x N_c`` similarities.

    Returns:
        ``(values, indices)``, both ``(N_q, min(k, N_c))``, sorted by decreasing similarity.
    """
    if queries.dim() != 2 or candidates.dim() != 2:
        raise ValueError("queries and candidates must be 2-D (N, d) tensors")
    if queries.shape[1] != candidates.shape[1]:
        raise ValueError(
            f"embedding sizes differ: queries have d={queries.shape[1]}, candidates d={candidates.shape[1]}"
        )
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")

    dtype = _compute_dtype(queries, candidates)
    cand = candidates.to(dtype)
    k = min(int(k), cand.shape[0])
    n_q = queries.shape[0]
    values = torch.empty((n_q, k), dtype=dtype, device=queries.device)
    indices = torch.empty((n_q, k), dtype=torch.long, device=queries.device)
    if k == 0:  # no candidates at all
        return values, indices
    buffer = _similarity_buffer(n_q, cand, chunk_size, dtype)  # the only O(chunk x N_c) memory
    for start in range(0, n_q, chunk_size):
        stop = min(start + chunk_size, n_q)
        sims = _chunk_similarities(queries[start:stop], cand, buffer)
        torch.topk(sims, k, dim=1, largest=True, sorted=True, out=(values[start:stop], indices[start:stop]))
    return values, indices


def _to_id_tensor(ids: Any) -> torch.Tensor | None:
    """Integer ids as a 1-D LongTensor, or None when they are not integers (e.g. strings)."""
    if isinstance(ids, torch.Tensor):
        t = ids
    else:
        try:
            import numpy as np

            arr = np.asarray(ids)
            if arr.dtype.kind not in "iub":
                return None
            t = torch.from_numpy(arr.astype("int64", copy=False))
        except (TypeError, ValueError):
            return None
    if t.is_floating_point() or t.is_complex():
        return None
    return t.reshape(-1).long()


def _encode_ids(image_ids: Any, text_ids: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Map both id sequences to a shared integer code space so matching is one tensor compare."""
    img, txt = _to_id_tensor(image_ids), _to_id_tensor(text_ids)
    if img is not None and txt is not None:
        return img, txt
    # Arbitrary hashable ids (file names, string labels): shared dictionary encoding.
    codes: dict[Any, int] = {}
    img_codes = [codes.setdefault(_hashable(x), len(codes)) for x in image_ids]
    txt_codes = [codes.setdefault(_hashable(x), len(codes)) for x in text_ids]
    return torch.tensor(img_codes, dtype=torch.long), torch.tensor(txt_codes, dtype=torch.long)


def _hashable(x: Any) -> Any:
    if isinstance(x, torch.Tensor):
        return x.item()
    if hasattr(x, "item") and not isinstance(x, (str, bytes)):  # numpy scalars
        try:
            return x.item()
        except (TypeError, ValueError):
            pass
    return x


@torch.no_grad()
def _direction_hits(
    queries: torch.Tensor,
    candidates: torch.Tensor,
    query_ids: torch.Tensor,
    cand_ids: torch.Tensor,
    ks: Sequence[int],
    chunk_size: int,
    direction: str,
    rerank_fn: RerankFn | None,
    rerank_k: int,
) -> tuple[dict[int, int], int]:
    """Number of (valid) queries with a positive in the top-k, for each k, plus the valid count."""
    n_q, n_c = queries.shape[0], candidates.shape[0]
    device = queries.device
    query_ids = query_ids.to(device)
    cand_ids = cand_ids.to(device)
    # Queries without any positive cannot be retrieved; they are excluded from the denominator.
    valid = torch.isin(query_ids, cand_ids)
    num_valid = int(valid.sum())
    hits = {k: 0 for k in ks}
    if num_valid == 0 or n_c == 0:
        return hits, num_valid

    depth = min(max(max(ks), rerank_k if rerank_fn is not None else 0), n_c)
    r = min(rerank_k, n_c) if rerank_fn is not None else 0
    dtype = _compute_dtype(queries, candidates)
    cand = candidates.to(dtype)
    buffer = _similarity_buffer(n_q, cand, chunk_size, dtype)
    for start in range(0, n_q, chunk_size):
        stop = min(start + chunk_size, n_q)
        chunk_valid = valid[start:stop]
        if not bool(chunk_valid.any()):
            continue
        # Same computation as chunked_similarity_topk, inlined so the re-ranking can work per chunk.
        sims = _chunk_similarities(queries[start:stop], cand, buffer)
        top = sims.topk(depth, dim=1, largest=True, sorted=True).indices
        # Drop queries without a positive before re-ranking: the ITM re-ranker is the expensive part.
        q_idx = torch.arange(start, stop, device=device)[chunk_valid]
        top = top[chunk_valid]
        if r > 0:
            head = top[:, :r]
            scores = torch.as_tensor(rerank_fn(q_idx, head, direction), device=device)
            if scores.shape != head.shape:
                raise ValueError(
                    f"rerank_fn must return scores of shape {tuple(head.shape)}, got {tuple(scores.shape)}"
                )
            # Stable sort: equal re-rank scores keep their similarity order.
            order = torch.sort(scores.float(), dim=1, descending=True, stable=True).indices
            top = torch.cat([head.gather(1, order), top[:, r:]], dim=1)
        match = cand_ids[top] == query_ids[q_idx, None]  # (valid queries in chunk, depth)
        for k in ks:
            hits[k] += int(match[:, : min(k, depth)].any(dim=1).sum())
    return hits, num_valid


@torch.no_grad()
def retrieval_metrics(
    image_embeds: torch.Tensor,
    text_embeds: torch.Tensor,
    image_ids: Sequence[Any] | torch.Tensor,
    text_ids: Sequence[Any] | torch.Tensor,
    ks: Sequence[int] = (1, 5, 10),
    chunk_size: int = 1024,
    rerank_fn: RerankFn | None = None,
    rerank_k: int = 16,
) -> dict[str, float]:
    """Image-to-text and text-to-image Recall@k.

    Args:
        image_embeds: ``(N_img, d)`` L2-normalised image embeddings (used as given).
        text_embeds: ``(N_txt, d)`` L2-normalised text embeddings (used as given).
        image_ids: ``N_img`` ids. Image ``i`` and text ``j`` are a positive pair iff
            ``image_ids[i] == text_ids[j]``: use the image id for caption datasets (5 captions per image)
            or the class label for class-level datasets; any number of positives per query is allowed
            in both directions. Integer tensors/arrays or any hashable values (e.g. file names).
        text_ids: ``N_txt`` ids, see ``image_ids``.
        ks: cut-offs k; recall@k = % of queries with at least one positive among their top-k.
        chunk_size: queries per similarity matmul; memory is O(chunk_size x N_candidates).
        rerank_fn: optional re-ranker (e.g. ITM head) called once per query chunk as
            ``rerank_fn(query_indices (q,), candidate_indices (q, rerank_k), direction)`` with
            ``direction`` in ``{"i2t", "t2i"}``; indices are global row indices of the embeddings
            (for "i2t" queries are images and candidates texts). Queries without a positive are not
            passed (they do not count). It returns ``(q, rerank_k)`` scores
            (higher = better); the top ``rerank_k`` candidates by similarity are re-ordered by them,
            candidates beyond ``rerank_k`` keep their similarity order after the re-ranked block.
        rerank_k: number of similarity top candidates passed to ``rerank_fn``.

    Returns:
        Flat dict: ``i2t_recall@{k}`` and ``t2i_recall@{k}`` as floats in [0, 100], plus the
        integer counts ``i2t_num_queries`` and ``t2i_num_queries``. Queries that have no positive
        among the candidates are excluded from the denominators (and the counts); a direction with
        no valid query reports NaN recalls.
    """
    if image_embeds.dim() != 2 or text_embeds.dim() != 2:
        raise ValueError("image_embeds and text_embeds must be 2-D (N, d) tensors")
    ks = tuple(int(k) for k in ks)
    if not ks or min(ks) < 1:
        raise ValueError(f"ks must be positive integers, got {ks}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if rerank_fn is not None and rerank_k < 1:
        raise ValueError(f"rerank_k must be >= 1, got {rerank_k}")
    img_ids, txt_ids = _encode_ids(image_ids, text_ids)
    if img_ids.numel() != image_embeds.shape[0]:
        raise ValueError(f"got {img_ids.numel()} image_ids for {image_embeds.shape[0]} image embeddings")
    if txt_ids.numel() != text_embeds.shape[0]:
        raise ValueError(f"got {txt_ids.numel()} text_ids for {text_embeds.shape[0]} text embeddings")

    out: dict[str, float] = {}
    counts: dict[str, int] = {}
    for direction, q, c, qi, ci in (
        ("i2t", image_embeds, text_embeds, img_ids, txt_ids),
        ("t2i", text_embeds, image_embeds, txt_ids, img_ids),
    ):
        hits, n = _direction_hits(q, c, qi, ci, ks, chunk_size, direction, rerank_fn, rerank_k)
        for k in ks:
            out[f"{direction}_recall@{k}"] = 100.0 * hits[k] / n if n > 0 else float("nan")
        counts[f"{direction}_num_queries"] = n
    out.update(counts)
    return out


def retrieval_metric_inputs(
    image_embeds: Any,
    text_embeds: Any,
    image_ids: Sequence[Any] | Any,
    text_ids: Sequence[Any] | Any,
) -> dict[str, list]:
    """The inputs of the ``retrieval_recall`` `evaluate` metric (:data:`RETRIEVAL_METRIC_PATH`) for separate image
    and text embeddings and ids: one row per embedding, images first, as
    ``{"embeddings": [[float, ...], ...], "ids": [...], "modality": ["image", ..., "text", ...]}``, so
    ``metric.compute(**retrieval_metric_inputs(...))`` or ``metric.add_batch(**retrieval_metric_inputs(...))``.
    Embeddings may be tensors, arrays or lists of rows; ids integers or strings (tensor/array ids become Python
    values)."""

    def rows(embeds: Any) -> list:
        if isinstance(embeds, torch.Tensor):
            return embeds.detach().float().cpu().tolist()
        return embeds.tolist() if hasattr(embeds, "tolist") else [list(row) for row in embeds]

    def values(ids: Any) -> list:
        return ids.reshape(-1).tolist() if hasattr(ids, "tolist") and hasattr(ids, "reshape") else list(ids)

    image_rows, text_rows = rows(image_embeds), rows(text_embeds)
    image_values, text_values = values(image_ids), values(text_ids)
    if len(image_values) != len(image_rows) or len(text_values) != len(text_rows):
        raise ValueError(
            f"got {len(image_values)} image_ids for {len(image_rows)} image embeddings and {len(text_values)} "
            f"text_ids for {len(text_rows)} text embeddings"
        )
    return {
        "embeddings": image_rows + text_rows,
        "ids": image_values + text_values,
        "modality": ["image"] * len(image_rows) + ["text"] * len(text_rows),
    }


def zero_shot_classifier(
    text_embeds_per_class: Sequence[torch.Tensor] | torch.Tensor,
) -> torch.Tensor:
    """CLIP-style zero-shot classifier weights from prompt-template text embeddings.

    Args:
        text_embeds_per_class: one ``(n_templates, d)`` tensor per class (template counts may differ),
            or a ``(C, n_templates, d)`` tensor.

    Returns:
        ``(C, d)``: each template embedding is L2-normalised (a no-op for normalised inputs, and it
        stops a long prompt with a large norm from dominating), averaged over templates, and the mean
        is L2-normalised again.
    """
    if isinstance(text_embeds_per_class, torch.Tensor) and text_embeds_per_class.dim() == 3:
        text_embeds_per_class = list(text_embeds_per_class)
    if len(text_embeds_per_class) == 0:
        raise ValueError("need at least one class")
    weights = []
    for c, emb in enumerate(text_embeds_per_class):
        if emb.dim() == 1:
            emb = emb[None]
        if emb.dim() != 2 or emb.shape[0] == 0:
            raise ValueError(f"class {c}: expected a non-empty (n_templates, d) tensor, got {tuple(emb.shape)}")
        emb = torch.nn.functional.normalize(emb.float(), dim=-1)
        weights.append(torch.nn.functional.normalize(emb.mean(dim=0), dim=-1))
    return torch.stack(weights)


@torch.no_grad()
def zero_shot_accuracy(
    image_embeds: torch.Tensor,
    labels: Sequence[int] | torch.Tensor,
    class_embeds: torch.Tensor,
    chunk_size: int = 1024,
) -> float:
    """Top-1 zero-shot accuracy in percent: ``argmax(image_embeds @ class_embeds.T) == labels``.

    ``labels[i]`` is the row of ``class_embeds`` (e.g. from :func:`zero_shot_classifier`) that is the
    correct class of image ``i``. Returns NaN for an empty set.
    """
    return zero_shot_metrics(image_embeds, labels, class_embeds, chunk_size)["zero_shot_accuracy"]


@torch.no_grad()
def zero_shot_metrics(
    image_embeds: torch.Tensor,
    labels: Sequence[int] | torch.Tensor,
    class_embeds: torch.Tensor,
    chunk_size: int = 1024,
) -> dict[str, float]:
    """Zero-shot classification in percent, as clip_benchmark reports it: ``zero_shot_accuracy`` (top-1),
    ``zero_shot_top5_accuracy`` (the label among the 5 most similar classes; left out with 5 classes or fewer,
    where it is 100 by construction) and ``zero_shot_mean_per_class_recall`` (top-1 recall of each class present
    among the labels, averaged over those classes: balanced accuracy, not swayed by a large class).

    ``labels[i]`` is the row of ``class_embeds`` that is image ``i``'s class; a label outside the rows (a class the
    names leave out, -1 for none) counts as wrong and is no class of the mean. NaN for an empty set."""
    labels = torch.as_tensor(labels).reshape(-1).long().to(image_embeds.device)
    if labels.numel() != image_embeds.shape[0]:
        raise ValueError(f"got {labels.numel()} labels for {image_embeds.shape[0]} images")
    num_classes = class_embeds.shape[0]
    results = {"zero_shot_accuracy": float("nan"), "zero_shot_mean_per_class_recall": float("nan")}
    if num_classes > 5:
        results["zero_shot_top5_accuracy"] = float("nan")
    if labels.numel() == 0:
        return results
    _, pred = chunked_similarity_topk(image_embeds, class_embeds.to(image_embeds.device), 5, chunk_size)
    top1 = pred[:, 0] == labels
    # counts in integers: a float32 mean would put noise into the percentages (95.27778029441833 for 343 / 360)
    results["zero_shot_accuracy"] = 100.0 * int(top1.sum()) / labels.numel()
    if num_classes > 5:
        results["zero_shot_top5_accuracy"] = 100.0 * int((pred == labels[:, None]).any(dim=1).sum()) / labels.numel()
    covered = (labels >= 0) & (labels < num_classes)
    if covered.any():
        present = labels[covered].unique()
        recalls = [int(top1[labels == c].sum()) / int((labels == c).sum()) for c in present.tolist()]
        results["zero_shot_mean_per_class_recall"] = 100.0 * sum(recalls) / len(recalls)
    return results


# Prompt-template sets for zero-shot classification, by dataset (the last part of its name, lower case): each class
# name is put into every template and the text embeddings are averaged (`zero_shot_classifier`). Any other dataset
# gets the generic set; `vlalign.evaluate --templates` takes a set name, a file of templates or templates themselves.
ZERO_SHOT_TEMPLATE_SETS: dict[str, list[str]] = {
    "digits": list(DIGIT_ZERO_SHOT_TEMPLATES),
    "generic": list(GENERIC_ZERO_SHOT_TEMPLATES),
    "photo": [
        "a photo of a {name}.",
        "a blurry photo of a {name}.",
        "a close-up photo of a {name}.",
        "a bright photo of the {name}.",
        "a cropped photo of the {name}.",
        "a low resolution photo of a {name}.",
        "a photo of one {name}.",
    ],
    "mnist": ['a photo of the number: "{name}".', "a handwritten {name}.", "the digit {name}."],
    "cifar10": ["a photo of a {name}.", "a blurry photo of a {name}.", "a low resolution photo of a {name}."],
    "cifar100": ["a photo of a {name}.", "a blurry photo of a {name}.", "a low resolution photo of a {name}."],
    "food101": ["a photo of {name}, a type of food."],
    "oxford_pets": ["a photo of a {name}, a type of pet."],
    "flowers102": ["a photo of a {name}, a type of flower."],
    "eurosat": ["a centered satellite photo of {name}.", "a satellite photo of {name}."],
}


def zero_shot_templates_for(dataset_name: str) -> list[str]:
    """The template set of a dataset (see `ZERO_SHOT_TEMPLATE_SETS`): by the last part of its name, lower case
    (``uoft-cs/cifar10`` -> ``cifar10``), else the generic set."""
    key = dataset_name.rstrip("/").rsplit("/", 1)[-1].lower().replace("-", "_")
    return list(ZERO_SHOT_TEMPLATE_SETS.get(key, ZERO_SHOT_TEMPLATE_SETS["generic"]))


# Cross-modal losses at or above this fraction of ln(number of keys) (the loss of a uniform prediction, whatever the
# targets) are reported as "alignment not started": the towers still cannot tell the paired caption from any other.
ALIGNMENT_STUCK_FRACTION = 0.98


def alignment_not_started(loss_i2t: float, loss_t2i: float, num_keys: int) -> bool:
    """Whether both cross-modal cross-entropies are still at the uniform value ln(num_keys) (within
    `ALIGNMENT_STUCK_FRACTION`). A soft-target cross-entropy against a uniform prediction is ln(num_keys) for any
    targets (one positive, several, or distillation-smoothed), so the test holds for all the InfoNCE-style terms."""
    if num_keys < 2:
        raise ValueError(f"num_keys must be >= 2, got {num_keys}")
    uniform = math.log(num_keys)
    return min(float(loss_i2t), float(loss_t2i)) >= ALIGNMENT_STUCK_FRACTION * uniform


# A codebook whose assignments have a perplexity below this is reported as collapsed (effectively one code).
CODE_COLLAPSE_PERPLEXITY = 2.0


@torch.no_grad()
def code_usage(codes: Sequence[int] | torch.Tensor, num_codes: int) -> dict[str, float]:
    """How a set of inputs spreads over a codebook, from each input's assigned (argmax) code.

    Returns ``codes_used`` (distinct codes assigned) and ``code_perplexity``: ``exp(entropy)`` of the empirical
    code distribution, i.e. the effective number of equally used codes (1 = every input on one code, a collapsed
    codebook; ``num_codes`` = perfectly uniform use). NaN for an empty set.
    """
    codes = torch.as_tensor(codes).reshape(-1).long()
    if codes.numel() == 0:
        return {"codes_used": 0, "code_perplexity": float("nan")}
    if codes.min() < 0 or codes.max() >= num_codes:
        raise ValueError(f"codes must lie in [0, {num_codes}), got range [{int(codes.min())}, {int(codes.max())}]")
    counts = torch.bincount(codes, minlength=num_codes).double()
    p = counts[counts > 0] / codes.numel()
    return {"codes_used": int((counts > 0).sum()), "code_perplexity": float(torch.exp(-(p * p.log()).sum()))}


@torch.no_grad()
def code_purity(codes: Sequence[int] | torch.Tensor, labels: Sequence[int] | torch.Tensor) -> float:
    """Cluster purity in percent: each code is credited with the most frequent label among its inputs, and purity
    is the fraction of inputs carrying their code's majority label. NaN for an empty set."""
    codes = torch.as_tensor(codes).reshape(-1).long()
    labels = torch.as_tensor(labels).reshape(-1).long()
    if codes.numel() != labels.numel():
        raise ValueError(f"got {labels.numel()} labels for {codes.numel()} codes")
    if codes.numel() == 0:
        return float("nan")
    majority = 0
    for code in codes.unique():
        majority += int(torch.bincount(labels[codes == code]).max())
    return 100.0 * majority / codes.numel()


def answers_match(generated: str, reference: str) -> bool:
    """Exact match of a generated answer and its reference, lower-cased, with "?" / "." and extra spaces ignored."""

    def normalise(text: str) -> str:
        return " ".join(str(text).lower().replace("?", " ").replace(".", " ").split())

    return normalise(generated) == normalise(reference)


# --------------------------------------------------------------------------------------------------------------
# Evaluation inputs: an eval split, decoded


@dataclass
class EvalInputs:
    """What retrieval / zero-shot evaluation needs, already decoded.

    `image_ids[i]` / `text_ids[j]`: positive ids (equal ids = a match; labels when positives are by label).
    `labels`: per-image class labels, or None without a label column. `num_skipped`: undecodable images dropped
    (their captions are dropped too, since they have no image to retrieve). `issues`: those images by reason,
    and the caption candidates dropped or repaired (an image whose captions are all unusable is kept: it is
    still a retrieval candidate and a zero-shot example).
    """

    images: list[Image.Image]
    image_ids: list[int]
    texts: list[str]
    text_ids: list[int]
    labels: list[int] | None
    num_skipped: int
    issues: DataIssueCounts = field(default_factory=DataIssueCounts)


def build_eval_inputs(
    dataset: datasets.Dataset,
    args: DataArguments,
    batch_size: int = 256,
    on_images: Callable[[list[Image.Image]], None] | None = None,
    captions: bool = True,
) -> EvalInputs:
    """Decode an eval split into `EvalInputs` (all captions of every image, flattened), with the image decoding and
    caption sanitising of training (`vlalign.data.decode_image`, `sanitise_caption`). `batch_size` is how many rows
    are read from the Arrow table at a time.

    With `on_images`, the decoded images are handed to it in lists of `batch_size` (in row order) and not kept
    (`EvalInputs.images` stays empty), so memory holds one batch of images, not the split: what
    `vlalign.evaluate` does to embed a large split. `captions=False` reads no caption column (zero-shot only)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size!r}")
    feature = dataset.features.get(args.image_column)
    if isinstance(feature, datasets.Image) and feature.decode:
        # Slicing a decoding Image column would raise inside `datasets` on the first corrupt file.
        dataset = dataset.cast_column(args.image_column, datasets.Image(decode=False))
    use_labels = args.label_column is not None and args.label_column in dataset.column_names
    id_column = args.image_id_column if args.image_id_column in dataset.column_names else None
    if id_column is None and ROW_ID_COLUMN in dataset.column_names:
        id_column = ROW_ID_COLUMN
    images, image_ids, texts, text_ids = [], [], [], []
    labels: list[int] | None = [] if use_labels else None
    issues = DataIssueCounts()
    for start in range(0, len(dataset), batch_size):
        chunk = dataset[start : start + batch_size]
        for offset in range(len(chunk[args.image_column])):
            index = start + offset
            try:
                image = decode_image(chunk[args.image_column][offset], args.max_image_pixels)
            except (ValueError, OSError) as error:
                reason = issues.count_image_refusal(error)
                if _time_to_warn(issues.images_skipped, 100):
                    logger.warning("Eval row %d: skipped an undecodable image [%s]: %s", index, reason, error)
                continue
            label = chunk[args.label_column][offset] if use_labels else None
            if args.positives_by == "label" and use_labels and label is not None:
                positive = _to_id(label)
            elif id_column is not None:
                positive = _to_id(chunk[id_column][offset])
            else:
                positive = index
            images.append(image)
            image_ids.append(positive)
            if labels is not None:
                labels.append(int(label) if label is not None else -1)
            if captions:
                for caption in _usable_captions(chunk[args.caption_column][offset], args.max_caption_chars, issues):
                    texts.append(caption)
                    text_ids.append(positive)
            if on_images is not None and len(images) == batch_size:
                on_images(images)
                images = []
    if on_images is not None and images:
        on_images(images)
        images = []
    if issues.images_skipped or issues.captions_skipped or issues.captions_sanitised:
        logger.warning("Eval split: %s", issues.summary())
    return EvalInputs(images, image_ids, texts, text_ids, labels, issues.images_skipped, issues)


# --------------------------------------------------------------------------------------------------------------
# Running a contrastive model


@contextlib.contextmanager
def eval_mode(model):
    """Run the block with the model in eval mode (no dropout), restoring its previous mode afterwards."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def _batches(items, batch_size: int, progress: str | None):
    """`items` in slices of `batch_size`, with a tqdm bar named `progress` (none when None)."""
    starts = range(0, len(items), batch_size)
    if progress is not None:
        starts = tqdm(starts, desc=progress, unit="batch", leave=False)
    for start in starts:
        yield items[start : start + batch_size]


@torch.no_grad()
def embed_images(model, processor, images, batch_size: int = 128, progress: str | None = None) -> torch.Tensor:
    """Normalised image embeddings (N, D) in float32, in batches (a progress bar named `progress` when given), in
    eval mode (no augmentation)."""
    device = next(model.parameters()).device
    out = []
    for batch in _batches(images, batch_size, progress):
        pixels = processor(images=batch, return_tensors="pt")["pixel_values"]
        out.append(model.get_image_features(pixel_values=pixels.to(device)).float().cpu())
    return torch.cat(out) if out else torch.empty(0)


@torch.no_grad()
def embed_texts(model, processor, texts, batch_size: int = 256, progress: str | None = None) -> torch.Tensor:
    """Normalised text embeddings (N, D) in float32, in batches."""
    device = next(model.parameters()).device
    out = []
    for batch in _batches(list(texts), batch_size, progress):
        tokens = processor(text=batch, return_tensors="pt")
        out.append(
            model.get_text_features(
                input_ids=tokens["input_ids"].to(device), attention_mask=tokens["attention_mask"].to(device)
            )
            .float()
            .cpu()
        )
    return torch.cat(out) if out else torch.empty(0)


def class_prompts(class_names: list[str], templates: list[str]) -> list[list[str]]:
    """Prompts per class: each template formatted with `name` (the class name) and `digit` (its index)."""
    return [[t.format(name=name, digit=i, label=i) for t in templates] for i, name in enumerate(class_names)]


def _warn_uncovered_labels(labels: list[int], num_classes: int) -> None:
    """Rows whose label is no class index (a class the names leave out, or no label: -1) can never be predicted
    right: say so, or zero-shot accuracy silently drops by their share."""
    uncovered = Counter(label for label in labels if not 0 <= label < num_classes)
    if not uncovered:
        return
    parts = [
        f"{'no label' if value == -1 else f'label {value}'}: {count} row{'s' if count != 1 else ''}"
        for value, count in sorted(uncovered.items(), key=lambda item: (item[0] == -1, item[0]))
    ]
    logger.warning(
        "Zero-shot evaluation: %d of %d eval rows have labels the %d class names do not cover (%s); they "
        "are scored as wrong in zero_shot_accuracy",
        sum(uncovered.values()),
        len(labels),
        num_classes,
        ", ".join(parts),
    )


@torch.no_grad()
def evaluate_model(
    model,
    processor,
    eval_inputs,
    class_names: list[str] | None = None,
    zero_shot_templates: list[str] | None = None,
    batch_size: int = 128,
    itm_rerank_k: int = 0,
    chunk_size: int = 1024,
    image_embeds: torch.Tensor | None = None,
    progress: bool = False,
) -> dict[str, float]:
    """What `ContrastiveTrainer.evaluate` and `vlalign.evaluate` report, from one code path:

    - retrieval recall@1/5/10 both ways (several positives per query, by `eval_inputs.image_ids` / `text_ids`;
      left out when the inputs have no caption), with `itm_rerank_k > 0` the top-k candidates re-ranked by the
      model's ITM head (TCL / CODIS with fusion layers; needs `eval_inputs.images`);
    - with labels, class names and templates, zero-shot classification (`zero_shot_metrics`: top-1, top-5, mean
      per-class recall) from prompt ensembles; rows whose label the class names do not cover count as wrong, with
      a warning naming those labels;
    - for a codebook model (CODIS), code usage (`codebook_metrics`).

    `image_embeds` may hold `embed_images` of the images, computed once for other uses too (or while the images
    were read, without keeping them: `build_eval_inputs(on_images=...)`). `progress` shows progress bars."""
    # identical captions with the same positive id are one query/candidate, not several (class-level datasets
    # repeat each caption for every image of the class; duplicates would only tie with each other)
    unique = dict.fromkeys(zip(eval_inputs.texts, eval_inputs.text_ids))
    texts = [text for text, _ in unique]
    text_ids = [text_id for _, text_id in unique]
    if itm_rerank_k > 0 and not eval_inputs.images:
        raise ValueError("ITM re-ranking needs the decoded images (eval_inputs.images)")
    with eval_mode(model):
        if image_embeds is None:
            image_embeds = embed_images(
                model, processor, eval_inputs.images, batch_size, "images" if progress else None
            )
        if image_embeds.shape[0] != len(eval_inputs.image_ids):
            raise ValueError(f"got {image_embeds.shape[0]} image embeddings for {len(eval_inputs.image_ids)} images")
        metrics: dict[str, float] = {}
        text_embeds = None
        if texts:
            text_embeds = embed_texts(model, processor, texts, batch_size, "captions" if progress else None)
            rerank_fn = None
            if itm_rerank_k > 0:
                rerank_fn = _itm_rerank_fn(model, processor, eval_inputs.images, texts, batch_size)
            metrics.update(
                retrieval_metrics(
                    image_embeds,
                    text_embeds,
                    eval_inputs.image_ids,
                    text_ids,
                    chunk_size=chunk_size,
                    rerank_fn=rerank_fn,
                    rerank_k=max(itm_rerank_k, 1),
                )
            )
        if class_names and zero_shot_templates and eval_inputs.labels is not None:
            _warn_uncovered_labels([int(label) for label in eval_inputs.labels], len(class_names))
            prompts = class_prompts(class_names, zero_shot_templates)
            class_batches = prompts if not progress else tqdm(prompts, desc="class prompts", leave=False)
            per_class = [embed_texts(model, processor, p, batch_size) for p in class_batches]
            classifier = zero_shot_classifier(per_class)
            metrics.update(zero_shot_metrics(image_embeds, torch.as_tensor(eval_inputs.labels), classifier, chunk_size))
        if hasattr(model, "code_logits"):
            metrics.update(codebook_metrics(model, image_embeds, text_embeds, eval_inputs.labels))
        metrics["num_eval_images"] = len(eval_inputs.image_ids)
        metrics["num_eval_texts"] = len(texts)
        metrics["num_eval_images_skipped"] = int(eval_inputs.num_skipped)
    return metrics


@torch.no_grad()
def codebook_metrics(model, image_embeds: torch.Tensor, text_embeds: torch.Tensor, labels=None) -> dict:
    """Code usage of a codebook model (CODIS) on the evaluation images and texts: codes used and perplexity per
    modality (see `code_usage`), and with labels the purity of the image clusters."""
    num_codes = model.config.codebook_size
    weight = model.codebook.weight
    image_codes = model.code_logits(image_embeds.to(weight)).argmax(dim=-1).cpu()
    text_codes = None if text_embeds is None else model.code_logits(text_embeds.to(weight)).argmax(dim=-1).cpu()
    results = {"codebook_size": num_codes}
    for name, codes in (("image", image_codes), ("text", text_codes)):
        if codes is None:  # no captions: zero-shot only
            continue
        results.update({f"{name}_{k}": v for k, v in code_usage(codes, num_codes).items()})
    if labels is not None:
        results["image_code_purity"] = code_purity(image_codes, labels)
    return results


def _itm_rerank_fn(model, processor, images, texts, batch_size):
    device = next(model.parameters()).device
    tokens = processor(text=list(texts), return_tensors="pt")
    image_tokens = []
    for start in range(0, len(images), batch_size):
        pixels = processor(images=images[start : start + batch_size], return_tensors="pt")["pixel_values"]
        image_tokens.append(model.get_image_tokens(pixels.to(device)))
    image_tokens = torch.cat(image_tokens)

    def rerank(query_indices, candidate_indices, direction):
        q, k = candidate_indices.shape
        if direction == "i2t":
            image_index = query_indices.view(-1, 1).expand(q, k).reshape(-1)
            text_index = candidate_indices.reshape(-1)
        else:
            text_index = query_indices.view(-1, 1).expand(q, k).reshape(-1)
            image_index = candidate_indices.reshape(-1)
        scores = []
        for start in range(0, len(text_index), batch_size):
            ti, ii = text_index[start : start + batch_size], image_index[start : start + batch_size]
            scores.append(
                model.itm_score(
                    input_ids=tokens["input_ids"][ti].to(device),
                    attention_mask=tokens["attention_mask"][ti].to(device),
                    image_tokens=image_tokens[ii.to(device)],
                )
                .float()
                .cpu()
            )
        return torch.cat(scores).view(q, k)

    return rerank


@torch.no_grad()
def retrieval_examples(
    model, processor, eval_inputs: EvalInputs, image_embeds: torch.Tensor, num_queries: int = 4, k: int = 5
) -> tuple[list[str], list[list[int]], list[list[bool]]]:
    """Text-to-image retrieval examples (the model card's picture): the first `num_queries` captions of distinct
    positive ids (one per class on class-level data), the indices of their top-`k` images ranked against
    `image_embeds` (`embed_images` of all `eval_inputs.images`), and whether each of those images is a match.
    Returns ``(captions, top image indices, correct)``; empty lists without evaluation images."""
    if not eval_inputs.images:
        return [], [], []
    queries, query_ids = [], []
    for text, text_id in zip(eval_inputs.texts, eval_inputs.text_ids, strict=True):
        if text_id not in query_ids:  # one caption per positive id (per class on class-level data)
            queries.append(text)
            query_ids.append(text_id)
        if len(queries) == num_queries:
            break
    with eval_mode(model):
        text_embeds = embed_texts(model, processor, queries)
    top = (text_embeds @ image_embeds.t()).topk(min(k, len(eval_inputs.images)), dim=1).indices
    image_ids = torch.as_tensor([int(i) for i in eval_inputs.image_ids])
    correct = image_ids[top] == torch.as_tensor([int(i) for i in query_ids]).view(-1, 1)
    return queries, top.tolist(), correct.tolist()


# --------------------------------------------------------------------------------------------------------------
# MIVC (generative) evaluation


@torch.no_grad()
def predict_multi_image(model, processor, image_lists: list[list], prompts: list[str], max_new_tokens: int = 4):
    """Greedy answers of an MIVC model for items of several images, and each image's pooling weight (the mean over
    the visual tokens for per-token pooling; None for the concatenation baseline). Call under `eval_mode`."""
    inputs = processor(images=image_lists, text=prompts).to(next(model.parameters()).device)
    generated = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    answers = processor.batch_decode(generated[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    weights = None
    if model.config.pooling_mode != "concatenate":
        _, weights = model.get_image_features(inputs["pixel_values"], inputs["image_mask"])
        weights = weights.float().mean(dim=-1) if weights.dim() == 3 else weights.float()
    return [answer.strip() for answer in answers], weights


@torch.no_grad()
def evaluate_mivc(
    model,
    processor,
    dataset,
    collator,
    batch_size: int = 32,
    max_new_tokens: int = 4,
    degraded_column: str | None = "degraded",
) -> dict[str, float]:
    """Exact-match accuracy of greedy answers and, when the dataset marks degraded images, the mean weight that
    MIVC's pooling gives to clean and to degraded images (per-token weights averaged over the tokens).

    Returns ``exact_match_accuracy`` (percent), ``mean_weight_clean_images``, ``mean_weight_degraded_images``,
    ``uniform_weight_reference`` (the mean of 1 / images per item over the same images: what equal weighting gives)
    and ``num_eval_items``.
    """
    correct = total = 0
    sums = {"clean": 0.0, "degraded": 0.0}
    counts = {"clean": 0, "degraded": 0}
    uniform = 0.0
    with eval_mode(model):
        for start in range(0, len(dataset), batch_size):
            rows = [dataset[i] for i in range(start, min(start + batch_size, len(dataset)))]
            kept = [(row, collator.decoded_images(row)) for row in rows]
            kept = [(row, images) for row, images in kept if images]
            if not kept:
                continue
            answers, per_image = predict_multi_image(
                model,
                processor,
                [images for _, images in kept],
                [row[collator.prompt_column] for row, _ in kept],
                max_new_tokens,
            )
            for (row, _), answer in zip(kept, answers, strict=True):
                correct += answers_match(answer, row[collator.answer_column])
                total += 1
            if degraded_column and degraded_column in rows[0] and per_image is not None:
                for index, (row, images) in enumerate(kept):
                    flags = row[degraded_column]
                    if len(flags) != len(images):  # an image was dropped as unreadable: flags no longer align
                        continue
                    for slot, degraded in enumerate(flags):
                        key = "degraded" if degraded else "clean"
                        sums[key] += float(per_image[index, slot])
                        counts[key] += 1
                        uniform += 1.0 / len(flags)
    results = {"exact_match_accuracy": 100.0 * correct / total if total else float("nan"), "num_eval_items": total}
    if counts["clean"] + counts["degraded"]:
        for key in ("clean", "degraded"):
            results[f"mean_weight_{key}_images"] = sums[key] / counts[key] if counts[key] else float("nan")
        results["uniform_weight_reference"] = uniform / (counts["clean"] + counts["degraded"])
    return results


@torch.no_grad()
def multi_image_examples(model, processor, dataset, collator, num_items: int = 4) -> list[dict]:
    """The first `num_items` items of a multi-image eval split (those with a decodable image) with the model's greedy
    answers and pooling weights (the model card's picture): dicts of ``images``, ``weights`` (per image, None for the
    concatenation baseline), ``degraded`` (the dataset's flags when they still align with the images, else None),
    ``generated`` and ``answer``."""
    if dataset is None or len(dataset) == 0:
        return []
    first_rows = (dataset[i] for i in range(min(num_items, len(dataset))))
    decoded = [(row, collator.decoded_images(row)) for row in first_rows]
    rows, image_lists = [row for row, images in decoded if images], [images for _, images in decoded if images]
    items = []
    if rows:
        with eval_mode(model):
            answers, weights = predict_multi_image(
                model, processor, image_lists, [row[collator.prompt_column] for row in rows]
            )
        for index, (row, images, answer) in enumerate(zip(rows, image_lists, answers, strict=True)):
            degraded = row.get("degraded")
            per_image = None if weights is None else weights[index, : len(images)].tolist()
            items.append(
                {
                    "images": images,
                    "weights": per_image,
                    "degraded": degraded if degraded is not None and len(degraded) == len(images) else None,
                    "generated": answer,
                    "answer": row[collator.answer_column],
                }
            )
    return items
