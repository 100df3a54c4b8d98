"""MIVC pooling: permutation and padding invariance, the attention formulas against float64 loops, masks, bf16."""

import ast
import copy
import itertools
import math
from pathlib import Path

import pytest
import torch

import vlalign.mivc_pooling as mivc_module
from vlalign.mivc_pooling import MIVCPooling, MIVCPoolingOutput

MODES = MIVCPooling.MODES
GRANULARITIES = ("token", "image")
CASES = list(itertools.product(MODES, GRANULARITIES, (3, 4)))
D, T, L = 6, 3, 5


def _module(mode, granularity="token", seed=0):
    """A module with N(0, 1) weights, so the softmax is far from uniform and the tests discriminate."""
    torch.manual_seed(seed)
    module = MIVCPooling(D, mode=mode, attention_dim=L, granularity=granularity)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    return module


def _features(batch, n_images, rank, seed=1, dtype=torch.float32):
    shape = (batch, n_images, D) if rank == 3 else (batch, n_images, T, D)
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(dtype)


def _mask(counts, n_images):
    return torch.arange(n_images)[None, :] < torch.tensor(counts)[:, None]


def _pad_content(kind, shape, seed=7):
    """What sits in padded slots: it must never matter."""
    if kind == "random":
        return torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    if kind == "huge":
        return torch.full(shape, 3e38)
    values = torch.tensor([float("inf"), float("-inf"), float("nan"), 1e30])
    return values[torch.arange(math.prod(shape)) % 4].reshape(shape)


