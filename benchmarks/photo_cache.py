"""Reading a sparse selection of photo patches, as `curate export` does, with and without the decoded-photo cache.

An export reads the selected patches in pool order; a selection of a few percent still touches nearly every
photo, and decoding a large wallpaper costs 0.1-1.6 s, so without the cache every export pays the decoding of the
whole folder again. Three reads of the same positions, each by a freshly opened pool (as a new `curate export`
process would be): with the cache off (the baseline), with an empty cache (it fills), with the cache warm. Photos
reached through symbolic links to one file are decoded once when the cache is on (its entries are keyed by the
file itself), which is why filling it can be faster than reading without it. The cache lives in a temporary
folder, so the user's is neither used nor touched. The last line is
``ratio=<seconds with the cache off / seconds warm>``.

    python benchmarks/photo_cache.py                       # /usr/share/wallpapers, 60,000 patches, 2% read
    python benchmarks/photo_cache.py --photos DIR --fraction 0.05 --json photo_cache.json
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from curate.pools import open_pool
from curate.pools.dataset import read_batch
from curate.spec import InputSpec

READ_CHUNK = 128  # positions per read, as the export's reader takes them


def read_selection(photos: Path, count: int, positions: np.ndarray) -> float:
    start = time.perf_counter()
    pool = open_pool("patches", photos, {"count": count, "size": 28})
    geometry = InputSpec(in_channels=3, image_size=28, mean=(0.5,) * 3, std=(0.5,) * 3).geometry()  # grey photos too
    for first in range(0, len(positions), READ_CHUNK):
        read_batch(pool, positions[first:first + READ_CHUNK], geometry)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--photos", type=Path, default=Path("/usr/share/wallpapers"))
    parser.add_argument("--count", type=int, default=60000, help="patches in the pool")
    parser.add_argument("--fraction", type=float, default=0.02, help="share of the patches read (the selection)")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = parser.parse_args()
    if not args.photos.is_dir():
        parser.error(f"{args.photos} is not a folder of photos (apt-get install plasma-workspace-wallpapers)")
    rng = np.random.default_rng(0)
    positions = np.sort(rng.choice(args.count, max(1, int(args.count * args.fraction)), replace=False))
    with tempfile.TemporaryDirectory() as cache:
        os.environ["XDG_CACHE_HOME"] = cache
        os.environ["CURATE_CACHE_GIB"] = "0"
        off = read_selection(args.photos, args.count, positions)
        os.environ["CURATE_CACHE_GIB"] = "4"
        filling = read_selection(args.photos, args.count, positions)
        warm = read_selection(args.photos, args.count, positions)
        cached_mib = sum(f.stat().st_size for f in Path(cache).rglob("*.npy")) / 2**20
    photos = len(open_pool("patches", args.photos, {"count": args.count}).photos)
    figures = {"photos": photos, "patches_read": len(positions), "cache_off_s": round(off, 2),
               "cache_filling_s": round(filling, 2), "cache_warm_s": round(warm, 2), "cache_mib": round(cached_mib),
               "ratio": round(off / warm, 1)}
    print(f"{len(positions):,} patches of {args.count:,} from {photos} photos in {args.photos}")
    print(f"cache off: {off:.1f} s   empty cache (filling): {filling:.1f} s   warm: {warm:.1f} s   "
          f"cache size: {cached_mib:.0f} MiB")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=1))
    print(f"ratio={off / warm:.1f}")


if __name__ == "__main__":
    main()
