"""Scoring throughput: `curate score` end to end against the bare teacher forward pass, in one run.

For each case the same teacher, batch size and images are used twice:

- baseline: the teacher's forward pass over normalised tensors already in memory;
- pipeline: `score_pool` from a .npy pool on disk (read record by record) to Parquet on disk
  (decode, preprocess, hooks and indicators, noise reference, writing), timed whole.

Then peak RSS of the pipeline (in a fresh process) at two pool sizes, to show memory stays flat.
The last line printed is ``ratio=<worst pipeline/baseline ratio>``.

``--ceiling`` times the pipeline alone: the teacher is ``conv1`` (one convolution and a linear layer), whose
forward pass costs next to nothing, so rows/s is what reading, hooks, indicators and writing allow. It
scores a 28x28 ``.npy`` pool and a folder of PNG and JPEG images (96x96 RGB, resized and made grey for the
teacher); the last line is ``ceiling=<rows/s of the .npy case>``.

    python benchmarks/score_throughput.py            # 50k images per case, RSS at 100k and 1M rows
    python benchmarks/score_throughput.py --quick    # small version, under a minute
    python benchmarks/score_throughput.py --ceiling  # the pipeline's own ceiling (200k .npy rows, 4k files)
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
import torch

from curate.models import build_model
from curate.score.config import ScoreConfig
from curate.score.runner import score_pool
from curate.teachers import save_model

CASES = {  # name: (arch, channels, size)
    "resnet8 28x28x1": ("resnet8", 1, 28),
    "resnet18 32x32x3": ("resnet18", 3, 32),
}


def make_teacher(folder: Path, arch: str, channels: int, size: int) -> Path:
    torch.manual_seed(0)
    model = build_model(arch, 10, channels, size)
    meta = {"num_classes": 10, "in_channels": channels, "image_size": size, "mean": [0.5] * channels,
            "std": [0.25] * channels}
    return save_model(model, meta, folder / f"{arch}.pt", "checkpoint", arch=arch)


def make_images(folder: Path, count: int, channels: int, size: int) -> Path:
    """Random images stored as a .npy, which the npy pool reads record by record."""
    path = folder / f"images-{count}-{channels}x{size}.npy"
    if not path.exists():
        shape = (count, size, size) if channels == 1 else (count, size, size, channels)
        images = np.lib.format.open_memmap(path, mode="w+", dtype=np.uint8, shape=shape)
        rng = np.random.default_rng(0)
        for start in range(0, count, 65536):
            stop = min(start + 65536, count)
            images[start:stop] = rng.integers(0, 256, (stop - start, *shape[1:]), dtype=np.uint8)
        images.flush()
    return path


def make_folder(folder: Path, count: int, size: int = 96) -> Path:
    """``count`` smooth RGB images (upscaled noise, so they compress like photos), half PNG and half JPEG."""
    from PIL import Image

    path = folder / f"files-{count}"
    if not path.exists():
        path.mkdir()
        rng = np.random.default_rng(0)
        for i in range(count):
            coarse = Image.fromarray(rng.integers(0, 256, (12, 12, 3), dtype=np.uint8))
            image = coarse.resize((size, size), Image.BICUBIC)
            image.save(path / (f"{i:06d}.png" if i % 2 else f"{i:06d}.jpg"))
    return path


def bare_forward(teacher: Path, images: Path, batch_size: int) -> float:
    """Images/s of the teacher alone on normalised in-memory tensors (channels-last, inference mode)."""
    from curate.teachers import load_teacher

    loaded = load_teacher(teacher)
    model = loaded.model.to(memory_format=torch.channels_last)
    array = np.load(images)
    tensor = torch.from_numpy(array if array.ndim == 4 else array[..., None]).permute(0, 3, 1, 2)
    normalize = loaded.spec.normalize()
    batches = [normalize(tensor[i:i + batch_size]).contiguous(memory_format=torch.channels_last)
               for i in range(0, len(tensor), batch_size)]
    with torch.inference_mode():
        model(batches[0])
        start = time.perf_counter()
        for x in batches:
            model(x)
        return len(tensor) / (time.perf_counter() - start)


def pipeline(teacher: Path, images: Path, out: Path, batch_size: int, workers: int | None,
             reference_count: int, pool: str = "npy", device: str = "auto", decode: str = "auto") -> float:
    """Images/s of `curate score` end to end, from the pool on disk to Parquet on disk (noise reference included)."""
    start = time.perf_counter()
    summary = score_pool(ScoreConfig(teacher=teacher, pool=pool, root=images, out=out, batch_size=batch_size,
                                     workers=workers, reference_count=reference_count, device=device,
                                     decode=decode))
    return summary.rows / (time.perf_counter() - start)


def ceiling(folder: Path, args: argparse.Namespace) -> dict[str, float]:
    """Rows/s of `curate score` with the trivial conv1 teacher over the .npy pool and the folder of files."""
    teacher = make_teacher(folder, "conv1", 1, 28)
    cases = {"npy 28x28x1": ("npy", make_images(folder, args.images or 200_000, 1, 28)),
             "folder 96x96 png/jpeg": ("folder", make_folder(folder, args.files))}
    figures = {}
    for name, (pool, root) in cases.items():
        figures[name] = pipeline(teacher, root, folder / f"ceiling-{pool}", args.batch_size, args.workers,
                                 args.reference_count or 2048, pool)
        print(f"ceiling {name:22s} {figures[name]:9.0f} rows/s", flush=True)
    return figures


def scoring_peak_rss_mib(teacher: Path, images: Path, out: Path, batch_size: int, workers: int | None) -> float:
    """Peak RSS of a fresh process running the scorer (children included: DataLoader workers)."""
    code = (f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); from pathlib import Path; "
            "from memory import peak_rss_mib; from curate.score.config import ScoreConfig; "
            "from curate.score.runner import score_pool; "
            f"score_pool(ScoreConfig(teacher=Path({str(teacher)!r}), pool='npy', root=Path({str(images)!r}), "
            f"out=Path({str(out)!r}), batch_size={batch_size}, workers={workers})); "
            "print(peak_rss_mib(children=True) * 1024)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(result.stdout.strip().splitlines()[-1]) / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small sizes, under a minute")
    parser.add_argument("--images", type=int, default=None, help="images per throughput case (default 50000)")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--workers", type=int, default=None, help="DataLoader workers (default: curate's choice)")
    parser.add_argument("--reference-count", type=int, default=None,
                        help="noise reference size (default curate's 2048; 256 with --quick)")
    parser.add_argument("--rss-rows", type=int, nargs=2, default=None, help="the two pool sizes for peak RSS")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    parser.add_argument("--ceiling", action="store_true", help="the pipeline's own ceiling with a trivial teacher")
    parser.add_argument("--files", type=int, default=4000, help="images of the folder case of --ceiling")
    args = parser.parse_args()
    if args.ceiling:
        with tempfile.TemporaryDirectory(prefix="score-ceiling-") as tmp:
            figures = ceiling(Path(tmp), args)
        if args.json:
            args.json.write_text(json.dumps({"threads": torch.get_num_threads(), "batch_size": args.batch_size,
                                             "workers": args.workers, "rows_s": figures}, indent=1))
        print(f"ceiling={figures['npy 28x28x1']:.0f}")
        return
    count = args.images or (4000 if args.quick else 50000)
    rss_rows = args.rss_rows or ([5000, 20000] if args.quick else [100000, 1000000])
    reference_count = args.reference_count or (256 if args.quick else 2048)
    figures: dict = {"threads": torch.get_num_threads(), "batch_size": args.batch_size, "workers": args.workers,
                     "reference_count": reference_count, "cases": {}}
    with tempfile.TemporaryDirectory(prefix="score-bench-") as tmp:
        folder = Path(tmp)
        ratios = []
        for name, (arch, channels, size) in CASES.items():
            count_here = min(count, 500) if args.quick and arch == "resnet18" else count
            teacher = make_teacher(folder, arch, channels, size)
            images = make_images(folder, count_here, channels, size)
            baseline = bare_forward(teacher, images, args.batch_size)
            scored = pipeline(teacher, images, folder / f"scored-{arch}", args.batch_size, args.workers,
                              reference_count)
            ratio = scored / baseline
            ratios.append(ratio)
            figures["cases"][name] = {"images": count_here, "bare_forward_img_s": round(baseline, 1),
                                      "curate_score_img_s": round(scored, 1), "ratio": round(ratio, 3)}
            print(f"{name:18s} {count_here:>8,} images  bare forward {baseline:8.0f} img/s  "
                  f"curate score {scored:8.0f} img/s  ratio {ratio:.3f}", flush=True)
        teacher = make_teacher(folder, "resnet8", 1, 28)
        rss = {}
        for rows in rss_rows:
            images = make_images(folder, rows, 1, 28)
            rss[rows] = scoring_peak_rss_mib(teacher, images, folder / f"rss-{rows}", args.batch_size, args.workers)
            print(f"peak RSS scoring {rows:>9,} rows (resnet8 28x28): {rss[rows]:7.0f} MiB", flush=True)
        small, large = rss_rows
        growth = rss[large] / rss[small]
        figures["peak_rss_mib"] = {str(k): round(v) for k, v in rss.items()}
        figures["rss_growth"] = round(growth, 3)
        print(f"peak RSS growth {small:,} -> {large:,} rows: {growth:.2f}x")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=1))
    print(f"ratio={min(ratios):.3f}")


if __name__ == "__main__":
    main()
