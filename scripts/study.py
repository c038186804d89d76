"""`python scripts/study.py [--quick] [--seeds N] [--out DIR]`: measure the seed's claims about activations and data
preparation, each over several seeds.

Trains every run it reports on first, in this process, with fcexp's own configs and diagnostics (fcexp.callbacks),
packed as a packed sweep trains its jobs (fcexp.train.train_pack): the runs that share a net shape and data settings
train as one vectorized model, each still exactly the run it would be alone. Then it writes DIR/report.md with PNG
figures beside it, from what each run wrote to its folder DIR/runs/<name>_seed<s> (metrics.json, TensorBoard events,
last.ckpt where the report tests a net again). Every configuration (an arm) trains once per seed, 0 to N-1 (`seed`
sets init, batch order and dropout): the report gives each number as its mean [95% interval] over seeds and each
comparison as a difference with its interval, test and verdict (fcexp.stats). Trained solo, one run after another,
the full study (3 seeds, 72 runs) took 7.5 minutes on 2 CPU cores; packed, about 6 (extrapolated from 1/8 and 1/4 of
its steps); --quick (2 seeds, a few steps per run, for the tests) about half a minute.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import shlex
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from functools import cached_property
from pathlib import Path

import matplotlib
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from fcexp.data import MNISTDataModule
from fcexp.module import Classifier, class_indices
from fcexp.pack import member_bytes, pack_key, pack_sizes
from fcexp.record import CHECKPOINTS, cpu_model, shell_program
from fcexp.stats import Interval, difference, holm, interval
from fcexp.train import Job, compose_config, quiet_lightning, train_pack
from hydra_plugins.fcexp_packed.packed_launcher import free_memory

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # after choosing the backend

DEPTHS = (2, 5, 10)
ACTS = ("sigmoid", "tanh", "relu", "leaky_relu")
NORMALIZATIONS = ("none", "scale", "standardize")
VANISHED = 0.01  # "lost its gradient": first layer's norm below 1% of the output layer's

# Steps per run: (training images, epochs). Batches are 128 images, so 12,800 images are 100 steps an epoch.
# The single-seed study ran 800 / 1,173 / 1,173 steps and took 7.9 minutes on this shared machine: three seeds of it
# would not fit in 20. Halving the steps keeps every arm (each carries a claim); three seeds then took 7.5 minutes
# (trained solo) with the other core idle, leaving room for a busy one.
SETTINGS = {
    "full": {"depth": (25_600, 2), "dying": (25_600, 3), "data": (50_000, 2), "width": 256, "overrides": []},
    # Quick runs validate on 2,000 images instead of 10,000 (there, validation would cost more than training) and
    # shrink the seed's 512-512 net to 64-64: they check the pipeline, not the claims.
    "quick": {
        "depth": (1_280, 1),
        "dying": (1_280, 1),
        "data": (1_280, 1),
        "width": 64,
        "overrides": ["+trainer.limit_val_batches=1", "model.hidden=[64,64]"],
    },
}
# Which arm's step count the report header quotes for each kind of run.
PARTS = {"depth runs": "depth2_sigmoid", "dying ReLU": "dying_relu_lr0.001", "sections 3-4": "normalize_scale"}
# Every run of the study: no progress display or model summary.
QUIET = ["callbacks.progress.refresh_rate=0", "trainer.enable_model_summary=false"]
# Most runs keep only the diagnostics the report reads. The arms whose nets sections 4-5 test again also keep
# last.ckpt (the net as training left it, not the best epoch's), and the seed's own arm (section 3's `scale`) every
# diagnostic, for the figures the report shows: drawn for the other arms too, they would cost more than the pack
# they would share with it saves.
LEAN = ["~callbacks.checkpoint", "~callbacks.histograms", "~callbacks.figures"]
TESTED = ["callbacks.checkpoint.best=null", "~callbacks.histograms", "~callbacks.figures"]
SEED_RUN = ["callbacks.checkpoint.best=null"]
# Runs per pack at most, as a packed sweep's default (hydra.launcher.max_members); memory may allow fewer.
MAX_MEMBERS = 32


@dataclass(eq=False)
class Run:
    """One trained run, read back from its folder: the scalars it logged to TensorBoard, its test metrics and steps
    from metrics.json, and its net from last.ckpt where it kept one."""

    name: str
    run_dir: Path
    cfg: DictConfig
    datamodule: MNISTDataModule  # shared by the runs with the same data settings; set up when first read
    series: dict[str, list[tuple[int, float]]]
    test: dict[str, float]
    seconds: float  # its share of its pack's wall time
    steps: int

    @classmethod
    def read(cls, job: Job, record: dict, datamodule: MNISTDataModule) -> Run:
        """The run `job` trained, from its metrics.json content (`record`) and its TensorBoard events."""
        events = EventAccumulator(str(job.run_dir), size_guidance={"scalars": 0}).Reload()
        series = {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}
        test = {k: v for k, v in record["metrics"].items() if k.startswith("test/")}
        steps = record["history"][-1]["step"]
        return cls(job.run_dir.name, job.run_dir, job.cfg, datamodule, series, test, record["wall_time_s"], steps)

    @cached_property
    def model(self) -> Classifier:
        """The net as training left it: the run's last.ckpt, which a pack's member writes as a solo run would."""
        return Classifier.load_from_checkpoint(self.run_dir / CHECKPOINTS / "last.ckpt", map_location="cpu")

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


Arm = dict[int, Run]  # one configuration's runs, by seed
Report = Callable[[], list[str]]  # a section's text, written once the study's runs have trained


@dataclass
class Study:
    out: Path
    overrides: list[str]  # added to every run's
    seeds: list[int]
    arms: dict[str, Arm] = field(default_factory=dict)
    jobs: list[tuple[str, Job]] = field(default_factory=list)  # every run to train, with its arm
    packs: list[int] = field(default_factory=list)  # the runs of each pack it trained
    failed: dict[str, BaseException] = field(default_factory=dict)  # by run name
    datamodules: dict[str, MNISTDataModule] = field(default_factory=dict)  # by data settings but the seed

    def arm(self, name: str, overrides: list[str], callbacks: list[str] = LEAN) -> Arm:
        """One configuration, to train once per seed: composed once, so its runs differ in the seed alone. Its runs
        by seed, once the study has trained them (`train`)."""
        args = [*QUIET, *callbacks, *self.overrides, *overrides]
        cfg = compose_config(*args)
        for seed in self.seeds:
            run_dir = self.out / "runs" / f"{name}_seed{seed}"
            # data.seed is ${seed}: init, batch order and dropout all follow it
            self.jobs.append((name, Job(OmegaConf.merge(cfg, {"seed": seed}), run_dir, [*args, f"seed={seed}"])))
        return self.arms.setdefault(name, {})

    def train(self) -> None:
        """Train every run the sections planned, in as few packs as fcexp.pack allows (as a packed sweep does,
        fcexp.train.train_packs): runs that share a net shape and data settings, at most MAX_MEMBERS and half the
        free memory a pack. Each run that trained joins its arm; each that failed is kept in `failed`."""
        groups: dict[str, list[tuple[str, Job]]] = defaultdict(list)
        for name, job in self.jobs:
            key = pack_key(job.cfg)
            if job.cfg.activation.name == "prelu":
                key += str(job.run_dir)  # learned activations train alone
            groups[key].append((name, job))
        budget = free_memory() / 2
        packs = []
        for group in groups.values():
            limit = min(MAX_MEMBERS, max(1, int(budget // member_bytes(group[0][1].cfg))))
            start = 0
            for size in pack_sizes(len(group), limit):
                packs.append(group[start : start + size])
                start += size
        self.packs = [len(pack) for pack in packs]
        for k, pack in enumerate(packs, start=1):
            started = time.perf_counter()
            results = train_pack([job for _, job in pack])
            print(f"pack {k}/{len(packs)}: {len(pack)} runs, {time.perf_counter() - started:.1f} s", flush=True)
            for (name, job), result in zip(pack, results, strict=True):
                if isinstance(result, BaseException):
                    self.failed[job.run_dir.name] = result
                    print(f"  {job.run_dir.name}: failed: {result}", flush=True)
                    continue
                run = Run.read(job, result, self.datamodule(job.cfg))
                self.arms[name][job.cfg.seed] = run
                print(
                    f"  {run.name}: test acc {run.test['test/acc']:.4f}, {run.steps} steps, {run.seconds:.1f} s "
                    "(its share)",
                    flush=True,
                )

    def datamodule(self, cfg: DictConfig) -> MNISTDataModule:
        """The test data of a run's data settings: one DataModule for all the runs that share them (the seed orders
        only the training batches)."""
        key = repr(sorted((k, v) for k, v in cfg.data.items() if k != "seed"))
        if key not in self.datamodules:
            self.datamodules[key] = instantiate(cfg.data)
        return self.datamodules[key]

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


# ---- numbers over seeds: every one a mean with its 95% interval, every comparison a test (fcexp.stats) -----------


def per_seed(arm: Arm, value: Callable[[Run], float]) -> dict[int, float]:
    return {seed: value(run) for seed, run in arm.items()}


def ci(values: dict[int, float]) -> str:
    """Mean [95% interval] over seeds."""
    return str(interval(list(values.values())))


def log_interval(values: dict[int, float]) -> Interval:
    """The interval of log10 of a ratio that spans decades (gradient norms): its mean is the geometric mean."""
    return interval([math.log10(v) for v in values.values()])


def fmt(x: float) -> str:
    return f"{x:.2g}" if x < 0.01 else f"{x:.3f}"


def ci_ratio(values: dict[int, float]) -> str:
    iv = log_interval(values)
    return f"{fmt(10**iv.mean)} [{fmt(10**iv.low)}, {fmt(10**iv.high)}]"


def signed(x: float, digits: int) -> str:
    # Differences far below the last shown digit (one-hot vs indices) keep their size instead of reading +0.0000.
    return f"{x:+.2g}" if 0 < abs(x) < 10**-digits else f"{x:+.{digits}f}"


@dataclass
class Claim:
    """Arm `other` against arm `base` on one measure; the difference is other - base."""

    measure: str
    values: dict[str, dict[int, float]]  # by arm, then by seed
    base: str
    other: str
    digits: int = 4


def judge(claims: list[Claim]) -> list[str]:
    """One line per comparison: difference, 95% interval, test, verdict. p values are Holm-adjusted over the
    section's comparisons, so the section as a whole calls a tie a difference at most 5% of the time."""
    diffs = holm([difference(c.values[c.base], c.values[c.other]) for c in claims])
    over = f", Holm-adjusted over {len(claims)} comparisons" if len(claims) > 1 else ""
    lines = []
    for c, d in zip(claims, diffs, strict=True):
        if d.significant:
            verdict = f"**significant**: {c.other} is {'higher' if d.delta > 0 else 'lower'} than {c.base}"
        else:
            verdict = f"not significant: the data cannot tell {c.other} from {c.base} apart"
        interval_ = f"[{signed(d.low, c.digits)}, {signed(d.high, c.digits)}]"
        lines.append(
            f"- {c.measure}, {c.other} - {c.base}: {signed(d.delta, c.digits)} {interval_} ({d.test} t test over "
            f"{len(c.values[c.other])} seeds, p = {d.p_holm:.2g}{over}): {verdict}."
        )
    return lines


