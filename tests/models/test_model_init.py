"""``secfed model init`` (issue 16): every task from a tiny local checkpoint, the LoRA targets
``auto`` picks per architecture, the output taken unchanged by federation init / join, and the
refusals (hub id, pickle-only checkpoint, unknown task, bad targets) as one-line errors."""

import json

import pytest
import torch

from secfed.errors import ModelError
from secfed.models import (
    adapter_hash,
    adapter_layout,
    get_flat,
    init_model,
    load_model,
    task_of,
)
from secfed.models.tiny import write_tiny_causal_lm, write_tiny_llava


@pytest.fixture(scope="session")
def causal_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("causal")
    out = {arch: write_tiny_causal_lm(root / arch, arch=arch)
           for arch in ("llama", "qwen2", "mistral", "gemma", "gpt2")}
    out["llava"] = write_tiny_llava(root / "llava")
    out["llava-siglip"] = write_tiny_llava(root / "llava-siglip", vision="siglip")
    return out


def _secfed(*args):
    """The CLI in-process (its stderr apart; not a terminal, as in a pipeline)."""
    from click.testing import CliRunner

    from secfed.cli.main import cli

    return CliRunner().invoke(cli, [str(a) for a in args])


@pytest.mark.parametrize(("arch", "leaves", "count"), [
    ("llama", {"q_proj", "v_proj"}, 4),
    ("qwen2", {"q_proj", "v_proj"}, 4),
    ("mistral", {"q_proj", "v_proj"}, 4),
    ("gemma", {"q_proj", "v_proj"}, 4),
    ("gpt2", {"c_attn"}, 2),
])
def test_auto_targets_are_the_attention_query_value_projections(arch, leaves, count,
                                                                 causal_dirs, tmp_path):
    report = init_model(causal_dirs[arch], task="causal-lm", out=tmp_path / "m")
    assert {t.rsplit(".", 1)[-1] for t in report.targets} == leaves
    assert len(report.targets) == count  # 2 layers
    model, info = load_model(tmp_path / "m")
    assert info.task == task_of(tmp_path / "m") == "causal-lm"
    lora_modules = {n.rsplit(".lora_", 1)[0] for n, _ in model.named_parameters()
                    if ".lora_" in n}
    assert lora_modules == {t for t in report.targets}
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_" in n for n in trainable)  # base frozen, no head
    assert adapter_layout(model).total == report.adapter_size


def test_vision_language_lora_on_the_language_model_and_optionally_the_vision_tower(
        causal_dirs, tmp_path):
    lm_only = init_model(causal_dirs["llava"], task="vision-language", out=tmp_path / "a")
    assert all(".language_model." in t for t in lm_only.targets)
    both = init_model(causal_dirs["llava-siglip"], task="vision-language", out=tmp_path / "b",
                      lora_vision=True)
    assert any(".vision_tower." in t for t in both.targets)
    assert any(".language_model." in t for t in both.targets)
    _, info = load_model(tmp_path / "b")
    assert info.image_tokens == (16 // 8) ** 2  # SigLIP: every patch, no CLS


def test_classifier_tasks_from_the_users_towers(text_dir, image_dir, tmp_path):
    seq = init_model(text_dir, task="seq-cls", out=tmp_path / "s", labels=["a", "b", "c"])
    assert {t.rsplit(".", 1)[-1] for t in seq.targets} == {"query", "value"}
    img = init_model(image_dir, task="image-cls", out=tmp_path / "i", labels=["x", "y"])
    assert {t.rsplit(".", 1)[-1] for t in img.targets} == {"q_proj", "v_proj"}
    fused = init_model(text_dir, task="image-text-cls", base_image=image_dir,
                       out=tmp_path / "f", labels=["a", "b"])
    assert any(t.startswith("text_tower.") for t in fused.targets)
    assert any(t.startswith("image_tower.") for t in fused.targets)
    for name, task, classes in (("s", "seq-cls", 3), ("i", "image-cls", 2),
                                ("f", "image-text-cls", 2)):
        model, info = load_model(tmp_path / name)
        assert task_of(tmp_path / name) == task and info.num_classes == classes


def test_initialisation_is_reproducible(causal_dirs, tmp_path):
    """Two runs with one seed give one adapter hash (every site can rebuild the same start)."""
    for name in ("a", "b"):
        init_model(causal_dirs["gpt2"], task="causal-lm", out=tmp_path / name, seed=3)
    hashes = [json.loads((tmp_path / n / "secfed_model.json").read_text())["adapter"]["hash"]
              for n in ("a", "b")]
    assert hashes[0] == hashes[1]
    model, _ = load_model(tmp_path / "a")
    layout = adapter_layout(model)
    assert adapter_hash(layout, get_flat(model, layout)) == hashes[0]


def test_explicit_targets_and_rank(causal_dirs, tmp_path):
    report = init_model(causal_dirs["llama"], task="causal-lm", out=tmp_path / "m",
                        lora_targets="q_proj,k_proj,o_proj", lora_r=2, lora_alpha=4)
    assert {t.rsplit(".", 1)[-1] for t in report.targets} == {"q_proj", "k_proj", "o_proj"}
    model, info = load_model(tmp_path / "m")
    assert info.lora.rank == 2
    a = [p for n, p in model.named_parameters() if ".lora_A." in n][0]
    assert a.shape[0] == 2


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"task": "translation"}, "task must be one of"),
    ({"lora_targets": "embed_tokens"}, "must name nn.Linear or Conv1D"),
    ({"lora_targets": "no_such_module"}, "matches no module"),
    ({"lora_targets": "q_proj,(.*)"}, "module names"),
    ({"labels": ["a", "b"]}, "takes no --labels"),
    ({"task": "seq-cls"}, "needs --labels"),
])
def test_bad_requests_are_refused_and_leave_nothing(kwargs, match, causal_dirs, tmp_path):
    args = {"task": "causal-lm", **kwargs}
    with pytest.raises(ModelError, match=match):
        init_model(causal_dirs["llama"], out=tmp_path / "m", **args)
    assert not (tmp_path / "m").exists()


