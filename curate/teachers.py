"""Teachers: load a trained classifier from any of the supported files, with its input spec and fingerprint.

Formats, detected from the file:

- checkpoint ``{"arch", "state_dict", "meta"}`` (+ ``arch_options``) built by :mod:`curate.models`;
- TorchScript (``torch.jit.save``), meta in ``_extra_files={"meta.json": ...}``;
- ``torch.export`` program (``.pt2``, ``torch.export.save``), meta in ``extra_files``;
- a pickled ``nn.Module`` (``torch.save(model)``): only with ``trust_pickle``, since unpickling runs code.

``meta`` holds num_classes, class_names, in_channels, image_size, mean, std
(anything else is carried along, e.g. arch and test accuracy). Overrides given
by the caller (``--teacher-meta``) win over what the file holds.
"""

from __future__ import annotations

import hashlib
import io
import json
import pickle
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn as nn

from curate.atomic import check_writable, read_json_object, write_atomically
from curate.errors import UserError
from curate.models import build_model
from curate.spec import InputSpec, merge_meta
from curate.zoo import LibraryModel, is_library_name

TeacherFormat = Literal["checkpoint", "torchscript", "export", "pickle"]
FORMATS: tuple[str, ...] = ("checkpoint", "torchscript", "export", "pickle")
META_FILE = "meta.json"


@dataclass
class Teacher:
    """A loaded teacher in eval mode: ``teacher(x)`` gives logits for inputs in ``teacher.spec``."""

    model: nn.Module
    meta: dict[str, Any]
    spec: InputSpec
    fingerprint: str
    path: Path
    format: str
    class_names: list[str] = field(default_factory=list)

    @property
    def num_classes(self) -> int:
        return int(self.meta["num_classes"])

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


def file_fingerprint(path: Path) -> str:
    """sha256 of a file's bytes, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def save_model(model: nn.Module, meta: dict[str, Any], path: Path | str, format: TeacherFormat = "checkpoint",
               arch: str | None = None, arch_options: dict[str, Any] | None = None) -> Path:
    """Write a teacher or a student, ``model`` with ``meta``, in one of the four teacher formats (anything saved
    so loads as a teacher); ``arch`` is needed for checkpoints."""
    path = Path(path)
    check_writable(path)
    model = model.eval()
    meta_bytes = json.dumps(meta).encode()
    if format not in FORMATS:
        raise ValueError(f"unknown teacher format {format!r}; one of {FORMATS}")
    if format == "checkpoint" and arch is None:
        raise ValueError("a checkpoint needs the registry name of its architecture (arch=...)")

    buffer = io.BytesIO()
    if format == "checkpoint":
        torch.save({"arch": arch, "arch_options": arch_options or {}, "state_dict": model.state_dict(), "meta": meta},
                   buffer)
    elif format == "torchscript":
        with warnings.catch_warnings():  # TorchScript is deprecated; it is still a format users hand us
            warnings.simplefilter("ignore", FutureWarning)
            torch.jit.save(torch.jit.script(model), buffer, _extra_files={META_FILE: meta_bytes})
    elif format == "export":
        spec = InputSpec.from_meta(meta)
        example = torch.zeros(2, *spec.shape())
        program = torch.export.export(model, (example,), dynamic_shapes=({0: torch.export.Dim("batch", min=1)},))
        torch.export.save(program, buffer, extra_files={META_FILE: meta_bytes.decode()})
    else:
        torch.save(model, buffer)
    write_bytes(path, buffer)
    return path


def save_state(state: Any, path: Path) -> None:
    """``torch.save(state)`` to ``path``, whole or not at all (a distillation checkpoint)."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    write_bytes(path, buffer)


def write_bytes(path: Path, buffer: io.BytesIO) -> None:
    """Serialised in memory first: torch's own file writer reports a full disk as an opaque RuntimeError, a
    plain write as ENOSPC, which becomes a one-line error. A run killed while writing leaves the previous file
    or none, never half of one."""
    write_atomically(path, lambda target: target.write_bytes(buffer.getbuffer()))


def _zip_names(path: Path) -> list[str]:
    try:
        with zipfile.ZipFile(path) as archive:
            return archive.namelist()
    except zipfile.BadZipFile:
        return []


