"""`python scripts/study.py [--quick] [--out DIR]`: measure the seed's claims about activations and data preparation.

Trains every run it reports on, in this process, with fcexp's own configs and diagnostics (fcexp.callbacks), and
writes DIR/report.md with PNG figures beside it; each run's TensorBoard events are under DIR/runs/<name>. Every
number in the report is read from these runs. The full study takes about 10 minutes on 2 CPU cores; --quick
(a few steps per run, for the tests) about 2.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import lightning as L
import matplotlib
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from lightning.fabric.loggers.logger import Logger
from lightning.pytorch.loggers import TensorBoardLogger
from omegaconf import OmegaConf

from fcexp.module import Classifier, class_indices
from fcexp.train import compose_config

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # after choosing the backend

DEPTHS = (2, 5, 10)
ACTS = ("sigmoid", "tanh", "relu", "leaky_relu")
NORMALIZATIONS = ("none", "scale", "standardize")
VANISHED = 0.01  # "lost its gradient": first layer's norm below 1% of the output layer's

# Steps per run: (training images, epochs). Batches are 128 images, so 12,800 images are 100 steps an epoch.
SETTINGS = {
    "full": {"depth": (25_600, 4), "dying": (50_000, 3), "data": (50_000, 3), "width": 256, "overrides": []},
    # Quick runs validate on 2,000 images instead of 10,000: there, validation would cost more than training.
    "quick": {
        "depth": (1_280, 2),
        "dying": (1_280, 2),
        "data": (2_560, 1),
        "width": 64,
        "overrides": ["+trainer.limit_val_batches=1"],
    },
}
# The study's runs keep only the diagnostics it reads; the seed run (section 3's `scale`) also draws its figures.
LEAN = ["~callbacks.checkpoint", "~callbacks.progress", "~callbacks.histograms", "~callbacks.figures"]
SEED_RUN = ["~callbacks.checkpoint", "~callbacks.progress"]


class Collect(Logger):
    """Keeps every logged scalar in memory, so the report reads the numbers the run itself logged."""

    def __init__(self):
        super().__init__()
        self.series: dict[str, list[tuple[int, float]]] = defaultdict(list)

    @property
    def name(self) -> str:
        return "collect"

    @property
    def version(self) -> int:
        return 0

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        for key, value in metrics.items():
            self.series[key].append((step or 0, float(value)))

    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        pass


@dataclass
class Run:
    name: str
    model: Classifier
    datamodule: L.LightningDataModule
    series: dict[str, list[tuple[int, float]]]
    test: dict[str, float]
    seconds: float
    steps: int

    def last(self, key: str) -> float:
        return self.series[key][-1][1]

    def layer_series(self, kind: str) -> list[list[tuple[int, float]]]:
        """One series per layer for tags `<kind>/layerNN`, in layer order."""
        tags = sorted(k for k in self.series if k.startswith(f"{kind}/layer"))
        return [self.series[t] for t in tags]

    def grad_profile(self, at: int) -> list[float]:
        """Per-layer gradient norms at the first (at=0) or last (at=-1) measurement."""
        return [s[at][1] for s in self.layer_series("grad_norm")]

    def mean_over_layers(self, kind: str) -> list[tuple[int, float]]:
        layers = self.layer_series(kind)
        return [(step, sum(s[k][1] for s in layers) / len(layers)) for k, (step, _) in enumerate(layers[0])]


@dataclass
class Study:
    out: Path
    overrides: list[str]  # added to every run's
    runs: dict[str, Run] = field(default_factory=dict)
    data_cache: dict[str, L.LightningDataModule] = field(default_factory=dict)

    def train(self, name: str, overrides: list[str], callbacks: list[str] = LEAN) -> Run:
        """One run of fcexp's Classifier on its composed config, with the TensorBoard logger and an in-memory one."""
        cfg = compose_config(*callbacks, *self.overrides, *overrides)
        L.seed_everything(cfg.seed, workers=True, verbose=False)
        key = OmegaConf.to_yaml(cfg.data)  # the same data settings share one set of tensors
        if key not in self.data_cache:
            self.data_cache[key] = instantiate(cfg.data)
        datamodule = self.data_cache[key]
        model = instantiate(cfg.model)
        collect = Collect()
        run_dir = self.out / "runs" / name
        loggers = [TensorBoardLogger(save_dir=run_dir, name="", version="", default_hp_metric=False), collect]
        trainer = instantiate(
            cfg.trainer,
            logger=loggers,
            callbacks=[instantiate(c) for c in cfg.callbacks.values()],
            default_root_dir=run_dir,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
        )
        started = time.perf_counter()
        trainer.fit(model, datamodule=datamodule)
        (test,) = trainer.test(model, datamodule=datamodule, verbose=False)
        seconds = time.perf_counter() - started
        run = Run(name, model, datamodule, collect.series, test, seconds, trainer.global_step)
        print(f"  {name}: test acc {test['test/acc']:.4f}, {run.steps} steps, {seconds:.1f} s", flush=True)
        self.runs[name] = run
        return run

    def figure(self, fig: plt.Figure, name: str) -> str:
        fig.tight_layout()
        fig.savefig(self.out / name, dpi=100)
        plt.close(fig)
        return f"![{name}]({name})"


