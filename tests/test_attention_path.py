"""Every attention call in the encoders vlalign builds (ViT, BERT text and fusion layers incl. cross-attention, the
momentum copies, the Q-Former, the causal LM) goes through transformers' SDPA path by default.

The check: with `attn_implementation="eager"` the eager kernels run N times; built by default, the same forward runs
`torch.nn.functional.scaled_dot_product_attention` exactly N times, the eager kernels never, and the outputs agree.
"""

from __future__ import annotations

import importlib

import pytest
import torch

from fixtures import tiny_batch, tiny_codis_config, tiny_tcl_config
from test_modeling_mivc import _config as mivc_config
from test_modeling_mivc import _mask, _pixels, _prompt_ids
from vlalign import CODISModel, MIVCForConditionalGeneration, TCLModel

EAGER_MODULES = ("vit", "bert", "llama", "blip_2")


@pytest.fixture
def attention_calls(monkeypatch):
    """Counts of eager-kernel and SDPA calls during the test."""
    counts = {"eager": 0, "sdpa": 0}
    for name in EAGER_MODULES:
        module = importlib.import_module(f"transformers.models.{name}.modeling_{name}")
        original = module.eager_attention_forward

        def counting_eager(*args, _original=original, **kwargs):
            counts["eager"] += 1
            return _original(*args, **kwargs)

        monkeypatch.setattr(module, "eager_attention_forward", counting_eager)
    original_sdpa = torch.nn.functional.scaled_dot_product_attention

    def counting_sdpa(*args, **kwargs):
        counts["sdpa"] += 1
        return original_sdpa(*args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", counting_sdpa)
    return counts


def _albef_case(model_class, config):
    def run(attn_implementation):
        torch.manual_seed(0)
        model = model_class._from_config(config, attn_implementation=attn_implementation)
        model.eval()  # no dropout: the eager and SDPA runs must agree
        with torch.no_grad():
            return model(**tiny_batch(), return_loss=True).loss
    return run


def _mivc_case(qformer):
    def run(attn_implementation):
        torch.manual_seed(0)
        model = MIVCForConditionalGeneration._from_config(mivc_config(qformer=qformer),
                                                          attn_implementation=attn_implementation).eval()
        counts, n_images = (2, 3), 3
        ids = torch.tensor([_prompt_ids(model, c) for c in counts])
        with torch.no_grad():
            return model(input_ids=ids, pixel_values=_pixels(2, n_images), image_mask=_mask(counts, n_images),
                         labels=ids).loss
    return run


CASES = {
    "tcl": _albef_case(TCLModel, tiny_tcl_config()),
    "codis": _albef_case(CODISModel, tiny_codis_config()),
    "mivc": _mivc_case(qformer=False),
    "mivc_qformer": _mivc_case(qformer=True),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_every_attention_call_uses_sdpa_by_default(case, attention_calls):
    eager_loss = CASES[case]("eager")
    eager_calls = attention_calls["eager"]
    # at least the vision tower and one other (text / fusion / Q-Former / LM) attention layer ran
    assert eager_calls >= 2 and attention_calls["sdpa"] == 0
    attention_calls.update(eager=0, sdpa=0)
    sdpa_loss = CASES[case](None)  # the default a user gets
    assert attention_calls["eager"] == 0
    assert attention_calls["sdpa"] == eager_calls
    torch.testing.assert_close(sdpa_loss, eager_loss, atol=1e-5, rtol=1e-5)
