"""A mix: several sources in one pool, described by a TOML spec (see data/pools/).

```toml
name = "related-hidden"
seed = 0                     # seeds the random subsets below
scale = 1.0                  # optional: keep a seeded fraction of every source (quick runs); also an option:
                             # --option scale=0.1

[[source]]
kind = "fashion-mnist"       # any pool kind
name = "fashion-hidden"      # source name in uids (default: the kind); unique in the mix
split = "train"              # any option of that kind goes here too
start = 30000                # optional range of the source's own order ...
stop = 60000
count = 10000                # ... and a seeded random subset of it (kept in source order);
                             # for generated kinds (noise, patches) count is how many to make
root = "/usr/share/datasets/fashion-mnist"   # optional; relative paths are under --root
```

Sources come one after another in spec order; a sample's uid is
``<source name>:<key in that source>``, so uids are unique across the mix and
the same spec always yields the same uids in the same order.
"""

from __future__ import annotations

import hashlib
import tomllib
from bisect import bisect_right
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from curate.errors import UserError
from curate.pools.base import Pool, Sample
from curate.pools.registry import POOL_KINDS, default_root, fits_type, make_pool, register, type_name

_MIX_KEYS = {"kind", "name", "root", "start", "stop", "count"}
_SPEC_KEYS = {"name": str, "seed": int, "scale": float, "source": list[dict]}  # the spec's top level


@dataclass
class MixSource:
    name: str
    pool: Pool
    indices: np.ndarray | None  # positions in ``pool``; None means all of it

    def __len__(self) -> int:
        return len(self.pool) if self.indices is None else len(self.indices)

    def local(self, position: int) -> int:
        return position if self.indices is None else int(self.indices[position])


def _scaled(count: int, scale: float) -> int:
    return max(1, int(count * scale + 0.5))


def _subset(entry: dict, pool: Pool, seed: int, takes_count: bool, scale: float) -> np.ndarray | None:
    start = int(entry.get("start", 0))
    stop = int(entry.get("stop", len(pool)))
    if not 0 <= start <= stop <= len(pool):
        raise UserError(f"source {entry['name']}: start/stop {start}..{stop} outside its {len(pool)} samples")
    count = None if takes_count else entry.get("count")  # a generating kind made exactly its count already
    if scale != 1.0:
        count = _scaled(stop - start if count is None else int(count), scale)
    if count is None:
        return None if (start, stop) == (0, len(pool)) else np.arange(start, stop)
    if int(count) > stop - start:
        raise UserError(f"source {entry['name']}: count {count} exceeds the {stop - start} samples in range")
    rng = np.random.default_rng([seed, int(hashlib.sha256(entry["name"].encode()).hexdigest()[:8], 16)])
    # a prefix of one seeded permutation: a scaled-down spec takes a subset of what the full one takes
    return np.sort(start + rng.permutation(stop - start)[:int(count)])


