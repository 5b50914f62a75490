"""Vectors stored as Arrow lists (logits, embeddings) to numpy, without DuckDB or torch."""

from __future__ import annotations

import numpy as np
import pyarrow as pa


def float_lists(values: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """Lists of D numbers (the stored fixed-size float16 lists, or DuckDB's float lists) -> float32 (rows, D)."""
    if isinstance(values, pa.ChunkedArray):
        values = values.combine_chunks()
    flat = values.flatten().cast(pa.float32()).to_numpy()  # Arrow's float16 cast is ~2x faster than numpy's
    return flat.reshape(len(values), -1) if len(values) else flat.reshape(0, 1)
