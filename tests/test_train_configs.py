"""Each shipped training config (training/configs/*.yaml) runs end to end through `accelerate launch training/train.py`
for 3 steps, with tiny-model overrides on the command line, and writes a folder that loads back through the Auto
classes. Part of the compatibility pass (ci/compat-tests.txt), so it runs at both ends of the declared ranges."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

# Small towers (the configs' own are sized for the few-minute demo), small data, 3 steps, no tensorboard.
TINY_TOWERS = [
    "--model.vision_config.image_size",
    "16",
    "--model.vision_config.hidden_size",
    "32",
    "--model.vision_config.num_hidden_layers",
    "1",
    "--model.vision_config.intermediate_size",
    "64",
    "--model.text_config.hidden_size",
    "32",
    "--model.text_config.intermediate_size",
    "64",
]
TINY = {
    "tcl_digits.yaml": [
        *TINY_TOWERS,
        "--model.text_config.num_hidden_layers",
        "2",
        "--embed_dim",
        "16",
        "--queue_size",
        "32",
        "--lmi_image_grid",
        "2",
        "--max_train_samples",
        "64",
        "--max_eval_samples",
        "20",
        "--alpha_ramp_steps",
        "2",
    ],
    "codis_digits.yaml": [
        *TINY_TOWERS,
        "--model.text_config.num_hidden_layers",
        "2",
        "--embed_dim",
        "16",
        "--queue_size",
        "32",
        "--codebook_size",
        "8",
        "--ot_iterations",
        "5",
        "--max_train_samples",
        "64",
        "--max_eval_samples",
        "20",
        "--alpha_ramp_steps",
        "2",
    ],
    "tcl_imagefolder.yaml": [  # image_size 32: the example scenes are 32 px
        *TINY_TOWERS,
        "--model.vision_config.image_size",
        "32",
        "--model.vision_config.patch_size",
        "8",
        "--model.text_config.num_hidden_layers",
        "2",
        "--embed_dim",
        "16",
        "--queue_size",
        "32",
        "--lmi_image_grid",
        "2",
        "--alpha_ramp_steps",
        "2",
    ],
    "mivc_digits.yaml": [
        *TINY_TOWERS,
        "--model.vision_config.patch_size",
        "8",
        "--model.text_config.num_hidden_layers",
        "1",
        "--pooling_attention_dim",
        "16",
        "--num_train_items",
        "40",
        "--num_test_items",
        "8",
        "--eval_batch_size",
        "8",
    ],
}
TINY["clip_finetune.yaml"] = ["--lmi_image_grid", "2"]  # the tiny CLIP's towers are the test's (_save_tiny_clip)
AUTO_CLASS = {
    "clip_finetune.yaml": "AutoModelForZeroShotImageClassification",
    "tcl_digits.yaml": "AutoModelForZeroShotImageClassification",
    "codis_digits.yaml": "AutoModelForZeroShotImageClassification",
    "tcl_imagefolder.yaml": "AutoModelForZeroShotImageClassification",
    "mivc_digits.yaml": "AutoModelForImageTextToText",
}


def test_every_shipped_config_is_covered():
    assert sorted(p.name for p in (REPO / "training" / "configs").glob("*.yaml")) == sorted(TINY)


@pytest.mark.parametrize("name", list(TINY))
def test_shipped_config_trains_3_steps_with_accelerate_launch(name, tmp_path):
    out = tmp_path / "out"
    if name == "tcl_imagefolder.yaml":  # the example folder its header tells how to write, at the relative data_dir
        from vlalign.data.digit_scenes import write_digit_scenes_imagefolder

        write_digit_scenes_imagefolder(tmp_path / "data" / "scenes", split_sizes={"train": 40, "test": 12})
    if name == "clip_finetune.yaml":  # its data, and a tiny CLIP where the config expects the downloaded one
        from vlalign.data.digit_scenes import write_digit_scenes_imagefolder

        scenes = write_digit_scenes_imagefolder(tmp_path / "data" / "scenes", split_sizes={"train": 40, "test": 12})
        _save_tiny_clip(tmp_path / "checkpoints" / "clip-vit-base-patch32", scenes / "processor")
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--num_processes",
        "1",
        "--cpu",
        str(REPO / "training" / "train.py"),
        "--config",
        str(REPO / "training" / "configs" / name),
        "--output_dir",
        str(out),
        "--max_steps",
        "3",
        "--per_device_train_batch_size",
        "8",
        "--logging_steps",
        "1",
        "--use_cpu",
        "true",
        "--report_to",
        "none",
        *TINY[name],
    ]
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = json.loads((out / "eval_results.json").read_text())
    assert results["train_steps"] == 3
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == ("tcl" if name == "clip_finetune.yaml" else name.split("_")[0])
    assert AUTO_CLASS[name] in config["auto_map"]
    assert (out / "model.safetensors").exists() and (out / "README.md").exists()
    assert not list(out.glob("*.bin"))

    import transformers

    import vlalign  # noqa: F401  (registers the model types with the Auto classes; remote code is tested elsewhere)

    model = getattr(transformers, AUTO_CLASS[name]).from_pretrained(out)
    assert model.config.model_type == config["model_type"]
    processor = transformers.AutoProcessor.from_pretrained(out)
    if name == "clip_finetune.yaml":
        _check_the_exported_clip(model.eval(), processor, out / "dual_encoder")
    if (
        name == "tcl_imagefolder.yaml"
    ):  # a tokenizer learnt from the scenes' captions, an augmentation keeping them true
        assert len(processor.tokenizer("bottom", add_special_tokens=False)["input_ids"]) == 1
        assert config["text_config"]["vocab_size"] == len(processor.tokenizer)
        augmentation = processor.augmentation
        assert augmentation["hflip_p"] == augmentation["color_jitter_p"] == augmentation["grayscale_p"] == 0.0


def _save_tiny_clip(folder, processor_folder):
    """A random tiny CLIPModel with a tokenizer (the example folder's, ending texts with [SEP] as CLIP's end of
    text) and a 32 px image processor: what `hf download` of a CLIP checkpoint gives, small."""
    import torch
    from transformers import AutoTokenizer, CLIPConfig, CLIPModel, ViTImageProcessorPil

    tokenizer = AutoTokenizer.from_pretrained(processor_folder)
    tokenizer.eos_token = "[SEP]"
    torch.manual_seed(0)
    vision = dict(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=1, num_attention_heads=4)
    text = dict(
        vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
        max_position_embeddings=64, pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.cls_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )  # fmt: skip
    config = CLIPConfig(vision_config=dict(vision, intermediate_size=64), text_config=dict(text, intermediate_size=64))
    CLIPModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    ViTImageProcessorPil(size={"height": 32, "width": 32}).save_pretrained(folder)


def _check_the_exported_clip(model, processor, folder):
    """The run's CLIP export loads with plain transformers and embeds as the trained vlalign model does."""
    import torch
    from PIL import Image
    from transformers import CLIPModel

    clip = CLIPModel.from_pretrained(folder).eval()
    inputs = processor(
        images=[Image.new("RGB", (32, 32), colour) for colour in ("white", "red")],
        text=["a red seven", "two blue digits"],
        return_tensors="pt",
    )
    with torch.no_grad():
        ours = model(**inputs)
        theirs = clip(**inputs)
    torch.testing.assert_close(theirs.image_embeds, ours.image_embeds, rtol=0, atol=1e-5)
    torch.testing.assert_close(theirs.text_embeds, ours.text_embeds, rtol=0, atol=1e-5)
    assert "Left out" in (folder / "README.md").read_text()
