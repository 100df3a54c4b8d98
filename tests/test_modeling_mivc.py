"""MIVCForConditionalGeneration end to end: permutation / padding invariance of the pooled visual tokens, the
attention formulas inside the model, freeze flags, generate, placeholder checks, save / load, remote code and the
image-text-to-text pipeline (prompts and chat messages), MIVCProcessor and its chat template, bf16, and the
attention implementations (SDPA by default, as eager).

Every model is a tiny random ViT (32x32 images, 8x8 patches -> 16 tokens per image), optionally a tiny BLIP-2 Q-Former
(4 queries), and a tiny Llama over the offline digits tokenizer; nothing is downloaded.
"""

import ast
import itertools
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from fixtures import (
    BLOCK_VLALIGN,
    MIVC_DIGITS_IMAGE_TOKEN_ID,
    MIVC_DIGITS_LLAMA,
    MIVC_DIGITS_NUM_QUERIES,
    MIVC_DIGITS_QFORMER,
    MIVC_DIGITS_VISION,
    count_attention_calls,
    mivc_digits_tokenizer,
    tiny_mivc_digits_config,
)
from PIL import Image
from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor, ViTImageProcessorPil

from vlalign import MIVCConfig, MIVCForConditionalGeneration, MIVCOutput, MIVCProcessor
from vlalign.processing_vlalign import mivc_chat_template

POOLING_MODES = ("mean", "max", "attention", "gated_attention")
ALL_MODES = POOLING_MODES + ("concatenate",)
PROMPT = "<image> which digit?"
VISION = MIVC_DIGITS_VISION  # 32x32 images, 8x8 patches
IMAGE_SIZE = VISION["image_size"]
# a Q-Former width different from the vision width: the config must set its encoder_hidden_size
QFORMER = MIVC_DIGITS_QFORMER
NUM_QUERIES = MIVC_DIGITS_NUM_QUERIES


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models run faster on one intra-op thread, and a busy machine cannot stall OpenMP workers."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


_tokenizer = mivc_digits_tokenizer


def _image_token_id():
    return _tokenizer().convert_tokens_to_ids("<image>")


def _image_processor():
    return ViTImageProcessorPil(
        size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}, image_mean=[0.5] * 3, image_std=[0.5] * 3
    )


_config = tiny_mivc_digits_config


def test_the_tiny_config_fits_the_digits_tokenizer():
    tok, text = _tokenizer(), MIVC_DIGITS_LLAMA
    assert text["vocab_size"] == len(tok) and _image_token_id() == MIVC_DIGITS_IMAGE_TOKEN_ID
    assert (text["bos_token_id"], text["eos_token_id"], text["pad_token_id"]) == (
        tok.bos_token_id,
        tok.eos_token_id,
        tok.pad_token_id,
    )


