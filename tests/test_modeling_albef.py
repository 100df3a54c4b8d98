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
from fixtures import (
    FAMILY_TEXT,
    FAMILY_VISION,
    TINY_TEXT,
    TINY_VISION,
    count_attention_calls,
    tiny_batch,
    tiny_codis_config,
    tiny_tcl_config,
)
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


# ---------------------------------------------------------------------------------------------------------------
# whole transformers dual encoders in (from_dual_encoder_pretrained) and out (as_source_architecture)

CLIP_TEXT = dict(
    vocab_size=144, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
    max_position_embeddings=16, pad_token_id=0, bos_token_id=2, eos_token_id=3,
)  # fmt: skip
CLIP_VISION = {k: v for k, v in TINY_VISION.items() if k != "model_type"}


def _dual_encoder_batch():
    """Captions [start] words [end] [pad]...: CLIP pools at the end-of-text token (id 3)."""
    b = tiny_batch()
    ids, mask = b["input_ids"].clamp_min(5), b["attention_mask"]
    ids[:, 0] = 2
    ids[torch.arange(4), mask.sum(1) - 1] = 3
    ids[mask == 0] = 0
    b["input_ids"] = ids
    return b


def _tiny_dual_encoder(kind):
    from transformers import (
        AutoConfig,
        CLIPConfig,
        CLIPModel,
        SiglipConfig,
        SiglipModel,
        VisionTextDualEncoderConfig,
        VisionTextDualEncoderModel,
    )

    torch.manual_seed(0)
    if kind == "clip":
        model = CLIPModel(CLIPConfig(vision_config=CLIP_VISION, text_config=CLIP_TEXT, projection_dim=16))
    elif kind == "siglip":
        model = SiglipModel(SiglipConfig(vision_config=CLIP_VISION, text_config=CLIP_TEXT))
        with torch.no_grad():
            model.logit_bias.fill_(-3.0)  # carried over and written back as it is
    else:
        config = VisionTextDualEncoderConfig.from_vision_text_configs(
            AutoConfig.for_model(**TINY_VISION), AutoConfig.for_model(**TINY_TEXT), projection_dim=16
        )
        model = VisionTextDualEncoderModel(config)
    with torch.no_grad():
        model.logit_scale.fill_(float(torch.log(torch.tensor(1 / 0.05))))  # a temperature of 0.05
    return model.eval()


def _source_outputs(model, b):
    # SigLIP's text tower is run without a mask, as SiglipProcessor prepares texts (padded to max_length)
    mask = None if model.config.model_type == "siglip" else b["attention_mask"]
    with torch.no_grad():
        return model(input_ids=b["input_ids"], attention_mask=mask, pixel_values=b["pixel_values"])


def _logits(model, output):
    """Our logits as the source class computes them: SigLIP adds its sigmoid bias."""
    bias = model.logit_bias if model.config.dual_encoder_source == "siglip" else 0.0
    return output.logits_per_image + bias


@pytest.mark.parametrize("model_class", [TCLModel, CODISModel], ids=["tcl", "codis"])
@pytest.mark.parametrize("kind", ["clip", "siglip", "vision-text-dual-encoder"])
def test_a_dual_encoder_fine_tunes_from_where_it_is_and_exports_back(tmp_path, kind, model_class):
    """Before any step the embeddings and logits are the source model's; after a training step the model written
    with as_source_architecture=True loads with plain transformers and gives the trained model's embeddings."""
    from transformers import AutoModel as TransformersAutoModel

    source = _tiny_dual_encoder(kind)
    source.save_pretrained(tmp_path / "source")
    objectives = dict(use_momentum=False, imc_weight=1.0)
    if model_class is TCLModel:
        objectives.update(lmi_weight=1.0, lmi_image_grid=2, contrastive_loss="decomposable", z_estimate="batch")
    else:
        objectives.update(codebook_size=12)
    model = model_class.from_dual_encoder_pretrained(str(tmp_path / "source"), **objectives).eval()
    config = model.config
    assert (config.num_fusion_layers, config.vision_pooling, config.text_pooling) == (0, "pooler", "pooler")
    assert config.projection == ("none" if kind == "siglip" else "linear_no_bias")
    b = _dual_encoder_batch()
    expected = _source_outputs(source, b)
    with torch.no_grad():
        ours = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], pixel_values=b["pixel_values"])
    torch.testing.assert_close(ours.image_embeds, expected.image_embeds, rtol=0, atol=1e-5)
    torch.testing.assert_close(ours.text_embeds, expected.text_embeds, rtol=0, atol=1e-5)
    torch.testing.assert_close(_logits(model, ours), expected.logits_per_image, rtol=1e-5, atol=1e-4)
    assert model.temperature.item() == pytest.approx(0.05, rel=1e-6)

    model.train()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    model(**b, return_loss=True).loss.backward()
    optimizer.step()
    model.eval()
    model.save_pretrained(tmp_path / "export", as_source_architecture=True)
    exported = TransformersAutoModel.from_pretrained(tmp_path / "export")
    assert type(exported) is type(source)
    with torch.no_grad():
        trained = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], pixel_values=b["pixel_values"])
    again = _source_outputs(exported.eval(), b)
    assert (trained.image_embeds - expected.image_embeds).abs().max() > 1e-3  # the step moved the model
    torch.testing.assert_close(again.image_embeds, trained.image_embeds, rtol=0, atol=1e-5)
    torch.testing.assert_close(again.text_embeds, trained.text_embeds, rtol=0, atol=1e-5)
    torch.testing.assert_close(again.logits_per_image, _logits(model, trained), rtol=1e-5, atol=1e-4)
    note = (tmp_path / "export" / "README.md").read_text()
    assert ("`codebook`" in note) == (model_class is CODISModel)


