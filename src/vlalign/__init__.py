"""vlalign: Hugging Face-native vision-language representation learning (TCL, and more to come).

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

from .configuration_tcl import TCLConfig
from .albef_stack import ALBEFModel, ALBEFOutput
from .configuration_albef import ALBEFStackConfig
from .modeling_tcl import TCLModel, TCLOutput
from .processing_vlalign import VLAlignProcessor

__version__ = "0.1.0"

AutoConfig.register(TCLConfig.model_type, TCLConfig, exist_ok=True)
AutoModel.register(TCLConfig, TCLModel, exist_ok=True)
AutoModelForZeroShotImageClassification.register(TCLConfig, TCLModel, exist_ok=True)
AutoProcessor.register(TCLConfig, VLAlignProcessor, exist_ok=True)

TCLConfig.register_for_auto_class()
TCLModel.register_for_auto_class("AutoModel")
VLAlignProcessor.register_for_auto_class()

__all__ = ["ALBEFModel", "ALBEFOutput", "ALBEFStackConfig", "TCLConfig", "TCLModel", "TCLOutput", "VLAlignProcessor",
           "__version__"]
