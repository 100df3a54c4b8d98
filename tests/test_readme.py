"""The README stays true: every fenced code block of README.md is run or checked here.

- ```python blocks run in a subprocess whose working directory is a workspace that the `workspace` fixture fills
  with what the README refers to: tiny random TCL / CODIS / MIVC models saved with their processors to the demos'
  output folders (`outputs/tcl_digits`, ...), small digit images (`digit.png`, `scan_0.png` ...), the shards and
  the `pairs/` folder the data examples name, `my.yaml` (a copy of the demo config, as the README suggests), and a
  local Hugging Face cache, used offline, in which the Hub ids the README names (`bert-base-uncased`,
  `you/tcl-digits`, ...) are tiny random models. The blocks run unchanged, each in a fresh namespace, in README
  order; a block that imports nothing from vlalign runs where `import vlalign` fails (so it must work without
  the package, as the README says). Some blocks are followed by a check of what their comments claim (CHECKS).
- ```bash blocks pass `bash -n`; every command in them is recognised: `pip install` (requirements parse, extras
  exist, the torch pin matches the installed torch), `python -m pytest tests`, `export`, `python -m vlalign.evaluate`
  (its arguments parse), and `accelerate launch
  ... training/train.py ...`, whose launcher arguments go through accelerate's own parser and whose training
  arguments through train.py's config reader (known sections, known fields, values accepted by the config classes).
  Commands on your own data (`--config my.yaml --dataset_name ...`) also train for 2 steps here; the demos (minutes
  each), multi-GPU launches and the Hub push are checked only.
- ```yaml blocks go through train.py's config reader and field check, and train for 2 steps merged into `my.yaml`
  (their `data` section replaces its own, their `training` / `run` keys are added) on the shards they name.
- Links and repository paths named in the README exist; nothing outside the repository is referred to.
"""

from __future__ import annotations

import ast
import io
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tarfile
import textwrap
import warnings
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from fixtures import BLOCK_VLALIGN

REPO = Path(__file__).resolve().parent.parent
README = REPO / "README.md"
sys.path.insert(0, str(REPO / "training"))

# What README.md holds: a block added or removed must be reflected here (so that no block goes unchecked silently).
EXPECTED_BLOCKS = {"python": 11, "bash": 15, "yaml": 2}
EXPECTED_COMMANDS = {
    "pip": 2,
    "pytest": 1,
    "export": 1,
    "scenes": 1,
    "evaluate": 2,
    "train_checked": 17,
    "train_run": 2,
}
EXPECTED_WITHOUT_VLALIGN = 1  # Python blocks that import nothing from vlalign (the trust_remote_code example)

# Steps and sizes that turn a README training command or config into a 2-step run here (appended overrides).
SHORT_RUN = [
    "--max_steps",
    "2",
    "--per_device_train_batch_size",
    "8",
    "--logging_steps",
    "1",
    "--eval_batch_size",
    "16",
]
MY_YAML = "my.yaml"  # the README's name for the reader's own config (here a copy of the TCL demo config)

