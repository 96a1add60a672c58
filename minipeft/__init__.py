"""minipeft: parameter-efficient fine-tuning of Llama 3, from scratch, in plain PyTorch + NumPy.

    from minipeft import Llama, apply_method, trainable_report
    model = Llama.from_pretrained("~/models/Llama-3.2-1B")
    apply_method(model, "lora", r=16, targets="all-linear")   # or lora.apply(model, LoRAConfig(...))
"""

from . import (bitfit, dora, ia3, ia3pp, llama_adapter, lora, partially_tied_lora, prefix_tuning,
               prompt_tuning, simple_dora, tensor_embedding, tied_lora, tied_lora_extra)
from .adapters import METHODS, apply_method, load_adapter, save_adapter
from .bitfit import BitFitConfig
from .dora import DoRAConfig
from .ia3 import IA3Config
from .ia3pp import IA3PPConfig
from .llama import Llama, LlamaConfig
from .llama_adapter import LlamaAdapterConfig
from .lora import LoRAConfig
from .partially_tied_lora import PartiallyTiedLoRAConfig
from .peft import count_parameters, merge, param_groups, trainable_report, unmerge
from .prefix_tuning import PrefixTuningConfig
from .prompt_tuning import PromptTuningConfig
from .simple_dora import SimpleDoRAConfig
from .tensor_embedding import TensorEmbeddingConfig
from .tied_lora import TiedLoRAConfig
from .tied_lora_extra import TiedLoRAExtraConfig
from .tokenizer import Tokenizer

__version__ = "0.1.0"
