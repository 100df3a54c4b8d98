"""The `retrieval_recall` evaluate metric shipped in the package: loads offline by path and gives exactly the numbers
of `vlalign.evaluation.retrieval_metrics`, the function the trainer's evaluation uses."""

import math
import socket
from pathlib import Path

import evaluate
import pytest
import torch
from fixtures import tiny_tcl_config

import vlalign.evaluation
from vlalign import TCLModel
from vlalign.evaluation import RETRIEVAL_METRIC_PATH, retrieval_metric_inputs, retrieval_metrics


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    """No network at all: evaluate in offline mode and every socket connection refused."""
    monkeypatch.setenv("HF_EVALUATE_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(evaluate.config, "HF_EVALUATE_OFFLINE", True)

    def refuse(*args, **kwargs):
        raise OSError("network access in an offline test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.fixture
def metric(tmp_path):
    return evaluate.load(RETRIEVAL_METRIC_PATH, cache_dir=str(tmp_path))


def _random_set(num_images=24, num_texts=60, dim=8, num_ids=7, seed=0):
    """Several texts per image AND several images per id, plus a few texts whose id has no image."""
    g = torch.Generator().manual_seed(seed)
    image_embeds = torch.nn.functional.normalize(torch.randn(num_images, dim, generator=g), dim=-1)
    text_embeds = torch.nn.functional.normalize(torch.randn(num_texts, dim, generator=g), dim=-1)
    image_ids = torch.arange(num_images) % num_ids
    text_ids = torch.randint(0, num_ids + 2, (num_texts,), generator=g)  # ids num_ids, num_ids + 1: no image
    return image_embeds, text_embeds, image_ids, text_ids


def test_path_points_into_the_package():
    path = Path(RETRIEVAL_METRIC_PATH)
    assert path.is_absolute()
    assert (path / "retrieval_recall.py").is_file() and (path / "README.md").is_file()
    assert path.parent.parent == Path(vlalign.evaluation.__file__).resolve().parent


def test_loads_offline_as_an_evaluate_metric(metric):
    assert isinstance(metric, evaluate.Metric)
    assert metric.name == "retrieval_recall"
    assert "Recall@k" in metric.description and "modality" in metric.inputs_description
    assert metric.citation == ""
    features = metric.features if isinstance(metric.features, list) else [metric.features]
    assert {tuple(sorted(f)) for f in features} == {("embeddings", "ids", "modality")}
    # the script file works too
    assert evaluate.load(str(Path(RETRIEVAL_METRIC_PATH) / "retrieval_recall.py")).name == "retrieval_recall"


@pytest.mark.parametrize("chunk_size", [1024, 5])
@pytest.mark.parametrize("k_values", [(1, 5, 10), (2, 3, 100)])
def test_equals_retrieval_metrics_exactly(metric, chunk_size, k_values):
    image_embeds, text_embeds, image_ids, text_ids = _random_set()
    expected = retrieval_metrics(image_embeds, text_embeds, image_ids, text_ids, ks=k_values, chunk_size=chunk_size)
    results = metric.compute(
        **retrieval_metric_inputs(image_embeds, text_embeds, image_ids, text_ids),
        k_values=list(k_values),
        chunk_size=chunk_size,
    )
    assert results == expected
    assert results["i2t_num_queries"] == 24 and 0 < results["t2i_num_queries"] < 60  # texts without image excluded
    assert 0.0 < results[f"t2i_recall@{k_values[0]}"] < 100.0


def test_default_k_values_and_string_ids(metric):
    image_embeds, text_embeds, image_ids, text_ids = _random_set(seed=1)
    expected = retrieval_metrics(image_embeds, text_embeds, image_ids, text_ids)
    names = [f"img_{i:03d}" for i in range(10)]  # zero-padded strings must stay strings
    results = metric.compute(
        **retrieval_metric_inputs(
            image_embeds, text_embeds, [names[i] for i in image_ids.tolist()], [names[i] for i in text_ids.tolist()]
        )
    )
    assert results == expected
    assert sorted(results) == sorted(
        [
            "i2t_recall@1",
            "i2t_recall@5",
            "i2t_recall@10",
            "t2i_recall@1",
            "t2i_recall@5",
            "t2i_recall@10",
            "i2t_num_queries",
            "t2i_num_queries",
        ]
    )


def test_add_batch_in_pieces_equals_one_compute(metric, tmp_path):
    image_embeds, text_embeds, image_ids, text_ids = _random_set(seed=2)
    expected = retrieval_metrics(image_embeds, text_embeds, image_ids, text_ids, ks=(1, 3))
    # uneven pieces, texts and images interleaved, one mixed batch: only the order within a modality matters
    pieces = [("text", slice(0, 7)), ("image", slice(0, 5)), ("text", slice(7, 30)), ("image", slice(5, 6))]
    for modality, rows in pieces:
        embeds, ids = (image_embeds, image_ids) if modality == "image" else (text_embeds, text_ids)
        metric.add_batch(embeddings=embeds[rows].tolist(), ids=ids[rows].tolist(), modality=[modality] * len(ids[rows]))
    mixed = retrieval_metric_inputs(image_embeds[6:], text_embeds[30:], image_ids[6:], text_ids[30:])
    metric.add_batch(**mixed)
    assert metric.compute(k_values=[1, 3]) == expected
    # one row at a time through `add`
    single = evaluate.load(RETRIEVAL_METRIC_PATH, cache_dir=str(tmp_path))
    inputs = retrieval_metric_inputs(image_embeds, text_embeds, image_ids, text_ids)
    for embedding, row_id, modality in zip(inputs["embeddings"], inputs["ids"], inputs["modality"]):
        single.add(embeddings=embedding, ids=row_id, modality=modality)
    assert single.compute(k_values=[1, 3]) == expected


def test_tensor_and_array_inputs(metric):
    image_embeds, text_embeds, image_ids, text_ids = _random_set(seed=3)
    expected = retrieval_metrics(image_embeds, text_embeds, image_ids, text_ids)
    modality = ["image"] * len(image_ids) + ["text"] * len(text_ids)
    results = metric.compute(
        embeddings=torch.cat([image_embeds, text_embeds]).numpy(),
        ids=torch.cat([image_ids, text_ids]).numpy(),
        modality=modality,
    )
    assert results == expected


def test_hand_built_three_by_three(metric):
    """Images on the axes; each text's nearest image is known, so every rank is known.

    similarities image x text:  T0 (0.6, 0.8, 0)  T1 (0, 1, 0)  T2 (0.8, 0, 0.6)
                       I0          0.6              0             0.8      -> own text T0 ranks 2nd
                       I1          0.8              1             0        -> own text T1 ranks 1st
                       I2          0                0             0.6      -> own text T2 ranks 1st
    text -> image: T0 ranks I1, I0 (2nd); T1 ranks I1 (1st); T2 ranks I0, I2 (2nd).
    T3 (0, 0, -1) has id 7, which no image has: not a t2i query, and as a candidate it is never above a positive.
    """
    results = metric.compute(
        embeddings=[[1, 0, 0], [0, 1, 0], [0, 0, 1], [0.6, 0.8, 0], [0, 1, 0], [0.8, 0, 0.6], [0, 0, -1]],
        ids=[0, 1, 2, 0, 1, 2, 7],
        modality=["image"] * 3 + ["text"] * 4,
        k_values=[1, 2, 3],
    )
    assert results == {
        "i2t_recall@1": 100.0 * 2 / 3,
        "i2t_recall@2": 100.0,
        "i2t_recall@3": 100.0,
        "t2i_recall@1": 100.0 * 1 / 3,
        "t2i_recall@2": 100.0,
        "t2i_recall@3": 100.0,
        "i2t_num_queries": 3,
        "t2i_num_queries": 3,
    }


def test_several_positives_any_one_counts(metric):
    """Two images of id 0 and two captions each: a query is a hit when ANY positive is in its top-k."""
    results = metric.compute(
        embeddings=[
            [1, 0],
            [0.8, 0.6],
            [0, 1],  # images: id 0, id 0, id 1
            [0.6, 0.8],
            [0.1, 0.995],
            [-1, 0],
            [0, 1],
        ],  # texts: id 0, id 0, id 1, id 1
        ids=[0, 0, 1, 0, 0, 1, 1],
        modality=["image"] * 3 + ["text"] * 4,
        k_values=[1, 2],
    )
    # i2t: I0 -> T0 (0.6) hit; I1 -> T0 (0.96) hit; I2 -> T3 (1.0, id 1) hit, just above T1 (0.995, id 0)
    assert results["i2t_recall@1"] == 100.0
    # t2i: T0 -> I1 (0.96) hit; T1 -> I2 (0.995) miss, then I1 (0.677) hit at 2; T2 (-1, 0) -> I2 (0) hit;
    # T3 -> I2 hit
    assert results["t2i_recall@1"] == 75.0 and results["t2i_recall@2"] == 100.0
    assert results["i2t_num_queries"] == 3 and results["t2i_num_queries"] == 4


def test_direction_without_positives_is_nan(metric):
    results = metric.compute(embeddings=[[1.0, 0.0], [0.0, 1.0]], ids=[1, 2], modality=["image", "text"])
    assert math.isnan(results["i2t_recall@1"]) and math.isnan(results["t2i_recall@10"])
    assert results["i2t_num_queries"] == 0 == results["t2i_num_queries"]


def test_bad_inputs_raise(metric, tmp_path):
    with pytest.raises(ValueError, match="modality"):
        metric.compute(embeddings=[[1.0], [1.0]], ids=[0, 0], modality=["image", "caption"])
    with pytest.raises(ValueError, match="at least one image row and one text row"):
        evaluate.load(RETRIEVAL_METRIC_PATH, cache_dir=str(tmp_path)).compute(
            embeddings=[[1.0], [1.0]], ids=[0, 0], modality=["image", "image"]
        )
    with pytest.raises(ValueError, match="same size"):
        evaluate.load(RETRIEVAL_METRIC_PATH, cache_dir=str(tmp_path)).compute(
            embeddings=[[1.0, 0.0], [1.0]], ids=[0, 0], modality=["image", "text"]
        )
    with pytest.raises(ValueError, match="image_ids"):
        retrieval_metric_inputs(torch.zeros(2, 3), torch.zeros(1, 3), [0], [0])


def test_evaluate_model_reports_the_metric_numbers(monkeypatch, metric, digits_processor_16):
    """`evaluate_model` (what `ContrastiveTrainer.evaluate` runs) and the evaluate metric agree exactly on the
    embeddings the trainer computes (class-level digits data: several images and several texts per id)."""
    from vlalign.data import DataArguments, load_image_text_datasets
    from vlalign.evaluation import build_eval_inputs

    data_args = DataArguments(max_train_samples=8, max_eval_samples=40)
    _, evaluation = load_image_text_datasets(data_args)
    eval_inputs = build_eval_inputs(evaluation, data_args)
    torch.manual_seed(0)
    model = TCLModel(tiny_tcl_config())

    seen = {}
    real = vlalign.evaluation.retrieval_metrics

    def spy(image_embeds, text_embeds, image_ids, text_ids, **kwargs):
        seen.update(image_embeds=image_embeds, text_embeds=text_embeds, image_ids=image_ids, text_ids=text_ids)
        return real(image_embeds, text_embeds, image_ids, text_ids, **kwargs)

    monkeypatch.setattr(vlalign.evaluation, "retrieval_metrics", spy)
    reported = vlalign.evaluation.evaluate_model(model, digits_processor_16, eval_inputs)
    assert seen["image_embeds"].shape[0] == len(eval_inputs.images) == reported["num_eval_images"]
    assert len(set(seen["image_ids"])) < len(seen["image_ids"])  # several images per id

    # the embeddings are the model's own (not something the spy made up)
    assert torch.equal(
        seen["image_embeds"], vlalign.evaluation.embed_images(model, digits_processor_16, eval_inputs.images)
    )
    results = metric.compute(
        **retrieval_metric_inputs(seen["image_embeds"], seen["text_embeds"], seen["image_ids"], seen["text_ids"])
    )
    for key, value in results.items():
        assert reported[key] == value, key
