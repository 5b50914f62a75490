"""Query-stage scale: time and peak RSS of SQL, the vector index and selection at two pool sizes.

Synthetic scored pools (C=10 classes, D=128 embedding, 8 sources with different relatedness
distributions, embeddings clustered by class) are written with the real scored-pool writer, then
each task runs in a fresh process so its peak RSS is its own:

- sql-per-source: `curate sql --example per-source` (group-by over the narrow columns)
- topk-per-class: the 1,000 most related rows of every predicted class (window function)
- index: `curate index` (auto kind: IVF-PQ above 200k rows)
- knn-10k: 10,000 queries of 10 neighbours on that index
- select-balanced / select-diverse: `curate select` with a budget of 10,000

Cost should grow no worse than linearly with rows (growth <= 10 for 10x rows). The last line printed is
``growth=<total time at the larger size / total time at the smaller>``.

    python benchmarks/query_scale.py            # 1M and 10M rows (about 3.3 GB on disk at 10M)
    python benchmarks/query_scale.py --quick    # 100k and 1M rows, under a minute or so
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from memory import peak_rss_mib  # noqa: E402

CLASSES, DIM, SHARD_ROWS, BUDGET = 10, 128, 1 << 20, 10_000
SOURCES = ["fashion", "mnist", "glyphs", "emoji", "icons", "photos", "patches", "noise"]
TASKS = ["sql-per-source", "topk-per-class", "index", "knn-10k", "select-balanced", "select-diverse"]


def write_pool(folder: Path, rows: int, seed: int = 0) -> None:
    """A scored pool of ``rows`` synthetic rows, written shard by shard with the scorer's own writer."""
    import torch  # here, not at the top: the task processes measure the query stage's memory, without torch

    from curate.score.indicators import INDICATORS, BatchScores
    from curate.score.output import ScoredOutput, plan_shards
    from curate.score.schema import record_batch, scored_schema

    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(CLASSES, DIM)).astype(np.float32)
    head = rng.normal(size=(DIM, CLASSES)).astype(np.float32) / np.sqrt(DIM)
    shards = plan_shards(rows, SHARD_ROWS)
    output = ScoredOutput(folder)
    meta = {"num_classes": CLASSES, "class_names": [f"class{i}" for i in range(CLASSES)], "in_channels": 1,
            "image_size": 28, "mean": [0.5], "std": [0.5]}
    output.open({"teacher": {"fingerprint": "synthetic", "meta": meta},
                 "pool": {"arg": "synthetic", "options": {}, "description": {"rows": rows}},
                 "settings": {"rows": rows}}, shards)
    output.manifest["teacher"] = {"path": "", "relatedness": ["bn_mean", "bn_var", "cos_class"]}
    schema = scored_schema(CLASSES, DIM, {"format": "curate.scored/1", "teacher_fingerprint": "synthetic",
                                          "class_names": meta["class_names"]})
    output.manifest["columns"] = schema.names
    for shard in shards:
        file = output.open_shard(shard, schema)
        for start in range(shard.start, shard.stop, 65536):
            n = min(65536, shard.stop - start)
            source = rng.integers(0, len(SOURCES), n)
            cls = rng.integers(0, CLASSES, n)
            embedding = centres[cls] * (1 + source[:, None] / 4) + rng.normal(size=(n, DIM)).astype(np.float32)
            logits = torch.from_numpy(embedding @ head)
            probs = logits.softmax(1)
            top2 = probs.topk(2, dim=1).values
            indicators = {name: torch.from_numpy(rng.normal(size=n).astype(np.float32)) for name in INDICATORS}
            relatedness = torch.from_numpy((rng.normal(size=n) - source).astype(np.float32))
            scores = BatchScores(logits=logits, embedding=torch.from_numpy(embedding), pred=logits.argmax(1),
                                 confidence=top2[:, 0], margin=top2[:, 0] - top2[:, 1],
                                 entropy=-(probs * probs.log()).sum(1), energy=-logits.logsumexp(1),
                                 feat_norm=torch.from_numpy(np.linalg.norm(embedding, axis=1)), indicators=indicators)
            uids = [f"{SOURCES[s]}:{start + i}" for i, s in enumerate(source)]
            keys = [str(start + i) for i in range(n)]
            file.write(record_batch(schema, uids, [SOURCES[s] for s in source], keys,
                                    torch.full((n,), -1), scores, indicators, relatedness))
        file.commit([])
    output.finish()


