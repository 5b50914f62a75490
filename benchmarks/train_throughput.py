"""Distillation throughput: `train distill` streaming from curated Parquet shards against an in-memory loop.

Same student (half-width resnet8), batch size, steps, loss (KD on stored logits), optimiser and
augmentation in both; the baseline indexes tensors already in memory. Both loops are timed after their
first sixth of steps, each is run ``--repeats`` times alternately and the best run counts. Streaming is
measured with each reader-process count in ``--workers`` (the first one is train distill's CPU default).
Also the reader alone (batches decoded per second) against the training step rate, and the reader's peak
RSS over 10 and 100 shards; and, where the CPU has bf16 units, `train distill`'s default bf16 autocast
against fp32 (both streaming, first worker count). The last line printed is
``ratio=<worst streaming/in-memory ratio>`` for the first worker count (fp32, as the in-memory loop).

    python benchmarks/train_throughput.py            # 20k rows, 300 steps per case
    python benchmarks/train_throughput.py --quick    # small version, about a minute
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from curate.device import fast_bf16
from curate.selected import ShardWriter, manifest_for, rows_table, shard_schema, write_manifest
from curate.spec import InputSpec

CASES = {"28x28x1": (1, 28), "32x32x3": (3, 32)}
WARMUP_PARTS = 6  # both loops are timed after the first sixth of their steps (workers started, caches warm)


def write_shards(folder: Path, rows: int, channels: int, size: int, shards: int) -> Path:
    """Curated shards in the export format (curate/selected.py): random pixels, logits, weights; row groups
    of 1,024."""
    rng = np.random.default_rng(0)
    meta = {"num_classes": 10, "class_names": [str(i) for i in range(10)], "in_channels": channels,
            "image_size": size, "mean": [0.5] * channels, "std": [0.25] * channels}
    manifest = manifest_for("synthetic", meta, InputSpec.from_meta(meta), meta["class_names"], 10)
    schema = shard_schema(manifest, None)
    folder.mkdir(parents=True)
    per_shard = -(-rows // shards)
    writer = ShardWriter(folder, schema, shard_rows=per_shard, row_group_rows=1024)
    for start in range(0, rows, per_shard):
        n = min(per_shard, rows - start)
        logits = rng.normal(size=(n, 10)).astype(np.float16)
        writer.write(rows_table(
            schema, [f"bench:{start + i}" for i in range(n)], pa.array(["bench"] * n),
            rng.integers(0, 256, (n, channels * size * size), dtype=np.uint8),
            pa.FixedSizeListArray.from_arrays(pa.array(logits.reshape(-1), pa.float16()), 10),
            pa.array(np.ones(n, np.float32)), pa.array(np.full(n, -1, np.int32), mask=np.ones(n, bool))))
    write_manifest(folder, {**manifest, "rows": rows, "shards": writer.close()})
    return folder


def streaming(shards: Path, out: Path, steps: int, batch_size: int, workers: int,
              amp: bool = False) -> tuple[float, float]:
    """Steady-state samples/s of `train distill` (its own metrics after the first logging interval) and the
    wall time of the whole call (start-up, final save and plot included). fp32 unless ``amp``, as the
    in-memory loop."""
    from train.distill import DistillConfig, distill

    cfg = DistillConfig(shards=shards, out=out, width=0.5, steps=steps, batch_size=batch_size, workers=workers,
                        log_every=steps // WARMUP_PARTS, ckpt_every=10 * steps, device="cpu", amp=amp,
                        crop_padding=2)  # as the in-memory loop (and the figures measured before crops became opt-in)
    start = time.perf_counter()
    history = distill(cfg)["history"][1:]
    wall = time.perf_counter() - start
    return len(history) / sum(1 / r["samples_per_s"] for r in history), wall  # equal intervals: harmonic mean


def in_memory(shards: Path, steps: int, batch_size: int) -> float:
    """The same training step over tensors already in memory (no reader, no checkpoint, no files)."""
    from curate.models import build_model, channels_last_is_safe
    from curate.selected import CuratedShards
    from train.augment import random_crop_flip
    from train.losses import DistillLoss
    from train.teacher import cosine_with_warmup

    loaded = CuratedShards.open(shards)
    table = pq.read_table(shards)
    shape = loaded.image_shape
    pixels = torch.from_numpy(np.frombuffer(b"".join(table["pixels"].to_pylist()), np.uint8).reshape(-1, *shape).copy())
    logits = torch.from_numpy(np.array(table["logits"].to_pylist(), np.float32))
    normalize = InputSpec.from_meta(loaded.manifest["input_spec"]).normalize()
    model = build_model("resnet8", 10, shape[0], shape[1], 0.5)
    fmt = torch.channels_last if channels_last_is_safe(model, torch.device("cpu")) else torch.contiguous_format
    model = model.to(memory_format=fmt)
    loss_fn = DistillLoss("kd", 4.0)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4)
    scheduler = cosine_with_warmup(optimizer, max(1, steps * 3 // 100), steps)
    order = torch.randperm(len(pixels))
    for step in range(steps):
        if step == steps // WARMUP_PARTS:  # timed like the streaming run: after its first logging interval
            start = time.perf_counter()
        take = order[(step * batch_size) % (len(pixels) - batch_size):][:batch_size]
        images = random_crop_flip(pixels[take], 2, False, torch.Generator().manual_seed(step))
        x = normalize(images).contiguous(memory_format=fmt)
        loss = loss_fn(model.classifier(model.features(x)), logits[take]).total
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
    return (steps - steps // WARMUP_PARTS) * batch_size / (time.perf_counter() - start)


def reader_only(shards: Path, batch_size: int, workers: int) -> float:
    from torch.utils.data import DataLoader

    from curate.selected import CuratedShards
    from train.shards import EpochPlan, ShardBatches

    loaded = CuratedShards.open(shards)
    plan = EpochPlan(loaded, batch_size, 0, 0, lanes=2)  # train distill's default
    keys = [(0, k) for k in range(len(plan))]  # one epoch
    loader = DataLoader(ShardBatches(loaded, lambda epoch: plan), batch_size=None, num_workers=workers, sampler=keys)
    start = time.perf_counter()
    rows = sum(len(b["pixels"]) for b in loader)
    return rows / (time.perf_counter() - start)


def reader_rss(shards: Path, batch_size: int) -> float:
    code = (f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); "
            "from memory import peak_rss_mib; from curate.selected import CuratedShards; from train.shards import "
            "EpochPlan, ShardBatches; "
            f"s = CuratedShards.open({str(shards)!r}); p = EpochPlan(s, {batch_size}, 0, 0); "
            "d = ShardBatches(s, lambda e: p); [d[0, k] for k in range(len(p))]; print(peak_rss_mib())")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--rows", type=int, default=None)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--workers", default="0,2",
                        help="reader processes to compare, comma-separated; the first gives the final ratio")
    parser.add_argument("--repeats", type=int, default=None, help="runs of each loop, alternated (best counts)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    rows = args.rows or (4096 if args.quick else 20480)
    steps = args.steps or (60 if args.quick else 300)
    args.repeats = args.repeats or (1 if args.quick else 3)
    workers = [int(w) for w in args.workers.split(",")]
    figures: dict = {"rows": rows, "steps": steps, "batch_size": args.batch_size, "workers": workers,
                     "repeats": args.repeats, "cases": {}}
    ratios = []
    with tempfile.TemporaryDirectory(prefix="train-bench-") as tmp:
        for name, (channels, size) in CASES.items():
            shards = write_shards(Path(tmp) / name, rows, channels, size, shards=max(1, rows // 4096))
            baselines: list[float] = []
            streams: dict[int, list[tuple[float, float]]] = {w: [] for w in workers}
            bf16: list[tuple[float, float]] = []
            for attempt in range(args.repeats):  # alternated, best of each: a noisy machine slows one, not both
                baselines.append(in_memory(shards, steps, args.batch_size))
                for w in workers:
                    streams[w].append(streaming(shards, Path(tmp) / f"run-{name}-{w}-{attempt}", steps,
                                                args.batch_size, w))
                if fast_bf16(torch.device("cpu")):
                    bf16.append(streaming(shards, Path(tmp) / f"run-{name}-bf16-{attempt}", steps, args.batch_size,
                                          workers[0], amp=True))
            baseline = max(baselines)
            case = figures["cases"][name] = {"in_memory_samples_s": round(baseline)}
            print(f"resnet8/2 {name}: in memory {baseline:7.0f} samples/s", flush=True)
            for w in workers:
                streamed, wall = max(streams[w])
                reader = reader_only(shards, args.batch_size, w)
                ratio = streamed / baseline
                if w == workers[0]:
                    ratios.append(ratio)
                case[f"workers_{w}"] = {"streaming_samples_s": round(streamed), "ratio": round(ratio, 3),
                                        "reader_samples_s": round(reader),
                                        "reader_over_training": round(reader / streamed, 1),
                                        "distill_wall_s": round(wall, 1)}
                print(f"  {w} workers: streaming {streamed:7.0f} samples/s  ratio {ratio:.3f}  reader alone "
                      f"{reader:8.0f} samples/s ({reader / streamed:.1f}x)  whole distill call {wall:.1f} s",
                      flush=True)
            if bf16:
                fp32 = max(streams[workers[0]])[0]
                case["bf16_autocast"] = {"streaming_samples_s": round(max(bf16)[0]),
                                         "over_fp32": round(max(bf16)[0] / fp32, 3)}
                print(f"  bf16 autocast (the default here): {max(bf16)[0]:7.0f} samples/s, "
                      f"{max(bf16)[0] / fp32:.2f}x fp32", flush=True)
        rss = {}
        for count in (10, 100):
            shards = write_shards(Path(tmp) / f"rss-{count}", count * 256, 1, 28, shards=count)
            rss[count] = reader_rss(shards, args.batch_size)
            print(f"reader peak RSS over {count:3d} shards: {rss[count]:6.0f} MiB", flush=True)
        figures["reader_peak_rss_mib"] = {str(k): round(v) for k, v in rss.items()}
    if args.json:
        args.json.write_text(json.dumps(figures, indent=1) + "\n")
    print(f"ratio={min(ratios):.3f}")


if __name__ == "__main__":
    main()
