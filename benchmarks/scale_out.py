"""Scaling out on one machine: scoring on 1 vs 2 Ray actors, distillation on 1 vs 2 torchrun processes.

Scoring: the same teacher (resnet8, 28x28x1) and .npy pool through `score_pool` with the local executor
(the baseline) and with ``--executor ray`` on a local Ray of this machine's CPUs, 1 and 2 actors. Every
case is timed whole on a one-batch pool (the fixed cost: actors starting, teacher loading, noise
reference) and on the full pool; the steady rate is the difference: (rows - one batch) / (t_full - t_one).

Distillation: `train distill` on the same synthetic shards (half-width resnet8, batch 128 global, KD on
stored logits) as one plain process (the baseline), and under torchrun with 1 and 2 processes; the rate
is the trainer's own samples/s after its first logging interval.

On a 2-core machine, two actors or two processes share the cores the baseline already uses (torch's
threads): expect well under 2x. The point is that both paths run, give the same output, and what they
cost is measured. The last line printed is ``ratio=<2 actors / 1 actor steady scoring rate>``.

    python benchmarks/scale_out.py            # 40k images, 300 steps
    python benchmarks/scale_out.py --quick    # small version, about 3 minutes
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from score_throughput import make_images, make_teacher
from train_throughput import WARMUP_PARTS, write_shards

from curate.score.config import ScoreConfig
from curate.score.runner import score_pool

BATCH = 256


def timed_score(teacher: Path, images: Path, out: Path, limit: int, executor: str, actors: int | None) -> float:
    start = time.perf_counter()
    score_pool(ScoreConfig(teacher=teacher, pool="npy", root=images, out=out, batch_size=BATCH, limit=limit,
                           shard_rows=8192, reference_count=512, executor=executor, num_actors=actors))
    return time.perf_counter() - start


def scoring(folder: Path, rows: int) -> dict[str, dict[str, float]]:
    import ray

    teacher = make_teacher(folder, "resnet8", 1, 28)
    images = make_images(folder, rows, 1, 28)
    started = time.perf_counter()
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, logging_level=logging.WARNING, log_to_driver=False)
    results = {"ray start": {"seconds": time.perf_counter() - started}}
    for name, executor, actors in (("local", "local", None), ("ray 1 actor", "ray", 1), ("ray 2 actors", "ray", 2)):
        fixed = timed_score(teacher, images, folder / f"{name}-one", BATCH, executor, actors)
        whole = timed_score(teacher, images, folder / f"{name}-all", rows, executor, actors)
        results[name] = {"fixed_s": fixed, "whole_s": whole, "rows_per_s": rows / whole,
                         "steady_rows_per_s": (rows - BATCH) / max(whole - fixed, 1e-9)}
        print(f"  {name:13s} fixed {fixed:5.1f} s  whole {whole:6.1f} s  {rows / whole:7,.0f} rows/s  "
              f"steady {results[name]['steady_rows_per_s']:7,.0f} rows/s", flush=True)
    ray.shutdown()
    return results


def distill_command(launcher: list[str], shards: Path, out: Path, steps: int) -> list[str]:
    return [*launcher, "-m", "train", "distill", "--shards", str(shards), "--out", str(out), "--width", "0.5",
            "--steps", str(steps), "--batch-size", "128", "--log-every", str(steps // WARMUP_PARTS),
            "--ckpt-every", str(10 * steps), "--device", "cpu"]


def training(folder: Path, steps: int) -> dict[str, dict[str, float]]:
    shards = write_shards(folder / "shards", 20480, 1, 28, 8)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    launchers = {"1 process": [sys.executable], "torchrun 1": [*torchrun, "--nproc_per_node", "1"],
                 "torchrun 2": [*torchrun, "--nproc_per_node", "2"]}
    results = {}
    for name, launcher in launchers.items():
        out = folder / name.replace(" ", "-")
        start = time.perf_counter()
        subprocess.run(distill_command(launcher, shards, out, steps), check=True, capture_output=True)
        wall = time.perf_counter() - start
        history = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()][1:]
        rate = len(history) / sum(1 / r["samples_per_s"] for r in history)  # equal intervals: harmonic mean
        results[name] = {"samples_per_s": rate, "wall_s": wall}
        print(f"  {name:11s} {rate:7,.0f} samples/s  (whole command {wall:5.1f} s)", flush=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="8k images and 90 steps")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    rows, steps = (8192, 90) if args.quick else (40960, 300)
    print(f"{os.cpu_count()} CPUs; scoring {rows:,} images 28x28x1 with resnet8, batch {BATCH}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        score = scoring(Path(tmp) / "score", rows)
        print(f"distillation: {steps} steps of 128 (global), half-width resnet8, 20,480 rows in 8 shards", flush=True)
        train = training(Path(tmp) / "train", steps)
    ratios = {
        "score: 2 actors / 1 actor (steady)": score["ray 2 actors"]["steady_rows_per_s"]
        / score["ray 1 actor"]["steady_rows_per_s"],
        "score: 2 actors / local (steady)": score["ray 2 actors"]["steady_rows_per_s"]
        / score["local"]["steady_rows_per_s"],
        "score: 2 actors / local (whole command)": score["local"]["whole_s"] / score["ray 2 actors"]["whole_s"],
        "train: torchrun 2 / torchrun 1": train["torchrun 2"]["samples_per_s"] / train["torchrun 1"]["samples_per_s"],
        "train: torchrun 2 / 1 process": train["torchrun 2"]["samples_per_s"] / train["1 process"]["samples_per_s"],
    }
    for name, value in ratios.items():
        print(f"{name:42s} {value:.3f}")
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "steps": steps, "scoring": score, "training": train,
                                         "ratios": ratios}, indent=1))
    print(f"ratio={ratios['score: 2 actors / 1 actor (steady)']:.3f}")


if __name__ == "__main__":
    main()