# Claims in the comments of Python blocks, checked after the block in its namespace; keyed by a string that must
# occur in exactly one block.
CHECKS = {
    'AutoModel.from_pretrained("outputs/tcl_digits")': """
        assert out.logits_per_image.shape == (1, 2)
        assert torch.allclose(image_embeds.norm(dim=-1), torch.ones(1), atol=1e-5)   # L2-normalised
        assert torch.allclose(text_embeds.norm(dim=-1), torch.ones(2), atol=1e-5)
        assert match.shape == (1,) and 0 <= float(match) <= 1   # a probability per pair
    """,
    'AutoModel.from_pretrained("you/tcl-digits", trust_remote_code=True)': """
        assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
        assert type(classifier.model).__module__.startswith("transformers_modules")
    """,
    "TCLModel.from_vision_text_pretrained(": """
        assert model.config.num_fusion_layers == 6 and model.config.lmi_image_grid == 7
        assert model.config.queue_size == 65536
    """,
    "model.get_codes(": """
        K = model.config.codebook_size
        assert codes.image_codes.shape == (len(images),) and codes.text_codes.shape == (len(texts),)
        assert codes.image_code_probs.shape == (len(images), K) and codes.text_code_probs.shape == (len(texts), K)
        assert torch.allclose(model.codewords.norm(dim=-1), torch.ones(K), atol=1e-5)
    """,
    "model.generate(**inputs": """
        prompt = "<image> Which digit do these scans show?"
        assert pipe.processor.apply_chat_template(messages, add_generation_prompt=True) == prompt
        by_prompt = pipe(images=scans[:2], text=prompt, max_new_tokens=4, return_full_text=False)
        assert chat[0]["generated_text"][-1]["content"] == by_prompt[0]["generated_text"]
        assert inputs["pixel_values"].shape[:2] == (2, 3) and inputs["image_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
        assert image_weights.shape[:2] == (2, 3)
        assert torch.allclose(image_weights.sum(1), torch.ones(()), atol=1e-5)   # weights over an item's images
        assert bool((image_weights[1, 2] == 0).all())                             # the padded slot counts nothing
    """,
    "vlalign.MIVCPooling(": """
        from transformers.utils import ModelOutput
        assert isinstance(out, ModelOutput) and not isinstance(out, tuple)
        assert out.pooled_features.shape == (2, 16, 64) and out.image_weights.shape == (2, 3, 16)
        assert bool((out.image_weights[1, 2] == 0).all())
    """,
    "from_pretrained_components(": """
        from PIL import Image
        assert model.config.pooling_mode == "attention"
        assert model.config.image_token_id == tokenizer.convert_tokens_to_ids("<image>")
        batch = processor(images=[[Image.open("scan_0.png"), Image.open("scan_1.png")]],
                          text=["<image> Which digit do these scans show?"], answers=["three"])
        assert model(**batch).loss.isfinite()
    """,
    "get_peft_model(": """
        adapted = [name for name, _ in model.named_parameters() if "lora_" in name]
        assert adapted and not any("momentum_" in name for name in adapted), adapted[:5]
    """,
    'PeftModel.from_pretrained(base, "outputs/tcl_digits_lora")': """
        import torch
        assert image_embeds.shape == (1, base.config.embed_dim)
        assert torch.allclose(merged.get_image_features(pixel_values=pixel_values), image_embeds, atol=1e-5)
    """,
    "evaluate.load(RETRIEVAL_METRIC_PATH)": """
        for k in (1, 5, 10):
            assert 0 <= results[f"i2t_recall@{k}"] <= 100 and 0 <= results[f"t2i_recall@{k}"] <= 100
        assert results["i2t_num_queries"] == 8 and results["t2i_num_queries"] == 16
    """,
}


@dataclass
class Block:
    language: str
    code: str
    line: int  # line of the opening fence in README.md

    @property
    def name(self) -> str:
        return f"README.md:{self.line} ({self.language})"


def readme_blocks() -> list[Block]:
    text = README.read_text(encoding="utf-8")
    blocks = []
    for match in re.finditer(r"^```([^\n`]*)\n(.*?)^```[ \t]*$", text, flags=re.MULTILINE | re.DOTALL):
        blocks.append(Block(match.group(1).strip(), match.group(2), text.count("\n", 0, match.start()) + 1))
    return blocks


BLOCKS = readme_blocks()
PYTHON_BLOCKS = [b for b in BLOCKS if b.language == "python"]
BASH_BLOCKS = [b for b in BLOCKS if b.language == "bash"]
YAML_BLOCKS = [b for b in BLOCKS if b.language == "yaml"]


def _ids(blocks):
    return [f"line{b.line}" for b in blocks]


# ------------------------------------------------------------------------------------------------- shell commands


@dataclass
class Command:
    block: Block
    text: str  # one command, continuation lines joined
    argv: list[str]

    @property
    def kind(self) -> str:
        head = self.argv[:3]
        if head[:2] == ["pip", "install"]:
            return "pip"
        if head == ["python", "-m", "pytest"]:
            return "pytest"
        if head[:1] == ["export"]:
            return "export"
        if head == ["python", "-m", "vlalign.data.digit_scenes"]:
            return "scenes"
        if head == ["python", "-m", "vlalign.evaluate"]:
            return "evaluate"
        if head[:2] == ["accelerate", "launch"]:
            return "train_run" if self.runs_here else "train_checked"
        return "unknown"

    @property
    def train_args(self) -> list[str]:
        """The arguments after training/train.py."""
        return self.argv[self.argv.index("training/train.py") + 1 :]

    @property
    def runs_here(self) -> bool:
        """Training on your own data (`--config my.yaml --dataset_name ...`) is cheap with tiny data: run it."""
        args = self.train_args
        return "--dataset_name" in args and _option(args, "--config") == MY_YAML