def test_dual_encoder_misuse_is_refused(tmp_path):
    from transformers import AutoConfig, AutoModel

    AutoModel.from_config(AutoConfig.for_model(**TINY_VISION)).save_pretrained(tmp_path / "vit")
    with pytest.raises(ValueError, match=r"takes a CLIPModel, SiglipModel or VisionTextDualEncoderModel .*'vit' model"):
        TCLModel.from_dual_encoder_pretrained(str(tmp_path / "vit"))
    _tiny_dual_encoder("clip").save_pretrained(tmp_path / "clip")
    with pytest.raises(ValueError, match=r"takes \['num_fusion_layers'\] from the checkpoint"):
        TCLModel.from_dual_encoder_pretrained(str(tmp_path / "clip"), num_fusion_layers=1)
    with pytest.raises(ValueError, match=r"need a model built by from_dual_encoder_pretrained"):
        TCLModel(tiny_tcl_config()).save_pretrained(tmp_path / "plain", as_source_architecture=True)


# ---------------------------------------------------------------------------------------------------------------------
# Locked towers (LiT): lock_image_tower / lock_text_tower, eval mode of the frozen parts, EMA teachers not duplicated,
# save / load of a locked model
# ---------------------------------------------------------------------------------------------------------------------

# parts of a tower that come before its blocks, by name: frozen whatever the number of unlocked blocks
_BEFORE_BLOCKS = ("embed", "pre_layrnorm")


def _lock_family_model(side, family):
    from transformers import AutoConfig

    from vlalign.towers import FUSION_TEXT_MODEL_TYPES, text_poolings, vision_poolings

    vision = FAMILY_VISION[family] if side == "vision" else dict(TINY_VISION)
    text = FAMILY_TEXT[family] if side == "text" else dict(TINY_TEXT)
    fusion = text["model_type"] in FUSION_TEXT_MODEL_TYPES
    objectives = {} if fusion else dict(num_fusion_layers=0, itm_weight=0.0, mlm_weight=0.0)
    # with the pooler where the family has one: it runs after the blocks
    poolings = vision_poolings(AutoConfig.for_model(**vision)), text_poolings(AutoConfig.for_model(**text))
    vision_pooling, text_pooling = ("pooler" if "pooler" in p else p[0] for p in poolings)
    return TCLModel(
        tiny_tcl_config(
            vision_config=vision,
            text_config=text,
            use_momentum=False,
            vision_pooling=vision_pooling,
            text_pooling=text_pooling,
            **objectives,
        )
    )


def _unique_parameter_bytes(model):
    storages = {}
    for tensor in model.state_dict().values():
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values())


