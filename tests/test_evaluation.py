"""vlalign.evaluation: the metrics against brute-force float64 references, retrieval in bounded memory at 100,000
captions x 20,000 images, the eval split decoded into EvalInputs (hostile rows counted by reason), and evaluating
a model (retrieval, zero-shot, ITM re-rank) against hand-computed recalls."""

import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from fixtures import as_bytes, hostile_rows, tiny_tcl_config
from PIL import Image

import vlalign.evaluation
from vlalign import TCLModel
from vlalign.data import (
    DEFAULT_MAX_CAPTION_CHARS,
    DIGIT_CAPTION_TEMPLATES,
    DIGIT_NAMES,
    DataArguments,
    build_digits_dataset,
)
from vlalign.evaluation import (
    EvalInputs,
    build_eval_inputs,
    chunked_similarity_topk,
    evaluate_model,
    retrieval_metrics,
    zero_shot_accuracy,
    zero_shot_classifier,
    zero_shot_metrics,
)

KS = (1, 5, 10)


# ----------------------------------------------------------------------------- references
def ref_recall(q, c, q_ids, c_ids, ks, rerank=None, rerank_k=0):
    """Brute force: full float64 similarity, full argsort per query, optional re-rank of the head."""
    sims = np.asarray(q, dtype=np.float64) @ np.asarray(c, dtype=np.float64).T
    q_ids, c_ids = np.asarray(q_ids), np.asarray(c_ids)
    hits, n = {k: 0 for k in ks}, 0
    for i in range(len(q_ids)):
        pos = c_ids == q_ids[i]
        if not pos.any():
            continue
        n += 1
        order = np.argsort(-sims[i], kind="stable")
        if rerank is not None:
            head = order[:rerank_k]
            scores = np.asarray([rerank(i, j) for j in head])
            order = np.concatenate([head[np.argsort(-scores, kind="stable")], order[rerank_k:]])
        for k in ks:
            hits[k] += bool(pos[order[:k]].any())
    return {k: 100.0 * hits[k] / n for k in ks}, n


def ref_metrics(img, txt, img_ids, txt_ids, ks, **kw):
    out = {}
    for d, q, c, qi, ci in (("i2t", img, txt, img_ids, txt_ids), ("t2i", txt, img, txt_ids, img_ids)):
        rec, n = ref_recall(q, c, qi, ci, ks, **{k: (v(d) if k == "rerank" else v) for k, v in kw.items()})
        out.update({f"{d}_recall@{k}": v for k, v in rec.items()})
        out[f"{d}_num_queries"] = n
    return out


def _exact_and_tie_free(img, txt):
    """Every partial sum of every dot product is an integer below 2**24, so float32 and the float64
    reference compute *identical* similarities; no row or column has ties, so rankings are unique."""
    bound = np.abs(img) @ np.abs(txt).T
    s = img @ txt.T
    return bound.max() < 2**24 and all(len(np.unique(r)) == len(r) for m in (s, s.T) for r in m)


def integer_embeddings(seed, n_img, n_txt, d=16, lim=700, txt_fn=None):
    """Integer-valued float32 embeddings, resampled until `_exact_and_tie_free` holds."""
    rng = np.random.default_rng(seed)
    while True:
        img = rng.integers(-lim, lim + 1, size=(n_img, d)).astype(np.float64)
        txt = rng.integers(-lim, lim + 1, size=(n_txt, d)).astype(np.float64)
        if txt_fn is not None:
            txt = txt_fn(img, txt)
        if _exact_and_tie_free(img, txt):
            return torch.from_numpy(img).float(), torch.from_numpy(txt).float()


@pytest.fixture(scope="module")
def class_level():
    """Class-level ids: many positives per query in both directions, plus ids with no positive."""
    img, txt = integer_embeddings(0, 60, 90)
    rng = np.random.default_rng(1)
    img_ids = rng.integers(0, 8, size=60)  # classes 0..7
    txt_ids = rng.integers(3, 11, size=90)  # classes 3..10: 0-2 images and 8-10 texts have no positive
    return img, txt, img_ids, txt_ids


@pytest.fixture(scope="module")
def caption_level():
    """Caption datasets: 5 captions per image, positives by image id. Each caption is its image plus
    integer noise, so recall is neither ~0 nor 100."""
    img_ids = np.arange(40)
    txt_ids = np.repeat(img_ids, 5)
    img, txt = integer_embeddings(2, 40, 200, txt_fn=lambda i, t: np.round(i[txt_ids] * 0.5 + t * 0.8))
    return img, txt, img_ids, txt_ids


# ----------------------------------------------------------------------------- retrieval
@pytest.mark.parametrize("data", ["class_level", "caption_level"])
def test_matches_bruteforce(data, request):
    img, txt, img_ids, txt_ids = request.getfixturevalue(data)
    got = retrieval_metrics(img, txt, img_ids, txt_ids, ks=KS, chunk_size=16)
    want = ref_metrics(img.numpy(), txt.numpy(), img_ids, txt_ids, KS)
    assert got.keys() == want.keys()
    for key in want:
        assert got[key] == pytest.approx(want[key], abs=1e-9), key
    # non-trivial data: neither all zero nor all perfect
    assert 0 < got["i2t_recall@1"] < 100 or 0 < got["t2i_recall@1"] < 100


