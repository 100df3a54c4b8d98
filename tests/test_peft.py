"""PEFT / LoRA: `peft.get_peft_model` on TCL and CODIS (LoRA on the student towers) and on MIVC's language model.

What is checked: only the adapters (and the chosen `modules_to_save`) train; a few optimizer steps lower the loss
and leave every base weight bitwise unchanged; the EMA teachers stay plain modules that follow the students'
*effective* weights (base + LoRA delta, the trained `modules_to_save` copy) exactly; `save_pretrained` writes the
adapters only and `PeftModel.from_pretrained(fresh_base, folder)` reproduces the outputs bit for bit; MIVC still
generates through the PeftModel. Tiny random models, nothing is downloaded.
"""

import copy
import functools
import os

import pytest
import torch
import torch.nn.functional as F
from fixtures import tiny_batch, tiny_codis_config, tiny_tcl_config
from safetensors.torch import load_file

peft = pytest.importorskip("peft")
from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402
from peft.tuners.lora import LoraLayer  # noqa: E402

from vlalign import CODISModel, TCLModel  # noqa: E402

# LoRA on the query / value projections of the student towers and the fusion layers (BERT names them
# query/value, transformers' ViT q_proj/v_proj) and on the two projection heads. A regex, because a list of names
# matches by suffix and would also adapt the EMA teachers `momentum_*` (refused, see the test below).
ALBEF_TARGETS = r"(vision_model|text_model|fusion_model)\..*\.(query|value|q_proj|v_proj)|(vision_proj|text_proj)"
# fully trained: modules without an EMA teacher (a teacher-twinned name like "vision_proj" would also wrap
# "momentum_vision_proj", since `modules_to_save` matches by suffix too)
MODULES_TO_SAVE = {"tcl": ["itm_head"], "codis": ["itm_head", "codebook"]}
MODELS = {"tcl": (TCLModel, tiny_tcl_config), "codis": (CODISModel, tiny_codis_config)}
STEPS = 6
# peft asks transformers for the deprecated `is_gradient_checkpointing` when it wraps a model
pytestmark = pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")
LR = 1e-2


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models run faster on one intra-op thread (and the results do not depend on the thread count)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _randomize(model, seed=0):
    """O(1) random student weights (the 0.02 init makes every embedding nearly the same, so that a few steps
    cannot move the in-batch contrastive loss), then teachers = students again."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2 and not name.startswith("momentum_"):
                p.copy_(torch.randn(p.shape, generator=g) / p.shape[-1] ** 0.5)
    model.copy_params_to_momentum()
    return model


def _base_model(kind, **overrides):
    model_class, make_config = MODELS[kind]
    torch.manual_seed(0)
    return _randomize(model_class(make_config(**overrides)))


def _lora_config(kind, **kwargs):
    return LoraConfig(target_modules=ALBEF_TARGETS, r=4, lora_alpha=8, modules_to_save=MODULES_TO_SAVE[kind],
                      **kwargs)


def _inference(model, batch):
    """Eval-mode CLIP-style outputs (no dropout, no EMA / queue update)."""
    was_training = model.training
    model.eval()
    with torch.no_grad():
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                    pixel_values=batch["pixel_values"])
    model.train(was_training)
    return out


def _in_batch_loss(model, batch):
    logits = _inference(model, batch).logits_per_image
    return F.cross_entropy(logits, torch.arange(logits.shape[0])).item()


def _snapshot(model):
    return {name: p.detach().clone() for name, p in model.named_parameters()}


@functools.cache
def _trained(kind, tmp_root):
    """Base model saved to `tmp_root/base`, then LoRA-wrapped and trained STEPS AdamW steps on one batch."""
    base = _base_model(kind)
    base_dir = os.path.join(tmp_root, f"{kind}-base")
    base.save_pretrained(base_dir)
    model = get_peft_model(base, _lora_config(kind))
    before = _snapshot(model)
    batch = tiny_batch()
    eval_before = _in_batch_loss(model, batch)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR)
    model.train()
    losses = []
    for _ in range(STEPS):
        out = model(**batch, return_loss=True)
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
        losses.append(out.loss.item())
    return dict(model=model, before=before, batch=batch, losses=losses, eval_before=eval_before,
                eval_after=_in_batch_loss(model, batch), base_dir=base_dir)


@pytest.fixture(scope="module")
def tmp_root(tmp_path_factory):
    return str(tmp_path_factory.mktemp("peft"))


@pytest.mark.parametrize("kind", list(MODELS))
def test_lora_trains_only_student_adapters_and_modules_to_save(kind, tmp_root):
    run = _trained(kind, tmp_root)
    model = run["model"]
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable, "nothing to train"
    for name in trainable:
        assert ".lora_A." in name or ".lora_B." in name or ".modules_to_save." in name, name
        assert "momentum_" not in name, f"a teacher parameter is trainable: {name}"
    adapted = {n.removeprefix("base_model.model.") for n, m in model.named_modules() if isinstance(m, LoraLayer)}
    towers = {n.split(".")[0] for n in adapted}
    assert towers == {"vision_model", "text_model", "fusion_model", "vision_proj", "text_proj"}, towers
    assert any(n.endswith("q_proj") for n in adapted) and any(n.endswith("value") for n in adapted)
    assert {n.split(".")[2] for n in trainable if ".modules_to_save." in n} == set(MODULES_TO_SAVE[kind])
    # the temperature is a bare parameter: PEFT freezes it (it keeps the base model's value)
    assert not model.base_model.model.temp.requires_grad


@pytest.mark.parametrize("kind", list(MODELS))
def test_lora_steps_lower_the_loss_and_change_only_trainable_parameters(kind, tmp_root):
    run = _trained(kind, tmp_root)
    model, before = run["model"], run["before"]
    losses = run["losses"]
    assert losses[-1] < losses[0], losses
    assert run["eval_after"] < run["eval_before"] - 0.02, (run["eval_before"], run["eval_after"])
    after = dict(model.named_parameters())
    assert after.keys() == before.keys()
    changed_teachers = 0
    for name, p in after.items():
        if p.requires_grad:
            assert not torch.equal(p, before[name]), f"trainable {name} did not change"
        elif ".momentum_" in name:
            changed_teachers += not torch.equal(p, before[name])  # EMA towards the adapted students
        else:
            assert torch.equal(p, before[name]), f"frozen base weight {name} changed"
    assert changed_teachers > 0


@pytest.mark.parametrize("kind", list(MODELS))
def test_teachers_follow_the_ema_of_the_effective_student_weights(kind, tmp_root):
    """teacher <- m * teacher + (1 - m) * (W + B A * scaling), with the merged weights computed by PEFT itself."""
    model = copy.deepcopy(_trained(kind, tmp_root)["model"])
    inner = model.base_model.model
    momentum = inner.config.momentum
    merged = dict(copy.deepcopy(model).merge_and_unload().named_parameters())
    teachers_before = {n: p.detach().clone() for n, p in inner.named_parameters() if n.startswith("momentum_")}
    assert len(teachers_before) > 50
    model.train()
    model(**tiny_batch(seed=1), return_loss=True)  # the EMA step runs at the start of the training forward
    after = dict(inner.named_parameters())
    folded = 0
    for name, before in teachers_before.items():
        student = merged[name.removeprefix("momentum_")]
        torch.testing.assert_close(after[name], before.mul(momentum).add(student, alpha=1 - momentum),
                                   rtol=0, atol=0, msg=name)
        base_weight = after.get(name.removeprefix("momentum_").replace(".weight", ".base_layer.weight"))
        if base_weight is not None and not torch.equal(base_weight, student):
            folded += 1  # a LoRA layer whose delta is non-zero: an EMA over base weights only would differ here
    assert folded >= 4


def test_copy_params_to_momentum_copies_base_plus_lora(tmp_root):
    """After loading adapters to resume training, `copy_params_to_momentum()` restarts the teachers from base +
    LoRA: their outputs equal the adapted students'; with the adapters disabled, from the base weights."""
    model = copy.deepcopy(_trained("tcl", tmp_root)["model"]).eval()
    inner = model.base_model.model
    batch = tiny_batch()
    with torch.no_grad():
        model.copy_params_to_momentum()
        features = {}
        for momentum in (False, True):
            image = inner._image_feature(inner._image_tokens(batch["pixel_values"], momentum), momentum)
            text = inner._text_feature(inner._text_tokens(batch["input_ids"], batch["attention_mask"], momentum),
                                       momentum)
            features[momentum] = (image, text)
        torch.testing.assert_close(features[True], features[False], rtol=1e-5, atol=1e-6)
        with model.disable_adapter():
            model.copy_params_to_momentum()
        base = dict(_base_model("tcl").named_parameters())
        for name, p in inner.named_parameters():
            if name.startswith("momentum_"):
                assert torch.equal(p, base[name.removeprefix("momentum_")]), name