@pytest.mark.parametrize(
    "side,family", [("vision", f) for f in FAMILY_VISION] + [("text", f) for f in FAMILY_TEXT], ids=lambda v: str(v)
)
def test_locking_a_tower_of_every_family_freezes_what_runs_before_its_unlocked_blocks(side, family):
    """unlocked_layers=0 freezes the whole tower and its projection; unlocked_layers=N leaves its last N blocks, what
    follows them (final norm, pooler, head) and the projection trainable, and nothing else of the tower: with N =
    every block only the embeddings (and CLIP's pre-norm) stay frozen. Other parts are untouched; a bad N is refused."""
    from vlalign.modeling_albef import tower_blocks

    model = _lock_family_model(side, family)
    tower_name, proj_name = ("vision_model", "vision_proj") if side == "vision" else ("text_model", "text_proj")
    lock = model.lock_image_tower if side == "vision" else model.lock_text_tower
    other_side = "text_model" if side == "vision" else "vision_model"
    tower = getattr(model, tower_name)
    path, blocks = tower_blocks(tower)
    assert len(blocks) == 2

    lock()
    assert not any(p.requires_grad for p in tower.parameters())
    assert not any(p.requires_grad for p in getattr(model, proj_name).parameters())
    assert all(p.requires_grad for p in getattr(model, other_side).parameters())

    lock(len(blocks))
    frozen = {n for n, p in tower.named_parameters() if not p.requires_grad}
    assert frozen == {n for n, _ in tower.named_parameters() if any(m in n for m in _BEFORE_BLOCKS)}
    assert frozen and all(p.requires_grad for p in getattr(model, proj_name).parameters())

    lock(1)
    trainable = {n for n, p in tower.named_parameters() if p.requires_grad}
    assert any(n.startswith(f"{path}.1.") for n in trainable)
    assert not any(n.startswith(f"{path}.0.") for n in trainable)
    # what is neither a block nor before them is after them: trainable with the last block
    assert trainable == {
        n
        for n, _ in tower.named_parameters()
        if not n.startswith(f"{path}.0.") and not any(m in n for m in _BEFORE_BLOCKS)
    }
    for bad in (-1, len(blocks) + 1):
        with pytest.raises(ValueError, match=rf"unlocked_layers = {bad}: {tower_name} has 2 blocks"):
            lock(bad)


def test_a_locked_text_tower_leaves_the_fusion_encoder_and_heads_trainable_and_only_the_projection_if_asked():
    model = TCLModel(tiny_tcl_config(use_momentum=False))  # 3 BERT layers: 2 text layers, 1 fusion layer
    model.lock_text_tower(unlocked_projection=True)
    assert not any(p.requires_grad for p in model.text_model.parameters())
    assert all(p.requires_grad for p in model.text_proj.parameters())
    for name in ("fusion_model", "itm_head", "mlm_head", "vision_model", "vision_proj"):
        assert all(p.requires_grad for p in getattr(model, name).parameters()), name
    with pytest.raises(ValueError, match=r"unlocked_layers = 3: text_model has 2 blocks"):
        model.lock_text_tower(3)  # the third BERT layer is the fusion layer, not the text tower's
    # a training step: no gradient reaches the locked tower, the fusion encoder learns
    model.train()
    model(**tiny_batch(), return_loss=True).loss.backward()
    assert all(p.grad is None for p in model.text_model.parameters())
    assert all(p.grad is not None for p in model.fusion_model.parameters() if p.requires_grad)


def test_the_frozen_parts_of_a_locked_tower_run_in_eval_mode_and_give_fixed_features():
    """No dropout in a locked tower (LiT: fixed features), in train mode too; the unlocked blocks keep theirs."""
    config = tiny_tcl_config(
        vision_config=dict(TINY_VISION, hidden_dropout_prob=0.5), text_config=dict(TINY_TEXT, hidden_dropout_prob=0.5)
    )
    model = TCLModel(config)
    model.lock_image_tower()
    model.lock_text_tower(1)
    model.train()
    b = tiny_batch()
    assert not model.vision_model.training and not model.momentum_vision_model.training
    assert not model.text_model.encoder.layer[0].training and not model.text_model.embeddings.training
    assert model.text_model.encoder.layer[1].training and model.momentum_text_model.encoder.layer[1].training
    assert model.fusion_model.training
    first, second = (model.get_image_features(b["pixel_values"]) for _ in range(2))
    assert torch.equal(first, second)
    texts = [model.get_text_features(b["input_ids"], b["attention_mask"]) for _ in range(2)]
    assert not torch.equal(*texts)  # the unlocked block's dropout
    model.eval()
    assert not model.text_model.encoder.layer[1].training
    model.train()
    assert not model.vision_model.training and model.text_model.encoder.layer[1].training


