"""Load Hugging Face models from local directories, attach LoRA, adapter <-> flat vector."""

from secfed.models.adapter import (
    AdapterLayout,
    LayoutEntry,
    adapter_hash,
    adapter_layout,
    get_flat,
    set_flat,
)
from secfed.models.classifiers import (
    ClassifierSpec,
    FusionClassifier,
    ImageClassifier,
    TextClassifier,
)
from secfed.models.generative import GENERATIVE_TASKS, CausalLM, GenerativeInfo
from secfed.models.loading import load_tokenizer, load_tower, resolve_model_dir
from secfed.models.lora import DEFAULT_TARGET_MODULES, LoraSettings, attach_lora, lora_targets
from secfed.models.model_init import (
    TASKS,
    InitReport,
    init_model,
    load_generative,
    load_model,
    task_of,
)
from secfed.models.scopes import TRAINABLE_SCOPES, select_trainable
from secfed.models.storage import (
    ProcessorInfo,
    build_classifier,
    classifier_from_towers,
    load_classifier,
    save_classifier,
)
from secfed.models.targets import auto_lora_targets, named_lora_targets

__all__ = [
    "DEFAULT_TARGET_MODULES",
    "TRAINABLE_SCOPES",
    "GENERATIVE_TASKS",
    "TASKS",
    "CausalLM",
    "GenerativeInfo",
    "InitReport",
    "auto_lora_targets",
    "init_model",
    "load_generative",
    "load_model",
    "named_lora_targets",
    "task_of",
    "AdapterLayout",
    "ClassifierSpec",
    "FusionClassifier",
    "ImageClassifier",
    "LayoutEntry",
    "LoraSettings",
    "ProcessorInfo",
    "TextClassifier",
    "adapter_hash",
    "adapter_layout",
    "attach_lora",
    "build_classifier",
    "classifier_from_towers",
    "get_flat",
    "load_classifier",
    "load_tokenizer",
    "load_tower",
    "lora_targets",
    "resolve_model_dir",
    "save_classifier",
    "select_trainable",
    "set_flat",
]
