"""Are two experiment folders the same run? For refactors that must not change behaviour.

    python scripts/compare_runs.py results-before/ results-after/ --repos /path/of/checkout-before /path/after

Every figure, table and weight must be identical: teacher and student weights (tensor for tensor),
every Parquet table (scored shards, errors, selections, curated shards; schema metadata too, except a
selection's recorded command line), manifests, metrics (but throughput), results.json (but wall times)
and the reports (but the wall-time table). What may differ is only what cannot be the same across two
runs: the checkout's and output's paths, timings, and so the teacher file's sha256, which every
downstream file records. Exit code 1 and the differing files listed when anything else differs.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import sys
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import torch


class Normalizer:
    """Replaces what legitimately differs between the two runs by placeholders."""

    def __init__(self, outs: tuple[Path, Path], repos: tuple[str, str], folders: tuple[Path, Path]) -> None:
        self.replacements = [(str(p), "OUT") for p in outs] + [(r, "REPO") for r in repos if r]
        for folder in folders:  # the teacher's sha256 (its file holds its training time and paths)
            digest = hashlib.sha256((folder / "teacher.pt").read_bytes()).hexdigest()
            self.replacements += [(digest, "FINGERPRINT"), (digest[:12], "FINGERPRINT")]
        self.replacements.sort(key=lambda pair: -len(pair[0]))  # longer paths first: one may prefix another

    def __call__(self, text: str) -> str:
        for old, new in self.replacements:
            text = text.replace(old, new)
        return re.sub(r'"train_seconds": [0-9.]+', '"train_seconds": "T"', text)


def model_view(path: Path, norm: Normalizer) -> Any:
    blob = torch.load(path, weights_only=False, map_location="cpu")
    if "state_dict" in blob:  # a teacher or a student
        meta = {k: v for k, v in blob["meta"].items() if k != "train_seconds"}
        return blob["arch"], blob["arch_options"], norm(json.dumps(meta, sort_keys=True)), blob["state_dict"]
    return blob["step"], blob["readers"], blob["model"]  # a distillation checkpoint


def same_models(a: Any, b: Any) -> bool:
    *fields_a, tensors_a = a
    *fields_b, tensors_b = b
    return fields_a == fields_b and tensors_a.keys() == tensors_b.keys() and all(
        torch.equal(tensors_a[k], tensors_b[k]) for k in tensors_a)


def table_view(path: Path, norm: Normalizer) -> tuple[Any, dict[bytes, str] | None]:
    table = pq.read_table(path)
    metadata = {k: norm(v.decode()) for k, v in (table.schema.metadata or {}).items()}
    if "selections" in path.parts:  # a selection records the command line of the process that wrote it
        metadata = None
    return table.replace_schema_metadata(None), metadata


def results_view(path: Path, norm: Normalizer) -> dict[str, Any]:
    results = json.loads(path.read_text())
    results.pop("stage_seconds")
    results["commands"] = [norm(c) for c in results["commands"]]
    for entry in results.get("ablation", {}).values():  # before issue 14 the options held a placeholder
        entry["options"] = [o.replace("{teacher}", "teacher.pt") for o in entry["options"]]
    return results


def metrics_view(path: Path) -> list[dict[str, Any]]:
    lines = path.read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k != "samples_per_s"} for line in lines]


def report_view(path: Path, norm: Normalizer) -> str:
    return norm(path.read_text()).split("## Wall time")[0]


def differences(a: Path, b: Path, norm: Normalizer) -> tuple[int, list[str]]:
    checked, differ = 0, []
    for file_a in sorted(p for p in a.rglob("*") if p.is_file() and ".done" not in p.parts):
        relative = file_a.relative_to(a)
        file_b = b / relative
        checked += 1
        if not file_b.exists():
            differ.append(f"{relative} (missing)")
            continue
        if file_a.suffix == ".parquet":
            (table_a, meta_a), (table_b, meta_b) = table_view(file_a, norm), table_view(file_b, norm)
            same = table_a.equals(table_b) and meta_a == meta_b
        elif file_a.suffix == ".pt":
            same = same_models(model_view(file_a, norm), model_view(file_b, norm))
        elif file_a.name == "metrics.jsonl":
            same = metrics_view(file_a) == metrics_view(file_b)
        elif file_a.name == "results.json":
            same = results_view(file_a, norm) == results_view(file_b, norm)
        elif file_a.name == "report.md":
            same = report_view(file_a, norm) == report_view(file_b, norm)
        elif file_a.suffix == ".json":
            json_a, json_b = json.loads(norm(file_a.read_text())), json.loads(norm(file_b.read_text()))
            if "shards" in relative.parts:  # provenance: hashes of the selection file and command line
                json_a.pop("provenance", None), json_b.pop("provenance", None)
            same = json_a == json_b
        else:
            checked -= 1  # plots and logs: not compared
            continue
        if not same:
            differ.append(str(relative))
    return checked, differ


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("before", type=Path)
    parser.add_argument("after", type=Path)
    parser.add_argument("--repos", nargs=2, default=("", ""), metavar=("BEFORE", "AFTER"),
                        help="the checkouts each run used (their paths appear in manifests)")
    parser.add_argument("--outs", nargs=2, type=Path, default=None, metavar=("BEFORE", "AFTER"),
                        help="the --out each run wrote to, when a folder was moved since (default: the folders)")
    args = parser.parse_args()
    outs = tuple(args.outs) if args.outs else (args.before, args.after)
    norm = Normalizer(outs, tuple(args.repos), (args.before, args.after))
    checked, differ = differences(args.before, args.after, norm)
    print(f"{checked} files compared; {len(differ)} differ")
    for name in differ:
        print(f"  differs: {name}")
    sys.exit(1 if differ else 0)


if __name__ == "__main__":
    main()