@pytest.mark.parametrize("model_class,make_config", [(TCLModel, tiny_tcl_config), (CODISModel, tiny_codis_config)])
def test_the_ema_teacher_of_a_locked_tower_is_the_students_tensors_and_the_rest_still_follows(model_class, make_config):
    """A locked tower's parameters are held once (unique storages: the model shrinks by exactly the locked tower and
    projection); the EMA update leaves them the student's, bit for bit, and still moves the unlocked teachers."""
    torch.manual_seed(0)
    model = model_class(make_config())
    before = _unique_parameter_bytes(model)
    model.lock_image_tower()
    model.lock_text_tower(1)
    locked = [*model.vision_model.parameters(), *model.vision_proj.parameters()]
    locked += [*model.text_model.embeddings.parameters(), *model.text_model.encoder.layer[0].parameters()]
    assert before - _unique_parameter_bytes(model) == sum(p.numel() * p.element_size() for p in locked)
    assert (
        model.momentum_vision_model.layers[0].attention.q_proj.weight
        is model.vision_model.layers[0].attention.q_proj.weight
    )
    assert (
        model.momentum_text_model.encoder.layer[1].output.dense.weight
        is not model.text_model.encoder.layer[1].output.dense.weight
    )

    # a training step moves the trainable students; then the EMA update
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    model.train()
    model(**tiny_batch(), return_loss=True).loss.backward()
    assert all(p.grad is None for p in locked)
    optimizer.step()
    # the frozen students (named_parameters lists a tensor once: the teachers that share it are not listed)
    frozen_before = {
        n: p.clone() for n, p in model.named_parameters() if not p.requires_grad and not n.startswith("momentum_")
    }
    assert len(frozen_before) == len(locked) + (model.config.learnable_temperature is False)
    teacher_layer = model.momentum_text_model.encoder.layer[1].output.dense.weight
    teacher_before = teacher_layer.clone()
    model.momentum_update()
    for name, value in frozen_before.items():  # frozen parts, and the teachers that share them, unchanged
        assert torch.equal(model.get_parameter(name), value), name
    for student, teacher in zip(*model._momentum_pairs()):
        for (name, p_s), (_, p_t) in zip(student.named_parameters(), teacher.named_parameters()):
            if not p_s.requires_grad:
                assert p_t is p_s, name
    student_layer = model.text_model.encoder.layer[1].output.dense.weight.detach()
    m = model.config.momentum
    assert torch.equal(teacher_layer, teacher_before.mul(m).add(student_layer, alpha=1 - m))
    assert not torch.equal(teacher_layer, teacher_before)
    # a skipped step restores what the forward updates: not the shared frozen tensors
    updated = {id(t) for t in model.forward_updated_tensors()}
    assert not any(id(p) in updated for p in locked)
    assert id(teacher_layer) in updated


def test_relocking_unties_the_teacher_of_what_is_unlocked_again():
    model = TCLModel(tiny_tcl_config())
    model.lock_image_tower()
    model.lock_image_tower(1, unlocked_projection=True)
    student, teacher = model.vision_model.layers[1].mlp.fc1.weight, model.momentum_vision_model.layers[1].mlp.fc1.weight
    assert student.requires_grad and not teacher.requires_grad
    assert teacher is not student and teacher.data_ptr() != student.data_ptr() and torch.equal(teacher, student)
    assert model.momentum_vision_model.layers[0].mlp.fc1.weight is model.vision_model.layers[0].mlp.fc1.weight
    assert model.vision_model.layers[1].training == model.training and not model.vision_model.layers[0].training


def test_a_locked_model_saves_every_key_and_loads_strictly_bit_for_bit(tmp_path):
    """save_pretrained writes the teachers of the locked towers too (safetensors holds no aliases, transformers
    refuses untied shared tensors): the folder loads with the strict loader into a model that does not lock, bit for
    bit, and locks again to the same shared layout."""
    from safetensors import safe_open

    torch.manual_seed(0)
    model = TCLModel(tiny_tcl_config())
    model.lock_image_tower(1)
    model.lock_text_tower()
    with torch.no_grad():  # the students move away from their teachers (as after training)
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(tmp_path)
    with safe_open(tmp_path / "model.safetensors", "pt") as handle:
        keys = set(handle.keys())
    # every key (transformers writes some towers under their checkpoint names), teachers and students alike
    assert len(keys) == len(model.state_dict())
    teachers = {k for k in keys if k.startswith("momentum_vision_model.")}
    assert teachers and {k.removeprefix("momentum_") for k in teachers} <= keys
    # the model as saved still shares (the copy is the file's)
    assert model.momentum_vision_model.layers[0].mlp.fc1.weight is model.vision_model.layers[0].mlp.fc1.weight
    loaded = TCLModel.from_pretrained(tmp_path)
    expected = model.state_dict()
    for key, value in loaded.state_dict().items():
        assert torch.equal(value, expected[key]), key
    loaded.lock_image_tower(1)
    loaded.lock_text_tower()
    assert _unique_parameter_bytes(loaded) == _unique_parameter_bytes(model)