def _option(argv: list[str], name: str) -> str | None:
    return argv[argv.index(name) + 1] if name in argv and argv.index(name) + 1 < len(argv) else None


def shell_commands(block: Block) -> list[Command]:
    joined = re.sub(r"\\\n", " ", block.code)
    commands = []
    for line in joined.splitlines():
        for part in re.split(r"\s&&\s", line):
            argv = shlex.split(part, comments=True)
            if argv:
                commands.append(Command(block, part.strip(), argv))
    return commands


COMMANDS = [c for b in BASH_BLOCKS for c in shell_commands(b)]


def test_readme_inventory():
    """The README has the blocks this file knows of, and every shell command is one it can check."""
    counts = {}
    for block in BLOCKS:
        counts[block.language] = counts.get(block.language, 0) + 1
    assert counts == EXPECTED_BLOCKS, f"README code blocks changed: {counts} (update EXPECTED_BLOCKS and the checks)"
    unknown = [c.text for c in COMMANDS if c.kind == "unknown"]
    assert not unknown, f"shell commands this test cannot check: {unknown}"
    kinds = {}
    for command in COMMANDS:
        kinds[command.kind] = kinds.get(command.kind, 0) + 1
    assert kinds == EXPECTED_COMMANDS
    assert sum(map(_without_vlalign, PYTHON_BLOCKS)) == EXPECTED_WITHOUT_VLALIGN
    for anchor in CHECKS:
        holders = [b.line for b in PYTHON_BLOCKS if anchor in b.code]
        assert len(holders) == 1, f"CHECKS key {anchor!r} is in blocks at lines {holders}, expected exactly one"


def test_readme_set_up_commands():
    """The fresh-machine set-up runs the main demo and the tests, in that section."""
    text = README.read_text(encoding="utf-8")
    section = text[text.index("## Set-up on a fresh machine") :]
    section = section[: section.index("\n## ", 1)]
    assert (
        "pip install torch==2.13.0 -e . && accelerate launch --config_file training/accelerate/default.yaml "
        "training/train.py --config training/configs/tcl_digits.yaml"
    ) in section
    assert 'pip install torch==2.13.0 -e ".[dev]" && python -m pytest tests' in section


