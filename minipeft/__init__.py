"""minipeft: parameter-efficient fine-tuning of Llama 3, from scratch, in plain PyTorch + NumPy.

    from minipeft import Llama, apply_method, trainable_report
    model = Llama.from_pretrained("~/models/Llama-3.2-1B")
    apply_method(model, "lora", r=16, targets="all-linear")   # or lora.apply(model, LoRAConfig(...))

The package, by layer (docs/layout.md; tests/test_layout.py keeps imports going down): the model and its
files (llama.py, masks.py, loss.py, tokenizer.py, safetensors_io.py, meta_layout.py, quant.py); the one
injection mechanism (peft.py), the methods (methods/) and their files (adapters.py, hf_peft.py); data and
tasks (data.py, tasks.py, base.py, recipes.py); scoring.py; the job (runs.py, finetune.py, evaluate.py,
compare.py, toy.py, export.py, generate.py, distributed.py); the labs' checks and grader (lab/, grade.py).
"""

import os

# OpenMP threads that wait for work sleep instead of spinning. On a CPU shared with other jobs (a course's lab
# server, CI) a spinning thread holds a core that a descheduled peer needs, and every small op then waits a
# whole time slice: two spinning threads made a toy training step 2x slower than one under load, two
# sleeping ones 0.8-0.9x (bench/bench_threads.py; the figures and the choice in docs/performance.md,
# "Threads on a shared CPU"). Read when torch loads OpenMP, so it
# must be set before torch is imported; a value the user set is kept.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from .adapters import METHODS, apply_method, load_adapter, save_adapter
from .llama import Llama, LlamaConfig
from .methods import (bitfit, dora, ia3, ia3pp, llama_adapter, lora, partially_tied_lora, prefix_tuning,
                      prompt_tuning, simple_dora, tensor_embedding, tied_lora, tied_lora_extra)
from .methods.bitfit import BitFitConfig
from .methods.dora import DoRAConfig
from .methods.ia3 import IA3Config
from .methods.ia3pp import IA3PPConfig
from .methods.llama_adapter import LlamaAdapterConfig
from .methods.lora import LoRAConfig
from .methods.partially_tied_lora import PartiallyTiedLoRAConfig
from .methods.prefix_tuning import PrefixTuningConfig
from .methods.prompt_tuning import PromptTuningConfig
from .methods.simple_dora import SimpleDoRAConfig
from .methods.tensor_embedding import TensorEmbeddingConfig
from .methods.tied_lora import TiedLoRAConfig
from .methods.tied_lora_extra import TiedLoRAExtraConfig
from .peft import count_parameters, merge, merge_and_unload, param_groups, trainable_report, unmerge
from .tokenizer import Tokenizer

__version__ = "0.1.0"


def __getattr__(name: str):
    """`generate_text` is imported on first use: importing minipeft.generate here would make
    `python -m minipeft.generate` find its own module already loaded (runpy's RuntimeWarning)."""
    if name == "generate_text":
        from .generate import generate_text
        return generate_text
    raise AttributeError(f"module 'minipeft' has no attribute {name!r}")
