"""ALBEFModel, the base of TCL and CODIS: the fusion encoder's bidirectional self-attention, the attention path of
every encoder it builds (SDPA by default, equal to eager) and `compile_encoders` (`torch.compile` of the towers as a
training option). A TCLModel is the
vehicle (ALBEFModel itself is abstract). The tests that every ALBEF-style model must pass are in
albef_model_tester.py, run by test_modeling_tcl.py and test_modeling_codis.py.

`compile_encoders()` compiles the towers in place (the trainer does this for `torch_compile=True` instead of
compiling the whole model, whose losses and queues hold data-dependent steps), and training with it gives the weights
of eager training. The inductor speed-up is measured in benchmarks/train_step.py --compile; here the `aot_eager`
backend keeps the test fast while tracing the same graphs.

The attention check: with `attn_implementation="eager"` the eager kernels run N times; built by default, the same
forward runs `torch.nn.functional.scaled_dot_product_attention` exactly N times, the eager kernels never, and the
losses agree (ViT, BERT text and fusion layers incl. cross-attention, the momentum copies; MIVC's towers, Q-Former
and LM: test_modeling_mivc.py)."""

import pytest
import torch
from fixtures import count_attention_calls, tiny_batch, tiny_codis_config, tiny_tcl_config
from transformers import TrainingArguments

from vlalign import CODISModel, TCLModel
from vlalign.trainer import ContrastiveTrainer


def test_fusion_self_attention_is_bidirectional():
    torch.manual_seed(0)
    model = TCLModel(tiny_tcl_config())
    model.eval()
    batch = tiny_batch()
    with torch.no_grad():
        image_tokens = model.get_image_tokens(batch["pixel_values"])
        text = model._encode_text(batch["input_ids"], torch.ones_like(batch["input_ids"]))[0]
        fused = model.fusion_model(text, torch.ones_like(batch["input_ids"]), image_tokens)
        changed = text.clone()
        changed[:, -1] += 1.0  # change only the last token
        fused_changed = model.fusion_model(changed, torch.ones_like(batch["input_ids"]), image_tokens)
    assert (fused[:, 0] - fused_changed[:, 0]).abs().max() > 1e-4


class FixedBatches:
    def __init__(self):
        self.calls = 0

    def __call__(self, rows):
        self.calls += 1
        return dict(tiny_batch(seed=self.calls), return_loss=True)


def _train(tmp_path, compile_backend=None):
    torch.manual_seed(0)
    model = TCLModel(tiny_tcl_config())
    extra = {"torch_compile": True, "torch_compile_backend": compile_backend} if compile_backend else {}
    args = TrainingArguments(
        output_dir=str(tmp_path),
        per_device_train_batch_size=4,
        max_steps=2,
        learning_rate=1e-3,
        report_to="none",
        remove_unused_columns=False,
        use_cpu=True,
        save_strategy="no",
        disable_tqdm=True,
        seed=0,
        **extra,
    )
    trainer = ContrastiveTrainer(model=model, args=args, train_dataset=list(range(8)), data_collator=FixedBatches())
    trainer.train()
    return trainer


def test_torch_compile_trains_the_towers_compiled_to_the_eager_weights(tmp_path):
    eager = _train(tmp_path / "eager")
    compiled = _train(tmp_path / "compiled", compile_backend="aot_eager")
    model = compiled.model
    # the towers (students and teachers) are compiled in place; the model itself is not wrapped
    for name in TCLModel.ENCODER_NAMES:
        assert getattr(model, name)._compiled_call_impl is not None, name
    assert compiled.accelerator.unwrap_model(compiled.model_wrapped) is model
    assert type(model) is TCLModel and not any("_orig_mod" in k for k in model.state_dict())
    expected = eager.model.state_dict()
    for name, value in model.state_dict().items():
        torch.testing.assert_close(value, expected[name], atol=1e-6, rtol=1e-5, msg=name)
    assert compiled.state.global_step == 2


@pytest.fixture
def attention_calls(monkeypatch):
    """Counts of eager-kernel and SDPA calls during the test."""
    return count_attention_calls(monkeypatch)


def _albef_case(model_class, config):
    def run(attn_implementation):
        torch.manual_seed(0)
        model = model_class._from_config(config, attn_implementation=attn_implementation)
        model.eval()  # no dropout: the eager and SDPA runs must agree
        with torch.no_grad():
            return model(**tiny_batch(), return_loss=True).loss

    return run


CASES = {
    "tcl": _albef_case(TCLModel, tiny_tcl_config()),
    "codis": _albef_case(CODISModel, tiny_codis_config()),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_every_attention_call_uses_sdpa_by_default(case, attention_calls):
    eager_loss = CASES[case]("eager")
    eager_calls = attention_calls["eager"]
    # at least the vision tower and one other (text / fusion) attention layer ran
    assert eager_calls >= 2 and attention_calls["sdpa"] == 0
    attention_calls.update(eager=0, sdpa=0)
    sdpa_loss = CASES[case](None)  # the default a user gets
    assert attention_calls["eager"] == 0
    assert attention_calls["sdpa"] == eager_calls
    torch.testing.assert_close(sdpa_loss, eager_loss, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "vision",
    [
        dict(model_type="vit"),
        dict(model_type="deit"),
        dict(model_type="beit", use_mask_token=False),
        dict(model_type="dinov2"),
        dict(model_type="dinov2_with_registers", num_register_tokens=2),
        dict(model_type="clip_vision_model"),
    ],
    ids=lambda vision: vision["model_type"],
)
def test_the_global_image_feature_of_every_accepted_tower_sees_every_quarter(vision):
    """For each vision family the config accepts, the global embedding changes when any one quarter of the image
    changes, and a training step runs (LMI takes the patch grid behind the prefix tokens)."""
    sizes = dict(
        image_size=16, patch_size=4, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64
    )
    torch.manual_seed(0)
    model = TCLModel(tiny_tcl_config(vision_config={**sizes, **vision})).eval()
    pixels = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        base = model.get_image_features(pixel_values=pixels)
        for rows, cols in (
            (slice(0, 8), slice(0, 8)),
            (slice(0, 8), slice(8, 16)),
            (slice(8, 16), slice(0, 8)),
            (slice(8, 16), slice(8, 16)),
        ):
            changed = pixels.clone()
            changed[..., rows, cols] = torch.randn(3, 8, 8, generator=torch.Generator().manual_seed(2))
            assert not torch.allclose(model.get_image_features(pixel_values=changed), base, atol=1e-6), (rows, cols)
    model.train()
    out = model(**tiny_batch(), return_loss=True)
    assert torch.isfinite(out.loss) and out.loss_lmi_image is not None
