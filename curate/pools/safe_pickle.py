"""Reading the pickled batches CIFAR and downsampled ImageNet ship as, without running code from them.

``pickle.load`` calls whatever callable a file names, so a crafted batch file would run code the moment a
pool is opened. These files hold only dicts, lists, strings, bytes, numbers and numpy arrays; an
unpickler that can build exactly those (numpy's array reconstruction, nothing else) reads every real
batch and refuses anything more with a one-line error.
"""

from __future__ import annotations

import codecs
import io
import pickle
from pathlib import Path
from typing import Any

import numpy as np

from curate.errors import UserError

try:  # numpy >= 2 keeps the array reconstruction in numpy._core; older pickles name numpy.core (an alias)
    from numpy._core import multiarray as _multiarray
    from numpy._core import numeric as _numeric
except ImportError:  # pragma: no cover - numpy 1.x
    from numpy.core import multiarray as _multiarray
    from numpy.core import numeric as _numeric

# (module, name) a batch file may name -> the object it gets. Arrays come as _reconstruct (protocols < 5) or
# _frombuffer (5), numpy scalars as scalar, and bytes written by Python 3 with protocol < 3 as _codecs.encode.
_ALLOWED: dict[tuple[str, str], Any] = {
    **{(f"{package}.multiarray", name): getattr(_multiarray, name)
       for package in ("numpy.core", "numpy._core") for name in ("_reconstruct", "scalar")},
    **{(f"{package}.numeric", "_frombuffer"): _numeric._frombuffer for package in ("numpy.core", "numpy._core")},
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("_codecs", "encode"): codecs.encode,
}


class RefusedPickle(Exception):
    """The file names a callable a dataset batch never needs."""


class _BatchUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            raise RefusedPickle(f"{module}.{name}") from None


def load_batch_pickle(path: Path) -> Any:
    """Unpickle ``path`` (latin1 for Python 2 strings), refusing anything but plain data and numpy arrays."""
    data = Path(path).read_bytes()
    try:
        return _BatchUnpickler(io.BytesIO(data), encoding="latin1").load()
    except RefusedPickle as err:
        raise UserError(f"{path} asks to run {err} while being read: a dataset batch holds only arrays and "
                        "lists, so it was refused (replace the file with the official one)") from None
