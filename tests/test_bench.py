"""The benchmark runs end to end and writes every method's figure; speed itself is not asserted here."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import DATA_ROOT

from fcexp.record import cpu_model

BENCH = Path(__file__).resolve().parents[1] / "scripts" / "bench.py"
METHODS = {"fcexp", "common recipe, 0 workers", "common recipe, 2 workers", "hand-written loop", "arithmetic bound"}


@pytest.mark.slow
def test_quick_bench_writes_all_methods(tmp_path, mnist_root):
    # `make bench ARGS=--quick` passes the full bench's --json runs/bench.json: a quick bench leaves that file alone.
    full = tmp_path / "bench.json"
    full.write_text('{"the full bench": "figures"}')
    proc = subprocess.run(
        [sys.executable, str(BENCH), "--quick", "--json", str(full)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env={**os.environ, "FCEXP_DATA": DATA_ROOT},
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert full.read_text() == '{"the full bench": "figures"}'
    quick = tmp_path / "bench-quick.json"
    assert f"wrote {quick}" in proc.stdout
    result = json.loads(quick.read_text())
    assert set(result["samples_per_s"]) >= METHODS
    assert all(v > 0 for v in result["samples_per_s"].values())
    assert set(result["ratios"]) >= {"fcexp/common", "fcexp/hand-written", "fcexp/arithmetic", "member/solo step, fp32"}
    assert result["process"]["wall_s"] > 0 and result["process"]["peak_rss_mb"] > 0
    assert 0.0 < result["process"]["test_acc"] <= 1.0
    assert cpu_model() in result["machine"] and cpu_model() in proc.stdout
    assert "fcexp/common" in proc.stdout
    # The table's last column is each method's speed over fcexp's, as its header says (and the README's table).
    assert "speed ÷ fcexp's (>1: faster than fcexp)" in proc.stdout
    speed = result["samples_per_s"]
    for name, value in speed.items():
        (row,) = [line for line in proc.stdout.splitlines() if re.fullmatch(rf"{re.escape(name)}\s+[\d,]+\s+\S+", line)]
        ratio = value / speed["fcexp"]  # from the JSON's whole samples/s: about 1% off the printed one at worst
        assert abs(float(row.split()[-1].rstrip("x")) - ratio) <= 0.005 + 0.01 * ratio, row
    # Into a file, the output carries no progress-bar redraws or colour codes, and no warnings.
    assert "\r" not in proc.stdout + proc.stderr and "\x1b" not in proc.stdout + proc.stderr
    assert proc.stderr == ""