def steps_overrides(images: int, epochs: int, points: int = 20) -> list[str]:
    """Training size and a logging interval that gives about `points` gradient measurements per run."""
    steps = images // 128 * epochs
    return [
        f"data.limit_train={images}",
        f"trainer.max_epochs={epochs}",
        f"trainer.log_every_n_steps={max(1, steps // points)}",
    ]


def fmt(x: float) -> str:
    return f"{x:.2g}" if x < 0.01 else f"{x:.3f}"


# ---- 1. vanishing gradients -------------------------------------------------------------------------------------


def vanishing(study: Study, s: dict) -> list[str]:
    common = ["model.dropout=0", "model.l2=0", *steps_overrides(*s["depth"])]
    columns = [(act, False) for act in ACTS] + [("sigmoid", True)]
    runs: dict[tuple[str, bool, int], Run] = {}
    for act, bn in columns:
        for depth in DEPTHS:
            hidden = "[" + ",".join([str(s["width"])] * depth) + "]"
            name = f"depth{depth}_{act}{'_bn' if bn else ''}"
            runs[act, bn, depth] = study.train(
                name, [*common, f"activation={act}", f"model.hidden={hidden}", f"model.batch_norm={str(bn).lower()}"]
            )

    def label(act: str, bn: bool) -> str:
        return f"{act} + BN" if bn else act

    fig, axes = plt.subplots(2, 3, figsize=(13, 7.5))
    for ax, (act, bn) in zip(axes.flat, columns, strict=False):
        for depth, color in zip(DEPTHS, ("C0", "C1", "C3"), strict=True):
            run = runs[act, bn, depth]
            layers = range(1, depth + 2)
            ax.semilogy(layers, run.grad_profile(0), "-o", color=color, ms=3, label=f"{depth} hidden, start")
            ax.semilogy(layers, run.grad_profile(-1), "--", color=color, label=f"{depth} hidden, end")
        ax.set(title=label(act, bn), xlabel="Linear layer (1 = input side)", ylabel="weight-gradient norm")
    axes.flat[0].legend(fontsize=7)
    summary = axes.flat[-1]
    for act, bn in columns:
        ratios = [runs[act, bn, d].series["grad_norm/first_over_last"][0][1] for d in DEPTHS]
        summary.semilogy(DEPTHS, ratios, "-o", label=label(act, bn))
    summary.axhline(VANISHED, color="grey", ls=":", label="1%")
    summary.set(title="first / last layer at start", xlabel="hidden layers", xticks=DEPTHS)
    summary.legend(fontsize=7)
    image = study.figure(fig, "vanishing_gradients.png")

    table = [
        "| activation | hidden layers | first/last gradient at start | at end | saturated units (end) "
        "| sparsity (end) | test accuracy |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for act, bn in columns:
        for depth in DEPTHS:
            run = runs[act, bn, depth]
            ratio = run.series["grad_norm/first_over_last"]
            table.append(
                f"| {label(act, bn)} | {depth} | {fmt(ratio[0][1])} | {fmt(ratio[-1][1])} "
                f"| {run.mean_over_layers('units/saturated')[-1][1]:.3f} "
                f"| {run.mean_over_layers('units/sparsity')[-1][1]:.3f} "
                f"| {run.test['test/acc']:.4f} |"
            )

    def verdict(bn: bool) -> str:
        at_start = {d: runs["sigmoid", bn, d].series["grad_norm/first_over_last"][0][1] for d in DEPTHS}
        below = [d for d in DEPTHS if at_start[d] < VANISHED]
        ratios = ", ".join(f"{fmt(at_start[d])} at {d}" for d in DEPTHS)
        if below:
            return f"falls below 1% of the output layer's from **{below[0]} hidden layers** on (ratios {ratios})"
        return f"stays above 1% of the output layer's at every depth tried (ratios {ratios})"

    steps = runs["sigmoid", False, DEPTHS[0]].steps

    def mean_end(kind: str, act: str) -> float:
        return sum(runs[act, False, d].mean_over_layers(f"units/{kind}")[-1][1] for d in DEPTHS) / len(DEPTHS)

    def acc(act: str) -> str:
        return ", ".join(f"{runs[act, False, d].test['test/acc']:.4f}" for d in DEPTHS)

    return [
        "## 1. Vanishing gradients",
        "",
        f"Width {s['width']}, no batch norm, no dropout, no L2, Adam at lr 1e-3, {steps} steps each; the gradient "
        "norm of every Linear weight at the first step (start) and the last measured step (end).",
        "",
        f"- At initialization, sigmoid's first-layer gradient {verdict(False)}.",
        f"- With batch norm on every hidden layer, sigmoid's first-layer gradient {verdict(True)}.",
        f"- After the same steps, test accuracy at {', '.join(map(str, DEPTHS))} hidden layers: "
        f"sigmoid {acc('sigmoid')}; tanh {acc('tanh')}; relu {acc('relu')}; leaky_relu {acc('leaky_relu')}.",
        f"- Saturated units at the end (mean derivative below 0.01 on the held-out images; mean over depths and "
        f"layers): sigmoid {mean_end('saturated', 'sigmoid'):.1%}, tanh {mean_end('saturated', 'tanh'):.1%}. "
        f"Activation sparsity (outputs exactly 0): relu {mean_end('sparsity', 'relu'):.1%}, leaky_relu "
        f"{mean_end('sparsity', 'leaky_relu'):.1%}, tanh {mean_end('sparsity', 'tanh'):.1%}.",
        "",
        image,
        "",
        *table,
    ]


# ---- 2. dying ReLU ----------------------------------------------------------------------------------------------


def dying(study: Study, s: dict) -> list[str]:
    images, epochs = s["dying"]
    # Validation (and so the dead-unit count) four times an epoch gives the curve its shape.
    every = max(1, images // 128 // 4)
    common = ["model.batch_norm=false", f"+trainer.val_check_interval={every}", *steps_overrides(images, epochs)]
    lrs = {"normal": 1e-3, "too high": 3e-2}
    runs = {
        (act, lr): study.train(f"dying_{act}_lr{lr:g}", [*common, f"activation={act}", f"optimizer.lr={lr}"])
        for act in ("relu", "leaky_relu")
        for lr in lrs.values()
    }
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6), sharey=True)
    for (act, lr), run in runs.items():
        style = "-" if act == "relu" else "--"
        for ax, kind in zip(axes, ("dead", "inactive"), strict=True):
            steps, values = zip(*run.mean_over_layers(f"units/{kind}"), strict=True)
            ax.plot(steps, values, style, marker="o", ms=3, label=f"{act}, lr {lr:g}")
    axes[0].set(title="dead: output 0 on every held-out image", xlabel="step", ylabel="fraction of hidden units")
    axes[1].set(title="inactive: pre-activation <= 0 on every one", xlabel="step")
    axes[1].legend(fontsize=8)
    image = study.figure(fig, "dying_relu.png")
    table = [
        "| activation | learning rate | dead units, layer 1 / 2 | inactive units, layer 1 / 2 | test accuracy |",
        "| --- | --- | --- | --- | --- |",
    ]
    for (act, lr), run in runs.items():
        dead = " / ".join(f"{s[-1][1]:.3f}" for s in run.layer_series("units/dead"))
        inactive = " / ".join(f"{s[-1][1]:.3f}" for s in run.layer_series("units/inactive"))
        table.append(f"| {act} | {lr:g} | {dead} | {inactive} | {run.test['test/acc']:.4f} |")

    def dead(act: str, lr: float) -> float:
        return runs[act, lr].mean_over_layers("units/dead")[-1][1]

    def inactive(act: str, lr: float) -> float:
        return runs[act, lr].mean_over_layers("units/inactive")[-1][1]

    high, normal = lrs["too high"], lrs["normal"]
    acc = {k: r.test["test/acc"] for k, r in runs.items()}
    return [
        "## 2. Dying ReLU",
        "",
        f"The seed's net (512-512, dropout 0.2) without batch norm, {runs['relu', normal].steps} steps, Adam at a "
        "normal and a too-high learning rate. Units are counted on the first 1,000 validation images at every "
        "validation.",
        "",
        f"- ReLU at lr {high:g} ends with {dead('relu', high):.1%} of its hidden units dead (at lr {normal:g}: "
        f"{dead('relu', normal):.1%}); test accuracy {acc['relu', high]:.4f} against {acc['relu', normal]:.4f}.",
        f"- Leaky ReLU cannot die (its output is never exactly 0): at lr {high:g}, {inactive('leaky_relu', high):.1%} "
        f"of its units are negative on every image yet still pass a 0.01 gradient; test accuracy "
        f"{acc['leaky_relu', high]:.4f} (ReLU {acc['relu', high]:.4f}).",
        "",
        image,
        "",
        *table,
    ]