def _randomize(model, seed=0):
    """O(1) random weights everywhere (the default init makes logits nearly independent of the images, and the
    attention nearly uniform, so invariance tests would pass trivially)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                fan_in = p.shape[-1]
                p.copy_(torch.randn(p.shape, generator=g) / fan_in**0.5)
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
        if hasattr(model, "query_tokens"):
            model.query_tokens.copy_(torch.randn(model.query_tokens.shape, generator=g))
        if hasattr(model, "pooling"):  # a far-from-uniform scorer
            for p in model.pooling.parameters():
                p.copy_(torch.randn(p.shape, generator=g))
    return model


def _model(seed=0, randomize=True, **config_kwargs):
    torch.manual_seed(seed)
    model = MIVCForConditionalGeneration(_config(**config_kwargs))
    if randomize:
        _randomize(model, seed)
    return model.eval()


def _processor(config_or_model, **kwargs):
    config = getattr(config_or_model, "config", config_or_model)
    return MIVCProcessor(
        image_processor=_image_processor(),
        tokenizer=_tokenizer(),
        image_seq_length=config.image_seq_length,
        concatenate_images=config.pooling_mode == "concatenate",
        **kwargs,
    )


def _prompt_ids(model, num_images, words="which digit?"):
    """[bos] + the expanded placeholder + words, as MIVCProcessor builds it."""
    tok = _tokenizer()
    config = model.config
    n = config.image_seq_length * (num_images if config.pooling_mode == "concatenate" else 1)
    return [tok.bos_token_id] + [_image_token_id()] * n + tok(words, add_special_tokens=False)["input_ids"]


def _left_pad(sequences):
    """Left-padded ids, attention mask and the position ids that make a padded row equal to the row alone."""
    longest = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), longest), _tokenizer().pad_token_id, dtype=torch.long)
    mask = torch.zeros(len(sequences), longest, dtype=torch.long)
    for row, s in enumerate(sequences):
        ids[row, longest - len(s) :] = torch.tensor(s)
        mask[row, longest - len(s) :] = 1
    position_ids = (mask.cumsum(-1) - 1).clamp_min(0)
    return ids, mask, position_ids


def _pixels(batch, n_images, seed=1):
    return torch.randn(batch, n_images, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(seed))


def _mask(counts, n_images):
    return torch.arange(n_images)[None, :] < torch.tensor(counts)[:, None]


def _images(*colours, size=20):
    return [Image.new("RGB", (size, size), c) for c in colours]


def _noise_image(seed, size=20):
    g = torch.Generator().manual_seed(seed)
    array = torch.randint(0, 256, (size, size, 3), generator=g, dtype=torch.uint8).numpy()
    return Image.fromarray(array)


def _gather(x, perm):
    """x[b, perm[b, j]] for every item b (reorders the image axis per item)."""
    return x[torch.arange(x.shape[0])[:, None], perm]


# ------------------------------------------------------------------------------------------------------------------
# 1. permutation invariance end to end

PERMUTATION_CASES = [(mode, qformer, "token") for mode in POOLING_MODES for qformer in (False, True)] + [
    (mode, qformer, "image") for mode in POOLING_MODES for qformer in (False, True)
]


@pytest.mark.parametrize("mode, qformer, granularity", PERMUTATION_CASES)
def test_shuffling_images_keeps_logits_and_permutes_weights(mode, qformer, granularity):
    model = _model(mode=mode, qformer=qformer, granularity=granularity)
    counts, n_images = (3, 2), 4
    ids = torch.tensor([_prompt_ids(model, c) for c in counts])
    pixel_values, image_mask = _pixels(2, n_images), _mask(counts, n_images)
    # the padded slots move into the middle / front too: the mask moves with the images
    perm = torch.tensor([[2, 3, 0, 1], [3, 1, 2, 0]])
    with torch.no_grad():
        out = model(input_ids=ids, pixel_values=pixel_values, image_mask=image_mask)
        shuffled = model(input_ids=ids, pixel_values=_gather(pixel_values, perm), image_mask=_gather(image_mask, perm))
        other = model(input_ids=ids, pixel_values=_pixels(2, n_images, seed=9), image_mask=image_mask)
    assert isinstance(out, MIVCOutput)
    # the test discriminates: the images do move the logits, and the weights are not uniform
    assert (other.logits - out.logits).abs().max() > 1e-2
    expected_shape = (2, n_images, model.config.image_seq_length) if granularity == "token" else (2, n_images)
    assert out.image_weights.shape == expected_shape
    if mode != "mean":
        real = out.image_weights[0, :3]
        assert (real.max(0).values - real.min(0).values).max() > 1e-3
    torch.testing.assert_close(shuffled.logits, out.logits, atol=1e-5, rtol=0)
    torch.testing.assert_close(shuffled.image_weights, _gather(out.image_weights, perm), atol=1e-6, rtol=0)
    # weights sum to 1 over the real images
    torch.testing.assert_close(out.image_weights.sum(1), torch.ones_like(out.image_weights.sum(1)), atol=1e-6, rtol=0)


def test_concatenation_baseline_depends_on_image_order():
    model = _model(mode="concatenate")
    counts, n_images = (3, 2), 3
    ids, mask, position_ids = _left_pad([_prompt_ids(model, c) for c in counts])
    pixel_values, image_mask = _pixels(2, n_images), _mask(counts, n_images)
    perm = torch.tensor([[2, 0, 1], [1, 0, 2]])  # real images reordered, the padded slot stays last
    with torch.no_grad():
        out = model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=position_ids,
            pixel_values=pixel_values,
            image_mask=image_mask,
        )
        shuffled = model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=position_ids,
            pixel_values=_gather(pixel_values, perm),
            image_mask=image_mask,
        )
    assert out.image_weights is None
    last_image = (ids == _image_token_id()).nonzero()[:, 1].max()
    difference = (shuffled.logits - out.logits)[:, last_image + 1 :].abs().amax(dim=(1, 2))
    assert (difference > 1e-2).all(), difference  # both items see their images in a different order


# ------------------------------------------------------------------------------------------------------------------
# 2. padding invariance


@pytest.mark.parametrize("mode, qformer", [(m, q) for m in ALL_MODES for q in (False, True)])
def test_masked_out_images_change_nothing(mode, qformer):
    model = _model(mode=mode, qformer=qformer)
    ids = torch.tensor([_prompt_ids(model, 2)])
    real = _pixels(1, 2)
    padded = _pixels(1, 4, seed=5) * 10  # random pixels in the padded slots
    padded[:, [1, 3]] = real
    padded_mask = torch.tensor([[False, True, False, True]])
    with torch.no_grad():
        out = model(input_ids=ids, pixel_values=real)
        out_padded = model(input_ids=ids, pixel_values=padded, image_mask=padded_mask)
    torch.testing.assert_close(out_padded.logits, out.logits, atol=1e-5, rtol=0)
    if mode == "concatenate":
        assert out.image_weights is None and out_padded.image_weights is None
        return
    assert (out_padded.image_weights[:, [0, 2]] == 0).all()
    torch.testing.assert_close(out_padded.image_weights[:, [1, 3]], out.image_weights, atol=1e-6, rtol=0)


@pytest.mark.parametrize("mode", ALL_MODES)
def test_batch_with_1_3_2_images_equals_items_alone(mode):
    model = _model(mode=mode, qformer=mode == "attention")
    counts, n_images = (1, 3, 2), 3
    sequences = [_prompt_ids(model, c) for c in counts]  # equal lengths except for the concatenation baseline
    ids, mask, position_ids = _left_pad(sequences)
    pixel_values, image_mask = _pixels(3, n_images), _mask(counts, n_images)
    with torch.no_grad():
        batched = model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=position_ids,
            pixel_values=pixel_values,
            image_mask=image_mask,
        )
        for row, count in enumerate(counts):
            alone = model(input_ids=torch.tensor([sequences[row]]), pixel_values=pixel_values[row : row + 1, :count])
            length = len(sequences[row])
            torch.testing.assert_close(batched.logits[row, -length:], alone.logits[0], atol=1e-5, rtol=0)
            if mode != "concatenate":
                torch.testing.assert_close(
                    batched.image_weights[row, :count], alone.image_weights[0], atol=1e-6, rtol=0
                )
                assert (batched.image_weights[row, count:] == 0).all()


# ------------------------------------------------------------------------------------------------------------------
# 3. the pooling formulas inside the model


def _reference_pooling(model, features, image_mask):
    """Float64 MIVC pooling of padded per-image features (B, N, T, D) from the model's own pooling weights."""
    pooling, config = model.pooling, model.config
    h = features.double()
    batch, n_images = image_mask.shape
    pooled, weights = [], []
    for b in range(batch):
        real = h[b, image_mask[b]]  # (n, T, D)
        if config.pooling_mode == "max":
            pooled.append(real.amax(0))
            weights.append(None)
            continue
        if config.pooling_mode == "mean":
            a = torch.full(real.shape[:2], 1.0 / real.shape[0], dtype=torch.float64)
        else:
            x = real if config.pooling_granularity == "token" else real.mean(1, keepdim=True)
            V, c = pooling.attention_proj.weight.double(), pooling.attention_proj.bias.double()
            w = pooling.score_proj.weight.double()[0]
            hidden = torch.tanh(x @ V.T + c)
            if config.pooling_mode == "gated_attention":
                U, d = pooling.gate_proj.weight.double(), pooling.gate_proj.bias.double()
                hidden = hidden * torch.sigmoid(x @ U.T + d)
            scores = hidden @ w  # (n, T) or (n, 1)
            a = torch.exp(scores - scores.max(0).values) / torch.exp(scores - scores.max(0).values).sum(0)
            a = a.expand(real.shape[0], real.shape[1])
        pooled.append((a[..., None] * real).sum(0))
        full = torch.zeros(n_images, real.shape[1], dtype=torch.float64)
        full[image_mask[b]] = a
        weights.append(full)
    return torch.stack(pooled), weights


@pytest.mark.parametrize(
    "mode, granularity, qformer",
    [
        (m, g, q)
        for m in POOLING_MODES
        for g in ("token", "image")
        for q in (False, True)
        if not (m in ("mean", "max") and g == "image" and q)
    ],
)
def test_pooling_inside_the_model_matches_the_formulas(mode, granularity, qformer):
    model = _model(mode=mode, granularity=granularity, qformer=qformer)
    counts, n_images = (3, 2), 3
    ids = torch.tensor([_prompt_ids(model, c) for c in counts])
    pixel_values, image_mask = _pixels(2, n_images), _mask(counts, n_images)
    with torch.no_grad():
        out = model(input_ids=ids, pixel_values=pixel_values, image_mask=image_mask)
        visual, weights = model.get_image_features(pixel_values, image_mask)
        per_image = model._per_image_features(pixel_values[image_mask])
        assert per_image.shape == (5, model.config.image_seq_length, model.config.vision_feature_dim)
        features = per_image.new_zeros(2, n_images, *per_image.shape[1:])
        features[image_mask] = per_image
        pooled_ref, weights_ref = _reference_pooling(model, features, image_mask)
        visual_ref = model.projector(pooled_ref.float())
        # the LM gets exactly those visual tokens in place of the placeholders
        embeds = model.get_input_embeddings()(ids).clone()
        embeds[ids == _image_token_id()] = visual_ref.reshape(-1, visual_ref.shape[-1])
        logits_ref = model.language_model(inputs_embeds=embeds).logits
    torch.testing.assert_close(visual, visual_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.logits, logits_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.image_weights, weights)
    if mode == "max":
        return
    for b in range(2):
        expected = weights_ref[b] if granularity == "token" else weights_ref[b][:, 0]
        torch.testing.assert_close(out.image_weights[b].double(), expected, atol=1e-6, rtol=0)
    if mode != "mean" and granularity == "image":
        # per-image scoring: one weight per image, shared by its tokens
        assert out.image_weights.shape == (2, n_images)