@pytest.mark.parametrize("kind", list(MODELS))
def test_save_pretrained_writes_adapters_only_and_reload_reproduces_outputs(kind, tmp_root, tmp_path):
    run = _trained(kind, tmp_root)
    model = run["model"]
    model.save_pretrained(tmp_path)
    files = set(os.listdir(tmp_path))
    assert {"adapter_model.safetensors", "adapter_config.json"} <= files
    assert files - {"adapter_model.safetensors", "adapter_config.json", "README.md"} == set(), files
    saved = load_file(tmp_path / "adapter_model.safetensors")
    for key in saved:
        assert "lora_" in key or any(f"{m}." in key for m in MODULES_TO_SAVE[kind]), key
        assert "momentum_" not in key, key
    n_base = sum(p.numel() for p in model.base_model.model.parameters())
    assert sum(t.numel() for t in saved.values()) < 0.1 * n_base

    model_class = MODELS[kind][0]
    reloaded = PeftModel.from_pretrained(model_class.from_pretrained(run["base_dir"]), tmp_path)
    assert not any(p.requires_grad for p in reloaded.parameters())  # inference mode by default
    batch = tiny_batch(seed=3)
    expected, actual = _inference(model, batch), _inference(reloaded, batch)
    for key in ("logits_per_image", "image_embeds", "text_embeds"):
        assert torch.equal(actual[key], expected[key]), key
    # the adapters matter: the base model alone gives other logits
    plain = _inference(model_class.from_pretrained(run["base_dir"]), batch)
    assert not torch.allclose(plain.logits_per_image, expected.logits_per_image, atol=1e-4)
    if kind == "codis":  # the trained codebook copy is the one used
        pixels = batch["pixel_values"]
        with torch.no_grad():
            assert torch.equal(reloaded.eval().get_codes(pixel_values=pixels).image_code_probs,
                               model.eval().get_codes(pixel_values=pixels).image_code_probs)


