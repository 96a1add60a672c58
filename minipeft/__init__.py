"""minipeft: parameter-efficient fine-tuning of Llama 3, from scratch, in plain PyTorch + NumPy."""

from .llama import Llama, LlamaConfig
from .tokenizer import Tokenizer

__version__ = "0.1.0"