def test_class_level_excludes_queries_without_positive(class_level):
    img, txt, img_ids, txt_ids = class_level
    got = retrieval_metrics(img, txt, img_ids, txt_ids)
    assert got["i2t_num_queries"] == int(np.isin(img_ids, txt_ids).sum()) < len(img_ids)
    assert got["t2i_num_queries"] == int(np.isin(txt_ids, img_ids).sum()) < len(txt_ids)

    # Appending queries that have no positive must not change any recall value. The extra items get a
    # new dimension that puts them last in every real query's ranking (real pairs all gain +1, which
    # keeps their order), so only the denominators could change.
    def pad(x, v):
        return torch.cat([x, torch.full((len(x), 1), v)], 1)

    extra = torch.zeros(6, img.shape[1] + 1)
    extra[:, -1] = -1e6
    got2 = retrieval_metrics(
        torch.cat([pad(img, 1.0), extra[:5]]),
        torch.cat([pad(txt, 1.0), extra]),
        np.concatenate([img_ids, np.full(5, 100)]),
        np.concatenate([txt_ids, np.full(6, 200)]),
    )
    assert got2 == got


@pytest.mark.parametrize("chunk_size", [1, 7, 10_000])
def test_chunk_size_invariance(class_level, chunk_size):
    img, txt, img_ids, txt_ids = class_level
    base = retrieval_metrics(img, txt, img_ids, txt_ids, chunk_size=1024)
    assert retrieval_metrics(img, txt, img_ids, txt_ids, chunk_size=chunk_size) == base


def test_id_types_equivalent(caption_level):
    img, txt, img_ids, txt_ids = caption_level
    base = retrieval_metrics(img, txt, torch.from_numpy(img_ids), torch.from_numpy(txt_ids))
    assert retrieval_metrics(img, txt, img_ids.tolist(), txt_ids.tolist()) == base
    as_str = [f"COCO_{i:06d}.jpg" for i in img_ids]
    assert retrieval_metrics(img, txt, as_str, [f"COCO_{i:06d}.jpg" for i in txt_ids]) == base


def test_hand_built_known_values():
    # 2-D toy case; similarities written out in the comments, ranks counted by hand.
    img = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])  # ids a, b, c
    txt = torch.tensor([[0.8, 0.6], [1.0, 0.0], [0.0, 1.0], [0.28, 0.96], [0.6, 0.8]])  # a, b, c, z, c
    # i2t: A -> t1 1, t0 .8 (rank 2); B -> t2 1, t3 .96, t4 .8, t0 .6, t1 0 (rank 5); C -> t4 1 (rank 1)
    # t2i: t0 -> C .96, A .8 (2); t1 -> A 1, C .6, B 0 (3); t2 -> B 1, C .8 (2); t4 -> C 1 (1); t3 no positive
    got = retrieval_metrics(img, txt, ["a", "b", "c"], ["a", "b", "c", "z", "c"], ks=(1, 2, 3, 5))
    assert got["i2t_num_queries"] == 3 and got["t2i_num_queries"] == 4
    assert got["i2t_recall@1"] == pytest.approx(100 / 3)
    assert got["i2t_recall@2"] == pytest.approx(200 / 3)
    assert got["i2t_recall@3"] == pytest.approx(200 / 3)
    assert got["i2t_recall@5"] == 100.0
    assert (got["t2i_recall@1"], got["t2i_recall@2"], got["t2i_recall@3"], got["t2i_recall@5"]) == (
        25.0,
        75.0,
        100.0,
        100.0,  # k larger than the number of candidates
    )


def test_no_valid_query_gives_nan():
    got = retrieval_metrics(torch.eye(3), torch.eye(3), [0, 1, 2], [3, 4, 5])
    assert got["i2t_num_queries"] == 0 and math.isnan(got["i2t_recall@1"])


# ----------------------------------------------------------------------------- re-ranking
def _oracle(img_ids, txt_ids, calls):
    img_ids, txt_ids = torch.as_tensor(img_ids), torch.as_tensor(txt_ids)

    def fn(q_idx, cand_idx, direction):
        calls.append((direction, q_idx.clone(), cand_idx.clone()))
        q, c = (img_ids, txt_ids) if direction == "i2t" else (txt_ids, img_ids)
        return (c[cand_idx] == q[q_idx][:, None]).float()  # positives score 1, negatives 0

    return fn


