"""Arrow schema of scored shards and the conversion of one batch's scores into a record batch."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import torch

from curate.score.indicators import INDICATORS, BatchScores


def ood_column(name: str) -> str:
    return f"ood_{name}"


def scored_schema(num_classes: int, embedding_dim: int | None, metadata: dict) -> pa.Schema:
    fields = [
        pa.field("uid", pa.string(), nullable=False),
        pa.field("source", pa.dictionary(pa.int32(), pa.string()), nullable=False),
        pa.field("key", pa.string(), nullable=False),
        pa.field("label", pa.int32()),
        pa.field("pred", pa.int16(), nullable=False),
        pa.field("confidence", pa.float32()),
        pa.field("margin", pa.float32()),
        pa.field("entropy", pa.float32()),
        pa.field("energy", pa.float32()),
        pa.field("logits", pa.list_(pa.float16(), num_classes)),
    ]
    if embedding_dim is not None:
        fields.append(pa.field("embedding", pa.list_(pa.float16(), embedding_dim)))
    fields.append(pa.field("feat_norm", pa.float32()))
    fields += [pa.field(ood_column(name), pa.float32()) for name in INDICATORS]
    fields.append(pa.field("relatedness", pa.float32()))
    return pa.schema(fields, metadata={"curate": json.dumps(metadata)})


def _fixed_list(values: torch.Tensor, width: int) -> pa.FixedSizeListArray:
    flat = values.to(torch.float16).numpy().reshape(-1)
    return pa.FixedSizeListArray.from_arrays(pa.array(flat, type=pa.float16()), width)


def _f32(values: torch.Tensor) -> pa.Array:
    return pa.array(values.numpy().astype(np.float32, copy=False))


def record_batch(schema: pa.Schema, uids: list[str], sources: list[str], keys: list[str], labels: torch.Tensor,
                 scores: BatchScores, z: dict[str, torch.Tensor], relatedness: torch.Tensor) -> pa.RecordBatch:
    """One batch of rows in ``schema``; labels of -1 become nulls."""
    label_values = labels.numpy().astype(np.int32)
    columns: dict[str, pa.Array] = {
        "uid": pa.array(uids, pa.string()),
        "source": pa.array(sources, pa.string()).dictionary_encode(),
        "key": pa.array(keys, pa.string()),
        "label": pa.array(label_values, pa.int32(), mask=label_values < 0),
        "pred": pa.array(scores.pred.numpy().astype(np.int16)),
        "confidence": _f32(scores.confidence),
        "margin": _f32(scores.margin),
        "entropy": _f32(scores.entropy),
        "energy": _f32(scores.energy),
        "logits": _fixed_list(scores.logits, scores.logits.shape[1]),
    }
    if "embedding" in schema.names:
        columns["embedding"] = _fixed_list(scores.embedding, scores.embedding.shape[1])
    columns["feat_norm"] = _f32(scores.feat_norm)
    for name in INDICATORS:
        columns[ood_column(name)] = _f32(z[name])
    columns["relatedness"] = _f32(relatedness)
    return pa.RecordBatch.from_arrays([columns[f.name] for f in schema], schema=schema)