# ------------------------------------------------------------------------------------------------------------------
# 4. freeze flags and the sizes the config derives (its validation: test_configuration.py)

PARTS = {
    "vision": lambda name: name.startswith("vision_model."),
    "qformer": lambda name: name.startswith("qformer.") or name == "query_tokens",
    "language": lambda name: name.startswith("language_model."),
}


@pytest.mark.parametrize(
    "freeze_vision, freeze_qformer, freeze_language", list(itertools.product((False, True), repeat=3))
)
def test_freeze_flags_freeze_exactly_their_part(freeze_vision, freeze_qformer, freeze_language):
    model = _model(
        qformer=True,
        freeze_vision_model=freeze_vision,
        freeze_qformer=freeze_qformer,
        freeze_language_model=freeze_language,
    )
    flags = {"vision": freeze_vision, "qformer": freeze_qformer, "language": freeze_language}

    def frozen(name):
        return any(flags[part] and belongs(name) for part, belongs in PARTS.items())

    names = [name for name, _ in model.named_parameters()]
    assert "query_tokens" in names
    for part, belongs in PARTS.items():
        assert any(belongs(n) for n in names), part
    assert any(n.startswith("pooling.") for n in names) and any(n.startswith("projector.") for n in names)
    for name, p in model.named_parameters():
        assert p.requires_grad == (not frozen(name)), name

    assert model.train() is model
    prefixes = {"vision": "vision_model", "qformer": "qformer", "language": "language_model"}
    for name, module in model.named_modules():
        part = next((k for k, prefix in prefixes.items() if name == prefix or name.startswith(prefix + ".")), None)
        expected_training = not (part is not None and flags[part])
        assert module.training == expected_training, name
    model.eval()
    assert not any(m.training for m in model.modules())
    model.train()

    processor = _processor(model)
    batch = processor(
        images=[_images("white", "black"), _images("gray")], text=[PROMPT, PROMPT], answers=["one", "two"]
    )
    loss = model(**batch).loss
    loss.backward()
    for name, p in model.named_parameters():
        if frozen(name):
            assert p.grad is None, name
        else:
            assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_default_freeze_follows_blip2():
    model = MIVCForConditionalGeneration(_config(qformer=True, freeze_vision_model=True, freeze_language_model=True))
    trainable = {n.split(".")[0] for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"query_tokens", "qformer", "pooling", "projector"}
    defaults = MIVCConfig(vision_config=dict(VISION), text_config=_config().text_config.to_dict())
    assert defaults.freeze_vision_model and defaults.freeze_language_model and not defaults.freeze_qformer


def test_config_image_seq_length_and_qformer_width():
    assert _config().image_seq_length == 16
    assert _config(vision_feature_select_strategy="full").image_seq_length == 17
    config = _config(qformer=True)
    assert config.image_seq_length == NUM_QUERIES
    assert config.qformer_config.encoder_hidden_size == VISION["hidden_size"]
    assert config.vision_feature_dim == QFORMER["hidden_size"]
    # "default" keeps the 16 patch tokens (drops [CLS]); "full" keeps all 17
    pixel_values = _pixels(1, 2)
    for strategy, kept in (("default", slice(1, None)), ("full", slice(None))):
        model = _model(vision_feature_select_strategy=strategy)
        ids = torch.tensor([_prompt_ids(model, 2)])
        with torch.no_grad():
            out = model(input_ids=ids, pixel_values=pixel_values)
            tokens = model.vision_model(pixel_values=pixel_values[0]).last_hidden_state
            features = model._per_image_features(pixel_values[0])
        assert out.image_weights.shape == (1, 2, model.config.image_seq_length)
        assert torch.equal(features, tokens[:, kept])


def test_auto_classes_resolve_mivc():
    config = _config()
    assert isinstance(
        AutoConfig.for_model("mivc", vision_config=dict(VISION), text_config=config.text_config), MIVCConfig
    )
    assert type(AutoModelForImageTextToText.from_config(config)) is MIVCForConditionalGeneration


# ------------------------------------------------------------------------------------------------------------------
# 5. generate


def test_generate_returns_prompt_then_new_tokens_and_matches_greedy_forward():
    model = _model(mode="attention", qformer=True)
    processor = _processor(model)
    images = [_images("white", "black"), [_noise_image(3)]]
    inputs = processor(images=images, text=[PROMPT, "<image> digit?"])  # different lengths: left padded
    assert (inputs["attention_mask"][:, 0] == torch.tensor([1, 0])).all()
    length = inputs["input_ids"].shape[1]
    generated = model.generate(**inputs, max_new_tokens=5, do_sample=False)
    assert length < generated.shape[1] <= length + 5
    assert torch.equal(generated[:, :length], inputs["input_ids"])
    texts = processor.batch_decode(generated[:, length:], skip_special_tokens=True)
    assert len(texts) == 2 and all(isinstance(t, str) for t in texts)

    # greedy decoding without a cache, re-reading the images at every step, gives the same tokens
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    eos, pad = _tokenizer().eos_token_id, _tokenizer().pad_token_id
    finished = torch.zeros(2, dtype=torch.bool)
    with torch.no_grad():
        for _ in range(generated.shape[1] - length):
            position_ids = (mask.cumsum(-1) - 1).clamp_min(0)
            logits = model(
                input_ids=ids,
                attention_mask=mask,
                position_ids=position_ids,
                pixel_values=inputs["pixel_values"],
                image_mask=inputs["image_mask"],
            ).logits
            token = logits[:, -1].argmax(-1)
            token = torch.where(finished, torch.full_like(token, pad), token)
            finished |= token == eos
            ids = torch.cat([ids, token[:, None]], 1)
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
    assert torch.equal(generated, ids)

    # a batched, left-padded generate equals each item generated alone
    for row in range(2):
        alone = processor(images=[images[row]], text=[[PROMPT, "<image> digit?"][row]])
        alone_generated = model.generate(**alone, max_new_tokens=5, do_sample=False)
        new = alone_generated[0, alone["input_ids"].shape[1] :]
        assert torch.equal(generated[row, length : length + len(new)], new)