def test_oracle_rerank_recall_at_1(class_level):
    img, txt, img_ids, txt_ids = class_level
    r = 4
    plain = retrieval_metrics(img, txt, img_ids, txt_ids, ks=(1, r))
    calls = []
    got = retrieval_metrics(
        img, txt, img_ids, txt_ids, ks=(1, r), chunk_size=7, rerank_fn=_oracle(img_ids, txt_ids, calls), rerank_k=r
    )
    # After an oracle re-rank, a positive is first iff one was in the similarity top-r.
    for d in ("i2t", "t2i"):
        assert got[f"{d}_recall@1"] == pytest.approx(plain[f"{d}_recall@{r}"])
        assert got[f"{d}_recall@1"] > plain[f"{d}_recall@1"]
    # called per chunk with the global indices of every query that has a positive, once, both directions
    for d, q_ids, c_ids in (("i2t", img_ids, txt_ids), ("t2i", txt_ids, img_ids)):
        qs = torch.cat([q for dd, q, _ in calls if dd == d])
        assert torch.equal(qs, torch.from_numpy(np.flatnonzero(np.isin(q_ids, c_ids))))
        assert max(len(q) for dd, q, _ in calls if dd == d) <= 7
        assert all(c.shape == (len(q), r) for dd, q, c in calls if dd == d)


def test_oracle_rerank_reaches_100_when_all_positives_in_head(caption_level):
    img, txt, img_ids, txt_ids = caption_level
    r = len(img_ids)  # every candidate image is inside the re-rank window for t2i
    got = retrieval_metrics(img, txt, img_ids, txt_ids, rerank_fn=_oracle(img_ids, txt_ids, []), rerank_k=r)
    assert got["t2i_recall@1"] == 100.0 and got["i2t_recall@1"] == 100.0
    assert retrieval_metrics(img, txt, img_ids, txt_ids)["t2i_recall@1"] < 100.0


def test_rerank_order_matches_reference(class_level):
    """A re-ranker that reverses the head: candidates beyond rerank_k must keep similarity order."""
    img, txt, img_ids, txt_ids = class_level
    r = 6
    rng = np.random.default_rng(5)
    table = {d: rng.permutation(10_000).reshape(100, 100) for d in ("i2t", "t2i")}  # distinct scores

    def fn(q_idx, cand_idx, direction):
        return torch.from_numpy(table[direction][q_idx.numpy()[:, None], cand_idx.numpy()]).float()

    got = retrieval_metrics(img, txt, img_ids, txt_ids, ks=(1, 3, 6, 10), chunk_size=5, rerank_fn=fn, rerank_k=r)
    want = ref_metrics(
        img.numpy(),
        txt.numpy(),
        img_ids,
        txt_ids,
        (1, 3, 6, 10),
        rerank=lambda d: lambda i, j: table[d][i, j],
        rerank_k=r,
    )
    for key in want:
        assert got[key] == pytest.approx(want[key], abs=1e-9), key


def test_rerank_bad_shape_raises(class_level):
    img, txt, img_ids, txt_ids = class_level
    with pytest.raises(ValueError, match="shape"):
        retrieval_metrics(img, txt, img_ids, txt_ids, rerank_fn=lambda q, c, d: torch.zeros(len(q)), rerank_k=3)


# ----------------------------------------------------------------------------- top-k helper
@pytest.mark.parametrize("chunk_size", [1, 7, 500])
def test_chunked_topk_matches_bruteforce(class_level, chunk_size):
    img, txt, _, _ = class_level
    vals, idx = chunked_similarity_topk(txt, img, k=12, chunk_size=chunk_size)
    s = txt.double().numpy() @ img.double().numpy().T
    ref_idx = np.argsort(-s, axis=1)[:, :12]
    assert np.array_equal(idx.numpy(), ref_idx)
    assert np.array_equal(vals.double().numpy(), np.take_along_axis(s, ref_idx, axis=1))
    # k beyond the number of candidates is clipped
    assert chunked_similarity_topk(txt[:3], img[:5], k=50, chunk_size=chunk_size)[1].shape == (3, 5)


# ----------------------------------------------------------------------------- zero-shot
def test_zero_shot_accuracy_constructed():
    classes = torch.eye(3)
    images = torch.tensor([[0.9, 0.1, 0.0], [0.2, 0.7, 0.1], [0.0, 0.4, 0.6], [0.5, 0.45, 0.05]])
    # predictions: 0, 1, 2, 0
    assert zero_shot_accuracy(images, torch.tensor([0, 1, 2, 1]), classes) == pytest.approx(75.0)
    assert zero_shot_accuracy(images, [0, 1, 2, 0], classes, chunk_size=1) == 100.0


