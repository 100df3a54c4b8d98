"""retrieval_recall: image-to-text and text-to-image Recall@k as a Hugging Face `evaluate` metric.

Load it by path (works offline, nothing is downloaded):

    import evaluate
    import vlalign.evaluation

    metric = evaluate.load(vlalign.evaluation.RETRIEVAL_METRIC_PATH)

The computation is ``vlalign.evaluation.retrieval_metrics``, the function that ``vlalign.evaluation.evaluate_model``
(and so ``ContrastiveTrainer.evaluate``) uses: the numbers are the same, not a re-implementation.

Input format: one row per embedding, images and texts in the same three columns, because an `evaluate` metric
stores its inputs as a table whose columns all have the same number of rows (and there are usually more texts
than images):

* ``embeddings``: the embedding of the row (a list of floats; L2-normalise them first, they are used as given
  and stored as float32);
* ``ids``: the positive id of the row (all integers, or all strings). Image ``i`` and text ``j`` are a positive
  pair iff their ids are equal: the image id for caption datasets (several captions per image), the class label
  for class-level datasets (several images and several texts per id);
* ``modality``: ``"image"`` or ``"text"``.

Rows can come in any order and in any number of ``add_batch`` calls (images and texts mixed or not); the order
of the images among themselves and of the texts among themselves is kept. ``vlalign.evaluation.retrieval_metric_inputs``
builds the three columns from separate image and text embeddings and ids:

    metric.compute(**retrieval_metric_inputs(image_embeds, text_embeds, image_ids, text_ids))
    # or, batch by batch
    metric.add_batch(embeddings=image_batch, ids=image_id_batch, modality=["image"] * len(image_batch))
    metric.add_batch(embeddings=text_batch, ids=text_id_batch, modality=["text"] * len(text_batch))
    metric.compute(k_values=[1, 5, 10])

``compute`` keyword arguments: ``k_values`` (default ``[1, 5, 10]``) and ``chunk_size`` (queries per similarity
matmul, default 1024; memory is O(chunk_size x number of candidates)).

Output: ``i2t_recall@k`` and ``t2i_recall@k`` for each k (percent of queries with at least one positive among their
k most similar candidates), ``i2t_num_queries`` and ``t2i_num_queries`` (queries without any positive among the
candidates do not count; a direction without any query reports NaN).
"""

import datasets
import evaluate
import numpy as np
import torch

from vlalign.evaluation import retrieval_metrics

_DESCRIPTION = """\
Cross-modal retrieval Recall@k in both directions (image-to-text and text-to-image) for embedding models such as
CLIP, ALBEF, TCL or CODIS, with any number of positives per query. Image i and text j are a positive pair when
they carry the same id. Recall@k is the percentage of queries that have at least one positive among their k most
similar candidates (dot product of the given, L2-normalised embeddings). Similarities are computed in query
chunks, so COCO-5K sized sets (25,000 captions x 5,000 images) need O(chunk_size x N) memory. The computation is
vlalign.evaluation.retrieval_metrics, the same function that vlalign's ContrastiveTrainer evaluation uses.
"""

_CITATION = ""

_KWARGS_DESCRIPTION = """
Args:
    embeddings (`list` of `list` of `float`): one embedding per row, images and texts alike, all of the same
        size, L2-normalised (used as given; stored as float32).
    ids (`list` of `int` or `list` of `str`): the positive id of each row; an image and a text are a positive
        pair iff their ids are equal (several texts per image and several images per id are allowed).
    modality (`list` of `str`): "image" or "text" for each row.
    k_values (`list` of `int`, *optional*, defaults to `[1, 5, 10]`): the cut-offs k.
    chunk_size (`int`, *optional*, defaults to 1024): queries per similarity matmul.
Returns:
    i2t_recall@k (`float`): image-to-text Recall@k in percent, for every k in `k_values`.
    t2i_recall@k (`float`): text-to-image Recall@k in percent, for every k in `k_values`.
    i2t_num_queries (`int`): images with at least one positive text (the i2t denominator).
    t2i_num_queries (`int`): texts with at least one positive image (the t2i denominator).
Examples:
    >>> import evaluate, vlalign.evaluation
    >>> metric = evaluate.load(vlalign.evaluation.RETRIEVAL_METRIC_PATH)
    >>> results = metric.compute(
    ...     embeddings=[[1.0, 0.0], [0.0, 1.0], [0.9, 0.1], [0.2, 0.8], [0.6, 0.4]],
    ...     ids=[0, 1, 0, 1, 1],
    ...     modality=["image", "image", "text", "text", "text"],
    ...     k_values=[1, 2],
    ... )
    >>> results["i2t_recall@1"], results["t2i_recall@1"], results["t2i_num_queries"]
    (100.0, 66.66666666666667, 3)
"""

_MODALITIES = ("image", "text")


def _features(id_type: str) -> datasets.Features:
    return datasets.Features(
        {
            "embeddings": datasets.Sequence(datasets.Value("float32")),
            "ids": datasets.Value(id_type),
            "modality": datasets.Value("string"),
        }
    )


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class RetrievalRecall(evaluate.Metric):
    """Image-to-text and text-to-image Recall@k with several positives per query (see the module docstring)."""

    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            # string ids first: an int id fails the string check and falls through to int64, while "007" stays a
            # string instead of becoming 7
            features=[_features("string"), _features("int64")],
            codebase_urls=[],
            reference_urls=[],
        )

    def _compute(self, embeddings, ids, modality, k_values=(1, 5, 10), chunk_size=1024):
        modality = np.asarray(modality).astype(str)
        unknown = sorted(set(modality.tolist()) - set(_MODALITIES))
        if unknown:
            raise ValueError(f"modality must be 'image' or 'text', got {unknown}")
        is_image = modality == "image"
        if not is_image.any() or is_image.all():
            raise ValueError(
                f"need at least one image row and one text row, got {int(is_image.sum())} image and "
                f"{int((~is_image).sum())} text rows"
            )
        embeds = _as_matrix(embeddings)
        ids = np.asarray(ids)
        return retrieval_metrics(
            embeds[torch.from_numpy(is_image)],
            embeds[torch.from_numpy(~is_image)],
            ids[is_image],
            ids[~is_image],
            ks=tuple(int(k) for k in k_values),
            chunk_size=int(chunk_size),
        )


def _as_matrix(embeddings) -> torch.Tensor:
    """The embeddings column (a list of float32 rows) as an (N, d) float32 tensor."""
    sizes = sorted({len(row) for row in embeddings})
    if len(sizes) > 1:
        raise ValueError(f"all embeddings must have the same size, got sizes {sizes}")
    return torch.from_numpy(np.asarray(embeddings, dtype=np.float32).reshape(len(embeddings), sizes[0]))
