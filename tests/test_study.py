"""The study's real command in quick mode: a report with every section, its figures, and where it came from."""

import subprocess
import sys
from pathlib import Path

import matplotlib.image
import pytest

STUDY = Path(__file__).resolve().parents[1] / "scripts" / "study.py"
SECTIONS = (
    "## 1. Vanishing gradients",
    "## 2. Dying ReLU",
    "## 3. Q1: input normalization",
    "## 4. Q2: one-hot labels vs class indices",
    "## 5. The output activation rule",
)


@pytest.mark.slow
def test_quick_study_writes_a_report_with_every_section(mnist_root, tmp_path):
    out = tmp_path / "study"
    proc = subprocess.run(
        [sys.executable, str(STUDY), "--quick", "--out", str(out)], capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = (out / "report.md").read_text()
    positions = [report.index(title) for title in SECTIONS]
    assert positions == sorted(positions)
    assert f"python scripts/study.py --quick --threads 1 --out {out}" in report
    # Every figure the report shows is there and decodes, the seed run's own included.
    images = [line.split("](", 1)[1].split(")", 1)[0] for line in report.splitlines() if line.startswith("![")]
    images += ["runs/normalize_scale/figures/confusion_matrix.png"]
    for name in images:
        assert matplotlib.image.imread(out / name).ndim == 3, name
    # The output rule's check: softmax rows sum to 1 and their argmax is what the run scored.
    rule = report.split(SECTIONS[-1])[1]
    assert "100.00% of rows" in rule
    scored = [line.split()[-1] for line in rule.splitlines() if line.startswith(("accuracy from", "test/acc logged"))]
    assert len(scored) == 2 and scored[0] == scored[1]
    assert float(rule.split("max |sum of a row - 1|")[1].split()[0]) < 1e-5
    # One-hot and index targets give the same loss on the same logits.
    assert "differ by at most" in report and len(list((out / "runs").iterdir())) == 24
