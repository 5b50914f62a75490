"""Killing a command mid-run, as a crash or an out-of-memory kill would."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path


def kill_after_second_shard(command: list[str], out: Path) -> None:
    """Start ``command`` (a `curate score` writing to ``out``), SIGKILL it as soon as its second shard is in
    place, and check it had not finished by then."""
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not (out / "part-00001.parquet").exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    manifest = json.loads((out / "_manifest.json").read_text())
    assert not manifest["complete"], "the run finished before it could be killed: make the pool bigger"
