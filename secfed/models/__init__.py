"""Load Hugging Face models from local directories, attach LoRA, adapter <-> flat vector."""
