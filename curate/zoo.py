"""Models from torchvision and timm by name (``torchvision:resnet50``, ``torchvision:resnet50:IMAGENET1K_V2``,
``timm:resnet50.a1_in1k``), in this project's classifier contract, with the libraries' own metadata.

A library model becomes a :class:`LibraryClassifier`: its final linear layer is taken out as ``classifier``
and replaced by an identity, so ``features(x)`` is the library model's own penultimate vector and
``forward(x) == classifier(features(x))``, as for the models of :mod:`curate.models`; scoring reads embeddings
and BatchNorm statistics from it like from any other teacher, and the trainer uses it as a student.

Weights are never downloaded: pretrained ones are taken from the library's own cache (torch hub's
``checkpoints/`` for torchvision, the Hugging Face cache for timm) or from a file the user names; a name whose
weights are in neither fails in one line that says where to put the file.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from curate.errors import UserError

LIBRARIES = ("torchvision", "timm")


def is_library_name(name: str) -> bool:
    return name.split(":", 1)[0] in LIBRARIES and ":" in name


class LibraryClassifier(nn.Module):
    """A torchvision or timm model with its final linear layer apart (``classifier``); one-channel inputs are
    repeated to the three channels these models take."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.classifier = _take_final_linear(model)
        self.model = model

    def features(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        return self.model(x).flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def _take_final_linear(model: nn.Module) -> nn.Linear:
    """Replace the model's last nn.Linear (its classifier) by an identity and return it."""
    named = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not named:
        raise UserError(f"{type(model).__name__} has no linear classifier: use a classification model")
    name, linear = named[-1]
    parent_name, _, attribute = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, attribute, nn.Identity())
    return linear