def test_output_carries_the_language_model_fields_under_the_installed_names():
    """MIVCOutput has exactly the LM output fields of the installed transformers (the cache is ``cache`` from 5.24,
    ``past_key_values`` before) plus image_weights, and holds the LM's values for them."""
    import dataclasses

    from transformers.cache_utils import Cache
    from transformers.modeling_outputs import CausalLMOutputWithPast

    lm_fields = [f.name for f in dataclasses.fields(CausalLMOutputWithPast)]
    assert [f.name for f in dataclasses.fields(MIVCOutput)] == lm_fields + ["image_weights"]
    cache_field = "cache" if "cache" in lm_fields else "past_key_values"
    model = _model(mode="attention").eval()
    inputs = _processor(model)(images=[_images("white", "black")], text=[PROMPT])
    with torch.no_grad():
        out = model(**inputs, use_cache=True, output_hidden_states=True)
        lm = model.language_model(
            inputs_embeds=_spliced_embeddings(model, inputs),
            use_cache=True,
            attention_mask=inputs["attention_mask"],
            output_hidden_states=True,
        )
    assert isinstance(getattr(out, cache_field), Cache)
    torch.testing.assert_close(out.logits, lm.logits)
    assert len(out.hidden_states) == len(lm.hidden_states)
    assert out.image_weights.shape[:2] == (1, 2)


def _spliced_embeddings(model, inputs):
    visual, _ = model.get_image_features(inputs["pixel_values"], inputs["image_mask"])
    embeds = model.get_input_embeddings()(inputs["input_ids"])
    return embeds.masked_scatter((inputs["input_ids"] == model.config.image_token_id).unsqueeze(-1), visual)


def test_a_field_that_a_later_transformers_adds_to_the_lm_output_does_not_break_the_model(monkeypatch):
    """The LM returning an output class with fields we do not know (as a later release or an MoE LM may) still gives
    a MIVCOutput with the known fields; nothing of the LM's output is splatted into our constructor."""
    from dataclasses import dataclass

    from transformers.modeling_outputs import CausalLMOutputWithPast

    @dataclass
    class FutureLMOutput(CausalLMOutputWithPast):
        a_field_from_the_future: torch.Tensor | None = None

    model = _model(mode="mean").eval()
    forward = model.language_model.forward

    def future_forward(*args, **kwargs):
        out = forward(*args, **kwargs)
        return FutureLMOutput(**{k: v for k, v in out.items()}, a_field_from_the_future=torch.ones(1))

    monkeypatch.setattr(model.language_model, "forward", future_forward)
    inputs = _processor(model)(images=[_images("white")], text=[PROMPT], answers=["one"])
    with torch.no_grad():
        out = model(**inputs)
    assert isinstance(out, MIVCOutput) and torch.isfinite(out.loss)
    assert not hasattr(out, "a_field_from_the_future")
    generated = model.generate(
        **_processor(model)(images=[_images("white")], text=[PROMPT]), max_new_tokens=2, do_sample=False
    )
    assert generated.shape[0] == 1


COLOUR_ITEMS = [  # (images, answer): "three" only for an item that holds both colours
    (("white",), "one"),
    (("black",), "two"),
    (("white", "black"), "three"),
    (("black", "white"), "three"),
    (("white", "white"), "one"),
    (("black", "black", "black"), "two"),
]


