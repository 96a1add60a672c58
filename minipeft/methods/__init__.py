"""The table of PEFT methods: name -> (module, config class). One module per method in this folder.

Each module opens with its paper, equation, what trains and whether it merges, and defines a config
dataclass (with a `method` name and, where it wraps Linears, a `targets` field) and
`apply(model, config)`. A new method adds its file and one row here, and touches no other method.
`minipeft.adapters.apply_method(model, name, **fields)` builds the config and applies it.
"""

METHODS = {
    "lora": ("minipeft.methods.lora", "LoRAConfig"),
    "dora": ("minipeft.methods.dora", "DoRAConfig"),
    "simple_dora": ("minipeft.methods.simple_dora", "SimpleDoRAConfig"),
    "tied_lora": ("minipeft.methods.tied_lora", "TiedLoRAConfig"),
    "partially_tied_lora": ("minipeft.methods.partially_tied_lora", "PartiallyTiedLoRAConfig"),
    "tied_lora_extra": ("minipeft.methods.tied_lora_extra", "TiedLoRAExtraConfig"),
    "tensor_embedding": ("minipeft.methods.tensor_embedding", "TensorEmbeddingConfig"),
    "ia3": ("minipeft.methods.ia3", "IA3Config"),
    "ia3pp": ("minipeft.methods.ia3pp", "IA3PPConfig"),
    "prefix_tuning": ("minipeft.methods.prefix_tuning", "PrefixTuningConfig"),
    "prompt_tuning": ("minipeft.methods.prompt_tuning", "PromptTuningConfig"),
    "infix_tuning": ("minipeft.methods.infix_tuning", "InfixTuningConfig"),
    "pasta": ("minipeft.methods.pasta", "PaSTAConfig"),
    "llama_adapter": ("minipeft.methods.llama_adapter", "LlamaAdapterConfig"),
    "bitfit": ("minipeft.methods.bitfit", "BitFitConfig"),
    "bottleneck_adapter": ("minipeft.methods.bottleneck_adapter", "BottleneckAdapterConfig"),
    "full": ("minipeft.methods.full", "FullConfig"),
    "adamix": ("minipeft.methods.adamix", "AdaMixConfig"),
    "adamix_lora": ("minipeft.methods.adamix_lora", "AdaMixLoRAConfig"),
    "adalora": ("minipeft.methods.adalora", "AdaLoRAConfig"),
    "dylora": ("minipeft.methods.dylora", "DyLoRAConfig"),
    "sparse_ft": ("minipeft.methods.sparse_ft", "SparseFTConfig"),
    "diff_pruning": ("minipeft.methods.diff_pruning", "DiffPruningConfig"),
    "spiel": ("minipeft.methods.spiel", "SpIELConfig"),
}
