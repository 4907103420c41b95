"""Benchmarks: each prints its figures as a Markdown table (bench/README.md records them)."""

import argparse
import json
import subprocess
import sys
from pathlib import Path


def in_fresh_process(module: str, *args: str) -> dict:
    """Run `python -m module --one ARGS...` and return the JSON it prints: a size measured in a process
    of its own, so that its peak memory (ru_maxrss) is that size's alone."""
    done = subprocess.run([sys.executable, "-m", module, "--one", *args], capture_output=True, text=True, check=True)
    return json.loads(done.stdout)


def add_step_flags(parser: argparse.ArgumentParser) -> None:
    """The hidden flags of a bench that makes its data in one fresh process (--make FOLDER --count N) and
    measures it in another (--one FOLDER)."""
    parser.add_argument("--one", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--make", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--count", type=int, help=argparse.SUPPRESS)


def make_in_fresh_process(module: str, folder: str, count: int) -> None:
    """`python -m module --make folder --count count`: made in a process of its own, because a child
    inherits its parent's peak RSS across fork and exec, which would inflate what is measured next."""
    subprocess.run([sys.executable, "-m", module, "--make", folder, "--count", str(count)], check=True)