@pytest.fixture(scope="module")
def colour_model(tmp_path_factory):
    """A tiny model (Q-Former, attention pooling, every part trainable) trained for 80 Adam steps on items whose
    answer depends only on their images (the prompt is the same for all); saved with its processor."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)
        model = MIVCForConditionalGeneration(_config(mode="attention", qformer=True))
        processor = _processor(model)
        batch = processor(
            images=[_images(*c) for c, _ in COLOUR_ITEMS],
            text=[PROMPT] * len(COLOUR_ITEMS),
            answers=[a for _, a in COLOUR_ITEMS],
        )
        optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
        model.train()
        for _ in range(80):
            loss = model(**batch).loss
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        model.eval()
        folder = tmp_path_factory.mktemp("colour-mivc")
        model.save_pretrained(folder)
        processor.save_pretrained(folder)
    finally:
        torch.set_num_threads(before)
    return model, processor, folder, loss.item()


def test_trained_model_generates_answers_that_depend_on_the_images(colour_model):
    model, processor, _, loss = colour_model
    assert loss < 0.5
    # the same prompt for every item: only the images tell the answers apart; also unseen counts and orders (whose
    # pooled features equal those of a training item: MIVC pooling sees a bag of images, not a sequence)
    cases = COLOUR_ITEMS + [
        (("white", "white", "white"), "one"),
        (("white", "black", "black", "white"), "three"),
        (("black", "black"), "two"),
    ]
    inputs = processor(images=[_images(*c) for c, _ in cases], text=[PROMPT] * len(cases))
    generated = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    texts = processor.batch_decode(generated[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert [t.strip() for t in texts] == [a for _, a in cases]


def test_beam_search_and_sampling_expand_the_images():
    model = _model(mode="attention", qformer=True)
    processor = _processor(model)
    inputs = processor(images=[_images("white", "black"), [_noise_image(3)]], text=[PROMPT, "<image> digit?"])
    length = inputs["input_ids"].shape[1]
    beams = model.generate(**inputs, max_new_tokens=3, num_beams=2, num_return_sequences=2, do_sample=False)
    assert beams.shape[0] == 4 and torch.equal(beams[:, :length], inputs["input_ids"].repeat_interleave(2, 0))
    torch.manual_seed(0)
    sampled = model.generate(**inputs, max_new_tokens=3, do_sample=True, num_return_sequences=2)
    assert sampled.shape[0] == 4 and torch.equal(sampled[:, :length], inputs["input_ids"].repeat_interleave(2, 0))


# ------------------------------------------------------------------------------------------------------------------
# 6. placeholder checks


def test_wrong_number_of_placeholders_raises():
    model = _model()
    ids = torch.tensor([_prompt_ids(model, 2)])
    pixel_values = _pixels(1, 2)
    fewer = ids.clone()
    fewer[0, 1] = _tokenizer().convert_tokens_to_ids("digit")
    more = torch.cat([ids, torch.tensor([[_image_token_id()]])], 1)
    for bad in (fewer, more):
        with pytest.raises(ValueError, match="image placeholder tokens"):
            model(input_ids=bad, pixel_values=pixel_values)
    # inputs built for the concatenation baseline (16 per image) do not fit a pooling model (16 per item)
    concat_processor = _processor(_config(mode="concatenate"))
    inputs = concat_processor(images=[_images("white", "black")], text=[PROMPT])
    with pytest.raises(ValueError, match=r"32 image placeholder tokens.*16 visual tokens"):
        model(**inputs)


def test_item_without_real_image_raises():
    model = _model()
    ids = torch.tensor([_prompt_ids(model, 2)] * 2)
    with pytest.raises(ValueError, match="at least one real image"):
        model(input_ids=ids, pixel_values=_pixels(2, 2), image_mask=torch.tensor([[True, True], [False, False]]))
    with pytest.raises(ValueError, match="pixel_values must be"):
        model(input_ids=ids, pixel_values=_pixels(2, 2)[:, 0])
    with pytest.raises(ValueError, match="image_mask must be"):
        model(input_ids=ids, pixel_values=_pixels(2, 2), image_mask=torch.ones(2, 3, dtype=torch.bool))


# ------------------------------------------------------------------------------------------------------------------
# 7. save / load


def _save(folder, mode="gated_attention", qformer=True, **overrides):
    model = _model(mode=mode, qformer=qformer, **overrides)
    processor = _processor(model)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return model, processor


def test_save_and_auto_load_identical(tmp_path):
    model, processor = _save(tmp_path, projector_type="linear", freeze_vision_model=True)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["auto_map"]["AutoConfig"] == "configuration_mivc.MIVCConfig"
    assert config["auto_map"]["AutoModelForImageTextToText"] == "modeling_mivc.MIVCForConditionalGeneration"
    for name in (
        "modeling_mivc.py",
        "configuration_mivc.py",
        "mivc_pooling.py",
        "loading.py",
        "processing_vlalign.py",
        "model.safetensors",
    ):
        assert (tmp_path / name).exists(), name
    for name in ("modeling_albef.py", "losses.py", "momentum.py"):  # MIVC does not need the ALBEF stack
        assert not (tmp_path / name).exists(), name
    assert not list(tmp_path.glob("*.bin"))
    # every sibling import of every copied code file is in the folder
    for path in tmp_path.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level:
                assert node.level == 1 and (tmp_path / f"{node.module}.py").exists(), (path.name, node.module)

    loaded = AutoModelForImageTextToText.from_pretrained(tmp_path)
    assert type(loaded) is MIVCForConditionalGeneration
    assert loaded.config.pooling_mode == "gated_attention" and loaded.config.projector_type == "linear"
    assert loaded.config.image_token_id == _image_token_id()
    assert list(model.state_dict()) == list(loaded.state_dict())
    for (name, a), b in zip(model.state_dict().items(), loaded.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    loaded.eval()
    inputs = processor(images=[_images("white", "black"), [_noise_image(1)]], text=[PROMPT, PROMPT])
    with torch.no_grad():
        a, b = model(**inputs), loaded(**inputs)
    assert torch.equal(a.logits, b.logits) and torch.equal(a.image_weights, b.image_weights)


def test_freeze_flags_survive_from_pretrained(tmp_path):
    model, _ = _save(tmp_path, freeze_vision_model=True, freeze_language_model=True)
    assert not model.language_model.lm_head.weight.requires_grad
    for loaded in (
        MIVCForConditionalGeneration.from_pretrained(tmp_path),
        AutoModelForImageTextToText.from_pretrained(tmp_path),
    ):
        for (name, p), q in zip(model.named_parameters(), loaded.parameters(), strict=True):
            assert q.requires_grad == p.requires_grad, name
    # a config override at load time (as training/train.py passes them) must freeze too
    loaded = MIVCForConditionalGeneration.from_pretrained(tmp_path, freeze_qformer=True)
    assert not any(p.requires_grad for p in loaded.qformer.parameters()) and not loaded.query_tokens.requires_grad


def test_from_pretrained_components_loads_every_part(tmp_path):
    from transformers import Blip2QFormerConfig, Blip2QFormerModel, LlamaForCausalLM, ViTConfig, ViTModel

    torch.manual_seed(3)
    text_config = _config().text_config
    vit = ViTModel(ViTConfig(**{k: v for k, v in VISION.items() if k != "model_type"}))  # with a pooler
    llama = LlamaForCausalLM(text_config)
    qformer = Blip2QFormerModel(Blip2QFormerConfig(**QFORMER, encoder_hidden_size=VISION["hidden_size"]))
    for name, part in (("vit", vit), ("llama", llama), ("qformer", qformer)):
        part.save_pretrained(tmp_path / name)
    model = MIVCForConditionalGeneration.from_pretrained_components(
        str(tmp_path / "vit"),
        str(tmp_path / "llama"),
        str(tmp_path / "qformer"),
        image_token_id=_image_token_id(),
        pooling_mode="gated_attention",
        num_query_tokens=NUM_QUERIES,
    )
    assert model.config.pooling_mode == "gated_attention" and model.config.image_seq_length == NUM_QUERIES
    for part, own in ((vit, model.vision_model), (llama, model.language_model), (qformer, model.qformer)):
        state = own.state_dict()
        for key, value in part.state_dict().items():
            if not key.startswith("pooler."):
                assert torch.equal(state[key], value), key
    # BLIP-2 defaults after loading: vision encoder and LM frozen, Q-Former + queries + pooling + projector trained
    trainable = {n.split(".")[0] for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"query_tokens", "qformer", "pooling", "projector"}


def test_processor_round_trips_through_auto_processor(tmp_path):
    processor = _processor(_config(mode="concatenate"), image_token="<image>")
    processor.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "processor_config.json").read_text())
    assert saved["image_seq_length"] == 16 and saved["image_token"] == "<image>"
    assert saved["concatenate_images"] is True
    assert saved["auto_map"]["AutoProcessor"] == "processing_vlalign.MIVCProcessor"
    loaded = AutoProcessor.from_pretrained(tmp_path)
    assert type(loaded) is MIVCProcessor
    assert (loaded.image_seq_length, loaded.image_token, loaded.concatenate_images) == (16, "<image>", True)
    assert loaded.image_token_id == _image_token_id()
    images, texts = [_images("white", "black"), _images("gray")], [PROMPT, "which digit?"]
    a, b = (
        processor(images=images, text=texts, answers=["one", "two"]),
        loaded(images=images, text=texts, answers=["one", "two"]),
    )
    assert set(a) == set(b)
    for key in a:
        assert torch.equal(a[key], b[key]), key


# ------------------------------------------------------------------------------------------------------------------
# 8. remote code and the image-text-to-text pipeline


def _expected_generation(model, processor, images):
    """model.generate on the processor's inputs: the ids, and the new text as the pipeline cuts it."""
    inputs = processor(images=images, text=PROMPT)
    generated = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    full = processor.batch_decode(generated, skip_special_tokens=True)[0]
    prompt = processor.batch_decode(inputs["input_ids"], skip_special_tokens=True)[0]
    assert full.startswith(prompt)
    return generated[0], full[len(prompt) :]


def test_image_text_to_text_pipeline_in_process(colour_model):
    from transformers import pipeline

    model, processor, folder, _ = colour_model
    pipe = pipeline("image-text-to-text", model=str(folder))
    assert type(pipe.model) is MIVCForConditionalGeneration and type(pipe.processor) is MIVCProcessor
    for colours, answer in ((("white", "black"), "three"), (("black", "black"), "two"), (("white",), "one")):
        images = _images(*colours)
        generated, new_text = _expected_generation(model, processor, images)
        assert new_text.strip() == answer  # "three": both images of the one prompt reached the model
        result = pipe(images=images, text=PROMPT, max_new_tokens=3, return_full_text=False)
        assert result[0]["generated_text"] == new_text
        result = pipe(images=images, text=PROMPT, max_new_tokens=3)
        assert result[0]["generated_text"] == PROMPT + new_text
        result = pipe(images=images, text=PROMPT, max_new_tokens=3, return_tensors=True)
        assert torch.equal(torch.as_tensor(result[0]["generated_token_ids"]).flatten(), generated)


def _chat(images, text="which digit?"):
    """One user message: the images (PIL images or paths) as image blocks, then the text."""
    blocks = [{"type": "image", "path": x} if isinstance(x, str) else {"type": "image", "image": x} for x in images]
    return [{"role": "user", "content": blocks + [{"type": "text", "text": text}]}]