# ---------------------------------------------------------------------------------------------------------------------
# Permutation and padding invariance
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode,granularity,rank", CASES)
def test_permuting_images_permutes_weights_and_keeps_pooled_features(mode, granularity, rank):
    module = _module(mode, granularity)
    features, mask = _features(3, 4, rank), _mask([4, 2, 3], 4)
    g = torch.Generator().manual_seed(3)
    perms = torch.stack([torch.randperm(4, generator=g) for _ in range(3)])  # shuffles real and padded slots alike
    shuffled = torch.stack([features[b, perms[b]] for b in range(3)])
    shuffled_mask = torch.stack([mask[b, perms[b]] for b in range(3)])
    assert not torch.equal(shuffled_mask, mask)
    out, out_perm = module(features, mask), module(shuffled, shuffled_mask)
    torch.testing.assert_close(out_perm.pooled_features, out.pooled_features, atol=1e-5, rtol=1e-5)
    for b in range(3):
        torch.testing.assert_close(out_perm.image_weights[b], out.image_weights[b, perms[b]], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("pad", ["random", "huge", "nonfinite"])
@pytest.mark.parametrize("mode,granularity,rank", CASES)
def test_padded_images_change_nothing(mode, granularity, rank, pad):
    module = _module(mode, granularity)
    counts, n_images = [1, 3, 5, 2], 5
    features, mask = _features(4, n_images, rank), _mask(counts, n_images)
    features = torch.where(mask.view(4, n_images, *[1] * (rank - 2)), features, _pad_content(pad, features.shape))
    out = module(features, mask)
    assert torch.isfinite(out.pooled_features).all()
    assert torch.equal(out.image_weights[~mask], torch.zeros_like(out.image_weights[~mask]))
    for b, n in enumerate(counts):
        alone = module(features[b : b + 1, :n])  # the same item with only its real images and no mask
        torch.testing.assert_close(out.pooled_features[b], alone.pooled_features[0], atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(out.image_weights[b, :n], alone.image_weights[0], atol=1e-7, rtol=1e-6)


def test_int_mask_equals_bool_mask():
    module = _module("attention")
    features, mask = _features(2, 3, 4), _mask([3, 1], 3)
    a, b = module(features, mask), module(features, mask.long())
    assert torch.equal(a.pooled_features, b.pooled_features) and torch.equal(a.image_weights, b.image_weights)


# ---------------------------------------------------------------------------------------------------------------------
# The formulas against float64 loops
# ---------------------------------------------------------------------------------------------------------------------


def _reference(module, features, mask):
    """Ilse et al.'s (gated) attention pooling with explicit loops over items / images / tokens, in float64."""
    V = module.attention_proj.weight.detach().double()
    b_v = module.attention_proj.bias.detach().double()
    w = module.score_proj.weight.detach().double()[0]
    gated = module.mode == "gated_attention"
    if gated:
        U, b_u = module.gate_proj.weight.detach().double(), module.gate_proj.bias.detach().double()
    x = features.detach().double()
    vector = x.dim() == 3
    if vector:
        x = x.unsqueeze(2)
    per_token = not vector and module.granularity == "token"

    def score(h):
        hidden = torch.tanh(V @ h + b_v)
        if gated:
            hidden = hidden * torch.sigmoid(U @ h + b_u)
        return float(w @ hidden)

    batch, n_images, n_tokens, _ = x.shape
    pooled = torch.zeros(batch, n_tokens, x.shape[-1], dtype=torch.float64)
    weights = torch.zeros(batch, n_images, n_tokens if per_token else 1, dtype=torch.float64)
    for b in range(batch):
        real = [k for k in range(n_images) if mask[b, k]]
        if per_token:
            for t in range(n_tokens):
                scores = {k: score(x[b, k, t]) for k in real}
                top = max(scores.values())
                z = sum(math.exp(s - top) for s in scores.values())
                for k in real:
                    weights[b, k, t] = math.exp(scores[k] - top) / z
                    pooled[b, t] += weights[b, k, t] * x[b, k, t]
        else:
            scores = {k: score(x[b, k].mean(dim=0)) for k in real}  # one score per image, from its mean token
            top = max(scores.values())
            z = sum(math.exp(s - top) for s in scores.values())
            for k in real:
                weights[b, k, 0] = math.exp(scores[k] - top) / z
                for t in range(n_tokens):
                    pooled[b, t] += weights[b, k, 0] * x[b, k, t]
    if vector:
        pooled = pooled.squeeze(1)
    if not per_token:
        weights = weights.squeeze(-1)
    return pooled, weights


@pytest.mark.parametrize("mode,granularity,rank", [c for c in CASES if "attention" in c[0]])
def test_attention_matches_float64_loops(mode, granularity, rank):
    module = _module(mode, granularity)
    features, mask = _features(3, 4, rank), _mask([4, 1, 3], 4)
    expected_pooled, expected_weights = _reference(module, features, mask)

    out64 = copy.deepcopy(module).double()(features.double(), mask)
    assert out64.pooled_features.dtype == out64.image_weights.dtype == torch.float64
    torch.testing.assert_close(out64.pooled_features, expected_pooled, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(out64.image_weights, expected_weights, atol=1e-12, rtol=1e-12)

    out32 = module(features, mask)
    assert out32.pooled_features.dtype == out32.image_weights.dtype == torch.float32
    torch.testing.assert_close(out32.pooled_features.double(), expected_pooled, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out32.image_weights.double(), expected_weights, atol=1e-5, rtol=1e-5)
    # The weights really are non-uniform, so the check above is not vacuous.
    assert (expected_weights[0].max() - expected_weights[0].min()) > 0.1


def test_image_granularity_uses_one_weight_per_image():
    module = _module("attention", "image")
    features = _features(2, 3, 4)
    out = module(features)
    assert out.image_weights.shape == (2, 3)
    expected = torch.einsum("bn,bntd->btd", out.image_weights, features)
    torch.testing.assert_close(out.pooled_features, expected, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("granularity", GRANULARITIES)
@pytest.mark.parametrize("rank", [3, 4])
def test_mean_and_max_match_masked_references(granularity, rank):
    counts, n_images = [3, 1, 2], 4
    features, mask = _features(3, n_images, rank).double(), _mask(counts, n_images)
    padding = _pad_content("nonfinite", features.shape).double()
    features = torch.where(mask.view(3, n_images, *[1] * (rank - 2)), features, padding)
    mean_out = _module("mean", granularity)(features, mask)
    max_out = _module("max", granularity)(features, mask)
    per_token = rank == 4 and granularity == "token"
    for b, n in enumerate(counts):
        real = features[b, :n]
        torch.testing.assert_close(mean_out.pooled_features[b], real.sum(0) / n, atol=1e-12, rtol=1e-12)
        assert torch.equal(max_out.pooled_features[b], real.max(dim=0).values)
        assert torch.allclose(mean_out.image_weights[b, :n], torch.full_like(mean_out.image_weights[b, :n], 1 / n))
        # max's weights: the share of feature entries for which each image holds the maximum, counted in a loop
        entries = real.reshape(n, -1, D) if per_token else real.reshape(n, 1, -1)
        for p in range(entries.shape[1]):
            wins = [0] * n
            for e in range(entries.shape[2]):
                wins[int(entries[:, p, e].argmax())] += 1
            for k in range(n):
                got = max_out.image_weights[b, k, p] if per_token else max_out.image_weights[b, k]
                assert float(got) == pytest.approx(wins[k] / entries.shape[2], abs=1e-12)
    real_mask = mask[..., None] if per_token else mask
    for out in (mean_out, max_out):
        sums = torch.where(real_mask, out.image_weights, 0).sum(dim=1)
        torch.testing.assert_close(sums, torch.ones_like(sums), atol=1e-12, rtol=0)


def test_max_splits_ties_evenly():
    """Two identical images supply every maximum together: each gets half, so the weights still sum to 1."""
    image = _features(1, 1, 4)
    features = torch.cat([image, image, image - 1.0], dim=1)
    out = _module("max")(features)
    torch.testing.assert_close(out.image_weights[0], torch.tensor([[0.5] * T, [0.5] * T, [0.0] * T]))


# ---------------------------------------------------------------------------------------------------------------------
# Weights and gradients
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode,granularity,rank", CASES)
def test_weights_are_a_distribution_and_gradients_skip_padding(mode, granularity, rank):
    module = _module(mode, granularity)
    counts, n_images = [2, 4, 3], 4
    mask = _mask(counts, n_images)
    view = mask.view(3, n_images, *[1] * (rank - 2))
    real = _features(3, n_images, rank)
    features = torch.where(view, real, _pad_content("nonfinite", real.shape))
    features.requires_grad_(True)
    out = module(features, mask)

    per_token = rank == 4 and granularity == "token"
    assert out.image_weights.shape == ((3, n_images, T) if per_token else (3, n_images))
    assert out.pooled_features.shape == ((3, T, D) if rank == 4 else (3, D))
    weights = out.image_weights
    assert (weights >= 0).all()
    assert torch.equal(weights[~mask], torch.zeros_like(weights[~mask]))
    sums = weights.sum(dim=1)
    torch.testing.assert_close(sums, torch.ones_like(sums), atol=1e-6, rtol=0)

    probe = torch.randn(out.pooled_features.shape, generator=torch.Generator().manual_seed(5))
    (out.pooled_features * probe).sum().backward()
    grad = features.grad
    assert torch.isfinite(grad).all()
    assert torch.equal(grad[~mask], torch.zeros_like(grad[~mask]))
    if mode == "max":  # only the entries that hold a maximum receive gradient
        holds_max = torch.where(view, features, float("-inf")) == out.pooled_features.unsqueeze(1)
        assert torch.equal(grad != 0, holds_max & view)
    else:
        assert (grad[mask].flatten(1).abs().sum(dim=1) > 0).all()
    for name, p in module.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


def test_parameters_follow_the_spec_names():
    assert [n for n, _ in _module("mean").named_parameters()] == []
    assert [n for n, _ in _module("max").named_parameters()] == []
    attention = MIVCPooling(8)
    assert attention.mode == "attention" and attention.granularity == "token" and attention.attention_dim == 128
    assert not hasattr(attention, "gate_proj") and attention.score_proj.bias is None
    assert attention.attention_proj.weight.shape == (128, 8) and attention.score_proj.weight.shape == (1, 128)
    gated = MIVCPooling(8, mode="gated_attention", attention_dim=16)
    assert gated.gate_proj.weight.shape == (16, 8) and gated.gate_proj.bias is not None
    assert isinstance(gated(torch.randn(1, 2, 8)), MIVCPoolingOutput)


def test_file_imports_only_torch_and_model_output():
    """The file is copied next to model files for trust_remote_code loading, so it cannot import the package."""
    tree = ast.parse(Path(mivc_module.__file__).read_text())
    roots = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            roots.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, "relative import"
            roots.add(node.module)
    allowed = {"__future__", "dataclasses", "typing", "torch", "torch.nn", "torch.nn.functional", "transformers.utils"}
    assert roots <= allowed


# ---------------------------------------------------------------------------------------------------------------------
# bf16
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("module_dtype", [torch.float32, torch.bfloat16])
def test_bf16_inputs_match_float32(mode, module_dtype):
    module = _module(mode)
    features, mask = _features(2, 4, 4, dtype=torch.bfloat16), _mask([4, 2], 4)
    reference = module(features.float(), mask)
    out = module.to(module_dtype)(features, mask)
    assert out.pooled_features.dtype == torch.bfloat16 and out.image_weights.dtype == torch.float32
    assert torch.isfinite(out.pooled_features).all()
    assert torch.equal(out.image_weights[~mask], torch.zeros_like(out.image_weights[~mask]))
    torch.testing.assert_close(out.image_weights, reference.image_weights, atol=3e-2, rtol=0)
    torch.testing.assert_close(out.pooled_features.float(), reference.pooled_features, atol=5e-2, rtol=2e-2)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast must not push the scores to bf16
        autocast_out = module(features, mask)
    assert autocast_out.image_weights.dtype == torch.float32
    torch.testing.assert_close(autocast_out.image_weights, out.image_weights, atol=0, rtol=0)


# ---------------------------------------------------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs,name",
    [
        ({"hidden_size": 8, "mode": "sum"}, "mode"),
        ({"hidden_size": 8, "granularity": "pixel"}, "granularity"),
        ({"hidden_size": 0}, "hidden_size"),
        ({"hidden_size": -3}, "hidden_size"),
        ({"hidden_size": 2.5}, "hidden_size"),
        ({"hidden_size": 8, "attention_dim": 0}, "attention_dim"),
        ({"hidden_size": 8, "attention_dim": True}, "attention_dim"),
    ],
)
def test_bad_constructor_arguments_raise(kwargs, name):
    with pytest.raises(ValueError, match=name):
        MIVCPooling(**kwargs)


@pytest.mark.parametrize(
    "features,mask,message",
    [
        (torch.randn(2, D), None, "features must be"),
        (torch.randn(1, 2, 3, 4, D), None, "features must be"),
        (torch.randn(2, 3, D + 1), None, "last dimension"),
        (torch.ones(2, 3, D, dtype=torch.long), None, "floating point"),
        (torch.randn(2, 0, D), None, "no image"),
        (torch.randn(2, 3, D), torch.ones(2, 4, dtype=torch.bool), "image_mask must have shape"),
        (torch.randn(2, 3, T, D), torch.ones(2, 3, T, dtype=torch.bool), "image_mask must have shape"),
        (torch.randn(3, 2, D), torch.tensor([[1, 0], [0, 0], [1, 1]]), r"items \[1\] have no real image"),
    ],
)
def test_bad_inputs_raise(features, mask, message):
    with pytest.raises(ValueError, match=message):
        _module("attention")(features, mask)
