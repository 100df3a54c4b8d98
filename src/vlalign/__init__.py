"""vlalign: Hugging Face-native vision-language representation learning (TCL, CODIS, and more to come).

Importing the package registers its configs, models and processors with transformers' Auto classes, and marks
them for `register_for_auto_class` so that saved folders carry `auto_map` and the code files (loadable with
`trust_remote_code=True` where vlalign is not installed).
"""

from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForZeroShotImageClassification,
    AutoProcessor,
)

from .albef_stack import ALBEFModel, ALBEFOutput
from .configuration_albef import ALBEFStackConfig
from .configuration_codis import CODISConfig
from .configuration_tcl import TCLConfig
from .modeling_codis import CODISCodes, CODISModel, CODISOutput
from .modeling_tcl import TCLModel, TCLOutput
from .processing_vlalign import VLAlignProcessor

__version__ = "0.1.0"

for _config_class, _model_class in ((TCLConfig, TCLModel), (CODISConfig, CODISModel)):
    AutoConfig.register(_config_class.model_type, _config_class, exist_ok=True)
    AutoModel.register(_config_class, _model_class, exist_ok=True)
    AutoModelForZeroShotImageClassification.register(_config_class, _model_class, exist_ok=True)
    AutoProcessor.register(_config_class, VLAlignProcessor, exist_ok=True)
    _config_class.register_for_auto_class()
    _model_class.register_for_auto_class("AutoModel")
VLAlignProcessor.register_for_auto_class()

__all__ = [
    "ALBEFModel",
    "ALBEFOutput",
    "ALBEFStackConfig",
    "CODISCodes",
    "CODISConfig",
    "CODISModel",
    "CODISOutput",
    "TCLConfig",
    "TCLModel",
    "TCLOutput",
    "VLAlignProcessor",
    "__version__",
]