def test_zero_shot_top5_and_mean_per_class_recall_by_hand():
    """Six classes (one-hot class embeddings): image 0 right; image 1 (class 0) second-ranked, right in the top 5;
    image 2 right; image 3 (class 2) ranked sixth, wrong even in the top 5; image 4's label 7 is no class (wrong,
    and no class of the per-class mean). Top-1 2/5, top-5 3/5, per-class recall (1/2 + 1 + 0) / 3."""
    classes = torch.eye(6)
    images = torch.tensor(
        [
            [1.0, 0.0, 0.0, 0.0, 0.0, 0.0],
            [0.3, 0.9, 0.0, 0.0, 0.0, 0.0],
            [0.0, 1.0, 0.0, 0.0, 0.0, 0.0],
            [0.1, 0.2, 0.0, 0.9, 0.8, 0.7],
            [0.0, 0.0, 0.0, 0.0, 1.0, 0.0],
        ]
    )
    got = zero_shot_metrics(images, [0, 0, 1, 2, 7], classes, chunk_size=2)
    assert got == pytest.approx(
        {"zero_shot_accuracy": 40.0, "zero_shot_top5_accuracy": 60.0, "zero_shot_mean_per_class_recall": 50.0}
    )
    # five classes or fewer: top-5 would be 100 by construction and is left out
    five = zero_shot_metrics(images[:, :5], [0, 0, 1, 2, 4], torch.eye(5))
    assert set(five) == {"zero_shot_accuracy", "zero_shot_mean_per_class_recall"}
    assert zero_shot_accuracy(images, [0, 0, 1, 2, 7], classes) == 40.0


def test_zero_shot_accuracy_random_vs_argmax():
    rng = np.random.default_rng(7)
    images, classes = rng.standard_normal((300, 32)), rng.standard_normal((17, 32))
    labels = rng.integers(0, 17, 300)
    pred = np.argmax(images @ classes.T, axis=1)
    want = 100.0 * np.mean(pred == labels)
    got = zero_shot_accuracy(
        torch.from_numpy(images).float(), torch.from_numpy(labels), torch.from_numpy(classes).float()
    )
    assert got == pytest.approx(want)


def test_zero_shot_classifier_clip_style():
    rng = np.random.default_rng(8)
    per_class = [rng.standard_normal((t, 16)) for t in (1, 4, 7)]  # different template counts
    got = zero_shot_classifier([torch.from_numpy(x).float() for x in per_class])
    for c, x in enumerate(per_class):
        x = x / np.linalg.norm(x, axis=1, keepdims=True)
        m = x.mean(0)
        np.testing.assert_allclose(got[c].numpy(), m / np.linalg.norm(m), rtol=1e-5, atol=1e-6)
    assert got.shape == (3, 16)
    # 3-D tensor input equals the list form
    same = [torch.from_numpy(rng.standard_normal((5, 16))).float() for _ in range(4)]
    assert torch.allclose(zero_shot_classifier(torch.stack(same)), zero_shot_classifier(same))
    # scaling one template must not change the classifier (templates are normalised first)
    scaled = [same[0] * torch.tensor([[10.0], [1], [1], [1], [1]])] + same[1:]
    assert torch.allclose(zero_shot_classifier(scaled), zero_shot_classifier(same), atol=1e-6)


# ----------------------------------------------------------------------------- scale / memory
_BIG_SCRIPT = textwrap.dedent(
    """
    import json, resource, sys, torch
    # imported before the baseline below, so the peak-RSS delta measures the call only
    import vlalign.evaluation as metrics

    # Integer-valued embeddings, |partial sums| <= 256 * 100 * 600 < 2**24: float32 similarities are
    # exact, so the reference below is exact too. Each caption = its image + integer noise.
    g = torch.Generator().manual_seed(0)
    n_img, per, d = 5000, 5, 256
    img = torch.randint(-100, 101, (n_img, d), generator=g).float()
    img_ids = torch.arange(n_img)
    txt_ids = img_ids.repeat_interleave(per)
    txt = img[txt_ids] + torch.randint(-500, 501, (n_img * per, d), generator=g).float()

    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    got = metrics.retrieval_metrics(img, txt, img_ids, txt_ids, ks=(1, 5, 10), chunk_size=1024)
    rss1 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

    # Reference by rank counting: a query hits @k iff fewer than k negatives beat its best positive.
    # Ties with a negative make the outcome depend on tie-breaking: count strict (">", optimistic)
    # and non-strict (">=", pessimistic) ranks and require the result to lie between the two.
    pos_t2i = (txt * img[txt_ids]).sum(1)  # each caption has exactly one positive image
    pos_i2t = pos_t2i.view(n_img, per).max(1).values  # best of an image's captions
    rank = {(dr, op): torch.zeros(n, dtype=torch.long) for dr, n in (("t2i", n_img * per), ("i2t", n_img))
            for op in ("gt", "ge")}
    for a in range(0, n_img * per, 2500):
        S = txt[a:a + 2500] @ img.T
        S[torch.arange(S.shape[0]), txt_ids[a:a + 2500]] = -float("inf")  # negatives only
        for op, f in (("gt", torch.gt), ("ge", torch.ge)):
            rank["t2i", op][a:a + 2500] = f(S, pos_t2i[a:a + 2500, None]).sum(1)
            rank["i2t", op] += f(S, pos_i2t[None, :]).sum(0)
    ref = {f"{dr}_recall@{k}": [100.0 * int((rank[dr, op] < k).sum()) / len(rank[dr, op]) for op in ("ge", "gt")]
           for dr in ("i2t", "t2i") for k in (1, 5, 10)}
    print(json.dumps({"got": got, "ref": ref, "rss_delta_mb": (rss1 - rss0) / 1024}))
    """
)