def test_hub_ids_and_pickle_only_checkpoints_are_refused(causal_dirs, tmp_path):
    with pytest.raises(ModelError, match="hub id"):
        init_model("Qwen/Qwen2.5-0.5B", task="causal-lm", out=tmp_path / "m")
    pickled = tmp_path / "pickled"
    model = __import__("transformers").AutoModelForCausalLM.from_pretrained(  # nosec B615
        causal_dirs["llama"], local_files_only=True)
    model.save_pretrained(pickled, safe_serialization=False)
    if any(pickled.glob("*.safetensors")):  # transformers 5 may always write safetensors
        for f in pickled.glob("*.safetensors"):
            f.unlink()
        torch.save({}, pickled / "pytorch_model.bin")
    assert not any(pickled.glob("*.safetensors"))
    with pytest.raises(ModelError, match=r"pickle-based checkpoints are refused"):
        init_model(pickled, task="causal-lm", out=tmp_path / "m")
    out = tmp_path / "full"
    out.mkdir()
    (out / "x").write_text("keep me")
    with pytest.raises(ModelError, match="new or empty"):
        init_model(causal_dirs["llama"], task="causal-lm", out=out)
    assert (out / "x").read_text() == "keep me"


def test_cli_prints_the_chosen_modules_and_refuses_in_one_line(causal_dirs, tmp_path):
    proc = _secfed("model", "init", "--base", causal_dirs["gpt2"], "--task", "causal-lm",
                   "--out", tmp_path / "m", "--max-length", 64)
    assert proc.exit_code == 0, proc.stderr
    assert "lm.transformer.h.0.attn.c_attn" in proc.stdout
    # not a terminal: one plain line per step on stderr
    steps = [ln for ln in proc.stderr.splitlines() if ln.startswith("secfed: model init: ")]
    assert len(steps) >= 3 and any("loading" in ln for ln in steps)
    for args, match in (
        (("--base", "meta-llama/Llama-3-8B", "--task", "causal-lm"), "hub id"),
        (("--base", causal_dirs["gpt2"], "--task", "nope"), "task must be one of"),
        (("--base", causal_dirs["gpt2"], "--task", "causal-lm", "--lora-targets", "wte"),
         "must name nn.Linear"),
    ):
        proc = _secfed("model", "init", *args, "--out", tmp_path / "bad")
        assert proc.exit_code == 1
        errors = [ln for ln in proc.stderr.splitlines() if not ln.startswith("secfed: model init:")]
        assert len(errors) == 1 and errors[0].startswith("secfed: error: ") and match in errors[0]
        assert "Traceback" not in proc.stderr


def test_federation_init_takes_the_directory_unchanged(causal_dirs, tmp_path):
    init_model(causal_dirs["qwen2"], task="causal-lm", out=tmp_path / "m")
    proc = _secfed("federation", "init", "--name", "f", "--enterprise", "a", "--enterprise", "b",
                   "--enterprise", "c", "--coordinator-url", "https://127.0.0.1:8443",
                   "--model", tmp_path / "m", "--out", tmp_path / "kits", "--json")
    assert proc.exit_code == 0, proc.stderr
    summary = json.loads(proc.stdout)
    model, _ = load_model(tmp_path / "m")
    assert summary["vector_length"] == adapter_layout(model).total