def detect_format(path: Path) -> str:
    names = _zip_names(path)
    if any(n.split("/")[1:] == ["archive_format"] for n in names):
        return "export"
    if any("/code/__torch__/" in n for n in names):
        return "torchscript"
    return "checkpoint"  # a torch.save file: a checkpoint dict, or a pickled module


def _load_checkpoint(path: Path, trust_pickle: bool, flags: Flags) -> tuple[nn.Module, dict, str]:
    with open(path, "rb") as f:
        magic = f.read(2)
    if magic[:2] != b"PK" and magic[:1] != b"\x80":  # neither torch.save's zip nor a raw pickle
        raise UserError(f"{path} is not a model file (unknown format): pass a checkpoint, TorchScript or .pt2 teacher")
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        if not trust_pickle:
            fix = (f"re-run with {flags.trust_pickle} only if you trust where it came from" if flags.trust_pickle
                   else "save it as a checkpoint, TorchScript or .pt2 (curate.teachers.save_model)")
            raise UserError(f"{path} is a pickled Python object, and loading it would run code from the file: {fix}"
                            ) from None
        blob = torch.load(path, map_location="cpu", weights_only=False)
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile) as err:
        raise UserError(f"{path} is not a readable teacher file ({err}): check the path or re-export it") from None
    if isinstance(blob, nn.Module):
        return blob, dict(getattr(blob, "meta", {}) or {}), "pickle"
    if not isinstance(blob, dict) or not {"arch", "state_dict"} <= set(blob):
        raise UserError(
            f"{path} is neither a teacher checkpoint (dict with arch, state_dict, meta) nor a model: "
            "save it with curate.teachers.save_model, torch.jit.save or torch.export.save"
        )
    meta = dict(blob.get("meta") or {})
    arch = str(blob["arch"])
    if is_library_name(arch) and not any(k.startswith("model.") for k in blob["state_dict"]):
        # the library model's own state_dict, as a user writes it: its meta fills what the checkpoint's lacks
        model, library_meta, _ = LibraryModel.parse(arch).pretrained(state=blob["state_dict"], source=path)
        return model, merge_meta(library_meta, meta), "checkpoint"
    if "num_classes" not in meta or "in_channels" not in meta:
        raise UserError(f"{path}: checkpoint meta lacks num_classes or in_channels: "
                        f"{flags.supply_meta('num_classes and in_channels')}")
    model = build_model(blob["arch"], int(meta["num_classes"]), int(meta["in_channels"]),
                        int(meta.get("image_size", 32)), **blob.get("arch_options", {}))
    try:
        model.load_state_dict(blob["state_dict"])
    except RuntimeError as err:
        first = str(err).strip().splitlines()[0]
        raise UserError(f"{path}: weights do not fit architecture {blob['arch']} ({first}): fix arch or meta") from None
    return model, meta, "checkpoint"


def _load_torchscript(path: Path) -> tuple[nn.Module, dict, str]:
    extra = {META_FILE: ""}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            model = torch.jit.load(str(path), map_location="cpu", _extra_files=extra)
    except RuntimeError as err:
        raise UserError(f"{path} is not a loadable TorchScript file ({str(err).splitlines()[0]})") from None
    return model, json.loads(extra[META_FILE]) if extra[META_FILE] else {}, "torchscript"


def _load_export(path: Path) -> tuple[nn.Module, dict, str]:
    extra = {META_FILE: ""}
    try:
        with open(path, "rb") as f:  # a file object: export's loader insists on a .pt2 suffix for paths
            program = torch.export.load(f, extra_files=extra)
    except Exception as err:  # export's loader raises many types on a damaged archive
        raise UserError(f"{path} is not a loadable torch.export program ({type(err).__name__}: {err})") from None
    meta = extra[META_FILE]
    if isinstance(meta, bytes):
        meta = meta.decode()
    return program.module(), json.loads(meta) if meta else {}, "export"


@dataclass(frozen=True)
class Flags:
    """How the calling command names its model options, so an error names options the user has (None: the
    command has no such option)."""

    file: str = "--teacher"
    meta: str | None = "--teacher-meta"
    trust_pickle: str | None = "--trust-pickle"

    def supply_meta(self, what: str) -> str:
        if self.meta is None:
            return f"save the model with {what} in its meta"
        return f"supply {what} with {self.meta} meta.json"