def test_acc(run: Run) -> float:
    return run.test["test/acc"]


# ---- 1. vanishing gradients -------------------------------------------------------------------------------------


def vanishing(study: Study, s: dict) -> Report:
    common = ["model.dropout=0", "model.l2=0", *steps_overrides(*s["depth"])]
    columns = [(act, False) for act in ACTS] + [("sigmoid", True)]
    arms: dict[tuple[str, bool, int], Arm] = {}
    for act, bn in columns:
        for depth in DEPTHS:
            hidden = "[" + ",".join([str(s["width"])] * depth) + "]"
            name = f"depth{depth}_{act}{'_bn' if bn else ''}"
            arms[act, bn, depth] = study.arm(
                name, [*common, f"activation={act}", f"model.hidden={hidden}", f"model.batch_norm={str(bn).lower()}"]
            )

    def label(act: str, bn: bool) -> str:
        return f"{act} + BN" if bn else act

    def ratio_start(run: Run) -> float:
        return run.series["grad_norm/first_over_last"][0][1]

    def ratio_end(run: Run) -> float:
        return run.series["grad_norm/first_over_last"][-1][1]

    def at_end(kind: str) -> Callable[[Run], float]:
        return lambda run: run.mean_over_layers(f"units/{kind}")[-1][1]

    def report() -> list[str]:
        first = study.seeds[0]
        fig, axes = plt.subplots(2, 3, figsize=(13, 7.5))
        for ax, (act, bn) in zip(axes.flat, columns, strict=False):
            for depth, color in zip(DEPTHS, ("C0", "C1", "C3"), strict=True):
                run = arms[act, bn, depth][first]
                layers = range(1, depth + 2)
                ax.semilogy(layers, run.grad_profile(0), "-o", color=color, ms=3, label=f"{depth} hidden, start")
                ax.semilogy(layers, run.grad_profile(-1), "--", color=color, label=f"{depth} hidden, end")
            ax.set(title=f"{label(act, bn)} (seed {first})", xlabel="Linear layer (1 = input side)")
            ax.set(ylabel="weight-gradient norm")
        axes.flat[0].legend(fontsize=7)
        summary = axes.flat[-1]
        for act, bn in columns:
            means = [10 ** log_interval(per_seed(arms[act, bn, d], ratio_start)).mean for d in DEPTHS]
            summary.semilogy(DEPTHS, means, "-o", label=label(act, bn))
        summary.axhline(VANISHED, color="grey", ls=":", label="1%")
        summary.set(title="first / last layer at start (geometric mean)", xlabel="hidden layers", xticks=DEPTHS)
        summary.legend(fontsize=7)
        image = study.figure(fig, "vanishing_gradients.png")

        table = [
            "| activation | hidden layers | first/last gradient at start | at end | saturated units (end) "
            "| sparsity (end) | test accuracy |",
            "| --- | --- | --- | --- | --- | --- | --- |",
        ]
        for act, bn in columns:
            for depth in DEPTHS:
                arm = arms[act, bn, depth]
                table.append(
                    f"| {label(act, bn)} | {depth} | {ci_ratio(per_seed(arm, ratio_start))} "
                    f"| {ci_ratio(per_seed(arm, ratio_end))} | {ci(per_seed(arm, at_end('saturated')))} "
                    f"| {ci(per_seed(arm, at_end('sparsity')))} | {ci(per_seed(arm, test_acc))} |"
                )

        def verdict(bn: bool) -> str:
            at_start = {d: per_seed(arms["sigmoid", bn, d], ratio_start) for d in DEPTHS}
            below = [d for d in DEPTHS if log_interval(at_start[d]).high < math.log10(VANISHED)]
            ratios = "; ".join(f"{ci_ratio(at_start[d])} at {d}" for d in DEPTHS)
            where = f"at **{', '.join(map(str, below))} hidden layers**" if below else "at no depth tried"
            return f"is below 1% of the output layer's, its whole 95% interval included, {where} (ratios {ratios})"

        def over_depths(kind: str, act: str) -> str:
            """Mean over depths and layers, per seed; then over seeds."""
            runs = [arms[act, False, d] for d in DEPTHS]
            return ci({seed: sum(at_end(kind)(arm[seed]) for arm in runs) / len(runs) for seed in study.seeds})

        deep = DEPTHS[-1]
        log_ratio = {
            label(a, bn): per_seed(arms[a, bn, deep], lambda r: math.log10(ratio_start(r))) for a, bn in columns
        }
        deep_acc = {label(a, bn): per_seed(arms[a, bn, deep], test_acc) for a, bn in columns}
        return [
            "## 1. Vanishing gradients",
            "",
            f"Width {s['width']}, no batch norm, no dropout, no L2, Adam at lr 1e-3, "
            f"{arms['sigmoid', False, deep][first].steps} steps each; the gradient norm of every Linear weight at the "
            "first step (start) and the last measured step (end). Ratios of gradient norms are geometric means with "
            "their 95% interval (computed on log10).",
            "",
            f"- At initialization, sigmoid's first-layer gradient {verdict(False)}.",
            f"- With batch norm on every hidden layer, sigmoid's first-layer gradient {verdict(True)}.",
            f"- Test accuracy at {deep} hidden layers: "
            + "; ".join(f"{arm} {ci(values)}" for arm, values in deep_acc.items())
            + ".",
            f"- Saturated units at the end (mean derivative below 0.01 on the held-out images; mean over depths and "
            f"layers): sigmoid {over_depths('saturated', 'sigmoid')}, tanh {over_depths('saturated', 'tanh')}. "
            f"Activation sparsity (outputs exactly 0): relu {over_depths('sparsity', 'relu')}, leaky_relu "
            f"{over_depths('sparsity', 'leaky_relu')}, tanh {over_depths('sparsity', 'tanh')}.",
            "",
            "Comparisons:",
            "",
            *judge(
                [
                    Claim(f"test accuracy, {deep} hidden layers", deep_acc, "sigmoid", "relu"),
                    Claim(
                        f"log10 of first/last gradient at start, {deep} hidden layers", log_ratio, "sigmoid", "relu", 2
                    ),
                    Claim(f"test accuracy, {deep} hidden layers", deep_acc, "sigmoid", "sigmoid + BN"),
                ]
            ),
            "",
            image,
            "",
            *table,
        ]

    return report