def test_coco_scale_bounded_memory_matches_reference():
    """25,000 captions x 5,000 images, d=256: the full float32 similarity matrix alone would be 500 MB.
    Runs in a fresh process so the peak-RSS delta measures this call only."""
    path = str(Path(vlalign.evaluation.__file__))
    proc = subprocess.run(
        [sys.executable, "-c", _BIG_SCRIPT, path], capture_output=True, text=True, timeout=120, check=False
    )
    assert proc.returncode == 0, proc.stderr
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    got, ref = res["got"], res["ref"]
    assert got["i2t_num_queries"] == 5000 and got["t2i_num_queries"] == 25000
    for key, (lo, hi) in ref.items():
        assert hi - lo < 0.1, (key, lo, hi)  # the reference is (nearly) tie-free, so the check is tight
        assert lo - 1e-9 <= got[key] <= hi + 1e-9, (key, got[key], lo, hi)
    assert 5 < got["t2i_recall@1"] < 95  # the data is neither trivial nor hopeless
    # one 1024 x 25,000 float32 chunk is ~100 MB, far below the 500 MB full matrix
    assert res["rss_delta_mb"] < 300, res["rss_delta_mb"]


# ----------------------------------------------------------------------------- codebook usage
def test_code_usage_counts_and_perplexity():
    from vlalign.evaluation import code_usage

    # uniform over 4 of 10 codes: perplexity 4
    assert code_usage([0, 3, 5, 9] * 5, 10) == {"codes_used": 4, "code_perplexity": pytest.approx(4.0)}
    # a collapsed codebook: perplexity 1
    assert code_usage([7] * 20, 10) == {"codes_used": 1, "code_perplexity": pytest.approx(1.0)}
    # skewed: exp(-(0.75 ln 0.75 + 0.25 ln 0.25))
    skewed = code_usage([1, 1, 1, 2], 3)
    assert skewed["codes_used"] == 2
    assert skewed["code_perplexity"] == pytest.approx(math.exp(-(0.75 * math.log(0.75) + 0.25 * math.log(0.25))))
    assert math.isnan(code_usage([], 5)["code_perplexity"])
    with pytest.raises(ValueError, match=r"\[0, 5\)"):
        code_usage([0, 5], 5)


def test_code_purity_against_labels():
    from vlalign.evaluation import code_purity

    # code 0: labels 1,1,2 -> 2 correct; code 1: labels 3,3 -> 2 correct; code 2: label 0 -> 1 correct
    assert code_purity([0, 0, 0, 1, 1, 2], [1, 1, 2, 3, 3, 0]) == pytest.approx(100 * 5 / 6)
    assert code_purity([4, 4, 4], [0, 1, 2]) == pytest.approx(100 / 3)
    # relabelling the codes changes nothing
    assert code_purity([9, 9, 9, 2, 2, 5], [1, 1, 2, 3, 3, 0]) == pytest.approx(100 * 5 / 6)
    with pytest.raises(ValueError, match="labels"):
        code_purity([0, 1], [0])


# ----------------------------------------------------------------------------- eval inputs
@pytest.fixture(scope="module")
def digits():
    return build_digits_dataset()


def test_build_eval_inputs_on_digits_with_a_corrupt_row(digits):
    args = DataArguments()
    evaluation = digits["test"].cast_column("image", datasets.Image(decode=False)).select(range(30))
    broken = evaluation.to_dict()
    broken["image"][3] = {"bytes": b"garbage", "path": None}
    # a *decoding* Image feature: build_eval_inputs must still skip the corrupt row rather than crash
    evaluation = datasets.Dataset.from_dict(broken, features=digits["test"].features)
    assert evaluation.features["image"].decode
    inputs = build_eval_inputs(evaluation, args, batch_size=7)
    keep = [i for i in range(30) if i != 3]
    assert inputs.num_skipped == 1
    assert len(inputs.images) == 29 and all(im.mode == "RGB" and im.size == (32, 32) for im in inputs.images)
    labels = [evaluation["label"][i] for i in keep]
    assert inputs.labels == labels and inputs.image_ids == labels  # positives_by="label"
    assert len(inputs.texts) == 29 * len(DIGIT_CAPTION_TEMPLATES)
    for text, text_id in zip(inputs.texts, inputs.text_ids):
        assert DIGIT_NAMES[text_id] in text or str(text_id) in text
    by_image = build_eval_inputs(evaluation, DataArguments(positives_by="image"))
    assert by_image.image_ids == [evaluation["image_id"][i] for i in keep]
    assert by_image.text_ids[:8] == [evaluation["image_id"][0]] * 8


