"""Crawl layouts at scale: `curate score` over the same images as WebDataset tars, as Parquet tables and as a
`.npy` array (the baseline), in one run.

For each layout, in a fresh process each: rows/s of the whole `curate score` (pool opening and indexing
included) and its peak RSS, at a small and at the full pool size (memory must stay flat: within 1.2x); the
time to open the pool with a cold index cache and a warm one. Then, for each crawl layout, a run killed with
SIGKILL at about half-way and resumed, whose files must equal the uninterrupted run's. The teacher is
`conv1` (one convolution and a linear layer), so rows/s is what the layouts and the pipeline allow.
The last line is ``ratio=<slowest crawl layout's rows/s / the .npy pool's>``.

    python benchmarks/pool_formats.py --crawl /tmp/crawl     # 1,000,000 images, built there if absent
    python benchmarks/pool_formats.py --quick                # 10,000 images in a temporary folder, ~90 s
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).parent))
from crawl_pool import build  # noqa: E402
from score_throughput import make_teacher  # noqa: E402

LAYOUTS = {  # name: (pool kind, folder or file under the crawl)
    "npy": ("npy", "images.npy"),
    "webdataset": ("webdataset", "webdataset"),
    "parquet": ("parquet", "parquet"),
}

SCORE = """
import json, sys, time
from pathlib import Path
sys.path.insert(0, {benchmarks!r})
from memory import peak_rss_mib
from curate.pools import open_pool
from curate.score.config import ScoreConfig
from curate.score.runner import score_pool
start = time.perf_counter()
open_pool({kind!r}, Path({root!r}))
opened = time.perf_counter() - start
summary = score_pool(ScoreConfig(teacher=Path({teacher!r}), pool={kind!r}, root=Path({root!r}), out=Path({out!r}),
                                 limit={limit!r}, shard_rows={shard_rows}))
seconds = time.perf_counter() - start
print(json.dumps({{"rows": summary.rows, "seconds": seconds, "open_seconds": opened,
                  "peak_rss_mib": peak_rss_mib(children=True)}}))
"""


def command(teacher: Path, kind: str, root: Path, out: Path, limit: int | None, shard_rows: int) -> list[str]:
    code = SCORE.format(benchmarks=str(Path(__file__).parent), kind=kind, root=str(root), teacher=str(teacher),
                        out=str(out), limit=limit, shard_rows=shard_rows)
    return [sys.executable, "-c", code]


def score(teacher: Path, kind: str, root: Path, out: Path, limit: int | None, shard_rows: int,
          cache: Path) -> dict:
    """One `curate score` in a fresh process with the index cache at ``cache``: rows, seconds, peak RSS."""
    shutil.rmtree(out, ignore_errors=True)
    result = subprocess.run(command(teacher, kind, root, out, limit, shard_rows), capture_output=True, text=True,
                            env={**os.environ, "XDG_CACHE_HOME": str(cache)}, check=False)
    if result.returncode:
        raise SystemExit(f"scoring {kind} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def kill_and_resume(teacher: Path, kind: str, root: Path, out: Path, whole: Path, shard_rows: int,
                    cache: Path) -> dict:
    """SIGKILL a run once half its shards are written, resume it, and compare every file with ``whole``."""
    shutil.rmtree(out, ignore_errors=True)
    argv = command(teacher, kind, root, out, None, shard_rows)
    env = {**os.environ, "XDG_CACHE_HOME": str(cache)}
    total = len(list(whole.glob("part-*.parquet")))
    process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    while len(list(out.glob("part-*.parquet"))) < total // 2 and process.poll() is None:
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    done_at_kill = len(list(out.glob("part-*.parquet")))
    subprocess.run(argv, capture_output=True, text=True, env=env, check=True)
    names = sorted(p.name for p in whole.glob("part-*.parquet")) + ["_errors.parquet"]
    equal = all(pq.read_table(out / n).equals(pq.read_table(whole / n)) for n in names)
    return {"shards": total, "written_before_kill": done_at_kill, "files_equal": equal}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="10,000 images in a temporary folder")
    parser.add_argument("--crawl", type=Path, default=None, help="folder of the built pool (built if absent)")
    parser.add_argument("--count", type=int, default=None, help="images (default 1,000,000; 10,000 with --quick)")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = parser.parse_args()
    count = args.count or (10_000 if args.quick else 1_000_000)
    small = count // 10
    shard_rows = 1024 if args.quick else 65536
    with tempfile.TemporaryDirectory(prefix="pool-formats-") as tmp:
        work = Path(tmp)
        crawl = args.crawl or work / "crawl"
        started = time.perf_counter()
        manifest = build(count, crawl)
        print(f"pool: {manifest['count']:,} images ({manifest['sources']}), built in "
              f"{manifest['build_seconds']:.0f} s ({time.perf_counter() - started:.0f} s this run)", flush=True)
        teacher = make_teacher(work, "conv1", 1, 28)
        figures: dict = {"count": manifest["count"], "small": small, "cpus": os.cpu_count(), "layouts": {}}
        for name, (kind, relative) in LAYOUTS.items():
            root = crawl / relative
            cold = score(teacher, kind, root, work / f"small-{name}", small, shard_rows, work / f"cache-{name}")
            full = score(teacher, kind, root, work / f"full-{name}", None, shard_rows, work / f"cache-{name}")
            figures["layouts"][name] = {
                "rows_s": full["rows"] / full["seconds"], "open_cold_s": cold["open_seconds"],
                "open_warm_s": full["open_seconds"], f"peak_rss_mib_{small}": cold["peak_rss_mib"],
                f"peak_rss_mib_{count}": full["peak_rss_mib"],
                "rss_growth": full["peak_rss_mib"] / cold["peak_rss_mib"]}
            f = figures["layouts"][name]
            print(f"{name:10s} {f['rows_s']:9,.0f} rows/s  open {f['open_cold_s']:6.2f} s cold, "
                  f"{f['open_warm_s']:5.2f} s warm  peak RSS {cold['peak_rss_mib']:6.0f} MiB at {small:,} rows, "
                  f"{full['peak_rss_mib']:6.0f} MiB at {count:,} ({f['rss_growth']:.2f}x)", flush=True)
        for name in ("webdataset", "parquet"):
            kind, relative = LAYOUTS[name]
            resumed = kill_and_resume(teacher, kind, crawl / relative, work / f"killed-{name}", work / f"full-{name}",
                                      shard_rows, work / f"cache-{name}")
            figures["layouts"][name]["kill_resume"] = resumed
            print(f"{name:10s} SIGKILL after {resumed['written_before_kill']} of {resumed['shards']} shards, "
                  f"resumed: files {'equal' if resumed['files_equal'] else 'DIFFERENT'} to the uninterrupted run",
                  flush=True)
    baseline = figures["layouts"]["npy"]["rows_s"]
    ratio = min(figures["layouts"][n]["rows_s"] for n in ("webdataset", "parquet")) / baseline
    figures["ratio"] = ratio
    if args.json:
        args.json.write_text(json.dumps(figures, indent=1))
    print(f"ratio={ratio:.3f}")


if __name__ == "__main__":
    main()
