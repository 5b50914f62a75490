"""GPU throughput: the cases of issue 17 in one prepared run, so a short loan of a GPU is spent measuring.

Scoring (bf16 autocast on CUDA, batch 1024): the teacher's bare forward pass over uint8 images already on
the GPU and fed from pinned host memory, against `curate score` end to end from a `.npy` pool (default
workers, then 8): resnet8 28x28x1 and resnet18 32x32x3, random weights. A TorchScript resnet50 at
224x224 over a folder of 400x300 JPEGs: bare forward against `curate score` with 0, 8 and 15 workers.
Distillation: `train distill` streaming curated shards (half-width resnet8, 32x32x3) at batch 512 with
4 and 8 reader processes and at batch 128, against the same step on GPU-resident tensors.

Every figure goes to ``--json`` with the card's name; each ratio is taken against a baseline measured in
the same run. ``--small`` is a dry run on the CPU (a few thousand images, a few steps) that checks the
script before GPU time is spent on it.

    python benchmarks/gpu_throughput.py --json gpu.json           # on a GPU machine, about 6 minutes
    python benchmarks/gpu_throughput.py --small --json dry.json   # anywhere, about a minute
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from score_throughput import make_images, make_teacher, pipeline
from train_throughput import write_shards

SCORE_CASES = {"resnet8 28x28x1": ("resnet8", 1, 28, 300_000), "resnet18 32x32x3": ("resnet18", 3, 32, 200_000)}


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def bare_forward(teacher: Path, images: Path, batch_size: int, device: torch.device) -> dict[str, float]:
    """Images/s of the teacher alone: uint8 images resident on the device, and copied from pinned host memory."""
    from curate.teachers import load_teacher

    loaded = load_teacher(teacher, device=device)
    model = loaded.model.to(memory_format=torch.channels_last).eval()
    normalize = loaded.spec.normalize()
    array = np.load(images)
    host = torch.from_numpy(array if array.ndim == 4 else array[..., None]).permute(0, 3, 1, 2).contiguous()
    sources = {"resident": host.to(device), "from_host": host.pin_memory() if device.type == "cuda" else host}
    figures = {}
    with torch.inference_mode(), torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda"):
        for name, images_at in sources.items():
            for start in range(0, min(len(host), 2 * batch_size), batch_size):  # warm-up
                model(normalize(images_at[start:start + batch_size].to(device)))
            synchronize(device)
            began = time.perf_counter()
            for start in range(0, len(host), batch_size):
                x = normalize(images_at[start:start + batch_size].to(device, non_blocking=True))
                model(x.contiguous(memory_format=torch.channels_last))
            synchronize(device)
            figures[name] = len(host) / (time.perf_counter() - began)
    return figures


def scoring(folder: Path, small: bool, device: torch.device) -> dict:
    results = {}
    batch_size = 256 if small else 1024
    for name, (arch, channels, size, count) in SCORE_CASES.items():
        count = 2000 if small else count
        teacher, images = make_teacher(folder, arch, channels, size), make_images(folder, count, channels, size)
        row = {"images": count, "batch_size": batch_size,
               **{f"bare_{k}_img_s": round(v) for k, v in bare_forward(teacher, images, batch_size, device).items()}}
        for workers in [None] if small else [None, 8]:
            rate = pipeline(teacher, images, folder / f"scored-{arch}-{workers}", batch_size, workers, 2048,
                            device=device.type)
            row[f"curate_score_workers_{workers}_img_s"] = round(rate)
            row[f"ratio_workers_{workers}"] = round(rate / row["bare_resident_img_s"], 3)
        results[name] = row
        print(name, row, flush=True)
    return results


def jpeg_folder(folder: Path, small: bool, device: torch.device) -> dict:
    """A TorchScript resnet50 at 224x224 over a folder of 400x300 JPEGs: decode and resize bound on the host."""
    import torchvision
    from PIL import Image

    count = 200 if small else 10_000
    model = torchvision.models.resnet50(num_classes=10).eval()
    meta = {"num_classes": 10, "in_channels": 3, "image_size": 224, "mean": [0.485, 0.456, 0.406],
            "std": [0.229, 0.224, 0.225]}
    teacher = folder / "resnet50.pt"
    torch.jit.save(torch.jit.script(model), str(teacher), _extra_files={"meta.json": json.dumps(meta)})
    photos = folder / "jpegs"
    photos.mkdir()
    base = (np.random.default_rng(0).random((300, 400, 3)) * 255).astype(np.uint8)
    for i in range(count):
        Image.fromarray((np.roll(base, i * 7, axis=1) // 2 + i % 64).astype(np.uint8)).save(photos / f"{i:06d}.jpg",
                                                                                           quality=90)
    batch = torch.randn(16 if small else 256, 3, 224, 224, device=device).contiguous(memory_format=torch.channels_last)
    resident = model.to(device).to(memory_format=torch.channels_last)
    with torch.inference_mode(), torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda"):
        resident(batch)
        synchronize(device)
        began, repeats = time.perf_counter(), 1 if small else 10
        for _ in range(repeats):
            resident(batch)
        synchronize(device)
        row = {"images": count, "bare_forward_img_s": round(repeats * len(batch) / (time.perf_counter() - began))}
    # decoded by the worker processes on the host (the CPU path), then on the device (--decode device, the
    # default on CUDA: workers only read the files)
    for decode, workers in [("workers", 0), ("device", 0)] if small else \
            [("workers", 0), ("workers", 8), ("workers", 15), ("device", 4), ("device", 8)]:
        rate = pipeline(teacher, photos, folder / f"scored-jpeg-{decode}-{workers}", 16 if small else 256, workers,
                        256, pool="folder", device=device.type, decode=decode)
        row[f"curate_score_decode_{decode}_workers_{workers}_img_s"] = round(rate)
        row[f"ratio_decode_{decode}_workers_{workers}"] = round(rate / row["bare_forward_img_s"], 3)
    print("resnet50 224 jpeg folder", row, flush=True)
    return row


def distillation(folder: Path, small: bool, device: torch.device) -> dict:
    from curate.models import build_model
    from train.distill import DistillConfig, distill
    from train.losses import DistillLoss

    shards = write_shards(folder / "shards", 3000 if small else 100_000, 3, 32, 10)
    results = {}
    for batch_size, workers in [(64, 0)] if small else [(512, 4), (512, 8), (128, 4)]:
        steps = 12 if small else 300
        cfg = DistillConfig(shards=shards, out=folder / f"distill-{batch_size}-{workers}", width=0.5, steps=steps,
                            batch_size=batch_size, workers=workers, log_every=steps // 6, ckpt_every=10 * steps,
                            device=device.type)
        history = distill(cfg)["history"][1:]
        rate = len(history) / sum(1 / r["samples_per_s"] for r in history)
        results[f"streaming_batch{batch_size}_workers{workers}_samples_s"] = round(rate)
        print("train distill", batch_size, workers, round(rate), flush=True)
    # The same step on tensors already on the device: no reader, no augmentation, no files.
    batch_size = 64 if small else 512
    model = build_model("resnet8", 10, 3, 32, 0.5).to(device).to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True)
    loss_fn = DistillLoss("kd", 4.0)
    x = torch.randn(8 * batch_size, 3, 32, 32, device=device).contiguous(memory_format=torch.channels_last)
    y = torch.randn(8 * batch_size, 10, device=device)

    def step(i: int) -> None:
        rows = slice((i % 8) * batch_size, (i % 8 + 1) * batch_size)
        with torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda"):
            loss = loss_fn(model.classifier(model.features(x[rows])).float(), y[rows]).total
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    for i in range(5 if small else 20):
        step(i)
    synchronize(device)
    steps = 5 if small else 200
    began = time.perf_counter()
    for i in range(steps):
        step(i)
    synchronize(device)
    results[f"resident_batch{batch_size}_samples_s"] = round(steps * batch_size / (time.perf_counter() - began))
    key = f"streaming_batch{batch_size}_workers{0 if small else 4}_samples_s"
    results["ratio"] = round(results[key] / results[f"resident_batch{batch_size}_samples_s"], 3)
    print("resident", results, flush=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--small", action="store_true", help="CPU dry run with small sizes")
    parser.add_argument("--json", type=Path, required=True, help="where to write the figures")
    parser.add_argument("--only", choices=["score", "jpeg", "distill"], action="append",
                        help="run only these parts (repeatable; default all)")
    args = parser.parse_args()
    if not torch.cuda.is_available() and not args.small:
        sys.exit("no CUDA device here: run with --small for the CPU dry run")
    device = torch.device("cuda" if torch.cuda.is_available() and not args.small else "cpu")
    figures = {"device": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu (dry run)",
               "torch": torch.__version__, "small": args.small}
    parts = {"score": scoring, "jpeg": jpeg_folder, "distill": distillation}
    with tempfile.TemporaryDirectory(prefix="gpu-bench-") as tmp:
        for name, run in parts.items():
            if not args.only or name in args.only:
                figures[name] = run(Path(tmp), args.small, device)
                args.json.write_text(json.dumps(figures, indent=1))  # what finished survives a timeout
    print(json.dumps(figures, indent=1))


if __name__ == "__main__":
    main()
