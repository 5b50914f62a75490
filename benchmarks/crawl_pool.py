"""Build a real crawl-like pool from the packaged data, in the layouts crawls use, with identical pixels:

```
OUT/webdataset/shards-000000.tar ...   KEY.png or KEY.jpg (+ KEY.cls for Fashion-MNIST), 1,000 samples a shard
OUT/parquet/part-00000.parquet ...     the Hugging Face layout: image struct (bytes, path), label; 1,000 rows a file
OUT/images.npy                         the same images decoded, N x 28 x 28 uint8 (the `npy` pool's baseline)
OUT/manifest.json                      counts per source, shard size, build time
```

Sources, all 28x28 grey: Fashion-MNIST train and test (PNG, labelled), Japanese and Latin glyphs (PNG), the
rest small photo patches from the Debian wallpapers (JPEG, quality 90), which is most of a million. The `.npy`
holds the pixels the encoded files decode to, so the three layouts are the same images. Shards are written
by two processes; `--count 1000000` takes a few minutes on 2 cores.

    python benchmarks/crawl_pool.py --count 1000000 --out /tmp/crawl
"""

from __future__ import annotations

import argparse
import functools
import io
import json
import os
import tarfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from curate.pools import open_pool

PER_SHARD = 1000
PHOTOS = ["/usr/share/wallpapers", "/usr/share/backgrounds"]  # Debian's wallpaper packages


def photo_folder() -> Path:
    """The first installed folder of Debian wallpapers (scripts/setup.sh installs them)."""
    return next(Path(p) for p in PHOTOS if Path(p).is_dir())


GLYPHS = {  # name: options of the glyphs pool
    "kana-kanji": {"fonts": ["ipag.ttf"], "ranges": ["kana", "kanji"], "size": 28},
    "latin": {"fonts": ["DejaVuSans.ttf", "DejaVuSerif.ttf"], "ranges": ["latin", "digits", "greek"], "size": 28},
}


def mix_spec(count: int, folder: Path) -> Path:
    """The sources as a TOML mix: Fashion-MNIST (up to 1/14 of ``count``) and glyphs (up to 1/40 per font
    set), patches the rest."""
    fashion = min(70000, count // 14)
    train = min(60000, fashion * 6 // 7)
    sources = [{"kind": "fashion-mnist", "name": "fashion", "split": "train", "count": train},
               {"kind": "fashion-mnist", "name": "fashion-test", "split": "test", "count": fashion - train}]
    for name, options in GLYPHS.items():
        available = len(open_pool("glyphs", None, options))
        sources.append({"kind": "glyphs", "name": name, **options, "count": min(available, count // 40)})
    photos = str(photo_folder())
    # small crops (2-10% of the photo's side): resizing a 500-pixel crop to 28 cost 0.5 ms a patch
    sources.append({"kind": "patches", "name": "photo", "root": photos, "size": 28, "min_scale": 0.02,
                    "max_scale": 0.1, "count": count - sum(s["count"] for s in sources)})
    text = 'name = "crawl"\nseed = 0\n' + "".join(
        "\n[[source]]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in source.items()) for source in sources)
    spec = folder / "crawl-sources.toml"
    spec.write_text(text)
    return spec


def encode(image: np.ndarray, jpeg: bool) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG" if jpeg else "PNG", quality=90)
    return buffer.getvalue()


def decode(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as image:
        return np.asarray(image.convert("L"))


@functools.lru_cache(maxsize=1)
def _pool(spec: str):
    """One opened mix per process: opening loads fonts and arrays, which would cost more than a shard."""
    return open_pool(spec)


def write_shard(spec: str, out: str, number: int, count: int) -> int:
    """Shard ``number``: samples [number * PER_SHARD, ...) in both layouts and their pixels in the .npy."""
    pool = _pool(spec)
    pixels = np.load(Path(out) / "images.npy", mmap_mode="r+")
    start, stop = number * PER_SHARD, min((number + 1) * PER_SHARD, count)
    rows = {"image": [], "label": []}
    with tarfile.open(Path(out) / "webdataset" / f"shards-{number:06d}.tar", "w", format=tarfile.USTAR_FORMAT) as tar:
        for index in range(start, stop):
            sample = pool.sample(index)
            grey = sample.image.numpy()[0] if sample.image.shape[0] == 1 else \
                np.asarray(Image.fromarray(sample.image.permute(1, 2, 0).numpy()).convert("L"))
            jpeg = sample.source == "photo"
            data = encode(grey, jpeg)
            key = f"{sample.source}-{index:07d}"
            fields = {"jpg" if jpeg else "png": data}
            if sample.label is not None:
                fields["cls"] = str(sample.label).encode()
            for field, payload in fields.items():
                member = tarfile.TarInfo(f"{key}.{field}")
                member.size, member.mtime = len(payload), 0
                tar.addfile(member, io.BytesIO(payload))
            rows["image"].append({"bytes": data, "path": f"{key}.{'jpg' if jpeg else 'png'}"})
            rows["label"].append(sample.label)
            pixels[index] = decode(data)
    pixels.flush()
    table = pa.table({"image": pa.array(rows["image"], pa.struct([("bytes", pa.binary()), ("path", pa.string())])),
                      "label": pa.array(rows["label"], pa.int64())})
    pq.write_table(table, Path(out) / "parquet" / f"part-{number:05d}.parquet", row_group_size=PER_SHARD)
    return stop - start


def build(count: int, out: Path, processes: int = 2) -> dict:
    """The pool in ``out`` (reused when a complete build of the same count is there)."""
    manifest_path = out / "manifest.json"
    if manifest_path.exists() and json.loads(manifest_path.read_text()).get("count") == count:
        return json.loads(manifest_path.read_text())
    started = time.perf_counter()
    for folder in ("webdataset", "parquet"):
        (out / folder).mkdir(parents=True, exist_ok=True)
    spec = mix_spec(count, out)
    np.lib.format.open_memmap(out / "images.npy", mode="w+", dtype=np.uint8, shape=(count, 28, 28)).flush()
    shards = -(-count // PER_SHARD)
    with ProcessPoolExecutor(processes) as workers:
        written = sum(workers.map(write_shard, [str(spec)] * shards, [str(out)] * shards, range(shards),
                                  [count] * shards, chunksize=max(1, shards // (processes * 8))))
    pool = open_pool(str(spec))
    manifest = {"count": written, "shards": shards, "per_shard": PER_SHARD,
                "sources": {s.name: len(s) for s in pool.sources},
                "build_seconds": round(time.perf_counter() - started, 1),
                "bytes": {layout: sum(p.stat().st_size for p in (out / layout).iterdir())
                          for layout in ("webdataset", "parquet")}}
    manifest_path.write_text(json.dumps(manifest, indent=1))
    return manifest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=1_000_000)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--processes", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args()
    print(json.dumps(build(args.count, args.out, args.processes), indent=1))


if __name__ == "__main__":
    main()
