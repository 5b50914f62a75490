"""Forward passes in slices of 128 against one large batch, as evaluation and the online teacher run them.

`train.evaluate` evaluates in batches of ``EVAL_BATCH`` (128) and `train distill`'s online teacher labels a
step's views in slices of that size on a CPU; before, evaluation ran batches of 512 (1,000 in the experiment's
report) and the teacher one batch of all the step's candidate views (256 with ``--candidates 2``). Both cases
time the same images through the same model in inference mode, alternately, ``--repeats`` times; the best run
counts. Models: the experiment's resnet8 teacher (full width) and half-width student, 28x28x1, random weights
(speed does not depend on them). Figures: images per second and the ratio sliced / whole, in fp32 (evaluation)
and, where the CPU has bf16 units, under bf16 autocast (the online teacher, as `train distill` runs it there).
The last line is ``ratio=<smallest ratio>``.

    python benchmarks/eval_batch.py            # 10,000 images per case, 1 and all threads
    python benchmarks/eval_batch.py --quick    # 2,000 images
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time
from pathlib import Path

import torch

from curate.device import fast_bf16
from curate.models import build_model
from train.evaluate import EVAL_BATCH


def images_per_second(model: torch.nn.Module, images: torch.Tensor, batch: int, bf16: bool) -> float:
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    with torch.inference_mode(), autocast:
        model(images[:batch])  # warm-up: oneDNN picks its kernels for this shape
        started = time.perf_counter()
        for chunk in images.split(batch):
            model(chunk)
    return len(images) / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="2,000 images per case")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = parser.parse_args()
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    torch.manual_seed(0)
    images = torch.randn(2000 if args.quick else 10000, 1, 28, 28)
    models = {"teacher resnet8": build_model("resnet8", 10, 1, 28).eval(),
              "student resnet8 x0.5": build_model("resnet8", 10, 1, 28, width=0.5).eval()}
    cases = [("fp32", False, 512), ("fp32", False, 1000)]
    if fast_bf16(torch.device("cpu")):
        cases.append(("bf16", True, 256))
    figures = []
    for threads in sorted({1, torch.get_num_threads()}):
        torch.set_num_threads(threads)
        for name, model in models.items():
            for precision, bf16, whole in cases:
                best = {"sliced": 0.0, "whole": 0.0}
                for _ in range(args.repeats):
                    best["sliced"] = max(best["sliced"], images_per_second(model, images, EVAL_BATCH, bf16))
                    best["whole"] = max(best["whole"], images_per_second(model, images, whole, bf16))
                ratio = best["sliced"] / best["whole"]
                figures.append({"model": name, "threads": threads, "precision": precision, "whole_batch": whole,
                                "sliced_img_s": round(best["sliced"]), "whole_img_s": round(best["whole"]),
                                "ratio": round(ratio, 3)})
                print(f"{name:22s} {threads} thread(s) {precision}: slices of {EVAL_BATCH} {best['sliced']:8,.0f} "
                      f"img/s, one batch of {whole:5d} {best['whole']:8,.0f} img/s, ratio {ratio:.2f}")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=1))
    print(f"ratio={min(f['ratio'] for f in figures):.3f}")


if __name__ == "__main__":
    main()
