"""`curate refine`: move the least related images of a curated folder toward the teacher's own data, and write
them, re-scored, as a new curated folder (same rows, same uids, same weights).

Why: when the pool holds little of the task, the rows the teacher calls "Shirt" are whatever it finds least
unlike a shirt, and a student trained on them learns those images, not shirts. Relatedness measures how far
an image's feature statistics fall from the ones every BatchNorm layer of the teacher kept from its training
data; the same quantity is differentiable in the pixels. A few optimiser steps on a real pool image lower
it while a cross-entropy term keeps the teacher's class of the row, so the selection keeps its class balance
and its images stay close to the real ones they start from (the BatchNorm-matching prior of data-free
distillation, started from real images instead of noise).

The steps, per shard, in order: read its rows -> the per-sample BatchNorm deviation of every image (the
un-standardised ``ood_bn_mean + ood_bn_var`` of scoring, negated) -> within each class of the teacher, the
``share`` of rows that deviate most -> refine them in batches -> re-score them (logits, embedding) -> write
the shard. The folder is written into a temporary and renamed at the end, like `curate export`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from curate.atomic import check_new_folder, write_folder_atomically
from curate.device import pick_device
from curate.errors import UserError
from curate.refine.config import RefineConfig
from curate.score.indicators import TeacherProbe
from curate.selected import CuratedShards, ShardWriter, decode_pixels, rows_table, shard_schema, write_manifest
from curate.spec import InputSpec
from curate.teachers import TEACHER_ONLY, load_teacher
from curate.vectors import float_lists


@dataclass
class RefineSummary:
    out: Path
    rows: int
    refined: int
    deviation_before: float  # mean BatchNorm deviation of the refined rows, before and after
    deviation_after: float
    class_kept: float  # share of refined rows whose teacher class is the one they started with
    seconds: float


class Refiner:
    """Pixels of a batch stepped down the teacher's per-sample BatchNorm deviation plus the cross-entropy to a
    class, with Adam, inside the valid pixel range; and the teacher's outputs on uint8 images."""

    def __init__(self, teacher: Any, spec: InputSpec, device: torch.device, cfg: RefineConfig) -> None:
        self.probe = TeacherProbe(teacher.model, torch.zeros(2, *spec.shape(), device=device))
        if not self.probe.batchnorm_layers:
            raise UserError(f"{cfg.teacher} has no BatchNorm layer whose statistics refining could match: "
                            "distil on the curated folder as it is")
        self.mean = torch.tensor(spec.mean, device=device).view(1, -1, 1, 1)
        self.std = torch.tensor(spec.std, device=device).view(1, -1, 1, 1)
        self.device, self.cfg = device, cfg

    def _scores(self, pixels: torch.Tensor):
        return self.probe.launch((pixels - self.mean) / self.std).result()

    @staticmethod
    def deviation(scores) -> torch.Tensor:
        return -(scores.indicators["bn_mean"] + scores.indicators["bn_var"])

    @torch.no_grad()
    def score(self, images: np.ndarray):
        """The teacher's outputs on uint8 images (N, C, H, W), in batches, concatenated on the host."""
        parts = [self._scores(torch.tensor(images[i:i + self.cfg.batch_size], device=self.device).float() / 255)
                 for i in range(0, len(images), self.cfg.batch_size)]
        return {"deviation": torch.cat([self.deviation(s) for s in parts]).cpu(),
                "logits": torch.cat([s.logits for s in parts]).cpu(),
                "embedding": None if parts[0].embedding is None else torch.cat([s.embedding for s in parts]).cpu()}

    def refine(self, images: np.ndarray, classes: np.ndarray) -> np.ndarray:
        """``images`` (uint8, N x C x H x W) moved toward the teacher's statistics, keeping ``classes``."""
        out = np.empty_like(images)
        for i in range(0, len(images), self.cfg.batch_size):
            pixels = torch.from_numpy(images[i:i + self.cfg.batch_size]).to(self.device).float().div_(255)
            target = torch.from_numpy(classes[i:i + self.cfg.batch_size]).to(self.device)
            pixels.requires_grad_(True)
            optimizer = torch.optim.Adam([pixels], lr=self.cfg.lr)
            for _ in range(self.cfg.steps):
                with torch.enable_grad():
                    scores = self._scores(pixels)
                    loss = self.deviation(scores) + self.cfg.class_weight * F.cross_entropy(
                        scores.logits, target, reduction="none")
                    optimizer.zero_grad(set_to_none=True)
                    loss.sum().backward()  # per-sample losses: the sum gives each image its own gradient
                optimizer.step()
                with torch.no_grad():
                    pixels.clamp_(0, 1)
            quantized = pixels.detach().mul(255).round_().clamp_(0, 255).to(torch.uint8)
            out[i:i + len(quantized)] = quantized.cpu().numpy()
        return out