@pytest.mark.parametrize("block", BASH_BLOCKS, ids=_ids(BASH_BLOCKS))
def test_bash_block_parses(block):
    proc = subprocess.run(["bash", "-n"], input=block.code, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, f"{block.name}: bash -n: {proc.stderr}"


def _check_repo_paths(command: Command) -> None:
    for token in command.argv:
        if re.match(r"^(training|tests|benchmarks|model_cards|src)(/|$)", token):
            assert (REPO / token).exists(), f"{command.block.name}: {command.text!r} names {token}, not in the repo"


def _check_pip(command: Command) -> None:
    import tomllib
    from packaging.requirements import Requirement
    from packaging.version import Version

    args = command.argv[2:]
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"].get("optional-dependencies", {})
    editable = [args[i + 1] for i, a in enumerate(args) if a == "-e"]
    assert editable, f"{command.text!r}: expected an editable install of the package (-e .)"
    for target in editable:
        match = re.fullmatch(r"\.(?:\[([\w,-]+)\])?", target)
        assert match, f"{command.text!r}: -e {target}: not this repository"
        for extra in filter(None, (match.group(1) or "").split(",")):
            assert extra in extras, f"{command.text!r}: extra [{extra}] not in pyproject.toml ({sorted(extras)})"
    for arg in args:
        if arg == "-e" or arg in editable:
            continue
        requirement = Requirement(arg)
        if requirement.name == "torch":
            import torch

            installed = Version(torch.__version__)
            assert requirement.specifier.contains(installed, prereleases=True), (
                f"{command.text!r}: the README's torch pin does not match the tested torch {installed}"
            )


def _accelerate_args(command: Command):
    from accelerate.commands.launch import launch_command_parser

    args = launch_command_parser().parse_args(command.argv[2:])
    assert args.training_script == "training/train.py", command.text
    if args.config_file:
        assert (REPO / args.config_file).is_file(), f"{command.text!r}: no accelerate config {args.config_file}"
    return args


def check_train_config(config_path: Path, overrides: list[str]) -> dict:
    """What train.py does with a config before training: read it (known sections), apply the overrides, and build
    every section's arguments (unknown fields and invalid values are refused)."""
    import train

    from vlalign.data import DataArguments, MIVCDataArguments
    from vlalign.trainer import ContrastiveTrainingArguments, VLAlignTrainingArguments

    config = train.load_config(str(config_path), train.parse_overrides(overrides))
    fields = train._section_fields()
    for section, values in config.items():
        unknown = set(values or {}) - fields[section]
        assert not unknown, f"{config_path}: unknown {section} fields {sorted(unknown)}"
    model = dict(config.get("model") or {})
    model_type = model.pop("model_type", "tcl")
    configs = train._model_configs()
    assert model_type in configs, model_type
    kwargs = {k: model.pop(k) for k in ("vision_config", "text_config", "qformer_config") if k in model}
    if (config.get("run") or {}).get("dual_encoder_name_or_path"):
        # the towers and their structure come from the checkpoint: a CLIP ViT-B/32's, as from_dual_encoder_pretrained
        # would build them (the default towers' patch grid is another)
        kwargs = dict(
            vision_config=dict(model_type="clip_vision_model", image_size=224, patch_size=32),
            text_config=dict(model_type="clip_text_model"),
            num_fusion_layers=0,
            itm_weight=0.0,
            mlm_weight=0.0,
            embed_dim=512,
            projection="linear_no_bias",
            dual_encoder_source="clip",
        )
    configs[model_type](**kwargs, **model)
    train.RunArguments(**(config.get("run") or {}))
    data_class = MIVCDataArguments if model_type == "mivc" else DataArguments
    data_class(**(config.get("data") or {}))
    arguments_class = VLAlignTrainingArguments if model_type == "mivc" else ContrastiveTrainingArguments
    arguments_class(**{"output_dir": "outputs/readme-check", **(config.get("training") or {})})
    return config


@pytest.mark.parametrize("command", COMMANDS, ids=[f"line{c.block.line}-{i}" for i, c in enumerate(COMMANDS)])
def test_shell_command_is_valid(command, tmp_path, request, monkeypatch):
    _check_repo_paths(command)
    if command.kind.startswith("train") and "--model_name_or_path" in command.train_args:
        monkeypatch.chdir(request.getfixturevalue("workspace"))  # the saved model it continues from is there
    if command.kind == "pip":
        _check_pip(command)
    elif command.kind == "pytest":
        assert (REPO / command.argv[3]).is_dir()
    elif command.kind == "export":
        assert re.fullmatch(r"[A-Z_][A-Z0-9_]*=.*", command.argv[1]), command.text
    elif command.kind == "scenes":  # runs with its own arguments, at a small size
        from vlalign.data.digit_scenes import main as write_scenes

        out = tmp_path / command.argv[3]
        write_scenes([str(out), *command.argv[4:], "--train_size", "6", "--validation_size", "2", "--test_size", "3"])
        assert len((out / "train" / "metadata.jsonl").read_text().splitlines()) == 6
        assert (out / "processor" / "processor_config.json").is_file()
    elif command.kind == "evaluate":  # the arguments parse (the models it names are trained by the demos)
        from vlalign.evaluate import parse_args

        args = parse_args(command.argv[3:])
        assert args.model, command.text
    elif command.kind.startswith("train"):
        _accelerate_args(command)
        args = command.train_args
        config = _option(args, "--config")
        assert config, f"{command.text!r}: no --config"
        path = REPO / "training/configs/tcl_digits.yaml" if config == MY_YAML else REPO / config
        assert path.is_file(), f"{command.text!r}: no config {config}"
        rest = args[: args.index("--config")] + args[args.index("--config") + 2 :]
        check_train_config(path, rest)
    else:
        pytest.fail(f"unrecognised command {command.text!r}")


@pytest.mark.parametrize("block", YAML_BLOCKS, ids=_ids(YAML_BLOCKS))
def test_yaml_block_is_a_valid_config(block, tmp_path):
    """A config fragment read by train.py (sections and fields known), also once merged into my.yaml."""
    path = tmp_path / "block.yaml"
    path.write_text(block.code)
    check_train_config(path, [])
    check_train_config(_merged_yaml_config(block, tmp_path), [])


def _merged_yaml_config(block: Block, folder: Path) -> Path:
    """my.yaml (the TCL demo config) with the block's `data` section in place of its own and its other keys added."""
    config = yaml.safe_load((REPO / "training/configs/tcl_digits.yaml").read_text())
    fragment = yaml.safe_load(block.code)
    for section, values in fragment.items():
        if section == "data":
            config["data"] = dict(values)
        else:
            config.setdefault(section, {}).update(values)
    path = folder / f"readme_yaml_line{block.line}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


# -------------------------------------------------------------------------------------------------- links, paths


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def test_readme_links_and_paths_exist():
    text = README.read_text(encoding="utf-8")
    assert "../" not in text, "the README refers to a path outside the repository"
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"^[a-z]+://", target):
            continue
        file, _, anchor = target.partition("#")
        path = REPO / file if file else README
        assert path.exists(), f"README link {target}: no {file}"
        if anchor:
            headings = re.findall(r"^#+ (.+)$", path.read_text(encoding="utf-8"), flags=re.MULTILINE)
            assert anchor in {_slug(h) for h in headings}, f"README link {target}: no such heading in {file}"
    for named in re.findall(r"`((?:src|tests|training|benchmarks|model_cards)/[^`\s]*)`", text):
        pattern = re.sub(r"<[^>]+>", "*", named)
        assert list(REPO.glob(pattern.rstrip("/"))), f"README names {named}, not in the repository"