def test_lora_on_the_teachers_is_refused_with_a_fix():
    """A list of names matches by suffix: ["query", "value"] also adapts `momentum_text_model` etc. The first
    training step refuses it (before, the EMA paired parameter lists by position) and says what to do."""
    model = get_peft_model(_base_model("tcl"), LoraConfig(target_modules=["query", "value"], r=4))
    assert any("momentum_" in n for n, m in model.named_modules() if isinstance(m, LoraLayer))
    with pytest.raises(ValueError, match=r"momentum_text_model.*exclude_modules"):
        model(**tiny_batch(), return_loss=True)


def test_name_list_with_exclude_modules_adapts_the_students_only():
    model = get_peft_model(_base_model("codis"), LoraConfig(
        target_modules=["query", "value", "q_proj", "v_proj"], exclude_modules=r"momentum_.*", r=4,
        modules_to_save=["codebook"]))
    adapted = [n for n, m in model.named_modules() if isinstance(m, LoraLayer)]
    assert adapted and not any("momentum_" in n for n in adapted)
    out = model(**tiny_batch(), return_loss=True)
    out.loss.backward()
    assert torch.isfinite(out.loss)


def test_lora_without_momentum_teachers_takes_plain_name_lists():
    model = get_peft_model(_base_model("tcl", use_momentum=False, itm_weight=0.0, mlm_weight=0.0),
                           LoraConfig(target_modules=["query", "value", "q_proj", "v_proj"], r=4,
                                      modules_to_save=["vision_proj", "text_proj"]))
    out = model(**tiny_batch(), return_loss=True)
    out.loss.backward()
    assert model.base_model.model.vision_proj.modules_to_save["default"].weight.grad is not None


# ----------------------------------------------------------------------------------------------------------------
# MIVC: LoRA on the language model's attention, projector and pooling trained, vision encoder frozen (config flags)

MIVC_TARGETS = r"language_model\..*\.(q_proj|v_proj)"  # a regex: transformers' ViT also names its layers q_proj
MIVC_MODULES_TO_SAVE = ["projector", "pooling"]  # what the freeze flags leave trainable (no Q-Former here)
PROMPT = "<image> which digit?"


@functools.cache
def _mivc_tokenizer():
    from vlalign.data import build_digits_tokenizer

    tok = build_digits_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": ["<image>"], "bos_token": "[CLS]", "eos_token": "[SEP]"})
    return tok