def chosen_rows(deviation: np.ndarray, classes: np.ndarray, share: float) -> np.ndarray:
    """Indices of the ``share`` of each class's rows with the largest ``deviation`` (at least one per class)."""
    chosen = []
    for c in np.unique(classes):
        members = np.flatnonzero(classes == c)
        count = max(1, round(share * len(members)))
        chosen.append(members[np.argsort(-deviation[members], kind="stable")[:count]])
    return np.sort(np.concatenate(chosen))


def refine_shards(cfg: RefineConfig) -> RefineSummary:
    started = time.perf_counter()
    check_new_folder(cfg.out)
    shards = CuratedShards.open(cfg.shards)
    device = pick_device(cfg.device)
    teacher = load_teacher(cfg.teacher, device=device, flags=TEACHER_ONLY, weights=cfg.teacher_weights)
    if teacher.fingerprint != shards.manifest["teacher"]["fingerprint"]:
        raise UserError(f"{cfg.teacher} is not the teacher that scored {cfg.shards}: pass the same teacher file")
    teacher.model.eval()
    spec = InputSpec.from_meta(shards.manifest["input_spec"])
    refiner = Refiner(teacher, spec, device, cfg)
    manifest = {**shards.manifest, "shards": []}
    schema = shard_schema(manifest, shards.embedding_dim)
    totals = {"refined": 0, "before": 0.0, "after": 0.0, "kept": 0}

    def fill(folder: Path) -> None:
        columns = [TextColumn("[bold]refining"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn()]
        with Progress(*columns) as progress:
            task = progress.add_task("refine", total=shards.rows)
            # shard_rows=1 closes a shard after every write: one output shard per input shard, in its row groups
            writer = ShardWriter(folder, schema, shard_rows=1,
                                 row_group_rows=max(max(f.group_rows) for f in shards.files))
            for layout in shards.files:
                table = pq.read_table(layout.path)
                writer.write(_refined_table(table, layout.path, schema, shards, refiner, cfg.share, totals))
                progress.advance(task, layout.rows)
        manifest["shards"] = writer.close()
        manifest["provenance"] = {**shards.manifest.get("provenance", {}), "refined_from": str(cfg.shards),
                                  "refine_command": cfg.command, "refined_rows": totals["refined"],
                                  "refine": {"share": cfg.share, "steps": cfg.steps, "lr": cfg.lr,
                                             "class_weight": cfg.class_weight}}
        write_manifest(folder, manifest)

    write_folder_atomically(cfg.out, fill)
    refined = totals["refined"]
    return RefineSummary(cfg.out, shards.rows, refined, totals["before"] / refined, totals["after"] / refined,
                         totals["kept"] / refined, time.perf_counter() - started)


def _refined_table(table: pa.Table, path: Path, schema: pa.Schema, shards: CuratedShards, refiner: Refiner,
                   share: float, totals: dict[str, Any]) -> pa.Table:
    images = decode_pixels(table["pixels"], shards.image_shape, path).copy()
    logits = float_lists(table["logits"]).copy()
    classes = logits.argmax(1)
    deviation = refiner.score(images)["deviation"].numpy()
    rows = chosen_rows(deviation, classes, share)
    images[rows] = refiner.refine(images[rows], classes[rows])
    after = refiner.score(images[rows])
    logits[rows] = after["logits"].numpy()
    embedding = None
    if shards.embedding_dim is not None:
        embedding = float_lists(table["embedding"]).copy()
        embedding[rows] = after["embedding"].numpy()
    totals["refined"] += len(rows)
    totals["before"] += float(deviation[rows].sum())
    totals["after"] += float(after["deviation"].sum())
    totals["kept"] += int((logits[rows].argmax(1) == classes[rows]).sum())
    source = table["source"].cast(pa.string()).to_numpy(zero_copy_only=False).astype(object)
    source[rows] = [f"{s}+refined" for s in source[rows]]
    return rows_table(schema, table["uid"], pa.array(source, pa.string()), images,
                      _float16_lists(logits), table["weight"], table["label"],
                      None if embedding is None else _float16_lists(embedding))


def _float16_lists(values: np.ndarray) -> pa.FixedSizeListArray:
    return pa.FixedSizeListArray.from_arrays(pa.array(values.astype(np.float16).reshape(-1)), values.shape[1])