SCORE_FLAGS = Flags()  # curate score: --teacher, --teacher-meta, --trust-pickle
TEACHER_ONLY = Flags(meta=None, trust_pickle=None)  # commands whose --teacher comes without the other two


def load_teacher(path: Path | str, trust_pickle: bool = False, meta_overrides: dict[str, Any] | None = None,
                 device: str | torch.device = "cpu", flags: Flags = SCORE_FLAGS,
                 weights: Path | None = None) -> Teacher:
    """Load a teacher file, or a library model by name (``torchvision:resnet50``, ``timm:NAME``; its weights
    from ``weights`` or the library's cache), merge ``meta_overrides`` into its meta, and check that its input
    spec works."""
    name = str(path)
    path = Path(path)
    if is_library_name(name) and not path.exists():
        library = LibraryModel.parse(name)
        model, meta, path = library.pretrained(Path(weights) if weights is not None else None)
        fmt, fingerprint = library.library, hashlib.sha256(f"{library}\0{file_fingerprint(path)}".encode()).hexdigest()
    elif weights is not None:
        raise UserError(f"--teacher-weights goes with a library teacher (torchvision:NAME or timm:NAME), not with "
                        f"the model file {path}")
    elif not path.is_file():
        raise UserError(f"model file {path} not found: pass {flags.file} with the path of a trained model, or a "
                        "library model such as torchvision:resnet50")
    else:
        loaders = {"export": _load_export, "torchscript": _load_torchscript}
        fmt = detect_format(path)
        model, meta, fmt = loaders[fmt](path) if fmt in loaders else _load_checkpoint(path, trust_pickle, flags)
        fingerprint = file_fingerprint(path)
    meta = merge_meta(meta, meta_overrides or {})
    if "num_classes" not in meta:
        raise UserError(f"{path}: meta lacks num_classes: {flags.supply_meta('num_classes')}")
    spec = InputSpec.from_meta(meta)
    class_names = [str(c) for c in meta.get("class_names") or range(int(meta["num_classes"]))]
    if len(class_names) != int(meta["num_classes"]):
        raise UserError(f"{path}: meta has {len(class_names)} class_names for {meta['num_classes']} classes")
    meta["class_names"] = class_names
    if fmt != "export":  # an exported program is frozen in eval mode and rejects .eval()
        model.eval()
    model = model.to(device)
    _check_input_spec(model, spec, int(meta["num_classes"]), path, device, flags)
    return Teacher(model, meta, spec, fingerprint, path, fmt, class_names)


def _check_input_spec(model: nn.Module, spec: InputSpec, num_classes: int, path: Path,
                      device: str | torch.device, flags: Flags) -> None:
    """Run two blank inputs of the meta's shape: a teacher whose meta lies fails here, not mid-scoring."""
    shape = "x".join(map(str, spec.shape()))
    try:
        with torch.inference_mode():
            out = model(torch.zeros(2, *spec.shape(), device=device))
    except Exception as err:  # any failure here means the model rejects the declared shape
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(
            f"{path}: the model rejects {shape} inputs that its meta declares ({reason[:200]}): "
            f"{flags.supply_meta('the right in_channels and image_size')}"
        ) from None
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != (2, num_classes):
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise UserError(f"{path}: the model returns {got} for 2 inputs, not (2, {num_classes}) logits: fix num_classes")


def read_meta_file(path: Path | str | None) -> dict[str, Any]:
    """Meta overrides from a JSON file (``--teacher-meta``); empty when no file is given."""
    if path is None:
        return {}
    path = Path(path)
    if not path.is_file():
        raise UserError(f"teacher meta file {path} not found: give a JSON file with num_classes, in_channels, ...")
    return read_json_object(path, "give a JSON object with num_classes, in_channels, image_size, mean, std")


__all__ = ["FORMATS", "SCORE_FLAGS", "TEACHER_ONLY", "Flags", "Teacher", "detect_format", "file_fingerprint",
           "load_teacher", "read_meta_file", "save_model", "save_state"]
