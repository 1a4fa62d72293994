"""Fine-tuning: LoRA, DoRA, state tuning and full fine-tunes, with their data and training loop."""

from .adapters import (
    DEFAULT_LORA_KEYS,
    DEFAULT_LORA_PARAMETERS,
    FINE_TUNE_TYPES,
    AdapterError,
    apply_lora_layers,
    base_fingerprint,
    dequantize_model,
    fuse_adapters,
    load_adapters,
    load_tuned_cache,
    model_identity,
    prepare_for_training,
    save_adapter_config,
    save_tuned_state,
)
from .datasets import DatasetError, Example, load_datasets, load_jsonl_dataset, make_example
from .lora import DoRALinear, LoRALinear
from .losses import chunked_cross_entropy
from .state import InitialState, StateTunedModel, make_tuned_cache
from .trainer import (
    TrainingArgs,
    TrainingError,
    TrainingHistory,
    TrainingInterrupted,
    evaluate,
    iterate_batches,
    resume_from,
    train,
)

__all__ = [
    "DEFAULT_LORA_KEYS",
    "DEFAULT_LORA_PARAMETERS",
    "FINE_TUNE_TYPES",
    "AdapterError",
    "DatasetError",
    "DoRALinear",
    "Example",
    "InitialState",
    "LoRALinear",
    "StateTunedModel",
    "TrainingArgs",
    "TrainingError",
    "TrainingHistory",
    "TrainingInterrupted",
    "apply_lora_layers",
    "base_fingerprint",
    "chunked_cross_entropy",
    "dequantize_model",
    "evaluate",
    "fuse_adapters",
    "iterate_batches",
    "load_adapters",
    "load_datasets",
    "load_jsonl_dataset",
    "load_tuned_cache",
    "make_example",
    "make_tuned_cache",
    "model_identity",
    "prepare_for_training",
    "resume_from",
    "save_adapter_config",
    "save_tuned_state",
    "train",
]
