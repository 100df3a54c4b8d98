"""The attention implementations of the ALBEF-stack models (TCL, CODIS): every attention call in the encoders they
build (ViT, BERT text and fusion layers incl. cross-attention, the momentum copies) goes through transformers' SDPA
path by default, and gives the eager path's loss (MIVC's towers, Q-Former and LM: test_modeling_mivc.py).

The check: with `attn_implementation="eager"` the eager kernels run N times; built by default, the same forward runs
`torch.nn.functional.scaled_dot_product_attention` exactly N times, the eager kernels never, and the outputs agree.
"""

from __future__ import annotations

import pytest
import torch
from fixtures import count_attention_calls, tiny_batch, tiny_codis_config, tiny_tcl_config

from vlalign import CODISModel, TCLModel


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
