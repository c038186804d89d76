"""The study's real command in quick mode: runs trained packed, then a report with every section, its figures,
intervals over seeds, a verdict for every comparison, and where it came from."""

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import matplotlib.image
import pytest
from conftest import DATA_ROOT, run_printed

from fcexp.record import cpu_model

STUDY = Path(__file__).resolve().parents[1] / "scripts" / "study.py"
SECTIONS = (
    "## 1. Vanishing gradients",
    "## 2. Dying ReLU",
    "## 3. Q1: input normalization",
    "## 4. Q2: one-hot labels vs class indices",
    "## 5. The output activation rule",
)
INTERVAL = re.compile(r"-?\d+\.\d{4} \[-?\d+\.\d{4}, -?\d+\.\d{4}\]")  # mean [low, high], fcexp.stats.Interval
# A comparison line: difference [95% interval] (test, p): verdict.
COMPARISON = re.compile(
    r"^- .+: [+-]\S+ \[[+-]\S+, [+-]\S+\] \(paired t test over 2 seeds, p = \S+?(, Holm-adjusted over \d "
    r"comparisons)?\): (\*\*significant\*\*: .+ is (higher|lower) than .+|not significant: the data cannot tell .+ "
    r"from .+ apart)\.$",
    re.MULTILINE,
)


@pytest.mark.slow
def test_quick_study_writes_a_report_with_every_section(mnist_root, tmp_path):
    out = tmp_path / "study"
    # Where SLURM is installed, Lightning hints at srun at every fit: a stand-in srun on PATH lets the hint through.
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text("#!/bin/sh\nexit 1\n")
    (bin_dir / "srun").chmod(0o755)
    proc = subprocess.run(
        [sys.executable, str(STUDY), "--quick", "--out", str(out)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env={**os.environ, "FCEXP_DATA": DATA_ROOT, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"},
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    # As clean as a run's output, also into a file: no warnings or hints, no progress-bar redraws or colour codes.
    assert proc.stderr == ""
    assert "\r" not in proc.stdout and "\x1b" not in proc.stdout
    assert cpu_model() in proc.stdout.splitlines()[-1]
    report = (out / "report.md").read_text()
    positions = [report.index(title) for title in SECTIONS]
    assert positions == sorted(positions)
    # The Regenerate line runs as printed from the user's shell (here the test's, with no venv activated): the
    # same arguments, with --help to skip the minutes. It names the CPU and counts threads in good grammar.
    (header,) = [line for line in report.splitlines() if line.startswith("Regenerate: ")]
    command = header.split("`")[1]
    assert command.endswith(f"study.py --quick --seeds 2 --threads 1 --out {out}")
    shown = run_printed(f"{command} --help", cwd=tmp_path)
    assert shown.returncode == 0 and "--seeds" in shown.stdout, shown.stderr[-3000:]
    assert "1 CPU thread of " in header and cpu_model() in header
    # Its TensorBoard command names the study's own runs folder, with a program the user's shell finds.
    tensorboard = shlex.split(re.search(r"`([^`]*tensorboard --logdir [^`]*)`", report)[1])
    assert shutil.which(tensorboard[0]) and tensorboard[1:] == ["--logdir", str(out / "runs")]
    # Every arm ran once per seed, each run in its own folder, trained packed as a packed sweep trains its jobs: its
    # metrics.json names the pack it shared. A run's share of a pack is 1/members, so the shares add up to the packs.
    records = {p.name: json.loads((p / "metrics.json").read_text()) for p in (out / "runs").iterdir()}
    assert len(records) == 24 * 2 and all(name.endswith(("_seed0", "_seed1")) for name in records)
    assert all(r["status"] == "completed" and r["pack"]["members"] > 1 for r in records.values())
    packs = int(re.search(r"trained packed, (\d+) packs", header)[1])
    assert packs < len(records) and packs == round(sum(1 / r["pack"]["members"] for r in records.values()))
    # The report tested the nets it reads again from their own last.ckpt, as a solo run would have written it.
    assert (out / "runs" / "labels_index_seed0" / "checkpoints" / "last.ckpt").is_file()
    # Every figure the report shows is there and decodes, the seed run's own included.
    images = [line.split("](", 1)[1].split(")", 1)[0] for line in report.splitlines() if line.startswith("![")]
    images += ["runs/normalize_scale_seed0/figures/confusion_matrix.png"]
    for name in images:
        assert matplotlib.image.imread(out / name).ndim == 3, name
    # Numbers come with intervals over seeds, and every comparison section judges each comparison it makes.
    sections = dict(zip(SECTIONS, re.split("|".join(map(re.escape, SECTIONS)), report)[1:], strict=True))
    for title, expected in zip(SECTIONS[:4], (3, 3, 2, 3), strict=True):
        assert INTERVAL.search(sections[title]), title
        assert len(COMPARISON.findall(sections[title])) == expected, title
    # The output rule's check: softmax rows sum to 1 and their argmax is what the runs scored.
    rule = sections[SECTIONS[-1]]
    assert "100.00% of rows" in rule
    scored = [
        re.split(r"\s{2,}", line)[1]
        for line in rule.splitlines()
        if line.startswith(("accuracy from", "test/acc logged"))
    ]
    assert len(scored) == 2 and scored[0] == scored[1] and INTERVAL.fullmatch(scored[0])
    assert float(rule.split("max |sum of a row - 1|")[1].split()[0]) < 1e-5
    # One-hot and index targets give the same loss on the same logits.
    assert "differ by at most" in sections[SECTIONS[3]]
