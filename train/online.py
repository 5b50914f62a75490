"""The online teacher (``--teacher``): it labels every view a step trains on, and with ``--feature-weight`` also
hands over its penultimate features on those views, the targets of feature matching.

Why features from the online teacher: the stored embedding is the teacher's answer for the clean stored image,
so under crops, mixup or CutMix it describes another image than the one the student sees. The features of the
view itself are what the teacher would have stored for it, and they carry far more of its signal than ten
logits (a 64- or 128-dimensional description of the view against a probability vector).
"""

from __future__ import annotations

import torch

from curate.errors import UserError
from curate.models import final_linear
from curate.selected import CuratedShards
from curate.teachers import Teacher
from train.config import DistillConfig
from train.evaluate import EVAL_BATCH


class OnlineTeacher:
    """``teacher(views)`` -> (logits, penultimate features or None), in inference mode; on a CPU in slices of
    ``EVAL_BATCH`` views, which keep a small convnet's activations in the caches (train/evaluate.py)."""

    def __init__(self, teacher: Teacher, with_features: bool) -> None:
        self.model = teacher.model
        self._features: torch.Tensor | None = None
        self.feature_dim: int | None = None
        if with_features:
            layer = final_linear(teacher.model) if not isinstance(teacher.model, torch.jit.ScriptModule) else None
            if layer is None:
                raise UserError(f"--feature-weight with --teacher reads the teacher's penultimate features, and "
                                f"{teacher.path.name} ({teacher.format}) has no linear layer to read them at: "
                                "use a checkpoint teacher, or drop --teacher to match the stored embeddings")
            self.feature_dim = layer.in_features
            layer.register_forward_pre_hook(lambda module, inputs: self._keep(inputs[0]))

    @classmethod
    def of(cls, teacher: Teacher | None, with_features: bool) -> OnlineTeacher | None:
        """The online teacher of a run (None without --teacher: the stored logits are the targets)."""
        return cls(teacher, with_features) if teacher is not None else None

    def _keep(self, features: torch.Tensor) -> None:
        self._features = features

    def __call__(self, inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        slices = inputs.split(EVAL_BATCH) if inputs.device.type == "cpu" else (inputs,)
        logits, features = [], []
        with torch.inference_mode():
            for views in slices:
                logits.append(self.model(views).float())
                if self.feature_dim is not None:
                    features.append(self._features.float().flatten(1))
        # clones leave inference mode, so autograd may use them
        return torch.cat(logits).clone(), torch.cat(features).clone() if features else None


def feature_target_dim(cfg: DistillConfig, shards: CuratedShards, online: OnlineTeacher | None) -> int | None:
    """The width of the teacher features that --feature-weight matches: the online teacher's, else the stored
    embedding's (None: no feature matching)."""
    if cfg.feature_weight <= 0:
        return None
    if online is not None:
        return online.feature_dim
    if shards.embedding_dim is None:
        raise UserError("--feature-weight needs teacher embeddings in the shards (export with --embedding) or "
                        "the teacher online (--teacher)")
    return shards.embedding_dim
