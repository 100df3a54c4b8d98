"""PEFT / LoRA, what is specific to it: which `target_modules` patterns work with the EMA teachers (a name list
that also adapts the `momentum_*` teachers is refused with the fix; `exclude_modules` or no teachers make it work),
the codebook trained through `modules_to_save` gets no weight decay, and LoRA on MIVC's language model (trains,
saves, loads, generates); training/train.py --lora_r (adapters only saved, base weights untouched, the adapters on
the base reproduce the run's embeddings and metrics, the trainable set per model type, exact MIVC resume, and bad
settings refused before training). Tiny random models, nothing is downloaded.

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


# ----------------------------------------------------------------------------------------------------------------
# training/train.py --lora_r: a tiny saved base model, adapted from the command line; the run saves the adapters only

ALBEF_LORA_TRAINED = {"tcl": {"itm_head"}, "codis": {"itm_head", "codebook"}}


def _train_module():
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "training"))
    import train

    return train


def _save_albef_base(model_type: str, folder):
    """A randomly initialised TCL / CODIS model and the digits processor, saved as train.py would save a run's model
    (the stand-in for a pretrained base: nothing is downloaded)."""
    from fixtures import TINY_TRAIN_MODEL

    from vlalign.data import build_digits_processor

    train = _train_module()
    processor = build_digits_processor(image_size=16)
    section = {k: v for k, v in TINY_TRAIN_MODEL.items() if model_type == "tcl" or k != "lmi_image_grid"}
    extra = {"codebook_size": 8} if model_type == "codis" else {}
    torch.manual_seed(0)
    model = train.build_model(train.RunArguments(), {**section, **extra, "model_type": model_type}, processor.tokenizer)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


ALBEF_DATA = {"max_train_samples": 32, "max_eval_samples": 16}
MIVC_DATA = {"num_train_items": 24, "num_test_items": 8, "image_size": 16}


def _lora_config_file(tmp_path, base, data=None, **training):
    import yaml

    config = {
        "data": data or ALBEF_DATA,
        "training": {
            "output_dir": str(tmp_path / "out"),
            "max_steps": 3,
            "per_device_train_batch_size": 8,
            "save_strategy": "no",
            "use_cpu": True,
            "learning_rate": 1e-2,
            **training,
        },
        "run": {"model_name_or_path": str(base), "cpu_threads": 1},
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _capture(monkeypatch, module, name, store):
    """Wrap `module.name` to keep its arguments and result in `store`."""
    original = getattr(module, name)

    def wrapper(*args, **kwargs):
        store[name] = (args, kwargs, original(*args, **kwargs))
        return store[name][2]

    monkeypatch.setattr(module, name, wrapper)


def _without_peft_names(name: str) -> str:
    return name.removeprefix("base_model.model.").replace(".base_layer.", ".").replace(".original_module.", ".")


@pytest.mark.parametrize("model_type", ["tcl", "codis"])
def test_train_script_lora_saves_adapters_that_reproduce_the_run_on_its_base(model_type, tmp_path, monkeypatch):
    import json

    from huggingface_hub import ModelCard

    from vlalign import AutoModel
    from vlalign.evaluation import embed_images, embed_texts, eval_mode
    from vlalign.hub import publishable_files

    train = _train_module()
    base = _save_albef_base(model_type, tmp_path / "base")
    base_bytes = (base / "model.safetensors").read_bytes()
    seen: dict = {}
    _capture(monkeypatch, train, "_apply_lora", seen)
    _capture(monkeypatch, train, "evaluate_model", seen)
    results = train.main(["--config", str(_lora_config_file(tmp_path, base)), "--lora_r", "4", "--lora_alpha", "8"])
    trained = seen["_apply_lora"][2]
    out = tmp_path / "out"

    # the adapters only (no full model), with the processor and card; the push takes the adapter files
    files = set(os.listdir(out))
    assert {"adapter_model.safetensors", "adapter_config.json", "processor_config.json", "README.md"} <= files
    assert not files & {"model.safetensors", "config.json"}, files
    assert {"adapter_model.safetensors", "adapter_config.json"} <= set(publishable_files(out))
    adapter_config = json.loads((out / "adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] == str(base)
    assert (adapter_config["r"], adapter_config["lora_alpha"]) == (4, 8)
    assert set(adapter_config["modules_to_save"]) == ALBEF_LORA_TRAINED[model_type]

    # trained: LoRA on the students' attention and projections, the ITM head (+ codebook) whole; nothing else
    trainable = {n for n, p in trained.named_parameters() if p.requires_grad}
    for name in trainable:
        assert ".lora_" in name or ".modules_to_save." in name, name
        assert not _without_peft_names(name).startswith("momentum_"), name
    lora_at = {_without_peft_names(n).split(".lora_")[0] for n in trainable if ".lora_" in n}
    assert {"vision_proj", "text_proj"} <= lora_at
    for tower in ("vision_model", "text_model", "fusion_model"):
        assert any(n.startswith(f"{tower}.") and n.endswith(("query", "value", "q_proj", "v_proj")) for n in lora_at)
    assert all(
        n.rsplit(".", 1)[-1] in ("query", "value", "q_proj", "v_proj", "vision_proj", "text_proj") for n in lora_at
    )
    saved_whole = {_without_peft_names(n).split(".")[0] for n in trainable if ".modules_to_save." in n}
    assert saved_whole == ALBEF_LORA_TRAINED[model_type]

    # the base weights are the base's, bit for bit (the EMA teachers move: they follow base + LoRA)
    assert (base / "model.safetensors").read_bytes() == base_bytes
    base_model = AutoModel.from_pretrained(base)
    base_params = dict(base_model.named_parameters())
    after = {
        _without_peft_names(n): p
        for n, p in trained.named_parameters()
        if ".lora_" not in n and ".modules_to_save." not in n
    }
    students = [n for n in base_params if not n.startswith("momentum_")]
    assert students and all(torch.equal(after[n], base_params[n]) for n in students)
    assert not all(torch.equal(after[n], base_params[n]) for n in base_params if n.startswith("momentum_"))

    # the adapters on the base reproduce the run's model: embeddings equal, the evaluation's metrics equal
    reloaded = PeftModel.from_pretrained(AutoModel.from_pretrained(base), out)
    args, kwargs, run_metrics = seen["evaluate_model"]
    processor, eval_inputs = args[1], args[2]
    with eval_mode(trained), eval_mode(reloaded):
        for embed, inputs in ((embed_images, eval_inputs.images), (embed_texts, eval_inputs.texts)):
            expected = embed(trained, processor, inputs)
            assert torch.equal(embed(reloaded, processor, inputs), expected)
            assert not torch.equal(embed(base_model.eval(), processor, inputs), expected)  # the run changed them
    again = train.evaluate_model(reloaded, *args[1:], **{k: v for k, v in kwargs.items() if k != "image_embeds"})
    assert again == run_metrics and {k: results[k] for k in run_metrics} == run_metrics
    # and `python -m vlalign.evaluate` on the adapter folder (its base found from adapter_config.json) gives them too
    from vlalign.evaluate import main as evaluate

    evaluate(["--model", str(out), "--max_samples", str(ALBEF_DATA["max_eval_samples"]), "--no_progress",
              "--batch_size", str(kwargs["batch_size"]), "--output", str(tmp_path / "evaluation.json")])  # fmt: skip
    measured = json.loads((tmp_path / "evaluation.json").read_text())["models"][str(out)]
    assert {k: measured[k] for k in run_metrics} == run_metrics

    card = ModelCard.load(out / "README.md")
    assert "| lora\\_r | 4 |" in card.content and "| lora\\_alpha | 8 |" in card.content


def _save_mivc_base(folder):
    from fixtures import TINY_TRAIN_MIVC

    from vlalign.data import build_mivc_digits_processor

    train = _train_module()
    processor = build_mivc_digits_processor(image_seq_length=1, image_size=16)
    torch.manual_seed(0)
    model = train.build_mivc_model(train.RunArguments(), TINY_TRAIN_MIVC, processor.tokenizer, processor.image_token_id)
    processor.image_seq_length = model.config.image_seq_length
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def _safetensors(path):
    from safetensors.torch import load_file

    return load_file(str(path))


def test_train_script_lora_on_mivc_adapts_the_language_model_and_reloads_exactly(tmp_path, monkeypatch):
    from vlalign import MIVCForConditionalGeneration
    from vlalign.evaluation import eval_mode

    train = _train_module()
    base = _save_mivc_base(tmp_path / "base")
    seen: dict = {}
    _capture(monkeypatch, train, "_apply_lora", seen)
    _capture(monkeypatch, train, "evaluate_mivc", seen)
    config = _lora_config_file(tmp_path, base, MIVC_DATA, learning_rate=1e-3)
    results = train.main(["--config", str(config), "--lora_r", "4"])
    trained, out = seen["_apply_lora"][2], tmp_path / "out"
    assert {"adapter_model.safetensors", "adapter_config.json"} <= set(os.listdir(out))
    assert not (out / "model.safetensors").exists()

    # LoRA on the language model's q_proj / v_proj only (not the ViT's), projector and pooling trained whole
    trainable = {_without_peft_names(n) for n, p in trained.named_parameters() if p.requires_grad}
    lora_at = {n.split(".lora_")[0] for n in trainable if ".lora_" in n}
    assert lora_at and all(n.startswith("language_model.") and n.endswith(("q_proj", "v_proj")) for n in lora_at)
    assert {n.split(".")[0] for n in trainable if ".modules_to_save." in n} == set(MIVC_MODULES_TO_SAVE)
    assert all(".lora_" in n or ".modules_to_save." in n for n in trainable)

    reloaded = PeftModel.from_pretrained(MIVCForConditionalGeneration.from_pretrained(base), out)
    args, kwargs, run_metrics = seen["evaluate_mivc"]
    _, processor, dataset, collator = args
    batch = collator([dataset[i] for i in range(4)])
    batch = {k: v for k, v in batch.items() if isinstance(v, torch.Tensor)}
    with eval_mode(trained), eval_mode(reloaded), torch.no_grad():
        assert torch.equal(reloaded(**batch).logits, trained(**batch).logits)
    assert train.evaluate_mivc(reloaded, *args[1:], **kwargs) == run_metrics
    assert {k: results[k] for k in run_metrics} == run_metrics


def test_train_script_lora_resumes_mivc_exactly_and_refuses_to_resume_tcl(tmp_path):
    """An MIVC checkpoint under LoRA holds everything that trains (adapters, projector, pooling): a resumed run ends
    with the adapters of an uninterrupted one. A TCL one lacks the EMA teachers and queues: refused, saying why."""
    train = _train_module()
    base = _save_mivc_base(tmp_path / "base")
    config = _lora_config_file(
        tmp_path, base, MIVC_DATA, max_steps=4, save_strategy="steps", save_steps=2, learning_rate=1e-3
    )
    train.main(["--config", str(config), "--lora_r", "4"])
    out = tmp_path / "out"
    uninterrupted = _safetensors(out / "adapter_model.safetensors")
    assert set(os.listdir(out / "checkpoint-2")) >= {"adapter_model.safetensors", "adapter_config.json"}
    train.main(["--config", str(config), "--lora_r", "4", "--resume_from_checkpoint", str(out / "checkpoint-2")])
    resumed = _safetensors(out / "adapter_model.safetensors")
    assert resumed.keys() == uninterrupted.keys()
    assert all(torch.equal(resumed[k], uninterrupted[k]) for k in resumed)
    assert not all(
        torch.equal(resumed[k], _safetensors(out / "checkpoint-2/adapter_model.safetensors")[k]) for k in resumed
    )

    tcl = _lora_config_file(tmp_path / "tcl", _save_albef_base("tcl", tmp_path / "tcl" / "base"))
    with pytest.raises(SystemExit, match=r"TCL checkpoint under LoRA holds the adapters only, not the EMA teachers"):
        train.main(["--config", str(tcl), "--lora_r", "4", "--resume_from_checkpoint", str(out / "checkpoint-2")])


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--lora_r", "-2"], r"run.lora_r = -2: the adapters' rank must be positive"),
        (["--lora_r", "4", "--lora_alpha", "0"], r"run.lora_alpha = 0: must be a positive number"),
        (["--lora_r", "4", "--lora_dropout", "1.5"], r"run.lora_dropout = 1.5: must be in \[0, 1\)"),
        (
            ["--lora_r", "4", "--lora_target_modules", "query,qeury"],
            r"run.lora_target_modules: \[.qeury.\] name no module of the TCL model \(its linear layers are named",
        ),
        (["--lora_r", "4", "--lora_target_modules", r"'nothing\..*'"], r"the regex matches no module name"),
        (
            ["--lora_r", "4", "--lora_modules_to_save", "vision_proj"],
            r"'vision_proj' also names the EMA teacher 'momentum_vision_proj'",
        ),
        (["--lora_r", "4", "--lora_modules_to_save", "[no_such_head]"], r"'no_such_head' names no module"),
        (["--lora_r", "4", "--model_name_or_path", "null"], r"LoRA adapts a saved vlalign model.*randomly initialised"),
        (
            ["--lora_r", "4", "--model_name_or_path", "null", "--vision_model_name_or_path", "v"],
            r"to start from run.vision_model_name_or_path, save the model built from them first",
        ),
    ],
)
def test_train_script_refuses_bad_lora_settings_before_training(argv, message, tmp_path):
    train = _train_module()
    config = _lora_config_file(tmp_path, _save_albef_base("tcl", tmp_path / "base"))
    with pytest.raises(SystemExit, match=message):
        train.main(["--config", str(config), *argv])
    assert not (tmp_path / "out").exists()  # nothing trained or written


def test_train_script_lora_names_given_as_a_list_adapt_the_students_only(tmp_path, monkeypatch):
    """`--lora_target_modules query,value` matches by suffix, which would take the teachers `momentum_*` too: they
    are excluded."""
    from peft.tuners.lora import LoraLayer

    train = _train_module()
    seen: dict = {}
    _capture(monkeypatch, train, "_apply_lora", seen)
    config = _lora_config_file(tmp_path, _save_albef_base("tcl", tmp_path / "base"), max_steps=1)
    train.main(["--config", str(config), "--lora_r", "2", "--lora_target_modules", "query,value"])
    adapted = {_without_peft_names(n) for n, m in seen["_apply_lora"][2].named_modules() if isinstance(m, LoraLayer)}
    assert adapted and not any(n.startswith("momentum_") for n in adapted)
    assert {n.rsplit(".", 1)[-1] for n in adapted} == {"query", "value"}


def test_train_script_lora_without_peft_installed_says_how_to_install_it(tmp_path, monkeypatch):
    import sys

    train = _train_module()
    config = _lora_config_file(tmp_path, _save_albef_base("tcl", tmp_path / "base"))
    monkeypatch.setitem(sys.modules, "peft", None)  # `import peft` raises ImportError
    with pytest.raises(SystemExit, match=r"LoRA needs peft, an optional extra: pip install 'vlalign\[peft\]'"):
        train.main(["--config", str(config), "--lora_r", "4"])