# ---- 3. Q1: input normalization ---------------------------------------------------------------------------------


def loss_curves(ax: plt.Axes, runs: dict[str, Run]) -> None:
    for label, run in runs.items():
        steps, losses = zip(*run.series["train/loss_step"], strict=True)
        ax.plot(steps, losses, label=label)
    ax.set(xlabel="step", ylabel="training loss (batch)", yscale="log")
    ax.legend(fontsize=8)


def normalization(study: Study, s: dict) -> list[str]:
    common = steps_overrides(*s["data"])
    runs = {
        how: study.train(f"normalize_{how}", [*common, f"data.normalize={how}"], SEED_RUN if how == "scale" else LEAN)
        for how in NORMALIZATIONS
    }
    fig, ax = plt.subplots(figsize=(6, 3.8))
    loss_curves(ax, {f"normalize={h}": r for h, r in runs.items()})
    image = study.figure(fig, "normalization.png")
    table = ["| data.normalize | final training loss | test loss | test accuracy |", "| --- | --- | --- | --- |"]
    for how, run in runs.items():
        table.append(
            f"| {how} | {run.last('train/loss'):.4f} | {run.test['test/loss']:.4f} | {run.test['test/acc']:.4f} |"
        )
    best = max(runs, key=lambda h: runs[h].test["test/acc"])
    return [
        "## 3. Q1: input normalization",
        "",
        f"The seed's net and optimizer, {runs['scale'].steps} steps; pixels as bytes (none), /255 (scale, the seed) or "
        f"standardized. Best test accuracy: **{best}** ({runs[best].test['test/acc']:.4f}); raw bytes "
        f"{runs['none'].test['test/acc']:.4f}.",
        "",
        image,
        "",
        *table,
        "",
        "The seed run's own figures (TensorBoard's Images tab shows the same):",
        "",
        "![training digits](runs/normalize_scale/figures/train_digits.png) "
        "![confusion matrix](runs/normalize_scale/figures/confusion_matrix.png) "
        "![confident mistakes](runs/normalize_scale/figures/confident_mistakes.png)",
    ]


