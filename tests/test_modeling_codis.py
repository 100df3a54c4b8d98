"""CODISModel: what CODIS adds to the ALBEF base -- the codebook terms of the training forward against float64
references, codebook and code_proj gradients, get_codes, training (config validation: see test_configuration.py).
The tests every ALBEF-style model shares (save/load with the codes, remote code, Auto classes, pipeline, gradient
caching, PEFT with the codebook trained, bf16, EMA / queues in the training forward, ...) run here through
`ALBEFModelTesterMixin` (albef_model_tester.py)."""

import pytest
import torch
import torch.nn.functional as F
from albef_model_tester import ALBEFModelTesterMixin
from fixtures import TINY_TEXT, TINY_VISION, tiny_batch, tiny_codis_config
from references import targets_reference

from vlalign import CODISConfig, CODISModel

NO_DROPOUT = dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
CODE_TERMS = ("code_image", "code_text", "ot_image", "ot_text")
ALL_TERMS = ("i2t", "t2i", "i2i", "t2t", "itm", "mlm", *CODE_TERMS)
# the wider text init of `_config(dropout=False)` below (the no-dropout part is the mixin's `config_without_dropout`)
WIDE_TEXT_INIT = dict(text_config=dict(TINY_TEXT, initializer_range=0.2))


class TestCODISModel(ALBEFModelTesterMixin):
    model_class = CODISModel
    config_class = CODISConfig
    model_type = "codis"
    loss_terms = ALL_TERMS
    own_terms_off = dict(code_weight=0.0, ot_weight=0.0)
    tiny_own_fields = dict(codebook_size=12)
    own_parameter_names = ("codebook.weight", "code_proj.weight")  # code_proj: with codebook_dim != embed_dim
    save_load_overrides = dict(codebook_dim=8)
    bf16_overrides = dict(codebook_dim=8)
    # the wider text init makes the prompts' features (and so the zero-shot scores) clearly differ
    pipeline_overrides = WIDE_TEXT_INIT
    extra_outputs_method = "get_codes"
    peft_modules_to_save = ("itm_head", "codebook")
    gradient_cache_cases = {
        # EMA teachers + queues, IPOT, own targets
        "momentum_ipot": dict(
            config=dict(WIDE_TEXT_INIT, itm_weight=0.0, mlm_weight=0.0, num_fusion_layers=0),
            batch=6,
            seed=2,
            chunk_size=2,
            terms=CODE_TERMS,
        ),
        "no_momentum_sinkhorn_swapped_proj": dict(
            config=dict(
                WIDE_TEXT_INIT,
                itm_weight=0.0,
                mlm_weight=0.0,
                num_fusion_layers=0,
                use_momentum=False,
                ot_solver="sinkhorn",
                code_targets="swapped",
                codebook_dim=8,
            ),
            batch=6,
            seed=2,
            chunk_size=2,
            terms=CODE_TERMS,
        ),
    }

    def tiny_config(self, **overrides):
        return tiny_codis_config(**overrides)


def _config(dropout=True, **overrides):
    """conftest's tiny CODIS config; with ``dropout=False`` no dropout in either tower (deterministic passes) and a
    wider text init: at std 0.02 the tiny BERT gives every caption the same [CLS] feature (cosines ~1.0000),
    which would make the text-side terms blind to which plan they use."""
    if not dropout:
        overrides = dict(
            vision_config=dict(TINY_VISION, **NO_DROPOUT),
            text_config=dict(TINY_TEXT, **NO_DROPOUT, initializer_range=0.2),
            **overrides,
        )
    return tiny_codis_config(**overrides)


def _model(dropout=True, seed=0, **overrides):
    torch.manual_seed(seed)
    return CODISModel(_config(dropout, **overrides))


def _same_view_batch(batch=6, seed=0):
    b = tiny_batch(batch=batch, seed=seed)
    b["pixel_values_view2"] = b["pixel_values"]
    return b


def _ce(logits, targets):
    return -(torch.log_softmax(logits, dim=1) * targets).sum(1).mean()


def _cosine(x, y):
    return F.normalize(x, dim=1) @ F.normalize(y, dim=1).t()


# ----------------------------------------------------------------------------------------------------------------
# 6. the training forward's codebook terms vs float64 references


