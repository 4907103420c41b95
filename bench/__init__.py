"""Benchmarks: each prints its figures as a Markdown table (bench/README.md records them)."""

import json
import subprocess
import sys


def in_fresh_process(module: str, *args: str) -> dict:
    """Run `python -m module --one ARGS...` and return the JSON it prints: a size measured in a process
    of its own, so that its peak memory (ru_maxrss) is that size's alone."""
    done = subprocess.run([sys.executable, "-m", module, "--one", *args], capture_output=True, text=True, check=True)
    return json.loads(done.stdout)
