"""The tiny configurations and inputs every test builds on: random tiny models, nothing downloaded.

Test modules import what they need from here (`from fixtures import tiny_tcl_config`); pytest's own fixtures are in
conftest.py. No test module imports another.
"""

import torch

TINY_VISION = dict(
    model_type="vit", image_size=16, patch_size=4, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
    intermediate_size=64,
)
TINY_TEXT = dict(
    model_type="bert", vocab_size=144, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
    intermediate_size=64, max_position_embeddings=32, pad_token_id=0,
)


# A script prefix that makes `import vlalign` fail, so a subprocess proves that a saved folder loads through
# transformers' remote code alone (the script can end by importing vlalign and expect the ImportError).
BLOCK_VLALIGN = """import sys
sys.path = [p for p in sys.path if 'vlalign' not in p and not p.endswith('/src')]
class Block:
    def find_spec(self, name, path=None, target=None):
        if name == 'vlalign' or name.startswith('vlalign.'):
            raise ImportError('vlalign is blocked in this test')
sys.meta_path.insert(0, Block())
"""

# The `model` section of a training-script config for a tiny TCL model (training/train.py tests).
TINY_TRAIN_MODEL = {
    "vision_config": {"model_type": "vit", "image_size": 16, "patch_size": 4, "hidden_size": 32,
                      "num_hidden_layers": 1, "num_attention_heads": 4, "intermediate_size": 64},
    "text_config": {"model_type": "bert", "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
                    "intermediate_size": 64, "max_position_embeddings": 32},
    "num_fusion_layers": 1, "embed_dim": 16, "queue_size": 64, "lmi_image_grid": 2,
}


def tiny_tcl_config(**overrides):
    from vlalign import TCLConfig

    kwargs = dict(
        vision_config=dict(TINY_VISION), text_config=dict(TINY_TEXT), num_fusion_layers=1, embed_dim=16,
        queue_size=32, mask_token_id=4, lmi_image_grid=2,
    )
    kwargs.update(overrides)
    return TCLConfig(**kwargs)


def tiny_codis_config(**overrides):
    from vlalign import CODISConfig

    kwargs = dict(
        vision_config=dict(TINY_VISION), text_config=dict(TINY_TEXT), num_fusion_layers=1, embed_dim=16,
        queue_size=32, mask_token_id=4, codebook_size=12,
    )
    kwargs.update(overrides)
    return CODISConfig(**kwargs)


def tiny_batch(batch=4, length=8, seed=0, image_size=16):
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(5, 144, (batch, length), generator=g)
    input_ids[:, 0] = 2
    attention_mask = torch.ones(batch, length, dtype=torch.long)
    attention_mask[0, length - 3 :] = 0
    input_ids[attention_mask == 0] = 0
    return dict(
        input_ids=input_ids,
        attention_mask=attention_mask,
        pixel_values=torch.randn(batch, 3, image_size, image_size, generator=g),
        pixel_values_view2=torch.randn(batch, 3, image_size, image_size, generator=g),
    )


# A tiny MIVC model: ViT tower, Q-Former and a one-layer Llama
MIVC_VISION = dict(model_type="vit", image_size=16, patch_size=8, hidden_size=32, num_hidden_layers=1,
                   num_attention_heads=4, intermediate_size=64)
MIVC_LLAMA = dict(model_type="llama", vocab_size=40, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                  num_key_value_heads=4, intermediate_size=64, max_position_embeddings=64,
                  tie_word_embeddings=True)  # the LM's output layer shares the input embeddings
MIVC_QFORMER = dict(hidden_size=24, num_hidden_layers=1, num_attention_heads=4, intermediate_size=48)


def tiny_mivc_config(**overrides):
    from vlalign import MIVCConfig

    kwargs = dict(vision_config=dict(MIVC_VISION), text_config=dict(MIVC_LLAMA), qformer_config=dict(MIVC_QFORMER),
                  num_query_tokens=4, image_token_id=5, pooling_attention_dim=8)
    kwargs.update(overrides)
    return MIVCConfig(**kwargs)