# ----------------------------------------------------------------------------- evaluating a model
def _three_pairs(processor, itm_scores=None):
    """Three images and their three captions (positive ids 0, 1, 2; labels 0, 1, 2) with a model whose towers and ITM
    head are fixed lookups, so every recall is known by hand. Image embeddings are the unit vectors e0, e1, e2 and
    caption j's embedding is column j of the similarities S[image, caption]:

                caption 0  caption 1  caption 2
        image 0    0.5        0.8        0.1
        image 1    0.8        0.5        0.2
        image 2    0.1        0.1        0.9

    By similarity image 0 ranks caption 1 first and image 1 caption 0 (both wrong), image 2 its own caption: recall@1
    is 1 of 3 image-to-text, and likewise text-to-image (captions 0 and 1 each rank the other image first); every
    match is within the top 2. The zero-shot prompts ("{name}" for the class names zero / one / two) embed as e1, e0,
    e2, so images 0 and 1 are classified as each other's class and image 2 right: 1 of 3. `itm_scores[image,
    caption]` is what the ITM head returns."""
    images = [Image.new("RGB", (16, 16), (level, level, level)) for level in (30, 130, 230)]
    captions = ["a handwritten digit zero", "a handwritten digit one", "a handwritten digit two"]
    prompts = ["zero", "one", "two"]
    image_embeds = torch.eye(3)
    similarities = torch.tensor([[0.5, 0.8, 0.1], [0.8, 0.5, 0.2], [0.1, 0.1, 0.9]])
    text_embeds = torch.cat([similarities.T, torch.eye(3)[[1, 0, 2]]])  # the captions, then the prompts

    def image_keys(pixel_values):
        return [round(float(pixels[0, 0, 0]), 4) for pixels in pixel_values]

    def text_keys(input_ids, attention_mask):
        return [tuple(ids[mask.bool()].tolist()) for ids, mask in zip(input_ids, attention_mask)]

    image_row = {key: row for row, key in enumerate(image_keys(processor(images=images)["pixel_values"]))}
    tokens = processor(text=captions + prompts, return_tensors="pt")
    text_row = {key: row for row, key in enumerate(text_keys(tokens["input_ids"], tokens["attention_mask"]))}
    assert len(image_row) == 3 and len(text_row) == 6

    def image_rows(pixel_values):
        return torch.tensor([image_row[key] for key in image_keys(pixel_values)])

    def text_rows(input_ids, attention_mask):
        return torch.tensor([text_row[key] for key in text_keys(input_ids, attention_mask)])

    torch.manual_seed(0)
    model = TCLModel(tiny_tcl_config())  # its own towers are never called
    model.get_image_features = lambda pixel_values: image_embeds[image_rows(pixel_values)]
    model.get_text_features = lambda input_ids, attention_mask: text_embeds[text_rows(input_ids, attention_mask)]
    model.get_image_tokens = lambda pixel_values: image_rows(pixel_values).float().view(-1, 1, 1)
    model.itm_score = lambda input_ids, attention_mask, image_tokens: itm_scores[
        image_tokens[:, 0, 0].long(), text_rows(input_ids, attention_mask)
    ]
    eval_inputs = EvalInputs(images, [0, 1, 2], captions, [0, 1, 2], [0, 1, 2], 0)
    return eval_inputs, model


def test_evaluate_model_reports_hand_computed_recall_and_zero_shot_accuracy(digits_processor_16):
    eval_inputs, model = _three_pairs(digits_processor_16)
    metrics = evaluate_model(model, digits_processor_16, eval_inputs, ["zero", "one", "two"], ["{name}"])
    for direction in ("i2t", "t2i"):
        assert metrics[f"{direction}_recall@1"] == pytest.approx(100 / 3)
        assert metrics[f"{direction}_recall@5"] == metrics[f"{direction}_recall@10"] == 100.0
        assert metrics[f"{direction}_num_queries"] == 3
    assert metrics["zero_shot_accuracy"] == pytest.approx(100 / 3)
    assert (metrics["num_eval_images"], metrics["num_eval_texts"], metrics["num_eval_images_skipped"]) == (3, 3, 0)


def test_contrastive_trainer_evaluate_reports_hand_computed_recall(digits_processor_16, tmp_path):
    """`ContrastiveTrainer.evaluate` on the constructed case: the recalls worked out in `_three_pairs`, prefixed, and
    with the trainer's `itm_rerank_k` the re-ranked ones."""
    from vlalign.trainer import ContrastiveTrainer, ContrastiveTrainingArguments

    eval_inputs, model = _three_pairs(digits_processor_16, itm_scores=torch.eye(3))
    for rerank_k, recall_at_1 in ((0, 100 / 3), (2, 100.0)):
        args = ContrastiveTrainingArguments(
            output_dir=str(tmp_path), report_to="none", use_cpu=True, itm_rerank_k=rerank_k
        )
        trainer = ContrastiveTrainer(
            model=model,
            args=args,
            train_dataset=[0] * 4,
            processing_class=digits_processor_16,
            eval_inputs=eval_inputs,
            class_names=["zero", "one", "two"],
            zero_shot_templates=["{name}"],
        )
        metrics = trainer.evaluate()
        assert metrics["eval_i2t_recall@1"] == pytest.approx(recall_at_1), rerank_k
        assert metrics["eval_t2i_recall@1"] == pytest.approx(recall_at_1), rerank_k
        assert metrics["eval_i2t_recall@10"] == metrics["eval_t2i_recall@10"] == 100.0
        assert metrics["eval_zero_shot_accuracy"] == pytest.approx(100 / 3)


