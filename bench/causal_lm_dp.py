"""DP-SGD step time and peak memory of LoRA fine-tuning on causal LMs, against the same step
without DP and against stock Opacus, in one run.

    .venv/bin/python bench/causal_lm_dp.py                     # both models, table
    .venv/bin/python bench/causal_lm_dp.py --model tiny-llama  # the small one only (~1 min)
    .venv/bin/python bench/causal_lm_dp.py --json

Models (random init from ``transformers`` configs, nothing downloaded), LoRA r=8 alpha=16 on the
attention q/v projections, records of exactly ``--length`` tokens with the loss on the second
half (the "completion"):

- ``tiny-llama``: a Llama-shaped LM (hidden 64, 2 layers, 4 heads / 2 KV heads, vocab 512),
  batch 8, 128 tokens. Modes stepped alternately on the same batches in one process:
  ``plain`` (mean per-record loss, backward, SGD), ``dp`` (secfed's DP-SGD step: the trainer's
  own ``_step``, per-example gradients of every LoRA matrix on ``[B, T, F]`` activations in one
  flat tensor, clip, CSPRNG Gaussian noise on a grid, SGD), ``opacus`` (stock
  ``PrivacyEngine.make_private``, hooks mode, ``secure_mode=False``). Target: dp <= 1.3x plain.
- ``qwen2.5-0.5b``: Qwen2.5-0.5B's published config (hidden 896, 24 layers, 14 heads / 2 KV
  heads, intermediate 4864, vocab 151936, tied embeddings: ~494 M parameters), batch 4, 256
  tokens. One fresh process per mode (plain, dp) so each peak RSS is that mode's own; the
  step time is the median of the timed steps in that process. Target: dp peak memory <= 1.5x
  plain. Also printed: the adapter vector size the protocol carries each round.

Memory: "peak" is the process's max RSS after the timed steps; "rise" is its increase over the
RSS after the model was built (what training itself needs). On a shared 2-core machine the load
average is printed: a busy core makes the times noisy, so ratios are measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from typing import Any

TIME_TARGET = 1.3
MEMORY_TARGET = 1.5
MODELS = {
    "tiny-llama": {"batch": 8, "length": 128, "steps": 8},
    "qwen2.5-0.5b": {"batch": 4, "length": 256, "steps": 2},
}


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _config(name: str) -> Any:
    from transformers import LlamaConfig, Qwen2Config

    if name == "tiny-llama":
        return LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128,
                           num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                           max_position_embeddings=256, tie_word_embeddings=True)
    # Qwen/Qwen2.5-0.5B config.json, as published
    return Qwen2Config(vocab_size=151936, hidden_size=896, intermediate_size=4864,
                       num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                       max_position_embeddings=32768, rope_theta=1000000.0, rms_norm_eps=1e-6,
                       tie_word_embeddings=True, use_sliding_window=False)


def _build(name: str) -> Any:
    import torch
    from transformers import AutoModelForCausalLM

    from secfed.models import CausalLM, auto_lora_targets
    from secfed.models.lora import LoraSettings, attach_lora

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        lm = AutoModelForCausalLM.from_config(_config(name), dtype=torch.float32)
        model = CausalLM(lm, "causal-lm")
        regex, _ = auto_lora_targets(model)
        model = attach_lora(model, LoraSettings(rank=8, alpha=16.0, target_modules=regex))
    model.train()
    return model


def _items(model: Any, n: int, length: int) -> list[dict[str, Any]]:
    import torch

    vocab = model.lm.config.vocab_size
    g = torch.Generator().manual_seed(1)
    items = []
    for _ in range(n):
        ids = torch.randint(3, vocab, (length,), generator=g)
        labels = ids.clone()
        labels[: length // 2] = -100  # the loss on the "completion" half only
        items.append({"input_ids": ids, "attention_mask": torch.ones(length, dtype=torch.long),
                      "labels": labels})
    return items


def _stepper(model: Any, items: list[dict[str, Any]], mode: str, batch: int, steps: int) -> Any:
    import torch

    from secfed.training import DPConfig, collate_examples, make_private_trainer

    if mode == "dp":
        config = DPConfig(noise_multiplier=1.0, sample_rate=batch / len(items),
                          local_steps=steps + 1, max_grad_norm=1.0, learning_rate=0.05)
        return make_private_trainer(model, items, config=config)._step  # train_local's step
    params = [p for p in model.parameters() if p.requires_grad]
    if mode == "opacus":
        return _opacus_stepper(model, items, params, batch)
    optimizer = torch.optim.SGD(params, lr=0.05)

    def step(indices: list[int]) -> None:
        optimizer.zero_grad(set_to_none=True)
        model.per_example_loss(collate_examples([items[i] for i in indices])).mean().backward()
        optimizer.step()

    return step


def _opacus_stepper(model: Any, items: list[dict[str, Any]], params: list[Any],
                    batch: int) -> Any:
    """Stock Opacus ``make_private`` (hooks mode) around the same model and loss."""
    import warnings

    import torch
    from opacus import PrivacyEngine
    from torch.utils.data import DataLoader

    from secfed.training import collate_examples

    warnings.filterwarnings("ignore")
    loader = DataLoader(items, batch_size=batch, collate_fn=collate_examples)
    module, optimizer, _ = PrivacyEngine(secure_mode=False).make_private(
        module=model, optimizer=torch.optim.SGD(params, lr=0.05), data_loader=loader,
        noise_multiplier=1.0, max_grad_norm=1.0, grad_sample_mode="hooks",
        poisson_sampling=False,
    )

    def step(indices: list[int]) -> None:
        optimizer.zero_grad(set_to_none=True)
        module._module.per_example_loss(collate_examples([items[i] for i in indices])
                                        ).mean().backward()
        optimizer.step()

    return step


def worker(name: str, modes: tuple[str, ...], threads: int) -> dict[str, Any]:
    """Build one model copy per mode, step them alternately on the same batches."""
    import torch

    from secfed.models import adapter_layout

    torch.set_num_threads(threads)
    spec = MODELS[name]
    batch, steps = spec["batch"], spec["steps"]
    n = 2 * batch
    steppers, size, params = {}, 0, 0
    for m in modes:
        model = _build(name)
        items = _items(model, n, spec["length"])
        size = adapter_layout(model).total
        params = sum(p.numel() for p in model.parameters())
        steppers[m] = _stepper(model, items, m, batch, steps)
    rss_built = _rss_mib()
    batches = [list(range((s * batch) % n, (s * batch) % n + batch)) for s in range(steps + 1)]
    for m in modes:
        steppers[m](batches[0])  # warm-up: lazy allocations, thread pool
    times: dict[str, list[float]] = {m: [] for m in modes}
    for indices in batches[1:]:
        for m in modes:
            start = time.perf_counter()
            steppers[m](indices)
            times[m].append(time.perf_counter() - start)
    return {"model": name, "modes": list(modes), "batch": batch, "length": spec["length"],
            "step_s": {m: statistics.median(t) for m, t in times.items()},
            "peak_rss_mib": _rss_mib(), "rss_rise_mib": _rss_mib() - rss_built,
            "adapter_size": size, "parameters": params, "steps": steps}


def _run(name: str, modes: tuple[str, ...], threads: int) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--worker", name, ",".join(modes), "--threads", str(threads)]
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false")
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if out.returncode != 0:
        raise SystemExit(f"worker {name}/{modes} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=[*MODELS, "all"], default="all")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-opacus", dest="opacus", action="store_false")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--worker", nargs=2, metavar=("MODEL", "MODES"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        name, modes = args.worker
        print(json.dumps(worker(name, tuple(modes.split(",")), args.threads)))
        return
    results: dict[str, Any] = {"load_avg_start": os.getloadavg()[0]}
    names = list(MODELS) if args.model == "all" else [args.model]
    if "tiny-llama" in names:
        modes = ("plain", "dp", "opacus") if args.opacus else ("plain", "dp")
        tiny = _run("tiny-llama", modes, args.threads)
        tiny["dp_over_plain"] = tiny["step_s"]["dp"] / tiny["step_s"]["plain"]
        if args.opacus:
            tiny["opacus_over_plain"] = tiny["step_s"]["opacus"] / tiny["step_s"]["plain"]
        results["tiny-llama"] = tiny
    if "qwen2.5-0.5b" in names:
        runs = {m: _run("qwen2.5-0.5b", (m,), args.threads) for m in ("plain", "dp")}
        results["qwen2.5-0.5b"] = {
            "runs": runs, "adapter_size": runs["dp"]["adapter_size"],
            "parameters": runs["dp"]["parameters"],
            "dp_over_plain_time": runs["dp"]["step_s"]["dp"] / runs["plain"]["step_s"]["plain"],
            "dp_over_plain_peak_rss": runs["dp"]["peak_rss_mib"] / runs["plain"]["peak_rss_mib"],
            "dp_over_plain_rss_rise": runs["dp"]["rss_rise_mib"] / runs["plain"]["rss_rise_mib"],
        }
    results["load_avg_end"] = os.getloadavg()[0]
    if args.json:
        print(json.dumps(results, indent=2))
        return
    _print(results)


def _print(results: dict[str, Any]) -> None:
    print(f"load average {results['load_avg_start']:.2f} -> {results['load_avg_end']:.2f}")
    tiny = results.get("tiny-llama")
    if tiny:
        s = tiny["step_s"]
        print(f"tiny-llama (batch {tiny['batch']}, {tiny['length']} tokens, LoRA r=8 q/v, "
              f"{tiny['adapter_size']} adapter floats), median of {tiny['steps']} steps:")
        for mode, t in s.items():
            print(f"  {mode:7s} {t * 1e3:8.1f} ms/step  {t / s['plain']:.2f}x plain")
        verdict = "meets" if tiny["dp_over_plain"] <= TIME_TARGET else "MISSES"
        print(f"  dp/plain {tiny['dp_over_plain']:.2f}x: {verdict} the <= {TIME_TARGET}x target")
    qwen = results.get("qwen2.5-0.5b")
    if qwen:
        runs = qwen["runs"]
        print(f"qwen2.5-0.5b-shaped ({qwen['parameters'] / 1e6:.0f} M parameters, batch 4, 256 "
              f"tokens, LoRA r=8 q/v): adapter vector {qwen['adapter_size']} floats "
              f"({qwen['adapter_size'] * 4 / 2**20:.2f} MiB float32)")
        for mode in ("plain", "dp"):
            r = runs[mode]
            print(f"  {mode:5s} {r['step_s'][mode]:8.2f} s/step  peak RSS {r['peak_rss_mib']:8.0f} "
                  f"MiB  (+{r['rss_rise_mib']:.0f} MiB while training)")
        verdict = "meets" if qwen["dp_over_plain_peak_rss"] <= MEMORY_TARGET else "MISSES"
        print(f"  dp/plain: time {qwen['dp_over_plain_time']:.2f}x, peak memory "
              f"{qwen['dp_over_plain_peak_rss']:.2f}x ({verdict} the <= {MEMORY_TARGET}x "
              f"target), training rise {qwen['dp_over_plain_rss_rise']:.2f}x")


if __name__ == "__main__":
    main()
