"""Scoring an ImageNet-size library teacher: `curate score --teacher torchvision:resnet50` over a folder of JPEG
photos (400x300, decoded, shorter side to 256, centre 224) against the same model's bare forward over the
same images already preprocessed in memory, in one run. The weights are random (nothing is downloaded): speed
does not depend on them. The last line is ``ratio=<curate score img/s / bare forward img/s>``.

    python benchmarks/library_teacher.py            # 256 photos
    python benchmarks/library_teacher.py --quick    # 64 photos, well under a minute on 2 cores
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image

from curate.device import pick_device
from curate.pools import open_pool, read_batch
from curate.score.config import ScoreConfig
from curate.score.runner import score_pool
from curate.teachers import load_teacher

sys.path.insert(0, str(Path(__file__).parent))
from crawl_pool import photo_folder  # noqa: E402


def make_photos(folder: Path, count: int) -> Path:
    """``count`` 400x300 JPEG crops of the Debian wallpapers (seeded positions)."""
    pool = open_pool("patches", photo_folder(), {"count": count, "size": 400, "min_scale": 0.3, "max_scale": 0.6})
    for i in range(count):
        pixels = pool.sample(i).image.expand(3, -1, -1)  # a grey wallpaper gives one channel
        image = Image.fromarray(pixels.permute(1, 2, 0).numpy()).resize((400, 300))
        image.save(folder / f"{i:05d}.jpg", quality=90)
    return folder


def bare_forward(name: str, weights: Path, photos: Path, batch_size: int, device: torch.device) -> float:
    """Images/s of the teacher alone on its preprocessed inputs already in memory (channels-last, inference)."""
    teacher = load_teacher(name, weights=weights, device=device)
    model = teacher.model.to(memory_format=torch.channels_last)
    pool = open_pool("folder", photos)
    images = read_batch(pool, range(len(pool)), teacher.spec.geometry()).images
    batches = [teacher.spec.normalize()(images[i:i + batch_size].to(device)).contiguous(
        memory_format=torch.channels_last) for i in range(0, len(images), batch_size)]
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    with torch.inference_mode(), autocast:
        model(batches[0])
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for x in batches:
            model(x)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return len(images) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="64 photos")
    parser.add_argument("--images", type=int, default=None, help="photos (default 256; 64 with --quick)")
    parser.add_argument("--model", default="torchvision:resnet50", help="library teacher (random weights)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = parser.parse_args()
    count = args.images or (64 if args.quick else 256)
    device = pick_device(args.device)
    with tempfile.TemporaryDirectory(prefix="library-teacher-") as tmp:
        work = Path(tmp)
        photos = make_photos((work / "photos").mkdir() or work / "photos", count)
        torch.manual_seed(0)
        import torchvision

        weights = work / "weights.pt"
        torch.save(torchvision.models.get_model(args.model.split(":")[1], weights=None).state_dict(), weights)
        bare = bare_forward(args.model, weights, photos, args.batch_size, device)
        start = time.perf_counter()
        summary = score_pool(ScoreConfig(teacher=Path(args.model), teacher_weights=weights, pool="folder",
                                         root=photos, out=work / "scored", batch_size=args.batch_size,
                                         reference_count=64, device=args.device))
        scored = summary.rows / (time.perf_counter() - start)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    figures = {"model": args.model, "images": count, "batch_size": args.batch_size, "device": name,
               "bare_forward_img_s": bare, "curate_score_img_s": scored, "ratio": scored / bare}
    print(f"{args.model} 224x224 on {name}: bare forward {bare:,.1f} img/s, curate score {scored:,.1f} img/s "
          f"(from 400x300 JPEG files, 64-image noise reference included)")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=1))
    print(f"ratio={scored / bare:.3f}")


if __name__ == "__main__":
    main()
