"""Tiny randomly initialised towers written as local Hugging Face directories.

For tests, benchmarks and smoke runs: a BERT-like text tower (with a small WordPiece tokenizer),
a ViT-like image tower, causal LMs of several architectures and a LLaVA-style vision-language
model (with a byte-level BPE tokenizer and a chat template), hidden size 32 and 2 layers by
default. Built from ``transformers``
configs only, nothing is downloaded.
"""

from __future__ import annotations

import os
import string
from pathlib import Path

import torch

__all__ = [
    "TINY_CAUSAL_ARCHS",
    "write_tiny_causal_lm",
    "write_tiny_image_tower",
    "write_tiny_llava",
    "write_tiny_text_tower",
    "write_tiny_tokenizer",
]

_SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
_WORDS = [
    "pothole", "crack", "graffiti", "flood", "light", "broken", "road", "street", "sign",
    "bench", "tree", "fallen", "water", "leak", "trash", "overflowing", "near", "the", "a",
    "on", "at", "is", "and", "park", "bridge", "sidewalk", "damaged", "missing", "dark",
]


def write_tiny_text_tower(
    out_dir: str | os.PathLike[str], *, hidden_size: int = 32, num_layers: int = 2,
    num_heads: int = 2, max_length: int = 32, dropout: float = 0.0, seed: int = 0,
) -> Path:
    """Write a tiny ``BertModel`` plus a WordPiece tokenizer to ``out_dir``; returns it."""
    from transformers import BertConfig, BertModel, BertTokenizerFast

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    vocab = _SPECIAL + list(string.ascii_lowercase) + [f"##{c}" for c in string.ascii_lowercase]
    vocab += _WORDS
    (out / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tokenizer = BertTokenizerFast(vocab_file=str(out / "vocab.txt"), do_lower_case=True)
    tokenizer.model_max_length = max_length
    config = BertConfig(
        vocab_size=len(vocab), hidden_size=hidden_size, num_hidden_layers=num_layers,
        num_attention_heads=num_heads, intermediate_size=2 * hidden_size,
        max_position_embeddings=max_length, hidden_dropout_prob=dropout,
        attention_probs_dropout_prob=dropout,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = BertModel(config, add_pooling_layer=False)
    model.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    return out


def write_tiny_image_tower(
    out_dir: str | os.PathLike[str], *, hidden_size: int = 32, num_layers: int = 2,
    num_heads: int = 2, image_size: int = 16, patch_size: int = 8, dropout: float = 0.0,
    seed: int = 0,
) -> Path:
    """Write a tiny ``ViTModel`` to ``out_dir``; returns it."""
    from transformers import ViTConfig, ViTModel

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = ViTConfig(
        image_size=image_size, patch_size=patch_size, hidden_size=hidden_size,
        num_hidden_layers=num_layers, num_attention_heads=num_heads,
        intermediate_size=2 * hidden_size, hidden_dropout_prob=dropout,
        attention_probs_dropout_prob=dropout,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = ViTModel(config, add_pooling_layer=False)
    model.save_pretrained(str(out))
    return out


# ----------------------------------------------------------------------------- generative

#: Causal-LM architectures :func:`write_tiny_causal_lm` builds (``model_type`` of the config).
TINY_CAUSAL_ARCHS = ("llama", "qwen2", "mistral", "gemma", "gpt2")

#: Special tokens of the tiny tokenizer; ``<image>`` is the LLaVA image placeholder.
TINY_SPECIAL = ("<pad>", "<s>", "</s>", "<unk>", "<|system|>", "<|user|>", "<|assistant|>",
                "<image>")

#: A chat template in the style of Zephyr: ``<|role|>\ncontent</s>\n`` per message.
TINY_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}{{ eos_token }}\n"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)

_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Report: smoke rising from the depot near the river. Hazard: fire_smoke, priority high.",
    "Water is pooling under the bridge after the storm; the road is closed.",
    "A cracked beam was found in the parking garage on level two.",
    "Answer: hazard=flooding priority=medium action=dispatch pumps",
    "User asks a question and the assistant answers it politely and briefly.",
    "0 1 2 3 4 5 6 7 8 9 10 11 12 ; : , . ! ? = - _ ( ) [ ] { } \" '",
]


def write_tiny_tokenizer(out_dir: str | os.PathLike[str], *, corpus: list[str] | None = None,
                         vocab_size: int = 320, max_length: int = 256) -> Path:
    """Train a byte-level BPE tokenizer on ``corpus`` (any text encodes: no unknown tokens),
    with BOS/EOS/pad, the chat roles and ``<image>`` as special tokens and a chat template;
    save it to ``out_dir`` as a ``PreTrainedTokenizerFast``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=list(TINY_SPECIAL), show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(list(corpus or _CORPUS), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
        unk_token="<unk>", additional_special_tokens=["<|system|>", "<|user|>", "<|assistant|>",
                                                      "<image>"],
        model_max_length=max_length,
    )
    fast.chat_template = TINY_CHAT_TEMPLATE
    fast.save_pretrained(str(out))
    return out


def _causal_config(arch: str, *, vocab: int, hidden: int, layers: int, heads: int,
                   kv_heads: int, max_length: int, special: dict[str, int]):
    from transformers import (
        GemmaConfig,
        GPT2Config,
        LlamaConfig,
        MistralConfig,
        Qwen2Config,
    )

    if arch == "gpt2":
        return GPT2Config(vocab_size=vocab, n_embd=hidden, n_layer=layers, n_head=heads,
                          n_positions=max_length, resid_pdrop=0.0, embd_pdrop=0.0,
                          attn_pdrop=0.0, bos_token_id=special["bos"],
                          eos_token_id=special["eos"], pad_token_id=special["pad"])
    classes = {"llama": LlamaConfig, "qwen2": Qwen2Config, "mistral": MistralConfig,
               "gemma": GemmaConfig}
    extra = {"head_dim": hidden // heads} if arch == "gemma" else {}
    return classes[arch](
        vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
        max_position_embeddings=max_length, bos_token_id=special["bos"],
        eos_token_id=special["eos"], pad_token_id=special["pad"], tie_word_embeddings=True,
        **extra,
    )


def write_tiny_causal_lm(
    out_dir: str | os.PathLike[str], *, arch: str = "llama", corpus: list[str] | None = None,
    vocab_size: int = 320, hidden_size: int = 32, num_layers: int = 2, num_heads: int = 4,
    num_kv_heads: int = 2, max_length: int = 256, seed: int = 0,
) -> Path:
    """Write a tiny randomly initialised causal LM of ``arch`` (see :data:`TINY_CAUSAL_ARCHS`)
    plus a byte-level BPE tokenizer (:func:`write_tiny_tokenizer`) to ``out_dir``; returns it.

    Raises:
        ValueError: unknown ``arch``.
    """
    from transformers import AutoModelForCausalLM

    if arch not in TINY_CAUSAL_ARCHS:
        raise ValueError(f"arch must be one of {TINY_CAUSAL_ARCHS} (got {arch!r})")
    out = write_tiny_tokenizer(out_dir, corpus=corpus, vocab_size=vocab_size,
                               max_length=max_length)
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast.from_pretrained(  # nosec B615  # the directory just written
        str(out), local_files_only=True)
    special = {"bos": tok.bos_token_id, "eos": tok.eos_token_id, "pad": tok.pad_token_id}
    config = _causal_config(arch, vocab=len(tok), hidden=hidden_size, layers=num_layers,
                            heads=num_heads, kv_heads=num_kv_heads, max_length=max_length,
                            special=special)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(str(out))
    return out


def write_tiny_llava(
    out_dir: str | os.PathLike[str], *, corpus: list[str] | None = None, vocab_size: int = 320,
    hidden_size: int = 32, num_layers: int = 2, image_size: int = 16, patch_size: int = 8,
    vision: str = "clip", max_length: int = 256, seed: int = 0,
) -> Path:
    """Write a tiny LLaVA-style model (a CLIP or SigLIP vision tower, the two-layer projector
    and a Llama language model) with the tiny tokenizer to ``out_dir``; returns it.

    The image placeholder is the tokenizer's ``<image>`` token; one image becomes
    ``(image_size / patch_size) ** 2`` of them.
    """
    from transformers import (
        CLIPVisionConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        PreTrainedTokenizerFast,
        SiglipVisionConfig,
    )

    out = write_tiny_tokenizer(out_dir, corpus=corpus, vocab_size=vocab_size,
                               max_length=max_length)
    tok = PreTrainedTokenizerFast.from_pretrained(  # nosec B615  # the directory just written
        str(out), local_files_only=True)
    special = {"bos": tok.bos_token_id, "eos": tok.eos_token_id, "pad": tok.pad_token_id}
    text = _causal_config("llama", vocab=len(tok), hidden=hidden_size, layers=num_layers,
                          heads=4, kv_heads=2, max_length=max_length, special=special)
    vision_cls = {"clip": CLIPVisionConfig, "siglip": SiglipVisionConfig}[vision]
    vision_config = vision_cls(hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                               num_hidden_layers=num_layers, num_attention_heads=4,
                               image_size=image_size, patch_size=patch_size)
    config = LlavaConfig(
        vision_config=vision_config, text_config=text,
        image_token_id=tok.convert_tokens_to_ids("<image>"),
        vision_feature_layer=-1,
        vision_feature_select_strategy="full" if vision == "siglip" else "default",
        projector_hidden_act="gelu", tie_word_embeddings=True,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlavaForConditionalGeneration(config)
    model.save_pretrained(str(out))
    (out / "preprocessor_config.json").write_text(
        '{"image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5], '
        f'"size": {{"height": {image_size}, "width": {image_size}}}}}\n'
    )
    return out