def run_task(task: str, scored: Path, seed: int) -> None:
    """One task in this (fresh) process; prints its seconds and peak RSS as JSON."""
    from curate.query.index import VectorIndex, build_index
    from curate.query.scored import ScoredPool
    from curate.query.select import SelectConfig, Selector
    from curate.query.sql import EXAMPLES, run_query

    pool = ScoredPool.open(scored)
    start = time.perf_counter()
    if task == "sql-per-source":
        rows = run_query(pool.connect(), EXAMPLES["per-source"][1]).to_arrow_table().num_rows
    elif task == "topk-per-class":
        rows = run_query(pool.connect(), """SELECT uid, pred, relatedness FROM scores
            QUALIFY row_number() OVER (PARTITION BY pred ORDER BY relatedness DESC) <= 1000
            """).to_arrow_table().num_rows
    elif task == "index":
        rows = build_index(pool, "auto").rows
    elif task == "knn-10k":
        index = VectorIndex.load(pool)
        queries = np.random.default_rng(seed).normal(size=(10_000, DIM)).astype(np.float32)
        start = time.perf_counter()  # loading the index is not the query cost
        rows = int((index.search(queries, 10)[1] >= 0).sum())
    else:
        strategy = task.split("-", 1)[1]
        out = scored.parent / f"{task}.parquet"
        rows = Selector(SelectConfig(scored=scored, strategy=strategy, budget=BUDGET, out=out, seed=seed,
                                     command=["benchmark"])).run().rows
    seconds = time.perf_counter() - start
    peak = peak_rss_mib()
    print(json.dumps({"task": task, "seconds": seconds, "peak_rss_mib": peak, "rows": rows}))


def measure(task: str, scored: Path, seed: int) -> dict:
    result = subprocess.run([sys.executable, __file__, "--task", task, "--scored", str(scored), "--seed", str(seed)],
                            capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"{task} failed:\n{result.stderr[-2000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="100k and 1M rows")
    parser.add_argument("--rows", type=int, nargs=2, default=None, help="the two pool sizes")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    parser.add_argument("--workdir", type=Path, default=None, help="where to write the pools (default: a temp dir)")
    parser.add_argument("--task", choices=TASKS, help=argparse.SUPPRESS)
    parser.add_argument("--scored", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.task:
        run_task(args.task, args.scored, args.seed)
        return
    sizes = args.rows or ([100_000, 1_000_000] if args.quick else [1_000_000, 10_000_000])
    figures: dict = {"sizes": sizes, "budget": BUDGET, "dim": DIM, "classes": CLASSES, "tasks": {}}
    with tempfile.TemporaryDirectory(prefix="query-bench-", dir=args.workdir) as tmp:
        results: dict[int, dict[str, dict]] = {}
        for rows in sizes:
            folder = Path(tmp) / f"pool-{rows}" / "scored"
            start = time.perf_counter()
            write_pool(folder, rows)
            print(f"wrote a synthetic scored pool of {rows:,} rows in {time.perf_counter() - start:.1f} s", flush=True)
            results[rows] = {}
            for task in TASKS:
                results[rows][task] = measure(task, folder, args.seed)
                r = results[rows][task]
                print(f"  {task:16s} {rows:>11,} rows  {r['seconds']:8.2f} s  peak RSS {r['peak_rss_mib']:7.0f} MiB",
                      flush=True)
    small, large = sizes
    print(f"\n{'task':16s} {small:>12,} {large:>12,}   growth  peak RSS at {large:,}")
    for task in TASKS:
        a, b = results[small][task], results[large][task]
        growth = b["seconds"] / a["seconds"]
        figures["tasks"][task] = {str(small): round(a["seconds"], 3), str(large): round(b["seconds"], 3),
                                  "growth": round(growth, 2), "peak_rss_mib": round(b["peak_rss_mib"])}
        print(f"{task:16s} {a['seconds']:10.2f} s {b['seconds']:10.2f} s  {growth:6.2f}x  {b['peak_rss_mib']:7.0f} MiB")
    total = sum(results[large][t]["seconds"] for t in TASKS) / sum(results[small][t]["seconds"] for t in TASKS)
    figures["growth"] = round(total, 2)
    if args.json:
        args.json.write_text(json.dumps(figures, indent=1) + "\n")
    print(f"growth={total:.2f}")


if __name__ == "__main__":
    main()
