"""PEFT / LoRA, what is specific to it: which `target_modules` patterns work with the EMA teachers (a name list
that also adapts the `momentum_*` teachers is refused with the fix; `exclude_modules` or no teachers make it work),
the codebook trained through `modules_to_save` gets no weight decay, and LoRA on MIVC's language model (trains,
saves, loads, generates). Tiny random models, nothing is downloaded.

What every ALBEF-style model must do under LoRA -- only the adapters (and the chosen `modules_to_save`) train; a few
optimizer steps lower the loss and leave every base weight bitwise unchanged; the EMA teachers follow the students'
*effective* weights (base + LoRA delta) exactly, `copy_params_to_momentum()` copies them; `save_pretrained` writes
the adapters only and the reload reproduces the outputs bit for bit -- runs for TCL and CODIS through
`ALBEFModelTesterMixin` (albef_model_tester.py, test_modeling_tcl.py, test_modeling_codis.py).
"""

import os

import pytest
import torch
from albef_model_tester import PEFT_WARNING_FILTER, randomize_weights
from fixtures import (
    MIVC_DIGITS_IMAGE_TOKEN_ID,
    MIVC_DIGITS_LLAMA,
    MIVC_DIGITS_VISION,
    mivc_digits_tokenizer,
    tiny_batch,
    tiny_codis_config,
    tiny_tcl_config,
)

peft = pytest.importorskip("peft")
from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402
from peft.tuners.lora import LoraLayer  # noqa: E402

from vlalign import CODISModel, TCLModel  # noqa: E402

MODELS = {"tcl": (TCLModel, tiny_tcl_config), "codis": (CODISModel, tiny_codis_config)}
STEPS = 6
pytestmark = pytest.mark.filterwarnings(PEFT_WARNING_FILTER)
LR = 1e-2


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models run faster on one intra-op thread (and the results do not depend on the thread count)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _base_model(kind, **overrides):
    model_class, make_config = MODELS[kind]
    torch.manual_seed(0)
    return randomize_weights(model_class(make_config(**overrides)))


def _snapshot(model):
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def test_lora_on_the_teachers_is_refused_with_a_fix():
    """A list of names matches by suffix: ["query", "value"] also adapts `momentum_text_model` etc. The first
    training step refuses it (before, the EMA paired parameter lists by position) and says what to do."""
    model = get_peft_model(_base_model("tcl"), LoraConfig(target_modules=["query", "value"], r=4))
    assert any("momentum_" in n for n, m in model.named_modules() if isinstance(m, LoraLayer))
    with pytest.raises(ValueError, match=r"momentum_text_model.*exclude_modules"):
        model(**tiny_batch(), return_loss=True)


def test_name_list_with_exclude_modules_adapts_the_students_only():
    model = get_peft_model(
        _base_model("codis"),
        LoraConfig(
            target_modules=["query", "value", "q_proj", "v_proj"],
            exclude_modules=r"momentum_.*",
            r=4,
            modules_to_save=["codebook"],
        ),
    )
    adapted = [n for n, m in model.named_modules() if isinstance(m, LoraLayer)]
    assert adapted and not any("momentum_" in n for n in adapted)
    out = model(**tiny_batch(), return_loss=True)
    out.loss.backward()
    assert torch.isfinite(out.loss)


def test_lora_without_momentum_teachers_takes_plain_name_lists():
    model = get_peft_model(
        _base_model("tcl", use_momentum=False, itm_weight=0.0, mlm_weight=0.0),
        LoraConfig(
            target_modules=["query", "value", "q_proj", "v_proj"], r=4, modules_to_save=["vision_proj", "text_proj"]
        ),
    )
    out = model(**tiny_batch(), return_loss=True)
    out.loss.backward()
    assert model.base_model.model.vision_proj.modules_to_save["default"].weight.grad is not None


# ----------------------------------------------------------------------------------------------------------------
# MIVC: LoRA on the language model's attention, projector and pooling trained, vision encoder frozen (config flags)

MIVC_TARGETS = r"language_model\..*\.(q_proj|v_proj)"  # a regex: transformers' ViT also names its layers q_proj
MIVC_MODULES_TO_SAVE = ["projector", "pooling"]  # what the freeze flags leave trainable (no Q-Former here)
PROMPT = "<image> which digit?"


def _mivc_model_and_processor():
    from PIL import Image
    from transformers import ViTImageProcessorPil

    from vlalign import MIVCConfig, MIVCForConditionalGeneration, MIVCProcessor

    tok = mivc_digits_tokenizer()
    config = MIVCConfig(
        vision_config=dict(MIVC_DIGITS_VISION),
        text_config=dict(MIVC_DIGITS_LLAMA),
        image_token_id=MIVC_DIGITS_IMAGE_TOKEN_ID,
        pooling_mode="attention",
        pooling_attention_dim=16,
    )  # default flags: vision + LM frozen
    torch.manual_seed(0)
    model = MIVCForConditionalGeneration(config)
    image_processor = ViTImageProcessorPil(size={"height": 32, "width": 32}, image_mean=[0.5] * 3, image_std=[0.5] * 3)
    processor = MIVCProcessor(image_processor=image_processor, tokenizer=tok, image_seq_length=config.image_seq_length)

    def images(*colours):
        return [Image.new("RGB", (32, 32), c) for c in colours]

    items = [(images("white"), "one"), (images("black"), "two"), (images("white", "black"), "three")]
    return model, processor, items


@pytest.mark.parametrize("task_type", [None, "CAUSAL_LM"])
def test_mivc_lora_on_the_language_model_trains_saves_loads_and_generates(task_type, tmp_path):
    from vlalign import MIVCForConditionalGeneration

    base, processor, items = _mivc_model_and_processor()
    base.save_pretrained(tmp_path / "base")
    model = get_peft_model(
        base,
        LoraConfig(
            target_modules=MIVC_TARGETS, r=4, lora_alpha=8, modules_to_save=MIVC_MODULES_TO_SAVE, task_type=task_type
        ),
    )
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
    reloaded = PeftModel.from_pretrained(
        MIVCForConditionalGeneration.from_pretrained(tmp_path / "base"), tmp_path / "adapter"
    )
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

    model = get_peft_model(
        CODISModel(tiny_codis_config()),
        LoraConfig(
            r=2,
            target_modules=r"(vision_model|text_model)\..*\.(query|value)",
            modules_to_save=["itm_head", "codebook"],
        ),
    )
    args = TrainingArguments(
        output_dir=str(tmp_path),
        per_device_train_batch_size=4,
        report_to="none",
        remove_unused_columns=False,
        use_cpu=True,
    )
    trainer = ContrastiveTrainer(model=model, args=args, train_dataset=[0] * 8)
    names = trainer.get_decay_parameter_names(model)
    trained_codebook = [n for n, p in model.named_parameters() if "codebook" in n and p.requires_grad]
    assert trained_codebook and not set(trained_codebook) & set(names)
    assert any("itm_head.modules_to_save" in n for n in names)  # other modules_to_save keep their decay