def _reference_terms(model, batch, image_plan_from="image", text_plan_from="text"):
    """Float64 references of the four codebook terms from the model's own student features (equal to the
    teacher's when momentum = 1, dropout = 0 and view2 = view1) and the float64 reference OT solvers."""
    cfg = model.config
    with torch.no_grad():
        feats = {
            "image": model.get_image_features(batch["pixel_values"]).double(),
            "text": model.get_text_features(batch["input_ids"], batch["attention_mask"]).double(),
        }
    codebook = model.codebook.weight.detach().double()
    plans = {m: targets_reference(f, codebook, cfg.ot_solver, **cfg.solver_kwargs()) for m, f in feats.items()}
    tau = cfg.code_temperature
    return (
        {
            "code_image": _ce(_cosine(feats["image"], codebook) / tau, plans[image_plan_from]),
            "code_text": _ce(_cosine(feats["text"], codebook) / tau, plans[text_plan_from]),
            "ot_image": ((1 - _cosine(feats["image"], codebook)) * plans["image"]).sum(1).mean(),
            "ot_text": ((1 - _cosine(feats["text"], codebook)) * plans["text"]).sum(1).mean(),
        },
        feats,
        plans,
    )


@pytest.mark.parametrize("use_momentum", [True, False], ids=["ema_teacher", "own_detached"])
@pytest.mark.parametrize("solver", ["ipot", "sinkhorn"])
def test_codebook_terms_match_float64_reference(solver, use_momentum):
    model = _model(
        dropout=False,
        momentum=1.0,
        ot_solver=solver,
        use_momentum=use_momentum,
        itm_weight=0.0,
        mlm_weight=0.0,
        code_targets="own",
    )  # the reference's plans; swapped: the test below
    model.train()
    batch = _same_view_batch()
    out = model(**batch, return_loss=True)
    assert set(out.loss_components()) == {"i2t", "t2i", "i2i", "t2t", *CODE_TERMS}
    reference, feats, _ = _reference_terms(model, batch)
    for name in CODE_TERMS:
        got = getattr(out, f"loss_{name}")
        assert got.dtype == torch.float32
        assert got.item() == pytest.approx(reference[name].item(), abs=1e-5, rel=1e-5), name
    if use_momentum:
        # the premise of the reference: the teacher (after its m = 1 EMA step) reproduces the student's features
        with torch.no_grad():
            teacher = model._image_feature(model._encode_image(batch["pixel_values_view2"], momentum=True)[1], True)
        torch.testing.assert_close(teacher.double(), feats["image"], rtol=0, atol=1e-6)


@pytest.mark.parametrize("solver", ["ipot", "sinkhorn"])
def test_swapped_targets_use_the_other_modalitys_plan(solver):
    batch = _same_view_batch()
    outs = {}
    for targets in ("own", "swapped"):
        model = _model(
            dropout=False, momentum=1.0, ot_solver=solver, code_targets=targets, itm_weight=0.0, mlm_weight=0.0
        )
        model.train()
        outs[targets] = model(**batch, return_loss=True)
    reference, _, plans = _reference_terms(model, batch, image_plan_from="text", text_plan_from="image")
    swapped, own = outs["swapped"], outs["own"]
    for name in CODE_TERMS:
        assert getattr(swapped, f"loss_{name}").item() == pytest.approx(reference[name].item(), abs=1e-5), name
    # the OT cost does not depend on the choice; the code prediction does (the two plans really differ)
    for name in ("ot_image", "ot_text"):
        assert getattr(swapped, f"loss_{name}").item() == pytest.approx(getattr(own, f"loss_{name}").item(), abs=1e-6)
    assert (plans["image"] - plans["text"]).abs().max() > 0.05
    for name in ("code_image", "code_text"):
        assert abs(getattr(swapped, f"loss_{name}").item() - getattr(own, f"loss_{name}").item()) > 1e-3, name


@pytest.mark.parametrize(
    "weights",
    [
        dict(cma_weight=0.7, imc_weight=0.3, code_weight=1.3, ot_weight=0.6, itm_weight=0.9, mlm_weight=0.4),
        dict(cma_weight=1.0, imc_weight=0.0, code_weight=0.0, ot_weight=2.0, itm_weight=0.0, mlm_weight=1.5),
        dict(cma_weight=0.0, imc_weight=0.5, code_weight=0.8, ot_weight=0.0, itm_weight=1.0, mlm_weight=0.0),
    ],
    ids=["all", "no_code_prediction", "no_ot"],
)
def test_total_is_the_weighted_sum_of_components(weights):
    model = _model(**weights)
    model.train()
    out = model(**tiny_batch(), return_loss=True)
    groups = {
        "cma_weight": ("i2t", "t2i"),
        "imc_weight": ("i2i", "t2t"),
        "code_weight": ("code_image", "code_text"),
        "ot_weight": ("ot_image", "ot_text"),
        "itm_weight": ("itm",),
        "mlm_weight": ("mlm",),
    }
    expected = 0.0
    for field, names in groups.items():
        for name in names:
            value = getattr(out, f"loss_{name}")
            if weights[field] == 0:
                assert value is None, name  # a disabled term is not computed
            else:
                assert value is not None and torch.isfinite(value), name
                expected = expected + weights[field] * value.double()
    assert out.loss.item() == pytest.approx(expected.item(), rel=1e-6)