# ---- 4. Q2: label encoding, 5. the output rule ------------------------------------------------------------------


@torch.no_grad()
def test_outputs(run: Run) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(logits, softmax probabilities from predict_step, class indices) over the test set."""
    run.model.eval()
    logits, probs, targets = [], [], []
    for i, (x, y) in enumerate(run.datamodule.test_dataloader()):
        logits.append(run.model(x))
        probs.append(run.model.predict_step((x, y), i))
        targets.append(class_indices(y))
    return torch.cat(logits), torch.cat(probs), torch.cat(targets)


def encoding(study: Study, s: dict) -> list[str]:
    common = steps_overrides(*s["data"])
    onehot = study.runs["normalize_scale"]  # the seed's data settings: scale + one-hot
    index = study.train("labels_index", [*common, "data.labels=index"])
    smooth = study.train("labels_onehot_smoothing0.1", [*common, "model.label_smoothing=0.1"])
    runs = {"one-hot": onehot, "class indices": index, "one-hot, label smoothing 0.1": smooth}

    logits, _, targets = test_outputs(onehot)
    by_onehot = F.cross_entropy(logits, F.one_hot(targets, 10).float(), reduction="none")
    by_index = F.cross_entropy(logits, targets, reduction="none")
    same_logits_gap = (by_onehot - by_index).abs().max().item()
    a, b = (dict(r.series["train/loss_step"]) for r in (onehot, index))
    curve_gap = max(abs(a[k] - b[k]) for k in a)
    acc_gap = abs(onehot.test["test/acc"] - index.test["test/acc"])

    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    loss_curves(axes[0], runs)
    steps = sorted(a)
    axes[1].semilogy(steps, [max(abs(a[k] - b[k]), 1e-12) for k in steps], "o", ms=4)
    axes[1].set(xlabel="step", ylabel="|loss one-hot - loss indices| (floor 1e-12)", title="one-hot vs class indices")
    image = study.figure(fig, "encoding.png")

    table = [
        "| targets | test accuracy | test cross-entropy (no smoothing) | mean top probability | ... on mistakes |",
        "| --- | --- | --- | --- | --- |",
    ]
    for label, run in runs.items():
        logits, probs, targets = test_outputs(run)
        top, pred = probs.max(1)
        wrong = pred != targets
        table.append(
            f"| {label} | {run.test['test/acc']:.4f} | {F.cross_entropy(logits, targets).item():.4f} | "
            f"{top.mean().item():.4f} | {top[wrong].mean().item():.4f} |"
        )
    return [
        "## 4. Q2: one-hot labels vs class indices",
        "",
        f"Same net, seed and data order, {onehot.steps} steps, targets one-hot (the seed) or as class indices.",
        "",
        f"- On the same logits (the one-hot run's, all 10,000 test images) the two losses differ by at most "
        f"{same_logits_gap:.2g} per example.",
        f"- Trained side by side, the logged training losses differ by at most {curve_gap:.2g} over "
        f"{len(a)} measurements, and test accuracy by {acc_gap:.4f} ({onehot.test['test/acc']:.4f} vs "
        f"{index.test['test/acc']:.4f}): the encoding is a storage choice, not a modelling one.",
        "- What one-hot (probability) targets make possible: label smoothing, i.e. targets of 0.91 / 0.01 instead of "
        "1 / 0. It changes how sure the net is, which the table shows as the mean top softmax probability.",
        "",
        image,
        "",
        *table,
    ]


def output_rule(study: Study) -> list[str]:
    run = study.runs["normalize_scale"]
    logits, probs, targets = test_outputs(run)
    sums = probs.sum(1)
    agrees = (probs.argmax(1) == logits.argmax(1)).float().mean().item()
    acc = (probs.argmax(1) == targets).float().mean().item()
    return [
        "## 5. The output activation rule",
        "",
        f"Softmax probabilities (`Classifier.predict_step`) of the seed run on all {len(probs):,} test images:",
        "",
        "```",
        f"max |sum of a row - 1|                 {(sums - 1).abs().max().item():.2e}",
        f"min / max probability                  {probs.min().item():.2e} / {probs.max().item():.6f}",
        f"argmax(probabilities) == argmax(logits) {agrees:.2%} of rows",
        f"accuracy from argmax(probabilities)    {acc:.4f}",
        f"test/acc logged by the run             {run.test['test/acc']:.4f}",
        "```",
    ]


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a few steps per run: checks the pipeline, not the claims")
    parser.add_argument("--out", type=Path, help="report folder (default runs/study/<date_time>)")
    # One thread by default: on a shared machine two threads per small matmul wait on each other (measured 8x slower
    # per step under load here), and these nets are too small to gain much from a second core anyway.
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    args = parser.parse_args(argv)
    out = args.out or Path("runs/study") / datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
    out.mkdir(parents=True, exist_ok=True)
    for name in ("lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.WARNING)
    s = SETTINGS["quick" if args.quick else "full"]
    torch.set_num_threads(args.threads)
    study = Study(out, s["overrides"])

    started = time.perf_counter()
    sections, timings = [], []
    for title, make in (
        ("vanishing gradients", lambda: vanishing(study, s)),
        ("dying ReLU", lambda: dying(study, s)),
        ("Q1 normalization", lambda: normalization(study, s)),
        ("Q2 encoding", lambda: encoding(study, s)),
        ("output rule", lambda: output_rule(study)),
    ):
        print(f"{title}:", flush=True)
        t = time.perf_counter()
        sections.append("\n".join(make()))
        timings.append(f"{title} {time.perf_counter() - t:.0f} s")
    total = time.perf_counter() - started

    command = "python scripts/study.py" + (" --quick" if args.quick else "") + f" --threads {args.threads} --out {out}"
    header = [
        "# What the seed claims, measured" + (" (quick mode: too few steps to judge the claims)" if args.quick else ""),
        "",
        f"Regenerate: `{command}` ({datetime.now():%Y-%m-%d %H:%M}, {len(study.runs)} runs in {total / 60:.1f} min on "
        f"{torch.get_num_threads()} CPU threads: {', '.join(timings)}). Every number below comes from these runs; "
        f"their TensorBoard events: `tensorboard --logdir {out / 'runs'}`.",
    ]
    (out / "report.md").write_text("\n\n".join(["\n".join(header), *sections]) + "\n")
    print(f"report: {out / 'report.md'} ({total / 60:.1f} min)")
    return out


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
