"""``annotator bench ui``: event-loop stalls while jobs run, opening a 10,000-image
project, switching images (issue 3). The measuring code drives the real window and so
lives in the GUI package (:mod:`annotator.gui.bench_ui`); the benchmarks package may not
import Qt (import contract), so it runs there in a child process and reports its JSON.

Targets: no stall over 100 ms on a 2-core machine; an image switch under 50 ms.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys


def run(quick: bool = False) -> dict:
    """``{"max_stall_ms", "open_10k_s", "switch_ms", ...}`` measured offscreen."""
    cmd = [sys.executable, "-m", "annotator.gui.bench_ui", "--json"] + (["--quick"] if quick else [])
    env = dict(os.environ, QT_QPA_PLATFORM=os.environ.get("QT_QPA_PLATFORM", "offscreen"))
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"the UI benchmark failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def format_report(r: dict) -> str:
    ok = "met" if r.get("targets_met") else "NOT met"
    return (f"longest event-loop stall while pre-label and check run: {r['max_stall_ms']} ms (target <= 100; "
            f"p99 tick gap {r['p99_gap_ms']} ms)\n"
            f"image switch: {r['switch_ms']} ms median, {r['switch_max_ms']} ms slowest (target < 50)\n"
            f"open a {r.get('open_images', 10_000)}-image project: {r['open_10k_s']} s\n"
            f"targets {ok}")
