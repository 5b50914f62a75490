"""`curate score --executor ray`: the teacher runs in a Ray actor pool, the driver writes the scored folder.

Ray Data holds the work as one row per batch of pool positions (the same batches as the local executor:
``ScoringJob.read_rows`` positions that never cross a shard boundary, in the pool's stable order), and
``map_batches`` hands them to a pool of ``BatchActor``s, each with its own copy of the pool reader and the
teacher (on a GPU when the cluster has them). An actor decodes its batch and scores it with the same
``BatchScorer`` as the local executor, and sends back the rows as Arrow IPC bytes: for small images the
scored row (logits, embedding, indicators) is smaller than the pixels, so decoding where the teacher runs
keeps the object store traffic down, and it never leaves a stage waiting on CPUs another stage holds (a
two-core machine running two actors has none left for separate read tasks).

Results come back in order (``preserve_order``), so the driver streams them through the same writer as the
local executor: same shard files, same manifest, same resume at shard granularity. Workers must see the
teacher file and the pool's ``--root`` at the same paths as the driver (a shared filesystem on a cluster).
"""

from __future__ import annotations

import json
import logging
import socket
from collections.abc import Iterator
from dataclasses import replace
from typing import Any
from urllib.parse import urlsplit

import numpy as np
import pyarrow as pa

from curate.device import pick_device
from curate.errors import UserError
from curate.pools import open_pool, read_batch
from curate.score.config import ScoreConfig
from curate.score.executors.base import ScoringJob
from curate.score.forward import BatchScorer, ForwardPass, PositionBatches, ScoredBatch, wants_autocast
from curate.score.reference import Reference
from curate.teachers import load_teacher, read_meta_file

# Positions an actor scores per call (at least one read batch): Ray Data costs ~20 ms a call, a GPU scores
# 256 images in ~10 ms.
POSITIONS_PER_CALL = 1024
INSTALL_HINT = "pip install 'hetero-distill[ray]' (or pip install 'ray[data]')"


def import_ray():
    try:
        import ray
        import ray.data  # noqa: F401  (the data extra: pandas, fsspec)
    except ImportError as err:
        raise UserError(f"--executor ray needs Ray Data ({err.name or err} is missing): {INSTALL_HINT}") from None
    return ray


def check_reachable(address: str, timeout: float = 3.0) -> None:
    """Fail in seconds, naming the address, where ray.init would retry for a minute: host:port must accept
    a TCP connection (``auto`` and ``local`` are left to Ray)."""
    if address in ("auto", "local"):
        return
    parts = urlsplit(address if "://" in address else f"ray://{address}")
    try:
        host, port = parts.hostname, parts.port
    except ValueError:
        host, port = None, None
    if not host or not port:
        raise UserError(f"--address {address!r} is not HOST:PORT (or ray://HOST:PORT, auto): give the head node's "
                        "address as `ray start --head` printed it")
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError as err:
        raise UserError(f"cannot reach the Ray cluster at {address} ({err.strerror or err}): start it with "
                        "`ray start --head` or fix --address") from None


def connect(address: str | None):
    """Join the cluster at ``address`` (default: $RAY_ADDRESS, else start a local Ray), unless this process
    is already connected (a test, a notebook). Returns the ray module."""
    ray = import_ray()
    if ray.is_initialized():
        return ray
    if address is not None:
        check_reachable(address)
    try:
        ray.init(address=address, logging_level=logging.WARNING, log_to_driver=False, include_dashboard=False)
    except ConnectionError as err:
        # Ray >= 2.59 starts clusters with token authentication; a client without RAY_AUTH_MODE=token is
        # refused, and the cause only reaches the log
        raise UserError(f"cannot connect to the Ray cluster at {address or 'RAY_ADDRESS'} ({err}): check that it "
                        "runs (`ray status` on its head) and, if it uses token authentication, set "
                        "RAY_AUTH_MODE=token here (the token as `ray get-auth-token` prints it, in RAY_AUTH_TOKEN or "
                        "~/.ray/auth_token)") from None
    return ray


