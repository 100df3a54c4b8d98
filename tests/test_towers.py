"""The backbone matrix (towers.py): every supported vision and text family, saved by its own transformers class with
random weights, loads through `from_vision_text_pretrained` with every tensor of the tower, computes what the
family's own model computes, pools a global feature that depends on the whole input, trains one TCL and one CODIS
step, survives save / load, and loads through remote code without the package. Refused families are tested in
test_configuration.py."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch
from fixtures import BLOCK_VLALIGN, FAMILY_TEXT, FAMILY_VISION, tiny_batch
from transformers import AutoConfig, AutoModel, SiglipTextModel

from vlalign import CODISModel, TCLModel
from vlalign.towers import TEXT_MODEL_TYPES, VISION_MODEL_TYPES

TOWER = dict(num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
DUAL_ENCODER = dict(num_fusion_layers=0, itm_weight=0.0, mlm_weight=0.0)
COMMON = dict(embed_dim=16, queue_size=32, mask_token_id=4)
ALL_FAMILIES = [("vision", family) for family in FAMILY_VISION] + [("text", family) for family in FAMILY_TEXT]


def test_the_matrix_covers_every_supported_family():
    assert set(FAMILY_VISION) == set(VISION_MODEL_TYPES)
    assert set(FAMILY_TEXT) == set(TEXT_MODEL_TYPES)


def _overrides(text_family):
    from vlalign.towers import FUSION_TEXT_MODEL_TYPES

    return dict(COMMON, **({"num_fusion_layers": 1} if text_family in FUSION_TEXT_MODEL_TYPES else DUAL_ENCODER))


def _text_batch(batch=4, length=8, seed=0):
    """[start] words [end] [pad]...: the start token first, the end-of-text token (where CLIP pools) last."""
    b = tiny_batch(batch=batch, length=length, seed=seed)
    ids, mask = b["input_ids"].clamp_min(5), b["attention_mask"]
    lengths = mask.sum(dim=1)
    ids[:, 0] = 2
    ids[torch.arange(batch), lengths - 1] = 3
    ids[mask == 0] = 0
    b["input_ids"] = ids
    return b


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """Each family saved by its own class (`AutoModel.from_config`, the class's default pooler switch)."""
    root = tmp_path_factory.mktemp("towers")
    paths = {}
    for kind, families in (("vision", FAMILY_VISION), ("text", FAMILY_TEXT)):
        for family, kwargs in families.items():
            torch.manual_seed(0)
            config = AutoConfig.for_model(**kwargs)
            path = root / f"{kind}-{family}"
            model = SiglipTextModel(config) if family == "siglip_text_model" else AutoModel.from_config(config)
            model.save_pretrained(path)
            paths[kind, family] = path
    return paths


def _pair(kind, family):
    return (family, "bert") if kind == "vision" else ("vit", family)


def _build(model_class, checkpoints, kind, family, **extra):
    vision, text = _pair(kind, family)
    overrides = dict(_overrides(text), **extra)
    if model_class is TCLModel:
        overrides["lmi_image_grid"] = 2
    else:
        overrides["codebook_size"] = 12
    return model_class.from_vision_text_pretrained(
        str(checkpoints["vision", vision]), str(checkpoints["text", text]), **overrides
    )


def _family_class(family):
    """The family's own model class: AutoModel's, or SigLIP's text tower (a part of SiglipModel, not in AutoModel)."""
    return SiglipTextModel if family == "siglip_text_model" else AutoModel


def _reference(path, family):
    """The family's own model loaded from `path` by transformers, which must find every weight in the file."""
    reference, info = _family_class(family).from_pretrained(path, output_loading_info=True)
    assert not info["missing_keys"], info["missing_keys"]
    return reference.eval()


def _tower_keys_loaded(tower, reference, key_map=lambda key: key):
    """Every tensor of `tower` equals the reference model's tensor of the same (mapped) name."""
    saved = reference.state_dict()
    own = tower.state_dict()
    missing = [key for key in own if key_map(key) not in saved]
    assert missing == [], missing
    unequal = [key for key, value in own.items() if not torch.equal(value, saved[key_map(key)])]
    assert unequal == [], unequal
    return saved


@pytest.mark.parametrize("family", list(FAMILY_VISION))
def test_vision_tower_loads_every_tensor_and_computes_what_its_family_computes(checkpoints, family):
    model = _build(TCLModel, checkpoints, "vision", family).eval()
    reference = _reference(checkpoints["vision", family], family)
    _tower_keys_loaded(model.vision_model, reference)
    _tower_keys_loaded(model.momentum_vision_model, reference)
    pixels = tiny_batch()["pixel_values"]
    with torch.no_grad():
        expected = reference(pixel_values=pixels)
        tokens, pooled = model._encode_image(pixels)
    states = expected.last_hidden_state
    if family == "convnext":  # (B, C, H, W): our tokens are its positions, row by row
        torch.testing.assert_close(tokens, states.flatten(2).transpose(1, 2), rtol=0, atol=0)
    else:
        torch.testing.assert_close(tokens, states, rtol=0, atol=0)
    pooling = model.config.vision_pooling
    if pooling == "pooler":
        reference_pooled = expected.pooler_output
    elif pooling == "cls":
        reference_pooled = states[:, 0]
    else:  # the mean of the 16 grid tokens, after any prefix tokens
        reference_pooled = states.flatten(2).mean(-1) if family == "convnext" else states[:, -16:].mean(1)
    torch.testing.assert_close(pooled, reference_pooled, rtol=1e-6, atol=1e-6)


def test_vision_pooler_weights_load_when_the_pooler_is_used(checkpoints):
    """ViT's pooler is built and loaded for `vision_pooling="pooler"` (left out otherwise), and then its output is
    ViT's own `pooler_output`."""
    model = _build(TCLModel, checkpoints, "vision", "vit", vision_pooling="pooler").eval()
    reference = _reference(checkpoints["vision", "vit"], "vit")
    _tower_keys_loaded(model.vision_model, reference)
    assert "pooler.dense.weight" in model.vision_model.state_dict()
    assert not any(key.startswith("pooler.") for key in _build(TCLModel, checkpoints, "vision", "vit").state_dict())
    pixels = tiny_batch()["pixel_values"]
    with torch.no_grad():
        torch.testing.assert_close(model._encode_image(pixels)[1], reference(pixel_values=pixels).pooler_output)


def _fusion_key(n_text):
    def key_map(key):  # fusion layer i is the text checkpoint's layer n_text + i (BERT naming)
        index, rest = key.split(".", 2)[1:]
        return f"encoder.layer.{int(index) + n_text}.{rest}"

    return key_map


@pytest.mark.parametrize("family", list(FAMILY_TEXT))
def test_text_tower_loads_every_tensor_and_computes_what_its_family_computes(checkpoints, family):
    model = _build(TCLModel, checkpoints, "text", family).eval()
    reference = _reference(checkpoints["text", family], family)
    saved = _tower_keys_loaded(model.text_model, reference)
    n_text = model.config.num_text_layers
    if model.config.num_fusion_layers:
        fusion = {k: v for k, v in model.fusion_model.layer.state_dict().items() if ".crossattention." not in k}
        used = {_fusion_key(n_text)("layer." + key) for key in fusion}
        for key, value in fusion.items():
            assert torch.equal(value, saved[_fusion_key(n_text)("layer." + key)]), key
        # nothing of the checkpoint left out but the pooler, which `cls` pooling does not use
        left = set(saved) - set(model.text_model.state_dict()) - used
        assert {key.split(".")[0] for key in left} <= {"pooler"}, left
    b = _text_batch()
    # SigLIP's text tower is used without a mask, as it was trained (the padding is part of its input)
    mask = None if family == "siglip_text_model" else b["attention_mask"]
    with torch.no_grad():
        expected = reference(input_ids=b["input_ids"], attention_mask=mask, output_hidden_states=True)
        tokens, pooled = model._encode_text(b["input_ids"], b["attention_mask"])
    # the text encoder is the checkpoint's first n_text layers (all of them without fusion)
    states = expected.hidden_states[n_text] if model.config.num_fusion_layers else expected.last_hidden_state
    real = b["attention_mask"].bool()
    torch.testing.assert_close(tokens[real], states[real], rtol=1e-6, atol=1e-6)
    if model.config.text_pooling == "pooler":  # CLIP: the end-of-text token; SigLIP: its head on the last position
        torch.testing.assert_close(pooled, expected.pooler_output, rtol=1e-6, atol=1e-6)
        if family == "clip_text_model":
            last = b["attention_mask"].sum(1) - 1
            torch.testing.assert_close(pooled, expected.last_hidden_state[torch.arange(4), last])
    else:
        torch.testing.assert_close(pooled, states[:, 0], rtol=1e-6, atol=1e-6)


def _changes(before, after):
    return (before - after).abs().max().item() > 1e-5


@pytest.mark.parametrize(("kind", "family"), ALL_FAMILIES, ids=[f"{k}-{f}" for k, f in ALL_FAMILIES])
def test_global_embedding_depends_on_the_whole_input(checkpoints, kind, family):
    """Changing any quarter of the image changes the image embedding; changing the first or the last word
    changes the text embedding (CLIP's causal text tower sees it at the end-of-text token)."""
    model = _build(TCLModel, checkpoints, kind, family).eval()
    b = _text_batch()
    with torch.no_grad():
        if kind == "vision":
            base = model.get_image_features(b["pixel_values"])
            for rows in (slice(0, 8), slice(8, 16)):
                for cols in (slice(0, 8), slice(8, 16)):
                    pixels = b["pixel_values"].clone()
                    pixels[..., rows, cols] = torch.randn_like(pixels[..., rows, cols])
                    assert _changes(base, model.get_image_features(pixels)), (rows, cols)
        else:
            base = model.get_text_features(b["input_ids"], b["attention_mask"])
            for position in (1, 3):  # every caption has at least 5 real tokens
                ids = b["input_ids"].clone()
                ids[:, position] = 7 + (ids[:, position] - 4) % 100
                assert _changes(base, model.get_text_features(ids, b["attention_mask"])), position


@pytest.mark.parametrize("model_class", [TCLModel, CODISModel], ids=["tcl", "codis"])
@pytest.mark.parametrize(("kind", "family"), ALL_FAMILIES, ids=[f"{k}-{f}" for k, f in ALL_FAMILIES])
def test_a_training_step_reaches_the_tower_and_save_load_keeps_it(checkpoints, tmp_path, model_class, kind, family):
    """One TCL step (with LMI over the grid) and one CODIS step: a finite loss whose gradient reaches the tower's
    parameters; the saved model loads strictly and gives the same embeddings."""
    torch.manual_seed(0)
    model = _build(model_class, checkpoints, kind, family).train()
    b = _text_batch()
    out = model(**b, return_loss=True)
    assert torch.isfinite(out.loss)
    if model_class is TCLModel:
        assert out.loss_lmi_image is not None and torch.isfinite(out.loss_lmi_image)
    out.loss.backward()
    tower = model.vision_model if kind == "vision" else model.text_model
    reached = [name for name, p in tower.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0]
    assert reached, "no gradient reached the tower"
    model.eval()
    model.save_pretrained(tmp_path)
    loaded = model_class.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(
            loaded.get_image_features(b["pixel_values"]), model.get_image_features(b["pixel_values"])
        )
        torch.testing.assert_close(
            loaded.get_text_features(b["input_ids"], b["attention_mask"]),
            model.get_text_features(b["input_ids"], b["attention_mask"]),
        )


def test_every_family_loads_through_remote_code_without_the_package(checkpoints, tmp_path):
    """One subprocess, with vlalign blocked, loads a saved TCL model of every family with trust_remote_code and
    gets the same embeddings."""
    b = _text_batch()
    torch.save(b, tmp_path / "batch.pt")
    expected = {}
    for kind, family in ALL_FAMILIES:
        model = _build(TCLModel, checkpoints, kind, family).eval()
        folder = tmp_path / f"{kind}-{family}"
        model.save_pretrained(folder)
        with torch.no_grad():
            expected[str(folder)] = (
                model.get_image_features(b["pixel_values"]),
                model.get_text_features(b["input_ids"], b["attention_mask"]),
            )
    torch.save(expected, tmp_path / "expected.pt")
    script = BLOCK_VLALIGN + textwrap.dedent(
        f"""
        import torch
        from transformers import AutoModel
        b = torch.load({str(tmp_path / "batch.pt")!r})
        for folder, (image, text) in torch.load({str(tmp_path / "expected.pt")!r}).items():
            model = AutoModel.from_pretrained(folder, trust_remote_code=True).eval()
            assert type(model).__module__.startswith('transformers_modules'), type(model).__module__
            with torch.no_grad():
                assert torch.allclose(model.get_image_features(b['pixel_values']), image, atol=1e-6), folder
                assert torch.allclose(model.get_text_features(b['input_ids'], b['attention_mask']), text,
                                      atol=1e-6), folder
        print('REMOTE CODE CHECKS PASSED', len(torch.load({str(tmp_path / "expected.pt")!r})))
        import vlalign
        """
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["HF_HUB_OFFLINE"] = "1"
    proc = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600
    )
    assert f"REMOTE CODE CHECKS PASSED {len(ALL_FAMILIES)}" in proc.stdout, proc.stderr[-3000:]
    assert "vlalign is blocked in this test" in proc.stderr, proc.stderr[-3000:]


# ---------------------------------------------------------------------------------------------------------------
# patch dropout (FLIP): the student tower runs on the prefix tokens and a random subset of its patch tokens

PATCH_DROPOUT_FAMILIES = [family for family in FAMILY_VISION if family not in ("swin", "convnext")]
# tokens before the grid in the tiny configs: [CLS]; DeiT's distillation token; DINOv2's 2 registers; SigLIP none
PREFIX = {"deit": 2, "dinov2_with_registers": 3, "siglip_vision_model": 0}


def _tower_pair(family, prob, pooling=None):
    """A tower with patch dropout `prob` and the same tower without it (same weights)."""
    from vlalign.towers import build_vision_encoder

    config = AutoConfig.for_model(**FAMILY_VISION[family])
    torch.manual_seed(0)
    dropped = build_vision_encoder(config, pooling, patch_dropout=prob)
    plain = build_vision_encoder(config, pooling)
    plain.load_state_dict(dropped.state_dict())
    return dropped, plain


def _kept_by_reference(embeddings, prefix, prob, seed):
    """open_clip's PatchDropout on the embeddings, written out: the top `max(1, int(N * (1 - prob)))` of
    randn(batch, N) per image, after the prefix tokens."""
    if isinstance(embeddings, tuple):  # Data2Vec-vision's (tokens, grid shape)
        return (_kept_by_reference(embeddings[0], prefix, prob, seed), *embeddings[1:])
    torch.manual_seed(seed)
    head, patches = embeddings[:, :prefix], embeddings[:, prefix:]
    keep = max(1, int(patches.shape[1] * (1 - prob)))
    indices = torch.randn(patches.shape[0], patches.shape[1]).topk(keep, dim=-1).indices
    return torch.cat([head, patches[torch.arange(patches.shape[0])[:, None], indices]], dim=1)


@pytest.mark.parametrize("family", PATCH_DROPOUT_FAMILIES)
def test_patch_dropout_runs_the_layers_on_the_kept_tokens(family):
    """In training mode the tower's output is what its own layers compute from the kept tokens: the embeddings
    (position embeddings added) with open_clip's choice of patches under the same seed, prefix tokens first."""
    from vlalign.towers import vision_embeddings, vision_prefix_tokens

    pooling = "pooler" if family == "siglip_vision_model" else None  # SigLIP's attention-pooling head sees all
    dropped, plain = _tower_pair(family, 0.5, pooling)
    dropped.train()
    plain.train()
    assert vision_prefix_tokens(plain.config) == PREFIX.get(family, 1)
    pixels = tiny_batch()["pixel_values"]
    prefix = PREFIX.get(family, 1)
    with torch.no_grad():
        torch.manual_seed(7)
        output = dropped(pixel_values=pixels)
        # the reference: the plain tower, its embeddings' output replaced by the manually gathered tokens
        handle = vision_embeddings(plain).register_forward_hook(
            lambda module, args, output: _kept_by_reference(output, prefix, 0.5, seed=7)
        )
        expected = plain(pixel_values=pixels)
        handle.remove()
        full = plain(pixel_values=pixels)
    assert output.last_hidden_state.shape[1] == prefix + 8  # 8 of the 16 patches
    torch.testing.assert_close(output.last_hidden_state, expected.last_hidden_state, rtol=0, atol=0)
    if pooling == "pooler":
        torch.testing.assert_close(output.pooler_output, expected.pooler_output, rtol=0, atol=0)
    assert not torch.allclose(output.last_hidden_state[:, :1], full.last_hidden_state[:, :1])  # it has teeth


@pytest.mark.parametrize("family", PATCH_DROPOUT_FAMILIES)
def test_patch_dropout_is_off_in_eval_mode_and_at_zero(family):
    """Evaluation sees every patch, bit for bit the tower without patch dropout; at 0 no hook is installed."""
    from vlalign.towers import vision_embeddings

    dropped, plain = _tower_pair(family, 0.5)
    pixels = tiny_batch()["pixel_values"]
    with torch.no_grad():
        assert torch.equal(dropped.eval()(pixel_values=pixels).last_hidden_state, plain.eval()(pixel_values=pixels)[0])
    off, _ = _tower_pair(family, 0.0)
    assert not vision_embeddings(off)._forward_hooks
    assert len(vision_embeddings(dropped)._forward_hooks) == 1


@pytest.mark.parametrize(
    "prob, kept",
    [(0.0, 16), (0.25, 12), (0.3, 11), (0.5, 8), (0.7, 4), (0.9, 1), (0.95, 1), (0.99, 1)],
)
def test_patch_dropout_keeps_open_clips_count_and_the_prefix_tokens(prob, kept):
    """max(1, int(N * (1 - p))) of the N = 16 patches (p = 0.7: int(4.8) = 4; p >= 15/16: the floor of 1), each
    kept patch one of the image's own, none twice; DeiT's [CLS] and distillation tokens stay, in front."""
    from vlalign.towers import PatchDropout, vision_embeddings

    assert PatchDropout(prob, 2).num_kept(16) == kept
    dropped, plain = _tower_pair("deit", prob) if prob > 0 else _tower_pair("deit", 0.0)
    pixels = tiny_batch()["pixel_values"]
    with torch.no_grad():
        tokens = vision_embeddings(dropped.train())(pixels)
        full = vision_embeddings(plain.train())(pixels)
    assert tokens.shape[1] == 2 + kept
    assert torch.equal(tokens[:, :2], full[:, :2])
    for image in range(pixels.shape[0]):
        # which of the image's patches each kept token is
        matches = (tokens[image, 2:, None] == full[image, None, 2:]).all(-1)
        assert torch.equal(matches.sum(-1), torch.ones(kept, dtype=torch.long))
        assert matches.any(0).sum() == kept


def test_patch_dropout_follows_torchs_rng():
    """The same seed draws the same patches (so gradient caching's replay of a chunk sees them again); another seed
    draws others."""
    from vlalign.towers import vision_embeddings

    dropped, _ = _tower_pair("vit", 0.5)
    embeddings = vision_embeddings(dropped.train())
    pixels = tiny_batch()["pixel_values"]
    draws = []
    for seed in (3, 3, 4):
        torch.manual_seed(seed)
        with torch.no_grad():
            draws.append(embeddings(pixels))
    assert torch.equal(draws[0], draws[1])
    assert not torch.equal(draws[0], draws[2])


def test_patch_dropout_applies_to_the_student_only():
    """With EMA teachers: the student encodes the kept tokens in training, every patch in evaluation; the teacher
    encodes every patch in both, and its output is the tower's without patch dropout."""
    from fixtures import tiny_tcl_config

    config = tiny_tcl_config(patch_dropout=0.5, num_fusion_layers=0, itm_weight=0.0, mlm_weight=0.0)
    torch.manual_seed(0)
    model = TCLModel(config).train()
    pixels = tiny_batch()["pixel_values"]
    with torch.no_grad():
        student_tokens, student_pooled = model._encode_image(pixels)
        teacher_tokens, _ = model._encode_image(pixels, momentum=True)
        assert (student_tokens.shape[1], teacher_tokens.shape[1]) == (1 + 8, 1 + 16)
        # the teacher is a copy of the student at the start: it computes the student's eval-mode output
        model.eval()
        torch.testing.assert_close(model._encode_image(pixels)[0], teacher_tokens, rtol=0, atol=0)
    assert not model.momentum_vision_model.embeddings._forward_hooks
    # a training step runs with it, and reaches the student tower
    model.train()
    model(**tiny_batch(), return_loss=True).loss.backward()
    assert model.vision_model.embeddings.patch_embeddings.projection.weight.grad.abs().sum() > 0


def test_patch_dropout_follows_the_models_mode_on_a_locked_tower():
    """LiT + FLIP: a locked image tower runs in eval mode (no dropout), yet drops patches while the model trains
    (the cost saving does not depend on the tower being trained), and keeps every patch in evaluation."""
    from fixtures import tiny_tcl_config

    config = tiny_tcl_config(patch_dropout=0.5, num_fusion_layers=0, itm_weight=0.0, mlm_weight=0.0)
    model = TCLModel(config)
    model.lock_image_tower()
    pixels = tiny_batch()["pixel_values"]
    with torch.no_grad():
        model.train()
        assert not model.vision_model.training
        assert model._encode_image(pixels)[0].shape[1] == 1 + 8
        model.eval()
        assert model._encode_image(pixels)[0].shape[1] == 1 + 16


def test_mean_pooling_averages_the_kept_patches():
    """`mean` pooling averages the patch tokens the tower returned (the kept ones), not its prefix tokens."""
    from vlalign.towers import encode_image

    dropped, _ = _tower_pair("dinov2_with_registers", 0.5)
    pixels = tiny_batch()["pixel_values"]
    with torch.no_grad():
        torch.manual_seed(1)
        tokens, pooled = encode_image(dropped.train(), pixels, "mean", 3)
    assert tokens.shape[1] == 3 + 8
    torch.testing.assert_close(pooled, tokens[:, 3:].mean(1), rtol=0, atol=0)


def test_patch_dropout_comes_back_with_a_saved_model(tmp_path):
    """Nothing of it is in the weights: the saved config's `patch_dropout` puts it back on the loaded student."""
    from fixtures import tiny_tcl_config

    config = tiny_tcl_config(patch_dropout=0.5, num_fusion_layers=0, itm_weight=0.0, mlm_weight=0.0)
    torch.manual_seed(0)
    model = TCLModel(config)
    model.save_pretrained(tmp_path)
    loaded = TCLModel.from_pretrained(tmp_path).train()
    assert loaded.config.patch_dropout == 0.5
    pixels = tiny_batch()["pixel_values"]
    with torch.no_grad():
        torch.manual_seed(5)
        expected = model.train()._encode_image(pixels)[0]
        torch.manual_seed(5)
        tokens = loaded._encode_image(pixels)[0]
    assert tokens.shape[1] == 1 + 8
    torch.testing.assert_close(tokens, expected, rtol=0, atol=0)