def _mivc_model_and_processor():
    from PIL import Image
    from transformers import ViTImageProcessorPil

    from vlalign import MIVCConfig, MIVCForConditionalGeneration, MIVCProcessor

    tok = _mivc_tokenizer()
    text = dict(model_type="llama", vocab_size=len(tok), hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                num_key_value_heads=4, intermediate_size=64, max_position_embeddings=256,
                bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    vision = dict(model_type="vit", image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=1,
                  num_attention_heads=4, intermediate_size=64)
    config = MIVCConfig(vision_config=vision, text_config=text, image_token_id=tok.convert_tokens_to_ids("<image>"),
                        pooling_mode="attention", pooling_attention_dim=16)  # default flags: vision + LM frozen
    torch.manual_seed(0)
    model = MIVCForConditionalGeneration(config)
    image_processor = ViTImageProcessorPil(size={"height": 32, "width": 32}, image_mean=[0.5] * 3,
                                           image_std=[0.5] * 3)
    processor = MIVCProcessor(image_processor=image_processor, tokenizer=tok,
                              image_seq_length=config.image_seq_length)

    def images(*colours):
        return [Image.new("RGB", (32, 32), c) for c in colours]

    items = [(images("white"), "one"), (images("black"), "two"), (images("white", "black"), "three")]
    return model, processor, items


@pytest.mark.parametrize("task_type", [None, "CAUSAL_LM"])
def test_mivc_lora_on_the_language_model_trains_saves_loads_and_generates(task_type, tmp_path):
    from vlalign import MIVCForConditionalGeneration

    base, processor, items = _mivc_model_and_processor()
    base.save_pretrained(tmp_path / "base")
    model = get_peft_model(base, LoraConfig(target_modules=MIVC_TARGETS, r=4, lora_alpha=8,
                                            modules_to_save=MIVC_MODULES_TO_SAVE, task_type=task_type))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable
    for name in trainable:
        assert (".language_model." in name and ".lora_" in name) or ".modules_to_save." in name, name
    assert any(".q_proj.lora_A." in n for n in trainable) and any(".v_proj.lora_B." in n for n in trainable)
    assert {n.split(".")[2] for n in trainable if ".modules_to_save." in n} == set(MIVC_MODULES_TO_SAVE)

    batch = processor(images=[i for i, _ in items], text=[PROMPT] * len(items), answers=[a for _, a in items])
    before = _snapshot(model)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=LR)
    model.train()
    losses = []
    for _ in range(STEPS):
        loss = model(**batch).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.05, losses
    for name, p in model.named_parameters():
        assert torch.equal(p, before[name]) != p.requires_grad, name  # trainable changed, the rest did not

    model.save_pretrained(tmp_path / "adapter")
    files = set(os.listdir(tmp_path / "adapter"))
    assert files - {"README.md"} == {"adapter_model.safetensors", "adapter_config.json"}, files
    reloaded = PeftModel.from_pretrained(MIVCForConditionalGeneration.from_pretrained(tmp_path / "base"),
                                         tmp_path / "adapter")
    model.eval()
    with torch.no_grad():
        expected = model(**batch).logits
        assert torch.equal(reloaded(**batch).logits, expected)

    prompts = processor(images=[i for i, _ in items], text=[PROMPT] * len(items))
    length = prompts["input_ids"].shape[1]
    generated = model.generate(**prompts, max_new_tokens=3, do_sample=False)
    assert generated.shape[0] == len(items) and length < generated.shape[1] <= length + 3
    assert torch.equal(generated[:, :length], prompts["input_ids"])
    assert torch.equal(reloaded.generate(**prompts, max_new_tokens=3, do_sample=False), generated)
    with torch.no_grad():  # greedy: the first new token is the argmax of the adapted model's next-token logits
        first = model(**prompts).logits[:, -1].argmax(-1)
    assert torch.equal(generated[:, length], first)


def test_codebook_copy_trained_through_modules_to_save_gets_no_weight_decay(tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import TrainingArguments

    from vlalign import CODISModel
    from vlalign.trainer import ContrastiveTrainer

    model = get_peft_model(CODISModel(tiny_codis_config()), LoraConfig(
        r=2, target_modules=r"(vision_model|text_model)\..*\.(query|value)", modules_to_save=["itm_head", "codebook"]))
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=4, report_to="none",
                             remove_unused_columns=False, use_cpu=True)
    trainer = ContrastiveTrainer(model=model, args=args, train_dataset=[0] * 8)
    names = trainer.get_decay_parameter_names(model)
    trained_codebook = [n for n, p in model.named_parameters() if "codebook" in n and p.requires_grad]
    assert trained_codebook and not set(trained_codebook) & set(names)
    assert any("itm_head.modules_to_save" in n for n in names)  # other modules_to_save keep their decay