def test_itm_rerank_evaluation_runs_on_candidates(digits_processor_16, digits_small):
    data_args, _, evaluation = digits_small
    eval_inputs = build_eval_inputs(evaluation.select(range(12)), data_args)
    torch.manual_seed(0)
    model = TCLModel(tiny_tcl_config())
    plain = evaluate_model(model, digits_processor_16, eval_inputs)
    reranked = evaluate_model(model, digits_processor_16, eval_inputs, itm_rerank_k=5)
    # re-ranking only reorders the top-5: recall@5 and recall@10 cannot change
    for key in ("i2t_recall@5", "i2t_recall@10", "t2i_recall@5", "t2i_recall@10"):
        assert reranked[key] == pytest.approx(plain[key])

    # the re-ranked order is the one scored: on the constructed case the ITM head puts every match first among the
    # top 2 by similarity, so recall@1 goes from the similarity's 1 of 3 to 3 of 3 both ways (worked out in
    # `_three_pairs`); a head of one candidate cannot reorder anything
    eval_inputs, model = _three_pairs(digits_processor_16, itm_scores=torch.eye(3))
    plain = evaluate_model(model, digits_processor_16, eval_inputs)
    reranked = evaluate_model(model, digits_processor_16, eval_inputs, itm_rerank_k=2)
    head_of_one = evaluate_model(model, digits_processor_16, eval_inputs, itm_rerank_k=1)
    for direction in ("i2t", "t2i"):
        assert plain[f"{direction}_recall@1"] == pytest.approx(100 / 3)
        assert reranked[f"{direction}_recall@1"] == pytest.approx(100.0)
        assert head_of_one[f"{direction}_recall@1"] == pytest.approx(100 / 3)
        assert plain[f"{direction}_recall@5"] == reranked[f"{direction}_recall@5"] == 100.0
    # an ITM head that prefers image 0 with caption 1 (and agrees elsewhere) costs exactly those two pairs' queries:
    # image 0 (i2t) and caption 1 (t2i) now rank the wrong one first
    misled = torch.eye(3)
    misled[0, 1] = 2.0
    eval_inputs, model = _three_pairs(digits_processor_16, itm_scores=misled)
    reranked = evaluate_model(model, digits_processor_16, eval_inputs, itm_rerank_k=2)
    assert reranked["i2t_recall@1"] == pytest.approx(200 / 3) and reranked["t2i_recall@1"] == pytest.approx(200 / 3)


def test_zero_shot_warns_about_eval_labels_the_class_names_do_not_cover(digits_processor_16, digits_small, caplog):

    data_args, _, evaluation = digits_small
    inputs = build_eval_inputs(evaluation.select(range(10)), data_args)
    labels = [0, 1, 2, 0, 1, 7, 7, 9, 7, 3]
    torch.manual_seed(0)
    model = TCLModel(tiny_tcl_config())
    with caplog.at_level("WARNING", logger="vlalign.evaluation"):
        covered = evaluate_model(
            model,
            digits_processor_16,
            EvalInputs(inputs.images, labels, inputs.texts[:10], labels, labels, 0),
            DIGIT_NAMES,
            data_args.zero_shot_templates,
        )
    assert "zero_shot_accuracy" in covered
    assert not [r for r in caplog.records if "class names do not cover" in r.getMessage()]
    labels[-1] = -1  # a row without a label (build_eval_inputs' None)
    with caplog.at_level("WARNING", logger="vlalign.evaluation"):
        metrics = evaluate_model(
            model,
            digits_processor_16,
            EvalInputs(inputs.images, labels, inputs.texts[:10], labels, labels, 0),
            ["zero", "one", "two"],
            data_args.zero_shot_templates,
        )
    assert "zero_shot_accuracy" in metrics  # still computed, those rows scored as wrong
    warned = [r.getMessage() for r in caplog.records if "class names do not cover" in r.getMessage()]
    assert warned == [
        "Zero-shot evaluation: 5 of 10 eval rows have labels the 3 class names do not cover (label 7: 3 "
        "rows, label 9: 1 row, no label: 1 row); they are scored as wrong in zero_shot_accuracy"
    ]


# ---------------------------------------------------------------------------------------------------------------------
# Eval inputs from hostile rows: every bad image and caption counted by reason
# ---------------------------------------------------------------------------------------------------------------------


