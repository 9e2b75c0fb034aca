"""Local fine-tuning of LoRA adapters with Opacus DP-SGD."""

from secfed.training.config import OPTIMIZERS, DPConfig
from secfed.training.dp_sgd import (
    PrivateTrainer,
    TrainResult,
    collate_examples,
    evaluate,
    make_private_trainer,
    train_local,
)

__all__ = [
    "OPTIMIZERS",
    "DPConfig",
    "PrivateTrainer",
    "TrainResult",
    "collate_examples",
    "evaluate",
    "make_private_trainer",
    "train_local",
]