# ------------------------------------------------------------------------------------------------ the workspace


def _save_hub_repo(cache: Path, repo_id: str, save) -> None:
    """A model repo as the Hugging Face cache stores it (snapshot + refs/main), read offline."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    commit = "0" * 40
    save(repo / "snapshots" / commit)
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(commit)


def _write_shards(folder: Path, digits) -> None:
    """The files the data examples name: parquet shards, WebDataset tars and an imagefolder `pairs/`."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from vlalign.data.digits import DIGIT_NAMES, _digit_to_png

    def rows(start, count):
        return [
            (
                _digit_to_png(digits.data[i], 16),
                f"a handwritten digit {DIGIT_NAMES[digits.target[i]]}",
                int(digits.target[i]),
            )
            for i in range(start, start + count)
        ]

    shards = folder / "shards"
    shards.mkdir()
    for name, start in (("train-00000", 0), ("train-00001", 10), ("test-00000", 20)):
        pq.write_table(
            pa.Table.from_pylist(
                [{"image": {"bytes": png, "path": None}, "caption": caption} for png, caption, _ in rows(start, 10)]
            ),
            shards / f"{name}.parquet",
        )
    for name, start in (
        ("train-00000", 30),
        ("train-00001", 36),
        ("train-00002", 42),
        ("train-00003", 48),
        ("test-00000", 54),
    ):
        with tarfile.open(shards / f"{name}.tar", "w") as tar:
            for i, (png, caption, label) in enumerate(rows(start, 6)):
                for extension, data in (("png", png), ("txt", caption.encode()), ("cls", str(label).encode())):
                    info = tarfile.TarInfo(f"{start + i:04d}.{extension}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    pairs = folder / "pairs"
    pairs.mkdir()
    with open(pairs / "metadata.jsonl", "w") as metadata:
        for i, (png, caption, _) in enumerate(rows(60, 12)):
            (pairs / f"{i:04d}.png").write_bytes(png)
            metadata.write(json.dumps({"file_name": f"{i:04d}.png", "caption": [caption, caption.upper()]}) + "\n")


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    import torch
    from sklearn.datasets import load_digits
    from transformers import (
        BertConfig,
        BertForMaskedLM,
        CLIPConfig,
        CLIPImageProcessor,
        CLIPModel,
        Qwen2Config,
        Qwen2ForCausalLM,
        ViTConfig,
        ViTModel,
    )

    from vlalign import CODISConfig, CODISModel, MIVCConfig, MIVCForConditionalGeneration, TCLConfig, TCLModel
    from vlalign.data.digits import _digit_to_png, build_digits_processor
    from vlalign.data.multiview_digits import build_mivc_digits_processor

    root = tmp_path_factory.mktemp("readme")
    torch.manual_seed(0)
    processor = build_digits_processor(image_size=16)
    tokenizer = processor.tokenizer
    vision = dict(
        model_type="vit",
        image_size=16,
        patch_size=4,
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=4,
        intermediate_size=64,
    )
    text = dict(
        model_type="bert",
        vocab_size=len(tokenizer),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=32,
        pad_token_id=tokenizer.pad_token_id,
    )
    stack = dict(
        vision_config=vision,
        text_config=text,
        num_fusion_layers=1,
        embed_dim=16,
        queue_size=32,
        mask_token_id=tokenizer.mask_token_id,
    )
    for folder, model in (
        ("tcl_digits", TCLModel(TCLConfig(**stack, lmi_image_grid=2))),
        ("codis_digits", CODISModel(CODISConfig(**stack, codebook_size=8))),
    ):
        model.save_pretrained(root / "outputs" / folder)
        processor.save_pretrained(root / "outputs" / folder)

    mivc_processor = build_mivc_digits_processor(image_seq_length=1, image_size=16)
    lm_tokenizer = mivc_processor.tokenizer
    llama = dict(
        model_type="llama",
        vocab_size=len(lm_tokenizer),
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=4,
        intermediate_size=64,
        max_position_embeddings=128,
        bos_token_id=lm_tokenizer.bos_token_id,
        eos_token_id=lm_tokenizer.eos_token_id,
        pad_token_id=lm_tokenizer.pad_token_id,
    )
    mivc = MIVCForConditionalGeneration(
        MIVCConfig(
            vision_config=vision,
            text_config=llama,
            pooling_mode="attention",
            image_token_id=mivc_processor.image_token_id,
        )
    )
    mivc_processor.image_seq_length = mivc.config.image_seq_length
    mivc.save_pretrained(root / "outputs" / "mivc_digits")
    mivc_processor.save_pretrained(root / "outputs" / "mivc_digits")
    # what `--model_name_or_path outputs/tcl_digits --lora_r 8` saves (train.py's LoRA step; random adapters)
    import train

    lora = train.RunArguments(model_name_or_path=str(root / "outputs" / "tcl_digits"), lora_r=8, lora_alpha=16)
    with warnings.catch_warnings():  # peft asks transformers for the deprecated `is_gradient_checkpointing`
        warnings.simplefilter("ignore", FutureWarning)
        adapted = train._apply_lora(
            TCLModel.from_pretrained(lora.model_name_or_path), lora, "tcl", SimpleNamespace(resume_from_checkpoint=None)
        )
    with torch.no_grad():
        for name, parameter in adapted.named_parameters():
            if ".lora_B." in name:
                parameter.normal_(0.0, 0.1)
    adapted.save_pretrained(root / "outputs" / "tcl_digits_lora")
    processor.save_pretrained(root / "outputs" / "tcl_digits_lora")

    digits = load_digits()
    (root / "digit.png").write_bytes(_digit_to_png(digits.data[7], 16))
    for i in range(5):
        (root / f"scan_{i}.png").write_bytes(_digit_to_png(digits.data[3 + 10 * i], 16))
    _write_shards(root, digits)
    shutil.copy(REPO / "training/configs/tcl_digits.yaml", root / MY_YAML)

    cache = root / "hf-cache"

    def bert(path):
        BertForMaskedLM(
            BertConfig(
                vocab_size=len(tokenizer),
                hidden_size=32,
                num_hidden_layers=7,
                num_attention_heads=4,
                intermediate_size=64,
                max_position_embeddings=32,
            )
        ).save_pretrained(path)
        tokenizer.save_pretrained(path)

    def clip(path):
        CLIPModel(
            CLIPConfig(
                vision_config=dict(
                    image_size=16,
                    patch_size=4,
                    hidden_size=32,
                    num_hidden_layers=1,
                    num_attention_heads=4,
                    intermediate_size=64,
                ),
                text_config=dict(
                    vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64
                ),
                projection_dim=16,
            )
        ).save_pretrained(path)
        CLIPImageProcessor(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16}).save_pretrained(path)

    def qwen(path):
        Qwen2ForCausalLM(
            Qwen2Config(
                vocab_size=len(tokenizer) + 8,
                hidden_size=32,
                num_hidden_layers=1,
                num_attention_heads=4,
                num_key_value_heads=2,
                intermediate_size=64,
                max_position_embeddings=128,
            )
        ).save_pretrained(path)
        tokenizer.save_pretrained(path)

    _save_hub_repo(
        cache,
        "google/vit-base-patch16-224-in21k",
        lambda path: ViTModel(
            ViTConfig(
                image_size=56,
                patch_size=4,
                hidden_size=32,
                num_hidden_layers=1,
                num_attention_heads=4,
                intermediate_size=64,
            )
        ).save_pretrained(path),
    )  # a 14x14 patch grid, as ViT-B/16 at 224 px
    _save_hub_repo(cache, "bert-base-uncased", bert)
    _save_hub_repo(cache, "you/tcl-digits", lambda path: shutil.copytree(root / "outputs" / "tcl_digits", path))
    _save_hub_repo(cache, "openai/clip-vit-large-patch14", clip)
    _save_hub_repo(cache, "Qwen/Qwen2.5-0.5B", qwen)
    return root