# ---- 2. dying ReLU ----------------------------------------------------------------------------------------------


def dying(study: Study, s: dict) -> Report:
    images, epochs = s["dying"]
    # Validation (and so the dead-unit count) four times an epoch gives the curve its shape.
    every = max(1, images // 128 // 4)
    common = ["model.batch_norm=false", f"+trainer.val_check_interval={every}", *steps_overrides(images, epochs)]
    lrs = {"normal": 1e-3, "too high": 3e-2}
    arms = {
        (act, lr): study.arm(f"dying_{act}_lr{lr:g}", [*common, f"activation={act}", f"optimizer.lr={lr}"])
        for act in ("relu", "leaky_relu")
        for lr in lrs.values()
    }

    def report() -> list[str]:
        first = study.seeds[0]
        fig, axes = plt.subplots(1, 2, figsize=(10, 3.6), sharey=True)
        for (act, lr), arm in arms.items():
            style = "-" if act == "relu" else "--"
            for ax, kind in zip(axes, ("dead", "inactive"), strict=True):
                steps, values = zip(*arm[first].mean_over_layers(f"units/{kind}"), strict=True)
                ax.plot(steps, values, style, marker="o", ms=3, label=f"{act}, lr {lr:g}")
        axes[0].set(title=f"dead: output 0 on every held-out image (seed {first})", xlabel="step")
        axes[0].set(ylabel="fraction of hidden units")
        axes[1].set(title="inactive: pre-activation <= 0 on every one", xlabel="step")
        axes[1].legend(fontsize=8)
        image = study.figure(fig, "dying_relu.png")

        def at_end(kind: str, layer: int | None = None) -> Callable[[Run], float]:
            """Fraction of units of one kind at the last count: in one layer, or the mean over layers."""
            if layer is None:
                return lambda run: run.mean_over_layers(f"units/{kind}")[-1][1]
            return lambda run: run.layer_series(f"units/{kind}")[layer][-1][1]

        layers = range(len(arms["relu", lrs["normal"]][first].layer_series("units/dead")))
        table = [
            "| activation | learning rate | dead units, layer 1 / 2 | inactive units, layer 1 / 2 | test accuracy |",
            "| --- | --- | --- | --- | --- |",
        ]
        for (act, lr), arm in arms.items():
            dead = " / ".join(ci(per_seed(arm, at_end("dead", i))) for i in layers)
            inactive = " / ".join(ci(per_seed(arm, at_end("inactive", i))) for i in layers)
            table.append(f"| {act} | {lr:g} | {dead} | {inactive} | {ci(per_seed(arm, test_acc))} |")

        high, normal = lrs["too high"], lrs["normal"]
        dead = {k: per_seed(arm, at_end("dead")) for k, arm in arms.items()}
        acc = {k: per_seed(arm, test_acc) for k, arm in arms.items()}
        acts = ("relu", "leaky_relu")
        return [
            "## 2. Dying ReLU",
            "",
            f"The seed's net (hidden {arms['relu', normal][first].cfg.model.hidden}, dropout 0.2) without batch "
            f"norm, {arms['relu', normal][first].steps} steps, Adam at a normal and a too-high learning rate. Units "
            "are counted on the first 1,000 validation images at every validation; fractions are means over the "
            "hidden layers.",
            "",
            f"- ReLU at lr {high:g} ends with a fraction {ci(dead['relu', high])} of its hidden units dead (at lr "
            f"{normal:g}: {ci(dead['relu', normal])}); test accuracy {ci(acc['relu', high])} against "
            f"{ci(acc['relu', normal])}.",
            f"- Leaky ReLU cannot die (its output is never exactly 0; dead fraction {ci(dead['leaky_relu', high])}): "
            f"at lr {high:g}, a fraction {ci(per_seed(arms['leaky_relu', high], at_end('inactive')))} of its units are "
            f"negative on every image yet still pass a 0.01 gradient; test accuracy {ci(acc['leaky_relu', high])}.",
            "",
            "Comparisons:",
            "",
            *judge(
                [
                    Claim(f"dead fraction at lr {high:g}", {a: dead[a, high] for a in acts}, "leaky_relu", "relu"),
                    Claim(
                        "relu's dead fraction",
                        {f"lr {lr:g}": dead["relu", lr] for lr in lrs.values()},
                        f"lr {normal:g}",
                        f"lr {high:g}",
                    ),
                    Claim(f"test accuracy at lr {high:g}", {a: acc[a, high] for a in acts}, "relu", "leaky_relu"),
                ]
            ),
            "",
            image,
            "",
            *table,
        ]

    return report


# ---- 3. Q1: input normalization ---------------------------------------------------------------------------------


def loss_curves(ax: plt.Axes, runs: dict[str, Run]) -> None:
    for label, run in runs.items():
        steps, losses = zip(*run.series["train/loss_step"], strict=True)
        ax.plot(steps, losses, label=label)
    ax.set(xlabel="step", ylabel="training loss (batch)", yscale="log")
    ax.legend(fontsize=8)


def normalization(study: Study, s: dict) -> Report:
    common = steps_overrides(*s["data"])
    arms = {
        how: study.arm(f"normalize_{how}", [*common, f"data.normalize={how}"], SEED_RUN if how == "scale" else LEAN)
        for how in NORMALIZATIONS
    }

    def report() -> list[str]:
        first = study.seeds[0]
        fig, ax = plt.subplots(figsize=(6, 3.8))
        loss_curves(ax, {f"normalize={h}": arm[first] for h, arm in arms.items()})
        ax.set_title(f"seed {first}")
        image = study.figure(fig, "normalization.png")
        table = ["| data.normalize | final training loss | test loss | test accuracy |", "| --- | --- | --- | --- |"]
        for how, arm in arms.items():
            train_loss = ci(per_seed(arm, lambda r: r.last("train/loss")))
            test_loss = ci(per_seed(arm, lambda r: r.test["test/loss"]))
            table.append(f"| {how} | {train_loss} | {test_loss} | {ci(per_seed(arm, test_acc))} |")
        acc = {how: per_seed(arm, test_acc) for how, arm in arms.items()}
        best = max(acc, key=lambda h: interval(list(acc[h].values())).mean)
        figures = f"runs/normalize_scale_seed{first}/figures"
        return [
            "## 3. Q1: input normalization",
            "",
            f"The seed's net and optimizer, {arms['scale'][first].steps} steps; pixels as bytes (none), /255 (scale, "
            f"the seed) or standardized. Highest mean test accuracy: **{best}** ({ci(acc[best])}); each other one "
            "against it:",
            "",
            *judge([Claim("test accuracy", acc, best, how) for how in NORMALIZATIONS if how != best]),
            "",
            image,
            "",
            *table,
            "",
            f"The seed run's own figures (seed {first}; TensorBoard's Images tab shows the same):",
            "",
            f"![training digits]({figures}/train_digits.png) ![confusion matrix]({figures}/confusion_matrix.png) "
            f"![confident mistakes]({figures}/confident_mistakes.png)",
        ]

    return report


# ---- 4. Q2: label encoding, 5. the output rule ------------------------------------------------------------------


@torch.no_grad()
def test_outputs(run: Run) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(logits, softmax probabilities from predict_step, class indices) over the test set, of the run's net as
    training left it (its last.ckpt)."""
    run.model.eval()
    run.datamodule.setup("test")  # the data once for all the runs that share it
    logits, probs, targets = [], [], []
    for i, (x, y) in enumerate(run.datamodule.test_dataloader()):
        logits.append(run.model(x))
        probs.append(run.model.predict_step((x, y), i))
        targets.append(class_indices(y))
    return torch.cat(logits), torch.cat(probs), torch.cat(targets)


def confidence(run: Run) -> dict[str, float]:
    """Test cross-entropy without smoothing, and the mean top softmax probability, overall and on mistakes."""
    logits, probs, targets = test_outputs(run)
    top, pred = probs.max(1)
    wrong = pred != targets
    return {
        "loss": F.cross_entropy(logits, targets).item(),
        "top": top.mean().item(),
        "top on mistakes": top[wrong].mean().item(),
    }


def encoding(study: Study, s: dict) -> Report:
    common = steps_overrides(*s["data"])
    onehot = study.arms["normalize_scale"]  # the seed's data settings: scale + one-hot
    index = study.arm("labels_index", [*common, "data.labels=index"], TESTED)
    smooth = study.arm("labels_onehot_smoothing0.1", [*common, "model.label_smoothing=0.1"], TESTED)
    arms = {"one-hot": onehot, "class indices": index, "one-hot + smoothing 0.1": smooth}

    def report() -> list[str]:
        same_logits_gap, curve_gap = 0.0, 0.0
        for seed in study.seeds:
            logits, _, targets = test_outputs(onehot[seed])
            by_onehot = F.cross_entropy(logits, F.one_hot(targets, 10).float(), reduction="none")
            by_index = F.cross_entropy(logits, targets, reduction="none")
            same_logits_gap = max(same_logits_gap, (by_onehot - by_index).abs().max().item())
            a, b = (dict(r[seed].series["train/loss_step"]) for r in (onehot, index))
            curve_gap = max(curve_gap, *(abs(a[k] - b[k]) for k in a))

        first = study.seeds[0]
        fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
        loss_curves(axes[0], {label: arm[first] for label, arm in arms.items()})
        a, b = (dict(arm[first].series["train/loss_step"]) for arm in (onehot, index))
        steps = sorted(a)
        axes[1].semilogy(steps, [max(abs(a[k] - b[k]), 1e-12) for k in steps], "o", ms=4)
        axes[1].set(xlabel="step", ylabel="|loss one-hot - loss indices| (floor 1e-12)")
        axes[1].set_title(f"one-hot vs class indices (seed {first})")
        image = study.figure(fig, "encoding.png")

        measured = {label: {seed: confidence(run) for seed, run in arm.items()} for label, arm in arms.items()}

        def measure(key: str) -> dict[str, dict[int, float]]:
            return {label: {seed: m[key] for seed, m in by_seed.items()} for label, by_seed in measured.items()}

        table = [
            "| targets | test accuracy | test cross-entropy (no smoothing) | mean top probability | ... on mistakes |",
            "| --- | --- | --- | --- | --- |",
        ]
        acc = {label: per_seed(arm, test_acc) for label, arm in arms.items()}
        loss, top, top_wrong = measure("loss"), measure("top"), measure("top on mistakes")
        for label in arms:
            table.append(
                f"| {label} | {ci(acc[label])} | {ci(loss[label])} | {ci(top[label])} | {ci(top_wrong[label])} |"
            )
        return [
            "## 4. Q2: one-hot labels vs class indices",
            "",
            f"Same net, seeds and data order, {onehot[first].steps} steps, targets one-hot (the seed) or as class "
            "indices.",
            "",
            f"- On the same logits (each one-hot run's, all 10,000 test images) the two losses differ by at most "
            f"{same_logits_gap:.2g} per example.",
            f"- Trained side by side, seed for seed, the logged training losses differ by at most {curve_gap:.2g}.",
            "- What one-hot (probability) targets make possible: label smoothing, i.e. targets of 0.91 / 0.01 instead "
            "of 1 / 0; the last comparison asks whether it changes how sure the net is.",
            "",
            "Comparisons:",
            "",
            *judge(
                [
                    Claim("test accuracy", acc, "one-hot", "class indices"),
                    Claim("test cross-entropy", loss, "one-hot", "class indices"),
                    Claim("mean top probability", top, "one-hot", "one-hot + smoothing 0.1"),
                ]
            ),
            "",
            image,
            "",
            *table,
        ]

    return report


def output_rule(study: Study, s: dict) -> Report:
    arm = study.arms["normalize_scale"]

    def report() -> list[str]:
        sum_gap, low, high, agrees, acc = 0.0, 1.0, 0.0, 1.0, {}
        for seed, run in arm.items():
            logits, probs, targets = test_outputs(run)
            sum_gap = max(sum_gap, (probs.sum(1) - 1).abs().max().item())
            low, high = min(low, probs.min().item()), max(high, probs.max().item())
            agrees = min(agrees, (probs.argmax(1) == logits.argmax(1)).float().mean().item())
            acc[seed] = (probs.argmax(1) == targets).float().mean().item()
        return [
            "## 5. The output activation rule",
            "",
            f"Softmax probabilities (`Classifier.predict_step`) of the seed's arm on all {len(probs):,} test images, "
            f"over its {len(arm)} seeds (extremes over all of them; accuracies as mean [95% interval]):",
            "",
            "```",
            f"max |sum of a row - 1|                 {sum_gap:.2e}",
            f"min / max probability                  {low:.2e} / {high:.6f}",
            f"argmax(probabilities) == argmax(logits) {agrees:.2%} of rows, every seed",
            f"accuracy from argmax(probabilities)    {ci(acc)}",
            f"test/acc logged by the runs            {ci(per_seed(arm, test_acc))}",
            "```",
        ]

    return report


# The report's sections, in order: each plans its arms and returns what writes its text once they trained.
SECTIONS: list[tuple[str, Callable[[Study, dict], Report]]] = [
    ("vanishing gradients", vanishing),
    ("dying ReLU", dying),
    ("Q1 normalization", normalization),
    ("Q2 encoding", encoding),
    ("output rule", output_rule),
]


def main(argv: list[str] | None = None) -> Path | None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a few steps per run: checks the pipeline, not the claims")
    parser.add_argument("--seeds", type=int, help="runs per arm, seeds 0 to N-1 (default 3; 2 with --quick)")
    parser.add_argument("--out", type=Path, help="report folder (default runs/study/<date_time>)")
    # One thread by default: on a shared machine two threads per small matmul wait on each other (measured 8x slower
    # per step under load here), and these nets are too small to gain much from a second core anyway.
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    args = parser.parse_args(argv)
    seeds = args.seeds or (2 if args.quick else 3)
    if seeds < 2:
        parser.error(f"--seeds must be at least 2, got {seeds}: an interval and a test need two runs per arm")
    out = args.out or Path("runs/study") / datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
    if (out / "runs").is_dir() and any((out / "runs").iterdir()):
        # A run trained again into its folder adds its events to the earlier run's: the report would read both.
        parser.error(f"{out / 'runs'} holds an earlier study's runs; give another --out, or remove them first")
    out.mkdir(parents=True, exist_ok=True)
    quiet_lightning()  # the warnings and hints a run filters (srun, deprecations), here too
    for name in ("lightning.pytorch", "lightning.fabric"):  # and each fit's device notices, 72 times over
        logging.getLogger(name).setLevel(logging.WARNING)
    s = SETTINGS["quick" if args.quick else "full"]
    torch.set_num_threads(args.threads)
    study = Study(out, s["overrides"], list(range(seeds)))

    started = time.perf_counter()
    # Every section names its arms first; all of them train together, then each section writes its part.
    reports = [(title, section(study, s)) for title, section in SECTIONS]
    study.train()
    trained = time.perf_counter() - started
    if study.failed:
        for name, err in study.failed.items():
            print(f"error: {name} failed: {err}; its folder: {out / 'runs' / name}", file=sys.stderr)
        print(f"error: no report: every arm carries a claim, and {len(study.failed)} runs failed", file=sys.stderr)
        return None
    sections, timings = [], []
    for title, report in reports:
        t = time.perf_counter()
        sections.append("\n".join(report()))
        timings.append(f"{title} {time.perf_counter() - t:.0f} s")
    total = time.perf_counter() - started

    # As the user's shell runs it: this environment's python and this script, from where the study ran.
    script = os.path.relpath(__file__)
    options = [*["--quick"] * args.quick, "--seeds", str(seeds), "--threads", str(args.threads), "--out", str(out)]
    command = shlex.join([shell_program("python"), script if not script.startswith("..") else __file__, *options])
    threads = torch.get_num_threads()
    cpu = f"{threads} CPU thread{'s' * (threads != 1)} of {cpu_model()} ({os.cpu_count()} cores)"
    tensorboard = shlex.join([shell_program("tensorboard"), "--logdir", str(out / "runs")])
    steps = {part: study.arms[name][study.seeds[0]].steps for part, name in PARTS.items()}
    runs = sum(len(arm) for arm in study.arms.values())
    header = [
        "# What the seed claims, measured" + (" (quick mode: too few steps to judge the claims)" if args.quick else ""),
        "",
        f"Regenerate: `{command}` ({datetime.now():%Y-%m-%d %H:%M}, {len(study.arms)} arms x {seeds} seeds = {runs} "
        f"runs in {total / 60:.1f} min on {cpu}: trained packed, {len(study.packs)} packs of "
        f"{', '.join(map(str, study.packs))} runs, in {trained:.0f} s; then the sections' figures and test passes, "
        f"{', '.join(timings)}). Every number below comes from these runs; each has its folder (`<arm>_seed<s>`) "
        f"with its metrics.json and TensorBoard events: `{tensorboard}`.",
        "",
        f"Each arm (a configuration) runs seeds {', '.join(map(str, study.seeds))}; the seed sets init, batch order "
        "and dropout. Runs that share a net shape and data settings trained as one pack, as `+launcher=packed` "
        "trains a sweep's jobs (fcexp.train.train_pack), each exactly as it would alone; a run's time is its share "
        "of its pack's. Numbers are the mean [95% t interval] over seeds. Comparisons give the difference with its 95% "
        "interval and a paired t test over seeds (the seed fixes the batch order both arms see), p values "
        "Holm-adjusted within a section; 'not significant' means these seeds cannot tell the two apart, not that "
        "they are equal. "
        f"Figures show seed {study.seeds[0]}'s runs. Steps per run: "
        + ", ".join(f"{n} ({part})" for part, n in steps.items())
        + ". The full study trains about half the steps of the single-seed study before it (800 for depth, 1,173 "
        "for the others), so that three seeds fit in 20 minutes on 2 CPU cores; no arm was dropped, as each carries "
        "a claim.",
    ]
    (out / "report.md").write_text("\n\n".join(["\n".join(header), *sections]) + "\n")
    print(f"TensorBoard, every run of the study: {tensorboard}")
    print(f"report: {out / 'report.md'} ({runs} runs in {total / 60:.1f} min on {cpu})")
    return out


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
