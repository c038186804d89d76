"""The benchmark runs end to end and writes every method's figure; speed itself is not asserted here."""

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
from conftest import DATA_ROOT
from lightning.pytorch.demos.boring_classes import BoringModel

from fcexp.record import cpu_model

BENCH = Path(__file__).resolve().parents[1] / "scripts" / "bench.py"
METHODS = {"fcexp", "common recipe, 0 workers", "common recipe, 2 workers", "hand-written loop", "arithmetic bound"}
METHODS |= {"arithmetic bound, bf16"}
RATIOS = {"fcexp/common", "fcexp/hand-written", "fcexp/arithmetic", "member step/solo step, fp32"}
RATIOS |= {"member step/solo step, bf16", "member step/bound, fp32", "member step/bound, bf16"}


def load_bench():
    spec = importlib.util.spec_from_file_location("bench", BENCH)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


def test_step_timer_times_each_step_once_however_many_instances(tmp_path, monkeypatch):
    # Hydra builds the timer once per member of a pack (today) or once per pack: either way a fit's steps count once.
    bench = load_bench()
    log = tmp_path / "steps.jsonl"
    monkeypatch.setenv(bench.STEP_LOG, str(log))
    for instances in (1, 3):
        trainer = L.Trainer(
            max_epochs=2,
            limit_train_batches=4,
            limit_val_batches=0,
            callbacks=[bench.StepTimer(steps=True) for _ in range(instances)],
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            default_root_dir=tmp_path,
        )
        trainer.fit(BoringModel())
    fits = [json.loads(line) for line in log.read_text().splitlines()]
    assert [fit["batches"] for fit in fits] == [8, 8]
    assert all(fit["steps_s"] > 0 for fit in fits)
    assert bench.StepTimer.fits == {}  # each fit's entry goes when its training ends


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
    assert set(result["ratios"]) >= RATIOS
    assert all(v > 0 for v in result["ratios"].values())
    process = result["process"]
    assert process["wall_s"] > 0 and process["peak_rss_mb"] > 0
    assert 0.0 < process["test_acc"] <= 1.0
    # The default run's own wall time, its training steps (timed in its process) and the share outside them.
    assert 0 < process["train_steps_s"] < process["run_wall_s"] < process["wall_s"]
    expected = (process["run_wall_s"] - process["train_steps_s"]) / process["train_steps_s"]
    assert process["outside_share"] == pytest.approx(expected, rel=0.05)
    assert result["arithmetic_gflops"] > 0 and result["arithmetic_gflops_bf16"] > 0
    assert result["cpu"] == cpu_model() and cpu_model() in result["machine"] and cpu_model() in proc.stdout
    assert "Every ratio A/B below is A's speed over B's" in proc.stdout
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