def test_build_eval_inputs_counts_by_reason(tmp_path):
    rows, expected = hostile_rows(tmp_path)
    features = datasets.Features({"image": datasets.Image(), "caption": datasets.Value("binary")})
    binary_rows = [dict(row, caption=as_bytes(row["caption"])) for row in rows]
    dataset = datasets.Dataset.from_list(binary_rows, features=features)
    inputs = build_eval_inputs(
        dataset, DataArguments(dataset_name="x", label_column=None, image_id_column=None, positives_by="image")
    )
    assert inputs.num_skipped == 6 and len(inputs.images) == len(rows) - 6
    assert all(image.mode == "RGB" for image in inputs.images)
    assert inputs.issues.report() == expected
    # images whose captions were all unusable stay retrieval candidates; repaired captions are texts
    assert len(inputs.texts) == len(rows) - 6 - 3
    assert max(len(text) for text in inputs.texts) == DEFAULT_MAX_CAPTION_CHARS


# ---------------------------------------------------------------------------------------------------------------------
# Bounded memory at scale
# ---------------------------------------------------------------------------------------------------------------------
# Retrieval evaluation of 100,000 captions against 20,000 images in bounded memory.
#
# The full 100,000 x 20,000 float32 similarity matrix would take 8 GB. `retrieval_metrics` works in query chunks
# written into one reused ``chunk_size x N_candidates`` buffer (1024 x 100,000 x 4 B = 410 MB for image->text), so
# the evaluation must fit in a fixed budget far below that. A child process builds the embeddings, then compares
# its peak RSS (`ru_maxrss`) before and after the evaluation.
#
# The embeddings carry a planted structure with known recalls: caption i belongs to image i // 5 and is that image's
# embedding plus small noise, except every 50th caption, which points the opposite way (it can never retrieve its
# image). So text->image recall@k is exactly 98% for every k, and image->text recall@k exactly 100% (each image
# keeps at least four close captions).
#
# 128-d embeddings (not 256) keep the run at about 10 s on the 2-core development machine, about 20 s when other
# jobs share the cores; memory does not depend on the dimension beyond the 51 MB of caption embeddings.


NUM_IMAGES, CAPTIONS_PER_IMAGE, DIM, CHUNK_SIZE = 20_000, 5, 128, 1024
BUDGET_MB = 600  # 410 MB similarity buffer + top-k results and slack; the full matrix would be 8,000 MB
FULL_MATRIX_MB = NUM_IMAGES * NUM_IMAGES * CAPTIONS_PER_IMAGE * 4 / 2**20

CHILD = textwrap.dedent(f"""
    import json, os, resource, time
    import torch
    from torch.nn.functional import normalize
    from vlalign.evaluation import retrieval_metrics

    def peak_mb():
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux

    def rss_mb():  # resident now (the peak can be higher: temporaries already freed)
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20

    torch.set_num_threads(2)
    num_images, per_image, dim = {NUM_IMAGES}, {CAPTIONS_PER_IMAGE}, {DIM}
    generator = torch.Generator().manual_seed(0)
    images = normalize(torch.randn(num_images, dim, generator=generator), dim=1)
    texts = torch.empty(num_images * per_image, dim)
    block = 10_000  # build the captions in blocks, so that building them leaves no large peak behind
    for start in range(0, len(texts), block):
        index = torch.arange(start, start + block)
        noise = 0.3 / dim ** 0.5 * torch.randn(block, dim, generator=generator)  # noise norm about 0.3
        captions = images[index // per_image] + noise
        captions[index % 50 == 0] *= -1  # every 50th caption points away from its image
        texts[start:start + block] = normalize(captions, dim=1)
    image_ids = torch.arange(num_images)
    text_ids = torch.arange(num_images * per_image) // per_image

    before, resident_before = peak_mb(), rss_mb()
    started = time.perf_counter()
    metrics = retrieval_metrics(images, texts, image_ids, text_ids, ks=(1, 5, 10), chunk_size={CHUNK_SIZE})
    seconds = time.perf_counter() - started
    after = peak_mb()
    # control: allocating 300 MB beyond the peak so far must show up as ~300 MB more peak
    probe = torch.ones(int((after - rss_mb() + 300) * 2**20) // 4)
    control = peak_mb() - after
    print(json.dumps(dict(metrics=metrics, growth_mb=after - before, extra_mb=after - resident_before,
                          control_mb=control, seconds=seconds, baseline_mb=before)))
""")


def test_100k_captions_against_20k_images_in_bounded_memory():
    env = dict(os.environ, OMP_NUM_THREADS="2", MKL_NUM_THREADS="2")
    done = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    print("bounded evaluation:", json.dumps({k: v for k, v in result.items() if k != "metrics"}))  # pytest -s

    metrics = result["metrics"]
    assert metrics["i2t_num_queries"] == NUM_IMAGES
    assert metrics["t2i_num_queries"] == NUM_IMAGES * CAPTIONS_PER_IMAGE
    for k in (1, 5, 10):
        assert metrics[f"i2t_recall@{k}"] == 100.0
        assert metrics[f"t2i_recall@{k}"] == 98.0

    assert result["control_mb"] > 250, result  # ru_maxrss does track allocations in this process
    # the peak's growth, and (stricter) the peak above what was resident before the evaluation
    assert BUDGET_MB < FULL_MATRIX_MB / 10
    assert result["growth_mb"] < BUDGET_MB and result["extra_mb"] < BUDGET_MB, result