@pytest.mark.parametrize("mode", ["attention", "concatenate"])
def test_pipeline_chat_messages_generate_what_the_prompt_form_generates(tmp_path, mode):
    from transformers import pipeline

    model, processor = _save(tmp_path, mode=mode, qformer=False)
    pipe = pipeline("image-text-to-text", model=str(tmp_path), processor=AutoProcessor.from_pretrained(tmp_path))
    _noise_image(7).save(tmp_path / "scan.png")
    options = dict(generate_kwargs={"do_sample": False, "max_new_tokens": 4})  # greedy (one dict: 5.20 refuses both)
    for images in ([_noise_image(1)], [_noise_image(2), str(tmp_path / "scan.png"), _noise_image(3)]):
        loaded = [Image.open(x) if isinstance(x, str) else x for x in images]
        inputs = processor(images=loaded, text=PROMPT)
        expected = model.generate(**inputs, max_new_tokens=4, do_sample=False)[0]
        by_prompt = pipe(images=loaded, text=PROMPT, return_full_text=False, **options)[0]["generated_text"]
        by_chat = pipe(_chat(images), **options)[0]["generated_text"]
        assert by_chat[:-1] == _chat(images) and by_chat[-1]["role"] == "assistant"
        assert by_chat[-1]["content"] == by_prompt
        ids = pipe(_chat(images), return_tensors=True, **options)[0]["generated_token_ids"]
        assert torch.equal(torch.as_tensor(ids).flatten(), expected)  # the prompt ids, then the same new tokens
        assert len(expected) > inputs["input_ids"].shape[1]


