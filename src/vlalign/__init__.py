"""vlalign: Hugging Face-native vision-language representation learning (TCL, CODIS, MIVC).

Importing the package registers its configs, models and processors with transformers' Auto classes, and marks
them for `register_for_auto_class` so that saved folders carry `auto_map` and the code files (loadable with
`trust_remote_code=True` where vlalign is not installed).

Where vlalign depends on transformers internals (not its documented API), kept short on purpose; each site says so
in a comment, and tests/test_transformers_internals.py fails when an import of a transformers submodule is added
that is not listed here:
- modeling_albef.py: the fusion layers are BERT's blocks (`models.bert.modeling_bert`: BertAttention, BertIntermediate,
  BertOutput, BertPredictionHeadTransform), with `masking_utils.create_bidirectional_mask` and
  `modeling_layers.GradientCheckpointingLayer`.
- configuration_albef.py, configuration_mivc.py: `configuration_utils.SubConfigSpec` for the sub-config defaults.
- modeling_mivc.py: MIVCOutput has the field set of `modeling_outputs.CausalLMOutputWithPast` (the cache's name
  changes with the release), and generation relies on GenerationMixin passing `pixel_values` on the prefill step
  only.
- trainer.py (training only, not in saved folders): the Trainer's checkpoint hooks `_save_checkpoint` /
  `_load_from_checkpoint` / `_get_output_dir` (exact resume, staged checkpoints), `_load_best_model` (loaded whole),
  `_load_optimizer_and_scheduler`
  (settings changed on resume), `_get_learning_rate` (named in an error),
  `_prepare_inputs`, `_build_accelerator_args` (torch_compile of the towers only), the `on_pre_optimizer_step` /
  `on_optimizer_step` callback events, `trainer_utils.rotate_checkpoints` and the checkpoint-folder names.
- hub.py (training only): `dynamic_module_utils.get_relative_imports`, to upload exactly the code files a saved
  folder's `auto_map` needs.
"""

from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForImageTextToText,
    AutoModelForZeroShotImageClassification,
    AutoProcessor,
)

from .configuration_albef import ALBEFStackConfig
from .configuration_codis import CODISConfig
from .configuration_mivc import MIVCConfig
from .configuration_tcl import TCLConfig
from .loading import (
    CheckpointMismatchError,
    CorruptCheckpointError,
    MissingCheckpointFileError,
    UnsafeCheckpointError,
    check_tokenizer_fits_model,
    check_tokenizer_special_tokens,
)
from .mivc_pooling import MIVCPooling, MIVCPoolingOutput
from .modeling_albef import ALBEFModel, ALBEFOutput
from .modeling_codis import CODISCodes, CODISModel, CODISOutput
from .modeling_mivc import MIVCForConditionalGeneration, MIVCOutput
from .modeling_tcl import TCLModel, TCLOutput
from .processing_vlalign import MissingTokenizerFileError, MIVCProcessor, VLAlignProcessor

__version__ = "0.1.0"

for _config_class, _model_class in ((TCLConfig, TCLModel), (CODISConfig, CODISModel)):
    AutoConfig.register(_config_class.model_type, _config_class, exist_ok=True)
    AutoModel.register(_config_class, _model_class, exist_ok=True)
    AutoModelForZeroShotImageClassification.register(_config_class, _model_class, exist_ok=True)
    AutoProcessor.register(_config_class, VLAlignProcessor, exist_ok=True)
    _config_class.register_for_auto_class()
    _model_class.register_for_auto_class("AutoModel")
VLAlignProcessor.register_for_auto_class()

AutoConfig.register(MIVCConfig.model_type, MIVCConfig, exist_ok=True)
AutoModelForImageTextToText.register(MIVCConfig, MIVCForConditionalGeneration, exist_ok=True)
AutoProcessor.register(MIVCConfig, MIVCProcessor, exist_ok=True)
MIVCConfig.register_for_auto_class()
MIVCForConditionalGeneration.register_for_auto_class("AutoModelForImageTextToText")
MIVCProcessor.register_for_auto_class()

__all__ = [
    "ALBEFModel",
    "ALBEFOutput",
    "ALBEFStackConfig",
    "CheckpointMismatchError",
    "CorruptCheckpointError",
    "CODISCodes",
    "CODISConfig",
    "CODISModel",
    "CODISOutput",
    "MissingCheckpointFileError",
    "MissingTokenizerFileError",
    "MIVCConfig",
    "MIVCForConditionalGeneration",
    "MIVCOutput",
    "MIVCPooling",
    "MIVCPoolingOutput",
    "MIVCProcessor",
    "TCLConfig",
    "TCLModel",
    "TCLOutput",
    "UnsafeCheckpointError",
    "VLAlignProcessor",
    "__version__",
    "check_tokenizer_fits_model",
    "check_tokenizer_special_tokens",
]