# ----------------------------------------------------------------------------------------------------------------
# 7. the OT term trains the codebook, and only the codebook


@pytest.mark.parametrize("use_momentum", [True, False], ids=["ema_teacher", "own_detached"])
@pytest.mark.parametrize("solver", ["ipot", "sinkhorn"])
def test_ot_term_gives_the_codebook_its_reference_gradient_and_nothing_else(solver, use_momentum):
    ot_weight = 0.7
    model = _model(
        dropout=False,
        momentum=1.0,
        ot_solver=solver,
        use_momentum=use_momentum,
        cma_weight=0.0,
        imc_weight=0.0,
        itm_weight=0.0,
        mlm_weight=0.0,
        code_weight=0.0,
        ot_weight=ot_weight,
        num_fusion_layers=0,
    )
    model.train()
    batch = _same_view_batch()
    out = model(**batch, return_loss=True)
    assert set(out.loss_components()) == {"ot_image", "ot_text"}
    out.loss.backward()

    _, feats, plans = _reference_terms(model, batch)
    codebook = model.codebook.weight.detach().double().requires_grad_()
    ref = sum(((1 - _cosine(feats[m], codebook)) * plans[m]).sum(1).mean() for m in ("image", "text"))
    (ot_weight * ref).backward()
    grad = model.codebook.weight.grad
    assert grad is not None and grad.abs().max() > 1e-3
    torch.testing.assert_close(grad.double(), codebook.grad, rtol=1e-4, atol=1e-6)
    for name, parameter in model.named_parameters():
        if name != "codebook.weight":
            assert parameter.grad is None or not parameter.grad.any(), f"{name} got gradient from the OT cost"


# ----------------------------------------------------------------------------------------------------------------
# 8. get_codes, code_proj