@register
class MixPool(Pool):
    kind = "mix"
    summary = "a TOML spec mixing several sources with per-source options, ranges and counts (see data/pools/)"
    options = {"spec": "path of the TOML spec (or give the .toml as --pool)",
               "scale": "keep a seeded fraction of every source, e.g. 0.1 for a quick run (default: the spec's, or 1)"}
    root_help = "base folder for sources whose root is relative or missing"

    def __init__(self, root: Path | None = None, spec: str | None = None, scale: float | None = None) -> None:
        if spec is None:
            raise UserError("the mix pool needs a spec: pass --pool path/to/spec.toml")
        self.spec_path = Path(spec)
        if not self.spec_path.is_file():
            raise UserError(f"pool spec {self.spec_path} not found: give the path of a .toml pool spec")
        try:
            self.spec = tomllib.loads(self.spec_path.read_text())
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
            raise UserError(f"pool spec {self.spec_path} is not valid TOML ({err}): fix the file") from None
        unknown = sorted(set(self.spec) - set(_SPEC_KEYS))
        if unknown:
            raise UserError(f"pool spec {self.spec_path}: unknown top-level key {', '.join(unknown)}: it takes "
                            f"{', '.join(_SPEC_KEYS)} (options of a source go in its [[source]] table)")
        for key, hint in _SPEC_KEYS.items():
            if key in self.spec and not fits_type(self.spec[key], hint):
                raise UserError(f"pool spec {self.spec_path}: {key} = {self.spec[key]!r} is not {type_name(hint)}")
        entries = self.spec.get("source")
        if not entries:
            raise UserError(f"pool spec {self.spec_path} has no [[source]] tables: add at least one")
        self.source = str(self.spec.get("name", self.spec_path.stem))
        seed = int(self.spec.get("seed", 0))
        self.scale = float(scale if scale is not None else self.spec.get("scale", 1.0))
        if not 0 < self.scale <= 1:
            raise UserError(f"pool scale {self.scale} is not in (0, 1]: give a fraction such as 0.1")
        base = root if root is not None else default_root()
        self.sources: list[MixSource] = []
        for entry in entries:
            self.sources.append(self._open_source(dict(entry), base, seed, self.scale))
        names = [s.name for s in self.sources]
        duplicated = sorted({n for n in names if names.count(n) > 1})
        if duplicated:
            raise UserError(f"pool spec {self.spec_path}: source names {duplicated} repeat; give each a unique name")
        self.starts = list(np.cumsum([0] + [len(s) for s in self.sources[:-1]]))
        label_spaces = {tuple(s.pool.class_names or ()) for s in self.sources}
        # Labels mean the same thing across the mix only when every source names the same classes.
        self.class_names = list(label_spaces.pop()) if len(label_spaces) == 1 else None

    def _open_source(self, entry: dict, base: Path, seed: int, scale: float) -> MixSource:
        kind = entry.get("kind")
        if not isinstance(kind, str) or kind not in POOL_KINDS or kind == "mix":
            raise UserError(f"pool spec {self.spec_path}: source kind {kind!r} unknown; run `curate pools`")
        entry.setdefault("name", kind)
        for key, hint, minimum in (("name", str, None), ("root", str, None), ("start", int, 0), ("stop", int, 0),
                                   ("count", int, 1)):
            value = entry.get(key)
            if value is not None and (not fits_type(value, hint) or (minimum is not None and value < minimum)):
                at_least = f" >= {minimum}" if minimum is not None else ""
                raise UserError(f"source {entry['name']!r} of {self.spec_path}: {key} = {value!r} is not "
                                f"{type_name(hint)}{at_least}")
        options = {k: v for k, v in entry.items() if k not in _MIX_KEYS}
        takes_count = "count" in POOL_KINDS[kind].options
        if takes_count and "count" in entry:
            options["count"] = entry["count"]
        if "name" in POOL_KINDS[kind].options:
            options["name"] = entry["name"]
        root = entry.get("root")
        root_path = None if root is None else (Path(root) if Path(root).is_absolute() else base / root)
        try:
            # A generating source makes fewer samples (its first ones: neighbours share a decoded photo);
            # without a count in the spec, its default count is known once it is built.
            if takes_count and scale != 1.0 and "count" in options:
                options["count"] = _scaled(options["count"], scale)
            pool = make_pool(kind, root_path, options)
            if takes_count and scale != 1.0 and "count" not in entry:
                pool = make_pool(kind, root_path, {**options, "count": _scaled(len(pool), scale)})
        except UserError as err:
            raise UserError(f"source {entry['name']} of {self.spec_path}: {err}") from None
        pool.source = entry["name"]
        return MixSource(entry["name"], pool, _subset(entry, pool, seed, takes_count, 1.0 if takes_count else scale))

    @property
    def cheap_to_read(self) -> bool:  # type: ignore[override]
        return all(s.pool.cheap_to_read for s in self.sources)

    def __len__(self) -> int:
        return sum(len(s) for s in self.sources)

    def _locate(self, index: int) -> tuple[MixSource, int]:
        number = bisect_right(self.starts, index) - 1
        source = self.sources[number]
        return source, source.local(index - self.starts[number])

    def key(self, index: int) -> str:
        source, local = self._locate(index)
        return source.pool.key(local)

    def uid(self, index: int) -> str:
        source, local = self._locate(index)
        return source.pool.uid(local)

    def read(self, index: int) -> tuple[np.ndarray | torch.Tensor, int | None]:
        source, local = self._locate(index)
        return source.pool.read(local)

    def sample(self, index: int) -> Sample:
        source, local = self._locate(index)
        return source.pool.sample(local)

    def parts(self, indices: np.ndarray) -> Iterator[tuple[Pool, np.ndarray, np.ndarray]]:
        numbers = np.searchsorted(self.starts, indices, side="right") - 1
        for number in np.unique(numbers):
            where = np.flatnonzero(numbers == number)
            source = self.sources[number]
            local = indices[where] - self.starts[number]
            yield source.pool, local if source.indices is None else source.indices[local], where

    def describe(self) -> dict:
        return {
            **super().describe(),
            "spec": self.spec,
            "scale": self.scale,
            "sources": [{**s.pool.describe(), "name": s.name, "taken": len(s)} for s in self.sources],
        }
