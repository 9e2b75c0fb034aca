"""Local fine-tuning of LoRA adapters with Opacus DP-SGD."""