def _env(root: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "PYTHONPATH"))}
    env.update(
        HF_HUB_OFFLINE="1",
        HF_HUB_CACHE=str(root / "hf-cache"),
        HF_HOME=str(root / "hf-home"),
        HF_DATASETS_CACHE=str(root / "hf-datasets"),
        HF_MODULES_CACHE=str(root / "hf-modules"),
        OMP_NUM_THREADS="1",
        TOKENIZERS_PARALLELISM="false",
        PYTHONPATH=str(REPO / "src"),
        MPLBACKEND="Agg",
    )
    return env


# ------------------------------------------------------------------------------------------------ python blocks

BLOCK_RUNNER = """
import json, sys, traceback
blocks = json.load(open(sys.argv[1]))
results = {}
for block in blocks:
    namespace = {"__name__": "__main__"}
    print(f"=== {block['name']}", flush=True)
    try:
        exec(compile(block["code"], block["name"], "exec"), namespace)
        if block["check"]:
            exec(compile(block["check"], block["name"] + " [test check]", "exec"), namespace)
        results[block["name"]] = None
    except BaseException:
        results[block["name"]] = traceback.format_exc()
    with open(sys.argv[2], "w") as handle:
        json.dump(results, handle)
"""


def _without_vlalign(block: Block) -> bool:
    """A block that imports nothing from vlalign must work without it (through trust_remote_code)."""
    imported = set()
    for node in ast.walk(ast.parse(block.code)):
        if isinstance(node, ast.Import):
            imported.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            imported.add(node.module)
    return not any(name == "vlalign" or name.startswith("vlalign.") for name in imported)