def test_remote_code_and_pipeline_without_vlalign(colour_model, tmp_path):
    model, processor, folder, _ = colour_model
    img1, img2 = _images("white", "black")
    img1.save(tmp_path / "img1.png")
    img2.save(tmp_path / "img2.png")
    generated, new_text = _expected_generation(model, processor, [img1, img2])
    assert new_text.strip() == "three"
    inputs = processor(images=[_images("white", "black"), [_noise_image(1)]], text=[PROMPT, PROMPT])
    with torch.no_grad():
        expected = model(**inputs).logits
    torch.save(dict(inputs), tmp_path / "inputs.pt")
    torch.save(expected, tmp_path / "expected.pt")
    torch.save(generated, tmp_path / "generated.pt")
    script = BLOCK_VLALIGN + textwrap.dedent(
        f"""
        import torch
        from PIL import Image
        from transformers import AutoModelForImageTextToText, AutoProcessor, pipeline
        folder = {str(folder)!r}
        model = AutoModelForImageTextToText.from_pretrained(folder, trust_remote_code=True)
        assert type(model).__module__.startswith('transformers_modules'), type(model).__module__
        assert type(model).__name__ == 'MIVCForConditionalGeneration'
        model.eval()
        inputs = torch.load({str(tmp_path / "inputs.pt")!r})
        with torch.no_grad():
            logits = model(**inputs).logits
        assert torch.allclose(logits, torch.load({str(tmp_path / "expected.pt")!r}), atol=1e-6, rtol=0)
        processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
        assert type(processor).__name__ == 'MIVCProcessor', type(processor)
        assert type(processor).__module__.startswith('transformers_modules'), type(processor).__module__
        img1, img2 = Image.open({str(tmp_path / "img1.png")!r}), Image.open({str(tmp_path / "img2.png")!r})
        pipe = pipeline('image-text-to-text', model=folder, trust_remote_code=True)
        result = pipe(images=[img1, img2], text={PROMPT!r}, max_new_tokens=3)
        text = result[0]['generated_text']
        assert isinstance(text, str) and text.startswith({PROMPT!r}), result
        assert text[len({PROMPT!r}):] == {new_text!r}, (text, {new_text!r})
        result = pipe(images=[img1, img2], text={PROMPT!r}, max_new_tokens=3, return_tensors=True)
        ids = torch.as_tensor(result[0]['generated_token_ids']).flatten()
        assert torch.equal(ids, torch.load({str(tmp_path / "generated.pt")!r})), ids
        # chat messages: the saved chat template renders the training prompt, and the pipeline answers the same
        chat = {_chat([str(tmp_path / "img1.png"), str(tmp_path / "img2.png")])!r}
        assert processor.apply_chat_template(chat, add_generation_prompt=True) == {PROMPT!r}
        result = pipe(chat, max_new_tokens=3)
        assert result[0]['generated_text'][-1] == {{'role': 'assistant', 'content': {new_text!r}}}, result
        result = pipe(chat, max_new_tokens=3, return_tensors=True)
        ids = torch.as_tensor(result[0]['generated_token_ids']).flatten()
        assert torch.equal(ids, torch.load({str(tmp_path / "generated.pt")!r})), ids
        print('REMOTE CODE OK')
        import vlalign
        """
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["HF_HUB_OFFLINE"] = "1"
    env["OMP_NUM_THREADS"] = "1"
    proc = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    # the script ends by importing vlalign, which must fail: that proves it really ran without the package
    assert "REMOTE CODE OK" in proc.stdout, proc.stderr[-3000:]
    assert "vlalign is blocked in this test" in proc.stderr, proc.stderr[-3000:]


# ------------------------------------------------------------------------------------------------------------------
# 9. MIVCProcessor


def test_processor_pads_images_and_builds_mask():
    processor = _processor(_config())
    images = [_images("white", "black"), [_noise_image(2)], [_noise_image(3), _noise_image(4), _noise_image(5)]]
    out = processor(images=images, text=[PROMPT] * 3)
    assert out["pixel_values"].shape == (3, 3, 3, IMAGE_SIZE, IMAGE_SIZE)
    assert out["image_mask"].tolist() == [[True, True, False], [True, False, False], [True, True, True]]
    assert (out["pixel_values"][0, 2] == 0).all() and (out["pixel_values"][1, 1:] == 0).all()
    reference = torch.as_tensor(
        _image_processor()([img for sample in images for img in sample], return_tensors="np")["pixel_values"]
    )
    torch.testing.assert_close(out["pixel_values"][out["image_mask"]], reference)


@pytest.mark.parametrize("concatenate", [False, True])
def test_processor_expands_placeholders(concatenate):
    processor = _processor(_config(mode="concatenate" if concatenate else "attention"))
    assert processor.concatenate_images == concatenate
    images = [_images("white", "black", "gray"), _images("white"), _images("black", "white")]
    out = processor(images=images, text=[PROMPT, "which digit?", "<image>"])
    counts = (out["input_ids"] == _image_token_id()).sum(1).tolist()
    assert counts == ([16 * 3, 16, 16 * 2] if concatenate else [16, 16, 16])
    # bos first, then the placeholders in one run
    for row in range(3):
        real = out["input_ids"][row][out["attention_mask"][row].bool()].tolist()
        assert real[0] == _tokenizer().bos_token_id
        first = real.index(_image_token_id())
        assert real[first : first + counts[row]] == [_image_token_id()] * counts[row]


def test_processor_labels_and_padding_sides():
    tok = _tokenizer()
    processor = _processor(_config())
    images = [_images("white"), _images("black", "gray")]
    texts, answers = [PROMPT, "<image> digit?"], ["one", "two three"]
    out = processor(images=images, text=texts, answers=answers)
    ids, mask, labels = out["input_ids"], out["attention_mask"], out["labels"]
    lengths = mask.sum(1).tolist()
    for row in range(2):
        assert mask[row].tolist() == [1] * lengths[row] + [0] * (ids.shape[1] - lengths[row])  # right padding
        target = tok(answers[row], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        assert labels[row][labels[row] != -100].tolist() == target
        assert labels[row, lengths[row] - len(target) : lengths[row]].tolist() == target
        assert (labels[row, : lengths[row] - len(target)] == -100).all()  # prompt and image positions
        assert (labels[row, lengths[row] :] == -100).all()  # padding
        assert ids[row, lengths[row] - len(target) : lengths[row]].tolist() == target
        assert (ids[row, lengths[row] :] == tok.pad_token_id).all()
    assert (labels[ids == _image_token_id()] == -100).all()

    generation = processor(images=images, text=texts)
    assert "labels" not in generation
    for row in range(2):
        n = int(generation["attention_mask"][row].sum())
        assert generation["attention_mask"][row].tolist() == [0] * (generation["input_ids"].shape[1] - n) + [1] * n
    assert generation["attention_mask"][:, -1].all()  # left padding: every prompt ends at the last column
    right = processor(images=images, text=texts, padding_side="right")
    assert right["attention_mask"][:, 0].all()
    # the prompt part of a training row is exactly the generation prompt
    for row in range(2):
        prompt = generation["input_ids"][row][generation["attention_mask"][row].bool()].tolist()
        assert ids[row, : len(prompt)].tolist() == prompt


def test_processor_placeholder_rules():
    processor = _processor(_config())
    image = _images("white")
    with_placeholder = processor(images=[image], text=["<image> which digit?"])
    without = processor(images=[image], text=["which digit?"])
    assert torch.equal(with_placeholder["input_ids"], without["input_ids"])
    with pytest.raises(ValueError, match="one '<image>' placeholder"):
        processor(images=[image], text=["<image> which <image> digit?"])
    with pytest.raises(ValueError, match="no token '<img>'"):
        MIVCProcessor(image_processor=_image_processor(), tokenizer=_tokenizer(), image_token="<img>")
    with pytest.raises(ValueError, match="image lists"):
        processor(images=[image, image, image], text=[PROMPT, PROMPT])
    with pytest.raises(ValueError, match="has no image"):
        processor(images=[image, []], text=[PROMPT, PROMPT])
    # a flat list is the images of a single prompt, and one image each for several prompts
    assert processor(images=_images("white", "black"), text=PROMPT)["image_mask"].shape == (1, 2)
    assert processor(images=_images("white", "black"), text=[PROMPT, PROMPT])["image_mask"].shape == (2, 1)
    # apply_chat_template's options: no BOS for a rendered prompt that holds it already; videos and audio refused
    no_bos = processor(images=[image], text=["<image> which digit?"], add_special_tokens=False)
    assert no_bos["input_ids"].tolist() == [with_placeholder["input_ids"][0, 1:].tolist()]
    with pytest.raises(ValueError, match="not videos or audio"):
        processor(images=[image], text=[PROMPT], videos=[[image]])


DIGITS_QUESTION = "Which digit do these scans show?"


@pytest.mark.parametrize("concatenate", [False, True])
def test_chat_template_renders_the_training_prompt(concatenate):
    from vlalign.data import MIVC_DIGITS_PROMPT, build_mivc_digits_processor

    # the demo's processor as training builds it: the chat template comes by default
    processor = build_mivc_digits_processor(image_seq_length=4, image_size=IMAGE_SIZE, concatenate_images=concatenate)
    one, three = [_noise_image(1)], [_noise_image(2), _noise_image(3), _noise_image(4)]
    for images in (one, three):
        chat = _chat(images, DIGITS_QUESTION)
        for add_generation_prompt in (True, False):  # training has no assistant header: nothing to add
            rendered = processor.apply_chat_template(chat, add_generation_prompt=add_generation_prompt)
            assert rendered == MIVC_DIGITS_PROMPT
        out = processor.apply_chat_template(chat, add_generation_prompt=True, tokenize=True, return_dict=True)
        direct = processor(images=images, text=MIVC_DIGITS_PROMPT)
        assert set(out) == set(direct)
        for key in direct:
            assert torch.equal(out[key], direct[key]), key
        ids = processor.apply_chat_template(chat, add_generation_prompt=True, tokenize=True)
        assert torch.equal(ids, direct["input_ids"])
        n = (direct["input_ids"] == processor.image_token_id).sum().item()
        assert n == 4 * (len(images) if concatenate else 1)
    # a batch of conversations: the training batch of the same items (left-padded, images padded and masked)
    chats = [_chat(one, DIGITS_QUESTION), _chat(three, DIGITS_QUESTION)]
    out = processor.apply_chat_template(chats, add_generation_prompt=True, tokenize=True, return_dict=True)
    direct = processor(images=[one, three], text=[MIVC_DIGITS_PROMPT] * 2)
    for key in direct:
        assert torch.equal(out[key], direct[key]), key


def test_chat_template_placement_and_refusals():
    processor = _processor(_config())
    image = {"type": "image"}

    def render(content, role="user"):
        return processor.apply_chat_template([{"role": role, "content": content}])

    assert render([image, image, {"type": "text", "text": "which digit?"}]) == PROMPT
    assert render([{"type": "text", "text": "which digit?"}, image, image]) == "which digit? <image>"
    assert render([{"type": "text", "text": "which"}, image, {"type": "text", "text": "digit?"}]) == (
        "which <image> digit?"
    )
    assert render("which digit?") == PROMPT  # no image block: the placeholder first, as the processor prepends it
    with pytest.raises(ValueError, match="image blocks together"):
        render([image, {"type": "text", "text": "which digit?"}, image])
    with pytest.raises(ValueError, match="got a video block"):
        render([{"type": "video"}, {"type": "text", "text": "which digit?"}])
    with pytest.raises(ValueError, match="exactly one user message .* got roles assistant"):
        render("one", role="assistant")
    with pytest.raises(ValueError, match="got roles system, user"):
        processor.apply_chat_template([{"role": "system", "content": "be brief"}, *_chat([image])])
    with pytest.raises(ValueError, match="got roles user, assistant, user"):
        processor.apply_chat_template(
            [*_chat([_noise_image(1)]), {"role": "assistant", "content": "one"}, *_chat([_noise_image(1)])]
        )
    # the template is built for the processor's placeholder
    assert processor.apply_chat_template(_chat([image]), chat_template=mivc_chat_template("<img>")) == (
        "<img> which digit?"
    )


def test_chat_template_is_saved_and_loaded(tmp_path):
    processor = _processor(_config())
    assert processor.chat_template == mivc_chat_template("<image>")
    processor.save_pretrained(tmp_path)
    assert (tmp_path / "chat_template.jinja").read_text() == processor.chat_template
    assert "chat_template" not in json.loads((tmp_path / "processor_config.json").read_text())
    assert AutoProcessor.from_pretrained(tmp_path).chat_template == processor.chat_template
    custom = "{{- '<image> ' ~ messages[0]['content'][-1]['text'] -}}"  # a user's own template is kept
    _processor(_config(), chat_template=custom).save_pretrained(tmp_path)
    loaded = AutoProcessor.from_pretrained(tmp_path)
    assert loaded.chat_template == custom
    assert loaded.apply_chat_template(_chat([{"type": "image"}], "digit?")) == "<image> digit?"
    # a folder saved before processors had a template gets the default one
    (tmp_path / "chat_template.jinja").unlink()
    assert AutoProcessor.from_pretrained(tmp_path).chat_template == mivc_chat_template("<image>")


# ------------------------------------------------------------------------------------------------------------------
# 10. bf16


@pytest.mark.parametrize(
    "mode, qformer", [("attention", True), ("gated_attention", False), ("max", False), ("concatenate", False)]
)
def test_bf16_autocast_forward_and_backward_are_finite(mode, qformer):
    model = _model(mode=mode, qformer=qformer, randomize=False)  # eval: no dropout, so the losses compare
    processor = _processor(model)
    batch = processor(
        images=[_images("white", "black"), _images("gray")], text=[PROMPT, PROMPT], answers=["one", "two"]
    )
    with torch.no_grad():
        reference = model(**batch).loss
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(**batch)
    assert torch.isfinite(out.loss)
    assert out.loss.item() == pytest.approx(reference.item(), abs=0.1)
    if out.image_weights is not None:
        assert out.image_weights.dtype == torch.float32
    out.loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


def test_activation_checkpointing_gives_the_same_gradients():
    qformer_config = dict(QFORMER, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    for freeze in (False, True):
        torch.manual_seed(0)
        config = _config(
            qformer=True, qformer_config=qformer_config, freeze_vision_model=freeze, freeze_language_model=freeze
        )
        plain = MIVCForConditionalGeneration(config)
        checkpointed = MIVCForConditionalGeneration(config)
        checkpointed.load_state_dict(plain.state_dict())
        checkpointed.activation_checkpointing_enable()
        assert any(getattr(m, "gradient_checkpointing", False) for m in checkpointed.language_model.modules())
        batch = _processor(plain)(
            images=[_images("white", "black"), _images("gray")], text=[PROMPT, PROMPT], answers=["one", "two"]
        )
        for model in (plain, checkpointed):
            model.train()
            model(**batch).loss.backward()
        for (name, a), b in zip(plain.named_parameters(), checkpointed.parameters(), strict=True):
            assert (a.grad is None) == (b.grad is None), name
            if a.grad is not None:
                torch.testing.assert_close(a.grad, b.grad, atol=1e-6, rtol=1e-5, msg=name)


def test_from_pretrained_components_rejects_a_checkpoint_that_does_not_match(tmp_path):
    """A checkpoint whose weights do not fit its own config raises with the keys instead of leaving random
    weights in the model."""
    from transformers import LlamaConfig, LlamaForCausalLM, ViTConfig, ViTModel

    ViTModel(ViTConfig(**{k: v for k, v in VISION.items() if k != "model_type"})).save_pretrained(tmp_path / "vit")
    LlamaForCausalLM(
        LlamaConfig(
            vocab_size=50,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=4,
            intermediate_size=64,
        )
    ).save_pretrained(tmp_path / "llm")
    config = json.loads((tmp_path / "llm" / "config.json").read_text())
    config["num_hidden_layers"] = 1  # the weights still hold two layers
    (tmp_path / "llm" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"language model checkpoint .* unexpected \[.*layers\.1"):
        MIVCForConditionalGeneration.from_pretrained_components(
            str(tmp_path / "vit"), str(tmp_path / "llm"), image_token_id=7
        )


# ------------------------------------------------------------------------------------------------------------------
# 11. attention implementations: every attention call (ViT, Q-Former, the causal LM) goes through transformers' SDPA
# path by default. With `attn_implementation="eager"` the eager kernels run N times; built by default, the same
# forward runs `torch.nn.functional.scaled_dot_product_attention` exactly N times, the eager kernels never, and the
# losses agree (TCL / CODIS: test_modeling_albef.py).


@pytest.fixture
def attention_calls(monkeypatch):
    """Counts of eager-kernel and SDPA calls during the test."""
    return count_attention_calls(monkeypatch)


def _attention_case(qformer):
    def run(attn_implementation):
        torch.manual_seed(0)
        model = MIVCForConditionalGeneration._from_config(
            _config(qformer=qformer), attn_implementation=attn_implementation
        ).eval()
        counts, n_images = (2, 3), 3
        ids = torch.tensor([_prompt_ids(model, c) for c in counts])
        with torch.no_grad():
            return model(
                input_ids=ids, pixel_values=_pixels(2, n_images), image_mask=_mask(counts, n_images), labels=ids
            ).loss

    return run


ATTENTION_CASES = {
    "mivc": _attention_case(qformer=False),
    "mivc_qformer": _attention_case(qformer=True),
}


@pytest.mark.parametrize("case", sorted(ATTENTION_CASES))
def test_every_attention_call_uses_sdpa_by_default(case, attention_calls):
    eager_loss = ATTENTION_CASES[case]("eager")
    eager_calls = attention_calls["eager"]
    # at least the vision tower and one other (Q-Former / LM) attention layer ran
    assert eager_calls >= 2 and attention_calls["sdpa"] == 0
    attention_calls.update(eager=0, sdpa=0)
    sdpa_loss = ATTENTION_CASES[case](None)  # the default a user gets
    assert attention_calls["eager"] == 0
    assert attention_calls["sdpa"] == eager_calls
    torch.testing.assert_close(sdpa_loss, eager_loss, atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------------------------------------------
# torch.compile


def test_mivc_compiles_whole_with_the_eager_loss_and_gradients():
    """MIVC has no ALBEF-style losses: `torch_compile=True` compiles the whole model (transformers' default); the
    graph breaks at the data-dependent placeholder check and image selection, and the results stay exact."""
    counts, n_images = (2, 3), 3
    results = []
    for compiled in (False, True):
        model = _model(qformer=True).train()
        ids = torch.tensor([_prompt_ids(model, c) for c in counts])
        run = torch.compile(model, backend="aot_eager") if compiled else model
        torch.manual_seed(1)
        loss = run(
            input_ids=ids, pixel_values=_pixels(2, n_images), image_mask=_mask(counts, n_images), labels=ids
        ).loss
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    (eager_loss, eager_grads), (compiled_loss, compiled_grads) = results
    torch.testing.assert_close(compiled_loss, eager_loss, atol=1e-6, rtol=1e-6)
    assert compiled_grads.keys() == eager_grads.keys() and len(eager_grads) > 10
    for name, grad in eager_grads.items():
        torch.testing.assert_close(compiled_grads[name], grad, atol=1e-6, rtol=1e-5, msg=name)
