"""The study's real command in quick mode: runs trained packed, then a report with a table of every claim, every
section, its figures, intervals over seeds, a verdict for every comparison, and where it came from."""

import importlib.util
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import matplotlib.image
import pytest
from conftest import DATA_ROOT, run_printed

from fcexp.data import NORMALIZATIONS
from fcexp.net import ACTIVATIONS
from fcexp.record import cpu_model

STUDY = Path(__file__).resolve().parents[1] / "scripts" / "study.py"
# Each section's heading and the comparisons it judges.
SECTIONS = {
    "## The activations": 0,
    "## 1. Vanishing gradients": 3,
    "## 2. Dying ReLU": 3,
    "## 3. Q1: input normalization": 6,
    "## 4. Q2: one-hot labels vs class indices": 3,
    "## 5. The output activation rule": 0,
    "## 6. Without an activation, depth adds nothing": 6,
    "## 7. tanh converges faster than sigmoid": 2,
    "## 8. ReLU is cheaper to compute": 6,
    "## 9. ReLU's sparsity and overfitting": 3,
    "## 10. Small training sets overfit": 9,
    "## 11. The activation guidance": 4,
}
# Every claim of the text the study answers, as the claims table words it (its first column starts so).
CLAIMS = (
    "Sigmoid's gradient vanishes in deep nets",
    "Deep sigmoid nets do not train",
    "Batch norm keeps",
    "ReLU makes a net's activations sparse",
    "A too-high learning rate kills ReLU units",
    "Leaky ReLU keeps them alive",
    "Normalizing the inputs helps gradient descent (Adam)",
    "Normalizing the inputs helps gradient descent (SGD)",
    "Normalizing the inputs helps gradient descent (SGD, no batch norm)",
    "One-hot targets and class indices",
    "A softmax output",
    "Without an activation, depth adds nothing",
    "tanh converges faster than sigmoid",
    "ReLU is cheaper to compute than sigmoid",
    "ReLU is cheaper to compute than tanh",
    "ReLU's zeros make the net sparse, which eases overfitting",
    "Neural networks overfit small data sets",
    "Dropout eases overfitting",
    "Hidden layers: prefer ReLU",
    "... avoid sigmoid",
)
VERDICT = re.compile(r"^(supported|partly|contradicted|not supported|not as the text|consistent|measured)")
INTERVAL = re.compile(r"-?\d+\.\d+ \[-?\d+\.\d+, -?\d+\.\d+\]")  # mean [low, high]
# A comparison line: difference [95% interval] (test, p): verdict, with a warning where p is near the threshold.
COMPARISON = re.compile(
    r"^- .+: [+-]\S+ \[[+-]\S+, [+-]\S+\] \((paired|Welch) t test over \d+( and \d+)? (seeds|repeats), p = \S+?"
    r"(, Holm-adjusted over \d+ comparisons; the interval is not)?\): "
    r"(\*\*significant\*\*: .+ is (higher|lower) than .+|not significant: the data cannot tell .+ from .+ apart)"
    r"(; p is near the 0.05 threshold: .+)?\.$",
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
    positions = [report.index(title) for title in ("## Claims and findings", *SECTIONS)]
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
    # metrics.json names the pack it shared (prelu, which learns its slope, trains alone). A run's share of a pack is
    # 1/members, so the shares add up to the packs. The arms of the comparisons that did not replicate across
    # machines run two seeds more.
    records = {p.name: json.loads((p / "metrics.json").read_text()) for p in (out / "runs").iterdir()}
    arms, runs = map(int, re.search(r"(\d+) arms, (\d+) runs", header).groups())
    assert len(records) == runs and all(r["status"] == "completed" for r in records.values())
    seeds = defaultdict(set)
    for name in records:
        arm, seed = name.rsplit("_seed", 1)
        seeds[arm].add(int(seed))
    more = {f"dying_{act}_lr0.03" for act in ("relu", "leaky_relu")} | {f"normalize_{how}" for how in NORMALIZATIONS}
    more.add("labels_index")  # packed as its one-hot twin, normalize_scale
    assert len(seeds) == arms and all(seeds[arm] == ({0, 1, 2, 3} if arm in more else {0, 1}) for arm in seeds)
    members = {name: r["pack"]["members"] if "pack" in r else 1 for name, r in records.items()}  # a solo run: none
    assert all((members[name] == 1) == ("prelu" in name) for name in records)
    packs = int(re.search(r"trained packed, (\d+) packs", header)[1])
    assert packs < len(records) and packs == round(sum(1 / m for m in members.values()))
    # The report tested the nets it reads again from their own last.ckpt, as a solo run would have written it.
    assert (out / "runs" / "labels_index_seed0" / "checkpoints" / "last.ckpt").is_file()
    # Every figure the report shows is there and decodes, the seed run's own included.
    images = [line.split("](", 1)[1].split(")", 1)[0] for line in report.splitlines() if line.startswith("![")]
    images += ["runs/normalize_scale_seed0/figures/confusion_matrix.png"]
    for name in images:
        assert matplotlib.image.imread(out / name).ndim == 3, name
    # Numbers come with intervals over seeds, every one finite, and every section judges each comparison it makes.
    assert not re.search(r"\b(nan|inf)\b", report, re.IGNORECASE)
    sections = dict(zip(SECTIONS, re.split("|".join(map(re.escape, SECTIONS)), report)[1:], strict=True))
    for title, expected in SECTIONS.items():
        assert title == "## The activations" or INTERVAL.search(sections[title]), title
        assert len(COMPARISON.findall(sections[title])) == expected, title
    # The claims table: a row for every claim, with a result, a verdict and a link to a section that is there.
    table = report.split("## Claims and findings")[1].split("\n## ")[0]
    rows = [line.split(" | ") for line in table.splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert all(any(row[0].lstrip("| ").startswith(claim) for row in rows) for claim in CLAIMS)
    anchors = {"#" + re.sub(r"[^\w\- ]", "", title[3:].lower()).replace(" ", "-") for title in SECTIONS}
    for claim, measured, result, verdict, link in rows:
        assert measured and re.search(r"\d", result) and VERDICT.match(verdict), claim
        assert re.fullmatch(r"\[\d+\]\((#[^)]+)\) \|", link) and link.split("(")[1].split(")")[0] in anchors, link
    # The gallery draws every registered activation, under every name it goes by.
    gallery = sections["## The activations"]
    assert all(name in gallery for name in ACTIVATIONS)
    # The output rule's check: softmax rows sum to 1 and their argmax is what the runs scored.
    rule = sections["## 5. The output activation rule"]
    assert "100.00% of rows" in rule
    scored = [
        re.split(r"\s{2,}", line)[1]
        for line in rule.splitlines()
        if line.startswith(("accuracy from", "test/acc logged"))
    ]
    assert len(scored) == 2 and scored[0] == scored[1] and INTERVAL.fullmatch(scored[0])
    assert float(rule.split("max |sum of a row - 1|")[1].split()[0]) < 1e-5
    # One-hot and index targets give the same loss on the same logits; a deep identity net is one matrix.
    assert "differ by at most" in sections["## 4. Q2: one-hot labels vs class indices"]
    assert "multiplies out to one 784 x 10 matrix" in sections["## 6. Without an activation, depth adds nothing"]


def load_study(monkeypatch):
    """scripts/study.py as a module (a script, not a package)."""
    spec = importlib.util.spec_from_file_location("study", STUDY)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "study", module)  # where its dataclasses look their annotations up
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_a_diverged_run_is_a_result_only_where_its_arm_may_diverge(mnist_root, tmp_path, monkeypatch):
    monkeypatch.setenv("FCEXP_DATA", mnist_root)
    study_module = load_study(monkeypatch)
    study = study_module.Study(tmp_path, ["model.hidden=[16]", "model.batch_norm=false", "model.l2=0"], [0, 1])
    # Raw bytes at an absurd learning rate: seed 1 diverges at its third step (seed 0's units all die first).
    blown = [
        "data.limit_train=1280",
        "trainer.max_epochs=1",
        "data.normalize=none",
        "optimizer=sgd",
        "optimizer.lr=1e12",
    ]
    allowed = study.arm("allowed", blown, may_diverge=True)
    study.arm("refused", [*blown, "optimizer.momentum=0.5"])
    study.train()
    # The two arms train alike, seed for seed. Where the arm allows it, a run that diverged is one of its runs,
    # saying where it diverged; elsewhere it is a failure.
    diverged = [seed for seed, run in allowed.items() if run.diverged]
    assert sorted(allowed) == [0, 1] and diverged
    assert all(allowed[seed].diverged.startswith("loss is nan at step") for seed in diverged)
    assert sorted(study.failed) == [f"refused_seed{seed}" for seed in diverged]