@dataclass(frozen=True)
class LibraryModel:
    """A model named by library: ``torchvision:NAME[:WEIGHTS]`` or ``timm:NAME[.TAG]``."""

    library: str
    name: str
    weights: str | None  # torchvision: a weights enum member (DEFAULT when None); timm: the tag is in name

    @classmethod
    def parse(cls, spec: str) -> LibraryModel:
        library, _, rest = spec.partition(":")
        name, _, weights = rest.partition(":")
        if library not in LIBRARIES or not name:
            raise UserError(f"{spec!r} is not a library model: write torchvision:NAME[:WEIGHTS] or timm:NAME")
        if library == "timm" and weights:
            raise UserError(f"{spec!r}: timm names carry their weights as a tag (timm:resnet50.a1_in1k), not after ':'")
        model = cls(library, name, weights or None)
        model._check_name()
        return model

    def __str__(self) -> str:
        return f"{self.library}:{self.name}" + (f":{self.weights}" if self.weights else "")

    def _check_name(self) -> None:
        if self.library == "torchvision":
            import torchvision.models as tvm

            if self.name not in tvm.list_models(module=tvm):
                raise UserError(f"torchvision has no classification model {self.name!r}: see "
                                "torchvision.models.list_models()")
        else:
            timm = _timm()
            if not timm.is_model(self.name.split(".")[0]):
                raise UserError(f"timm has no model {self.name!r}: see timm.list_models()")

    def build(self, num_classes: int) -> LibraryClassifier:
        """Randomly initialised, with ``num_classes`` outputs."""
        return LibraryClassifier(self._library_model(num_classes))

    def _library_model(self, num_classes: int) -> nn.Module:
        """The library's own module, randomly initialised."""
        if self.library == "torchvision":
            import torchvision.models as tvm

            return tvm.get_model(self.name, weights=None, num_classes=num_classes)
        return _timm().create_model(self.name, pretrained=False, num_classes=num_classes)

    def pretrained(self, weights_file: Path | None = None, state: dict[str, torch.Tensor] | None = None,
                   source: Path | None = None) -> tuple[LibraryClassifier, dict[str, Any], Path]:
        """The model with its weights (``state`` read from ``source``, else from ``weights_file``, else from the
        library's cache), its meta, and the file the weights came from."""
        if state is not None:
            path = Path(source or "state_dict")
        else:
            path = weights_file if weights_file is not None else self._cached_weights()
            state = _read_state(path)
        num_classes = _classes_in(state, path)
        model = self._library_model(num_classes)
        try:
            model.load_state_dict(state)
        except RuntimeError as err:
            first = str(err).strip().splitlines()[0]
            raise UserError(f"{path}: the weights do not fit {self} ({first}): give the state_dict of that "
                            "architecture") from None
        return LibraryClassifier(model.eval()), self.meta(num_classes), path

    def meta(self, num_classes: int) -> dict[str, Any]:
        """Input spec and classes from the library's metadata (ImageNet's when the class count is its own)."""
        if self.library == "torchvision":
            weights = self._torchvision_weights()
            transform = weights.transforms()
            meta = {"image_size": int(transform.crop_size[0]), "resize_size": int(transform.resize_size[0]),
                    "mean": list(transform.mean), "std": list(transform.std),
                    "interpolation": transform.interpolation.value, "class_names": weights.meta.get("categories")}
        else:
            cfg = self._timm_cfg
            size = int(cfg["input_size"][-1])
            meta = {"image_size": size, "resize_size": int(size / cfg.get("crop_pct", 0.875)),
                    "mean": list(cfg["mean"]), "std": list(cfg["std"]),
                    "interpolation": cfg.get("interpolation", "bilinear"), "class_names": _imagenet_names(cfg)}
        if not meta["class_names"] or len(meta["class_names"]) != num_classes:
            meta["class_names"] = [str(i) for i in range(num_classes)]
        return {**meta, "num_classes": num_classes, "in_channels": 3, "arch": str(self)}

    @cached_property
    def _timm_cfg(self) -> dict[str, Any]:
        """The pretrained config timm resolves for this name and tag (input size, crop, mean/std, hub id)."""
        return _timm().create_model(self.name, pretrained=False).pretrained_cfg

    def _torchvision_weights(self):
        import torchvision.models as tvm

        enum = tvm.get_model_weights(self.name)
        member = self.weights or "DEFAULT"
        try:
            return enum[member] if member != "DEFAULT" else enum.DEFAULT
        except KeyError:
            raise UserError(f"torchvision has no weights {member} for {self.name}: choose one of "
                            f"{', '.join(w.name for w in enum)}") from None

    def _cached_weights(self) -> Path:
        """The pretrained weights' file in the library's cache, or a one-line error saying where it goes."""
        if self.library == "torchvision":
            weights = self._torchvision_weights()
            path = Path(torch.hub.get_dir()) / "checkpoints" / Path(weights.url).name
            if not path.is_file():
                raise UserError(f"the weights of {self} are not on this machine and are not downloaded: put "
                                f"{Path(weights.url).name} (from {weights.url}) at {path}, or pass "
                                "--teacher-weights FILE with a state_dict of the model")
            return path
        repo = self._timm_cfg.get("hf_hub_id")
        from huggingface_hub import try_to_load_from_cache

        for filename in ("model.safetensors", "pytorch_model.bin"):
            found = try_to_load_from_cache(repo, filename) if repo else None
            if isinstance(found, str):
                return Path(found)
        raise UserError(f"the weights of {self} are not in the Hugging Face cache and are not downloaded: fetch "
                        f"{repo or self.name} into the cache on a connected machine (HF_HOME), or pass "
                        "--teacher-weights FILE with a state_dict of the model")


def _read_state(path: Path) -> dict[str, torch.Tensor]:
    """A state_dict from a torch.save file (tensors only: no code runs) or a safetensors file."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"weights file {path} not found: pass --teacher-weights with a state_dict file")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any reader failure: not a state_dict we can use
        raise UserError(f"{path} is not a readable state_dict ({type(err).__name__}): save one with "
                        "torch.save(model.state_dict(), path)") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"{path} does not hold a state_dict (names to tensors): save one with "
                        "torch.save(model.state_dict(), path)")
    return state


def _classes_in(state: dict[str, torch.Tensor], path: Path) -> int:
    """The class count of a state_dict: the output size of its last two-dimensional weight (the classifier)."""
    matrices = [v for k, v in state.items() if k.endswith("weight") and v.ndim == 2]
    if not matrices:
        raise UserError(f"{path} has no linear classifier weight: give the state_dict of a classification model")
    return int(matrices[-1].shape[0])


def _imagenet_names(cfg: dict) -> list[str] | None:
    try:
        from timm.data import ImageNetInfo, infer_imagenet_subset

        subset = infer_imagenet_subset(cfg)
        return ImageNetInfo(subset).label_descriptions(as_dict=False) if subset else None
    except Exception:  # noqa: BLE001 - names are a nicety: numbered classes otherwise
        return None


def _timm():
    try:
        import timm
    except ImportError:
        raise UserError("timm models need timm: pip install -e '.[timm]'") from None
    return timm