def _run_blocks(root: Path, blocks: list[Block], prefix: str, tag: str) -> dict:
    spec = [
        {
            "name": b.name,
            "code": b.code,
            "check": next((textwrap.dedent(c) for a, c in CHECKS.items() if a in b.code), ""),
        }
        for b in blocks
    ]
    (root / f"{tag}.json").write_text(json.dumps(spec))
    proc = subprocess.run(
        [sys.executable, "-c", prefix + BLOCK_RUNNER, f"{tag}.json", f"{tag}-results.json"],
        cwd=root,
        env=_env(root),
        capture_output=True,
        text=True,
        timeout=600,
    )
    results_path = root / f"{tag}-results.json"
    results = json.loads(results_path.read_text()) if results_path.exists() else {}
    output = (proc.stdout + proc.stderr)[-6000:]
    return {
        b.name: (results[b.name] if b.name in results else f"not run (exit {proc.returncode}):\n{output}", output)
        for b in blocks
    }


@pytest.fixture(scope="module")
def python_results(workspace):
    plain = [b for b in PYTHON_BLOCKS if not _without_vlalign(b)]
    bare = [b for b in PYTHON_BLOCKS if _without_vlalign(b)]
    return {**_run_blocks(workspace, plain, "", "blocks"), **_run_blocks(workspace, bare, BLOCK_VLALIGN, "bare")}