class BatchActor:
    """One teacher and one pool reader per actor; each call scores a few batches of positions, each on its own
    (batch composition is what makes the rows identical to the local executor's)."""

    def __init__(self, cfg: ScoreConfig, fingerprint: str, reference: dict, schema: pa.Schema) -> None:
        device = pick_device(cfg.device)
        teacher = load_teacher(cfg.teacher, cfg.trust_pickle, read_meta_file(cfg.teacher_meta), device,
                               weights=cfg.teacher_weights)
        if teacher.fingerprint != fingerprint:
            raise UserError(f"{cfg.teacher} on a Ray worker is not the driver's teacher: put the same file at the "
                            "same path on every node")
        self.pool = open_pool(cfg.pool, cfg.root, cfg.pool_options)
        self.geometry = teacher.spec.geometry()
        self.device, self.jpegs_encoded = device, cfg.jpegs_on_device(device)
        forward = ForwardPass(teacher, device, wants_autocast(cfg.autocast, device), cfg.channels_last)
        self.scorer = BatchScorer(forward, Reference.from_json(reference), schema, cfg.batch_size)

    def __call__(self, work: dict[str, np.ndarray]) -> dict[str, list[Any]]:
        out: dict[str, list[Any]] = {"shard": [], "rows": [], "errors": [], "samples": []}
        for shard, start, stop in zip(work["shard"], work["start"], work["stop"]):
            batch = read_batch(self.pool, range(int(start), int(stop)), self.geometry, self.jpegs_encoded)
            batch = batch.on_device(self.device, self.geometry)
            rows = self.scorer(batch)
            out["shard"].append(int(shard))
            out["rows"].append(b"" if rows is None else _to_ipc(rows))
            out["errors"].append(json.dumps([[uid, reason] for _, uid, reason in batch.errors]))
            out["samples"].append(int(stop - start))
        return out


def _to_ipc(rows: pa.RecordBatch) -> bytes:
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, rows.schema) as writer:
        writer.write_batch(rows)
    return sink.getvalue().to_pybytes()


def _from_ipc(data: bytes) -> pa.RecordBatch | None:
    if not data:
        return None
    return pa.ipc.open_stream(pa.py_buffer(data)).read_next_batch()


def actor_resources(ray, cfg: ScoreConfig) -> tuple[int, dict[str, float]]:
    """How many actors, and what each asks of Ray: one GPU each where the cluster has GPUs (unless --device
    cpu), else one CPU each."""
    gpus = int(ray.cluster_resources().get("GPU", 0))
    cpus = int(ray.cluster_resources().get("CPU", 1))
    if cfg.device.startswith("cuda") and gpus == 0:
        raise UserError("--device cuda but the Ray cluster has no GPUs: use --device auto or cpu")
    if gpus and cfg.device != "cpu":
        return cfg.num_actors or gpus, {"num_gpus": 1, "num_cpus": 1}
    return cfg.num_actors or max(1, cpus), {"num_cpus": 1}


class RayExecutor:
    """Connects on construction (a missing Ray or an unreachable cluster fails before any work)."""

    def __init__(self, cfg: ScoreConfig) -> None:
        self.cfg = cfg
        self.ray = connect(cfg.address)

    def scored_batches(self, job: ScoringJob) -> Iterator[ScoredBatch]:
        cfg, ray = self.cfg, self.ray
        actors, resources = actor_resources(ray, cfg)
        context = ray.data.DataContext.get_current()
        context.execution_options.preserve_order = True  # the writer commits shards in pool order
        context.enable_progress_bars = False  # the driver shows its own
        logging.getLogger("ray.data").setLevel(logging.ERROR)
        work = [{"shard": p[0] // cfg.shard_rows, "start": p[0], "stop": p[-1] + 1}
                for p in PositionBatches(job.todo, job.read_rows)]
        # The actors get no --address (they are already on the cluster) and open the pool themselves.
        actor_cfg = replace(cfg, address=None)
        results = ray.data.from_items(work).map_batches(
            BatchActor, fn_constructor_kwargs={"cfg": actor_cfg, "fingerprint": job.teacher.fingerprint,
                                               "reference": job.reference.to_json(), "schema": job.schema},
            batch_size=max(1, POSITIONS_PER_CALL // job.read_rows), compute=ray.data.ActorPoolStrategy(size=actors),
            **resources)
        try:
            for result in results.iter_rows():
                errors = [(uid, reason) for uid, reason in json.loads(result["errors"])]
                yield ScoredBatch(int(result["shard"]), _from_ipc(result["rows"]), errors, int(result["samples"]))
        except ray.exceptions.RayError as err:
            user_error = _user_error_inside(err)
            if user_error is None:
                raise
            raise user_error from None


def _user_error_inside(err: BaseException) -> UserError | None:
    """A UserError raised in an actor (a missing file on a worker) reaches the driver wrapped by Ray."""
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, UserError):
            return UserError(str(err))
        err = getattr(err, "cause", None) or err.__cause__ or err.__context__
    return None