def test_get_codes_is_the_softmax_of_the_code_logits():
    model = _model()
    model.eval()
    b = tiny_batch(batch=5)
    with torch.no_grad():
        codes = model.get_codes(b["pixel_values"], b["input_ids"], b["attention_mask"])
        image_feats = model.get_image_features(b["pixel_values"])
        text_feats = model.get_text_features(b["input_ids"], b["attention_mask"])
        image_logits = model.code_logits(image_feats)
    tau = model.config.code_temperature
    codewords = model.codebook.weight.detach().double()
    for probs, argmax, feats in (
        (codes.image_code_probs, codes.image_codes, image_feats),
        (codes.text_code_probs, codes.text_codes, text_feats),
    ):
        assert probs.shape == (5, 12) and probs.dtype == torch.float32
        torch.testing.assert_close(probs.sum(1), torch.ones(5), rtol=0, atol=1e-6)
        assert torch.equal(argmax, probs.argmax(1))
        expected = torch.softmax(_cosine(feats.double(), codewords) / tau, dim=1)
        torch.testing.assert_close(probs.double(), expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(codes.image_code_probs, torch.softmax(image_logits, 1), rtol=0, atol=0)
    torch.testing.assert_close(model.codewords, F.normalize(model.codebook.weight, dim=-1))
    # one modality at a time
    only_images = model.get_codes(pixel_values=b["pixel_values"])
    assert only_images.text_codes is None and torch.equal(only_images.image_codes, codes.image_codes)
    only_texts = model.get_codes(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
    assert only_texts.image_codes is None and torch.equal(only_texts.text_codes, codes.text_codes)
    with pytest.raises(ValueError):
        model.get_codes()


@pytest.mark.parametrize("codebook_dim", [None, 8])
def test_a_codeword_set_to_a_feature_claims_it(codebook_dim):
    model = _model(codebook_dim=codebook_dim)
    model.eval()
    assert hasattr(model, "code_proj") == (codebook_dim is not None)
    b = tiny_batch(batch=4, seed=1)
    targets = torch.tensor([7, 2, 9, 0])
    with torch.no_grad():
        image_code_space = model._to_code_space(model.get_image_features(b["pixel_values"]))
        text_code_space = model._to_code_space(model.get_text_features(b["input_ids"], b["attention_mask"]))
        before = model.get_codes(b["pixel_values"], b["input_ids"], b["attention_mask"])
        assert not torch.equal(before.image_codes, targets)
        model.codebook.weight[targets] = image_code_space * 3.0  # the norm does not matter
        model.codebook.weight[5] = text_code_space[2]
        codes = model.get_codes(b["pixel_values"], b["input_ids"], b["attention_mask"])
    assert torch.equal(codes.image_codes, targets)
    assert codes.text_codes[2].item() == 5


def test_code_proj_and_codebook_get_the_code_prediction_gradient():
    """codebook_dim != embed_dim: the student's code prediction trains the shared code_proj and the codebook,
    with the gradient of the float64 reference loss (plans from code_proj(teacher features))."""
    code_weight = 1.5
    model = _model(
        dropout=False,
        momentum=1.0,
        codebook_dim=8,
        cma_weight=0.0,
        imc_weight=0.0,
        itm_weight=0.0,
        mlm_weight=0.0,
        ot_weight=0.0,
        code_weight=code_weight,
        num_fusion_layers=0,
        code_targets="own",
    )  # the reference's plans
    model.train()
    assert model.code_proj.weight.shape == (8, 16) and model.code_proj.bias is None
    assert model.codebook.weight.shape == (12, 8)
    batch = _same_view_batch()
    out = model(**batch, return_loss=True)
    assert set(out.loss_components()) == {"code_image", "code_text"}
    out.loss.backward()
    with torch.no_grad():
        feats = {
            "image": model.get_image_features(batch["pixel_values"]).double(),
            "text": model.get_text_features(batch["input_ids"], batch["attention_mask"]).double(),
        }
    proj = model.code_proj.weight.detach().double().requires_grad_()
    codebook = model.codebook.weight.detach().double().requires_grad_()
    cfg = model.config
    ref = 0.0
    for modality, f in feats.items():
        plan = targets_reference((f @ proj.t()).detach(), codebook.detach(), cfg.ot_solver, **cfg.solver_kwargs())
        term = _ce(_cosine(f @ proj.t(), codebook) / cfg.code_temperature, plan)
        assert getattr(out, f"loss_code_{modality}").item() == pytest.approx(term.item(), abs=1e-5)
        ref = ref + term
    (code_weight * ref).backward()
    for parameter, expected in ((model.code_proj.weight, proj.grad), (model.codebook.weight, codebook.grad)):
        assert parameter.grad is not None and parameter.grad.abs().max() > 1e-3
        torch.testing.assert_close(parameter.grad.double(), expected, rtol=1e-4, atol=1e-5)  # float32 vs float64
    # the code prediction also trains the towers (it is the student's loss)
    assert model.vision_proj.weight.grad.abs().max() > 0 and model.text_proj.weight.grad.abs().max() > 0


# ----------------------------------------------------------------------------------------------------------------
# 9. training


def test_few_adam_steps_lower_the_loss():
    model = _model()
    model.train()
    batch = tiny_batch(batch=8, seed=7)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    history = []
    for step in range(30):
        torch.manual_seed(step)  # ITM negatives / MLM masks
        out = model(**batch, return_loss=True)
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
        history.append({"loss": out.loss.item(), **out.loss_components()})
    assert all(torch.isfinite(torch.tensor(list(h.values()))).all() for h in history)
    first, last = history[0], history[-1]
    assert last["loss"] < first["loss"], (first, last)
    code_first = first["code_image"] + first["code_text"]
    code_last = last["code_image"] + last["code_text"]
    assert code_last < code_first, (first, last)


def test_ot_term_does_not_train_code_proj():
    model = _model(
        dropout=False,
        codebook_dim=8,
        cma_weight=0.0,
        imc_weight=0.0,
        itm_weight=0.0,
        mlm_weight=0.0,
        code_weight=0.0,
        ot_weight=1.0,
        num_fusion_layers=0,
    )
    model.train()
    model(**_same_view_batch(), return_loss=True).loss.backward()
    assert model.codebook.weight.grad.abs().max() > 1e-3
    grad = model.code_proj.weight.grad
    assert grad is None or not grad.any(), f"code_proj got |grad| up to {grad.abs().max():.3g} from the OT cost"