@pytest.mark.parametrize("block", PYTHON_BLOCKS, ids=_ids(PYTHON_BLOCKS))
def test_python_block_runs(block, python_results):
    error, output = python_results[block.name]
    where = "where vlalign cannot be imported" if _without_vlalign(block) else "with vlalign"
    assert error is None, f"{block.name} fails ({where}):\n{error}\n--- output (tail) ---\n{output}"


# --------------------------------------------------------------------------------------- 2-step training runs

TRAIN_RUNNER = """
import json, sys, traceback
import train
runs = json.load(open(sys.argv[1]))
results = {}
for run in runs:
    print(f"=== {run['name']}", flush=True)
    try:
        results[run["name"]] = {"results": train.main(run["argv"])}
    except BaseException:
        results[run["name"]] = {"error": traceback.format_exc()}
    with open(sys.argv[2], "w") as handle:
        json.dump(results, handle, default=str)
"""

TRAIN_RUNS = [c for c in COMMANDS if c.kind == "train_run"]


@pytest.fixture(scope="module")
def training_results(workspace):
    runs = []
    for i, command in enumerate(TRAIN_RUNS):
        runs.append(
            {
                "name": f"{command.block.name}: {command.text}",
                "argv": command.train_args + SHORT_RUN + ["--output_dir", f"outputs/readme_command_{i}"],
            }
        )
    for block in YAML_BLOCKS:
        config = _merged_yaml_config(block, workspace)
        runs.append(
            {
                "name": block.name,
                "argv": ["--config", config.name, *SHORT_RUN, "--output_dir", f"outputs/readme_yaml_{block.line}"],
            }
        )
    (workspace / "train-runs.json").write_text(json.dumps(runs))
    env = _env(workspace)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "training"), str(REPO / "src")])
    proc = subprocess.run(
        [sys.executable, "-c", TRAIN_RUNNER, "train-runs.json", "train-results.json"],
        cwd=workspace,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    path = workspace / "train-results.json"
    results = json.loads(path.read_text()) if path.exists() else {}
    output = (proc.stdout + proc.stderr)[-6000:]
    return {
        run["name"]: (
            results.get(run["name"], {"error": f"not run (exit {proc.returncode})"}),
            output,
            workspace / run["argv"][-1],
        )
        for run in runs
    }


def _check_run(name, training_results):
    outcome, output, folder = training_results[name]
    assert "error" not in outcome, f"{name} fails:\n{outcome['error']}\n--- output (tail) ---\n{output}"
    results = outcome["results"]
    assert results["train_steps"] == 2
    assert results["train_images_skipped"] == 0 and results["train_items_skipped"] == 0
    for file in ("config.json", "model.safetensors", "processor_config.json", "README.md", "eval_results.json"):
        assert (folder / file).is_file(), f"{name}: no {file} in {folder}"
    return results


@pytest.mark.parametrize("command", TRAIN_RUNS, ids=[f"line{c.block.line}-{i}" for i, c in enumerate(TRAIN_RUNS)])
def test_own_data_command_trains(command, training_results):
    _check_run(f"{command.block.name}: {command.text}", training_results)


@pytest.mark.parametrize("block", YAML_BLOCKS, ids=_ids(YAML_BLOCKS))
def test_yaml_block_trains(block, training_results):
    results = _check_run(block.name, training_results)
    fragment = yaml.safe_load(block.code)["data"]
    assert results["i2t_recall@1"] >= 0 and results["t2i_recall@1"] >= 0  # evaluated on the test shards
    if fragment.get("label_column"):
        assert "zero_shot_accuracy" in results
