"""`train teacher`: supervised training of a classifier on a labeled pool, saved as a teacher checkpoint.

Read top to bottom: config -> data -> model -> optimiser and schedule -> loop -> evaluation -> checkpoint.
"""

from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from curate.atomic import check_writable
from curate.device import pick_device
from curate.errors import UserError
from curate.models import build_model, channels_last_is_safe
from curate.pools import open_pool
from curate.teachers import save_model
from train.augment import random_crop_flip
from train.config import TeacherConfig
from train.data import class_names_of, infer_input_spec, labeled_batches, make_loader
from train.evaluate import accuracy
from train.optim import cosine_with_warmup, mixed_precision


def train_teacher(cfg: TeacherConfig) -> dict:
    """Train, evaluate on the test split, save the checkpoint; returns the saved meta."""
    check_writable(cfg.out)  # before the training, not after it
    torch.manual_seed(cfg.seed)
    device = pick_device(cfg.device)
    started = time.perf_counter()

    # Data: uint8 batches in the model's shape; crop/flip and normalisation per batch on the device.
    train_pool = open_pool(cfg.dataset, cfg.root)
    test_pool = open_pool(cfg.test_pool_name(), cfg.root)
    class_names = class_names_of(train_pool, cfg.num_classes)
    spec = infer_input_spec(train_pool, cfg.in_channels, cfg.image_size, cfg.seed)
    normalize = spec.normalize()
    subset = None
    if cfg.limit is not None and cfg.limit < len(train_pool):
        subset = np.sort(np.random.default_rng(cfg.seed).choice(len(train_pool), cfg.limit, replace=False))
    train_loader = make_loader(train_pool, spec, cfg.batch_size, shuffle=True, seed=cfg.seed,
                               workers=cfg.workers, indices=subset, drop_last=True)
    test_loader = make_loader(test_pool, spec, 512, shuffle=False, seed=cfg.seed, workers=cfg.workers)
    if len(train_loader) == 0:
        raise UserError(f"the training set has fewer samples than one batch ({cfg.batch_size}): lower --batch-size")

    # Model, optimiser, schedule.
    try:
        model = build_model(cfg.arch, len(class_names), spec.in_channels, spec.image_size, cfg.width)
    except UserError as err:
        raise UserError(f"{err}: pass --image-size to resize the dataset's images, or choose another --arch") from None
    memory_format = torch.channels_last if channels_last_is_safe(model, device) else torch.contiguous_format
    model = model.to(device, memory_format=memory_format)
    decay = [p for p in model.parameters() if p.ndim > 1]  # no weight decay on BN and biases
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    optimizer = torch.optim.SGD([{"params": decay, "weight_decay": cfg.weight_decay},
                                 {"params": no_decay, "weight_decay": 0.0}],
                                lr=cfg.lr, momentum=cfg.momentum, nesterov=True)
    total_steps = cfg.epochs * len(train_loader)
    scheduler = cosine_with_warmup(optimizer, int(cfg.warmup_epochs * len(train_loader)), total_steps)
    augment_rng = torch.Generator().manual_seed(cfg.seed + 1)
    use_amp, amp_dtype, scaler = mixed_precision(cfg.amp, device)
    autocast = torch.autocast(device.type, dtype=amp_dtype, enabled=use_amp)

    columns = [TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("{task.fields[status]}"), TimeElapsedColumn(), TimeRemainingColumn()]
    history = []
    with Progress(*columns, transient=False) as progress:
        task = progress.add_task("teacher", total=total_steps, status="")
        for epoch in range(cfg.epochs):
            model.train()
            seen, correct, loss_sum, epoch_start = 0, 0, 0.0, time.perf_counter()
            for batch in labeled_batches(train_loader):
                images = batch.images.to(device, non_blocking=True)
                labels = batch.labels.to(device, non_blocking=True)
                images = random_crop_flip(images, cfg.crop_padding, cfg.flip, augment_rng)
                inputs = normalize(images).contiguous(memory_format=memory_format)
                with autocast:
                    logits = model(inputs)
                    loss = F.cross_entropy(logits, labels, label_smoothing=cfg.label_smoothing)
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
                scheduler.step()
                seen += len(labels)
                loss_sum += float(loss.detach()) * len(labels)
                correct += int((logits.detach().argmax(1) == labels).sum())
                rate = seen / (time.perf_counter() - epoch_start)
                progress.update(task, advance=1, status=f"epoch {epoch + 1}/{cfg.epochs} loss {loss_sum / seen:.3f} "
                                                       f"acc {correct / seen:.3f} {rate:.0f} img/s")
            test_acc = accuracy(model, test_loader, normalize, device)
            history.append({"epoch": epoch + 1, "train_loss": loss_sum / seen, "train_accuracy": correct / seen,
                            "test_accuracy": test_acc})
            progress.console.print(f"epoch {epoch + 1}: train loss {loss_sum / seen:.4f}, "
                                   f"train acc {correct / seen:.4f}, test acc {test_acc:.4f}")

    meta = {
        "num_classes": len(class_names),
        "class_names": class_names,
        **spec.to_meta(),
        "arch": cfg.arch,
        "width": cfg.width,
        "dataset": cfg.dataset,
        "test_dataset": cfg.test_pool_name(),
        "train_samples": len(train_loader) * cfg.batch_size,
        "test_accuracy": history[-1]["test_accuracy"],
        "history": history,
        "train_seconds": round(time.perf_counter() - started, 1),
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(cfg).items()},
    }
    save_model(model.to("cpu", memory_format=torch.contiguous_format), meta, cfg.out, "checkpoint",
                 arch=cfg.arch, arch_options={"width": cfg.width})
    return meta
