"""`python scripts/study.py [--quick] [--seeds N] [--out DIR]`: measure the claims of the text fcexp grew from, about
activations, depth, data preparation and overfitting, each over several seeds.

Trains every run it reports on first, in this process, with fcexp's own configs and diagnostics (fcexp.callbacks),
packed as a packed sweep trains its jobs (fcexp.train.train_pack): the runs that share a net shape and data settings
train as one vectorized model, each still exactly the run it would be alone. Then it writes DIR/report.md with PNG
figures beside it, from what each run wrote to its folder DIR/runs/<name>_seed<s> (metrics.json, TensorBoard events,
last.ckpt where the report tests a net again), and from the timings it takes itself (what an activation costs). Every
configuration (an arm) trains once per seed, 0 to N-1 (`seed` sets init, batch order and dropout; the arms of the
comparisons whose verdict did not replicate across machines run 0 to N+1): the report gives each number as its mean
[95% interval] over seeds and each comparison as a difference with its interval, test and verdict (fcexp.stats), and
opens with a table of every claim, what measured it and the verdict. --quick (2 seeds, a few steps per run, for the
tests) checks the pipeline, not the claims.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import re
import shlex
import statistics
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

from fcexp import compare
from fcexp.data import TRAIN_IMAGES, MNISTDataModule
from fcexp.module import Classifier, class_indices
from fcexp.net import ACTIVATIONS, make_activation
from fcexp.pack import member_bytes, pack_key, pack_sizes
from fcexp.record import CHECKPOINTS, RunRecord, cpu_model, shell_program
from fcexp.stats import ALPHA, Difference, Interval, difference, holm, interval
from fcexp.train import Job, compose_config, quiet_lightning, train_pack
from hydra_plugins.fcexp_packed.packed_launcher import free_memory

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # after choosing the backend

DEPTHS = (2, 5, 10)
ACTS = ("sigmoid", "tanh", "relu", "leaky_relu")
NORMALIZATIONS = ("none", "scale", "standardize")
VANISHED = 0.01  # "lost its gradient": first layer's norm below 1% of the output layer's
THRESHOLD = 0.90  # the validation accuracy whose first crossing counts as "converged" (section 7)
CHANCE = 0.1  # the accuracy of a net that learned nothing (ten classes): what a diverged run counts as
# The two verdicts that flipped between an AMD EPYC and an Intel Xeon (leaky vs relu at lr 3e-2, normalization
# under Adam) sat at p = 0.05 with 3 seeds: their arms run this many seeds more.
MORE_SEEDS = 2
# Holm-adjusted p values in this range get a warning beside their verdict: a rerun may land on either side of 0.05.
NEAR = (0.01, 0.10)
FIT_IMAGES = 10_000  # train accuracy (sections 9-11) on at most this many training images

# Steps per run: (training images, epochs), or for the fit sections (training-set sizes, about how many steps each, at
# least an epoch). Batches are 128 images, so 12,800 images are 100 steps an epoch. The single-seed study ran 800 /
# 1,173 / 1,173 steps and took 7.9 minutes on this shared machine: three seeds of it would not fit in 20. Halving the
# steps kept every arm (each carries a claim). The sections added since (SGD, the fit and ranking runs) take an epoch
# or about 200 steps, so that all of them fit in 15 minutes on 2 cores.
SETTINGS = {
    "full": {
        "depth": (25_600, 2),
        "dying": (25_600, 3),
        "data": (50_000, 2),
        "sgd": (50_000, 1),
        "rank": (25_600, 1),
        "fit": ((500, 2_000, 10_000, 50_000), 200),
        "width": 256,
        "repeats": 12,  # timings per activation and shape (section 8)
        "overrides": [],
    },
    # Quick runs validate on 2,000 images instead of 10,000 (there, validation would cost more than training) and
    # shrink the seed's 512-512 net to 64-64: they check the pipeline, not the claims.
    "quick": {
        "depth": (1_280, 1),
        "dying": (1_280, 1),
        "data": (1_280, 1),
        "sgd": (1_280, 1),
        "rank": (1_280, 1),
        "fit": ((128, 256, 512, 1_280), 10),
        "width": 64,
        "repeats": 2,
        "overrides": ["+trainer.limit_val_batches=1", "model.hidden=[64,64]"],
    },
}
# Which arm's step count the report header quotes for each kind of run.
PARTS = {
    "depth runs, sections 1 and 6": "depth2_sigmoid",
    "sections 2 and 7": "dying_relu_lr0.001",
    "sections 3-5 under Adam": "normalize_scale",
    "section 3 under SGD": "normalize_sgd_scale",
    "section 11": "rank_relu",
}
# Every run of the study: no progress display or model summary.
QUIET = ["callbacks.progress.refresh_rate=0", "trainer.enable_model_summary=false"]
# Most runs keep only the diagnostics the report reads. The arms whose nets the report tests again also keep
# last.ckpt (the net as training left it, not the best epoch's), the fit sections' arms their accuracy on the training
# set, and the seed's own arm (section 3's `scale`) every diagnostic, for the figures the report shows: drawn for the
# other arms too, they would cost more than the pack they would share with it saves.
LEAN = ["~callbacks.checkpoint", "~callbacks.histograms", "~callbacks.figures", "~callbacks.train_accuracy"]
TESTED = ["callbacks.checkpoint.best=null", "~callbacks.histograms", "~callbacks.figures", "~callbacks.train_accuracy"]
FIT = [
    "~callbacks.checkpoint",
    "~callbacks.histograms",
    "~callbacks.figures",
    f"callbacks.train_accuracy.images={FIT_IMAGES}",
]
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
    datamodule: MNISTDataModule | None  # shared by the runs with the same data settings; None for a diverged run
    series: dict[str, list[tuple[int, float]]]
    test: dict[str, float]
    seconds: float  # its share of its pack's wall time
    steps: int
    diverged: str | None = None  # how its training diverged (its loss stopped being finite), if it did

    @classmethod
    def read(cls, job: Job, record: dict, datamodule: MNISTDataModule, diverged: str | None = None) -> Run:
        """The run `job` trained, from its metrics.json content (`record`) and its TensorBoard events."""
        events = EventAccumulator(str(job.run_dir), size_guidance={"scalars": 0}).Reload()
        series = {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}
        test = {k: v for k, v in record["metrics"].items() if k.startswith("test/")}
        steps = record["history"][-1]["step"] if record["history"] else 0
        seconds = record.get("wall_time_s") or 0.0
        return cls(job.run_dir.name, job.run_dir, job.cfg, datamodule, series, test, seconds, steps, diverged)

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


@dataclass
class Finding:
    """One row of the report's claims table: the claim in the text's words, what measured it, the result with its
    interval, and the verdict worded from the numbers."""

    claim: str
    measured: str
    result: str
    verdict: str


Written = tuple[list[str], list[Finding]]  # a section's text (after its heading) and its rows of the claims table
Report = Callable[[], Written]  # what writes a section, once the study's runs have trained


@dataclass
class Study:
    out: Path
    overrides: list[str]  # added to every run's
    seeds: list[int]
    arms: dict[str, Arm] = field(default_factory=dict)
    planned: dict[str, tuple[list[str], list[int]]] = field(default_factory=dict)  # each arm's overrides and seeds
    may_diverge: set[str] = field(default_factory=set)  # arms whose runs may diverge: that is a result, not a failure
    jobs: list[tuple[str, Job]] = field(default_factory=list)  # every run to train, with its arm
    packs: list[int] = field(default_factory=list)  # the runs of each pack it trained
    failed: dict[str, BaseException] = field(default_factory=dict)  # by run name
    datamodules: dict[str, MNISTDataModule] = field(default_factory=dict)  # by data settings but the seed

    @property
    def more_seeds(self) -> list[int]:
        """The seeds of the arms whose comparisons need more of them (MORE_SEEDS)."""
        return list(range(len(self.seeds) + MORE_SEEDS))

    def arm(
        self,
        name: str,
        overrides: list[str],
        callbacks: list[str] = LEAN,
        seeds: list[int] | None = None,
        may_diverge: bool = False,
    ) -> Arm:
        """One configuration, to train once per seed (the study's, or `seeds`): composed once, so its runs differ in
        the seed alone. Its runs by seed, once the study has trained them (`train`); with `may_diverge`, a run whose
        training diverged is one of them (Run.diverged). Sections that share an arm plan it each with the same
        settings; it trains once."""
        if may_diverge:
            self.may_diverge.add(name)
        args = [*QUIET, *callbacks, *self.overrides, *overrides]
        seeds = self.seeds if seeds is None else seeds
        if name in self.planned:
            if self.planned[name] != (args, seeds):
                raise ValueError(f"arm {name} planned twice with different settings")
            return self.arms[name]
        self.planned[name] = (args, seeds)
        cfg = compose_config(*args)
        for seed in seeds:
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
                if isinstance(result, FloatingPointError) and name in self.may_diverge:
                    how = str(result).split(":")[0]  # "loss is nan at step N (epoch E)"
                    self.arms[name][job.cfg.seed] = Run.read(job, RunRecord.load(job.run_dir), None, how)
                    print(f"  {job.run_dir.name}: diverged: {how}", flush=True)
                    continue
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


def ci(values: dict[int, float], digits: int = 4) -> str:
    """Mean [95% interval] over seeds (or repeats); the mean alone of one value, "-" for none."""
    if not values:
        return "-"
    iv = interval(list(values.values()))
    form = ".3g" if abs(iv.mean) >= 1e4 else f".{digits}f"  # a loss that blew up: its size, not its decimals
    if iv.low is None:
        return f"{iv.mean:{form}}"
    return f"{iv.mean:{form}} [{iv.low:{form}}, {iv.high:{form}}]"


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


def near(d: Difference) -> bool:
    """Whether a verdict sits so close to the threshold that other seeds or another machine may flip it."""
    return d.p_adj is not None and NEAR[0] <= d.p_adj <= NEAR[1]


@dataclass
class Claim:
    """Arm `other` against arm `base` on one measure; the difference is other - base. `judge` tests it."""

    measure: str
    values: dict[str, dict[int, float]]  # by arm, then by seed (or by repeat: `over`)
    base: str
    other: str
    digits: int = 4
    over: str = "seeds"
    diff: Difference | None = None  # set by judge

    def shown(self) -> str:
        """The difference with its 95% interval, as the comparisons and the claims table give it."""
        d, digits = self.diff, self.digits
        return (
            f"{self.other} - {self.base}: {signed(d.delta, digits)} [{signed(d.low, digits)}, {signed(d.high, digits)}]"
        )


def details(comparisons: list[str], image: str, header: list[str], rows: list[list[str]]) -> list[str]:
    """What follows a section's summary: its comparisons, its figure and its table of arms."""
    return ["Comparisons:", "", *comparisons, "", image, "", *table(header, rows)]


def judge(claims: list[Claim]) -> list[str]:
    """One line per comparison: difference, 95% interval, test, verdict; each claim keeps its `diff`. p values are
    Holm-adjusted over the section's comparisons, so the section as a whole calls a tie a difference at most 5% of
    the time."""
    diffs = holm([difference(c.values[c.base], c.values[c.other]) for c in claims])
    # The interval is each comparison's own: it may exclude 0 where the adjusted p says "cannot tell".
    over = f", Holm-adjusted over {len(claims)} comparisons; the interval is not" if len(claims) > 1 else ""
    lines = []
    for c, d in zip(claims, diffs, strict=True):
        c.diff = d
        if d.significant:
            verdict = f"**significant**: {c.other} is {'higher' if d.delta > 0 else 'lower'} than {c.base}"
        else:
            verdict = f"not significant: the data cannot tell {c.other} from {c.base} apart"
        if near(d):
            verdict += f"; p is near the {ALPHA:g} threshold: other seeds or another machine may flip this verdict"
        counts = sorted({len(c.values[c.other]), len(c.values[c.base])}, reverse=True)
        lines.append(
            f"- {c.measure}, {c.shown()} ({d.test} t test over {' and '.join(map(str, counts))} {c.over}, "
            f"p = {d.p_adj:.2g}{over}): {verdict}."
        )
    return lines


def supports(claims: list[Claim], sign: int, name: Callable[[Claim], str] = lambda c: c.other) -> str:
    """The claims table's verdict on a claim that the judged `claims` test, each expecting other - base to have the
    sign `sign` (+1 or -1): supported (every one agrees), partly, contradicted (one goes the other way) or not
    supported (none can tell); with the p values that sit near the threshold."""
    agree = [name(c) for c in claims if c.diff.significant and c.diff.delta * sign > 0]
    against = [name(c) for c in claims if c.diff.significant and c.diff.delta * sign < 0]
    if against:
        word = f"contradicted: {', '.join(against)} goes the other way"
    elif len(agree) == len(claims):
        word = "supported"
    elif agree:
        untold = [name(c) for c in claims if not c.diff.significant]
        word = f"partly: holds for {', '.join(agree)}, not shown for {', '.join(untold)}"
    elif len(claims) == 1:
        word = f"not supported: the data cannot tell {claims[0].other} from {claims[0].base} apart"
    else:
        word = "not supported: the data cannot tell any of them apart"
    return word + closeness(claims)


def closeness(claims: list[Claim]) -> str:
    """The p values of the judged `claims` that sit near the threshold, for a verdict's end; "" where none does."""
    close = [f"{c.diff.p_adj:.2g}" for c in claims if near(c.diff)]
    return f" (p = {', '.join(close)}: near the threshold)" if close else ""


def test_acc(run: Run) -> float:
    return run.test["test/acc"]


def test_loss(run: Run) -> float:
    return run.test["test/loss"]


def sparsity(run: Run) -> float:
    """Share of hidden outputs exactly 0 at the last count, mean over layers."""
    return run.mean_over_layers("units/sparsity")[-1][1]


def table(header: list[str], rows: list[list[str]]) -> list[str]:
    return [
        "| " + " | ".join(header) + " |",
        "|" + " --- |" * len(header),
        *("| " + " | ".join(r) + " |" for r in rows),
    ]


def errorbars(ax: plt.Axes, x: list, values: list[dict[int, float]], bars: bool = False, **style: object) -> None:
    """The mean of each of `values` (over seeds or repeats) at `x`, with its 95% interval: points, or bars."""
    means = [interval(list(v.values())) for v in values]
    yerr = [[m.mean - m.low for m in means], [m.high - m.mean for m in means]]
    if bars:
        ax.bar(x, [m.mean for m in means], yerr=yerr, capsize=2, **style)
    else:
        ax.errorbar(x, [m.mean for m in means], yerr=yerr, capsize=3, **style)


def registered() -> dict[str, list[str]]:
    """Every activation fcexp registers (fcexp.net.ACTIVATIONS), by its first name, with all the names it goes by
    (swish is silu): a new one appears in the gallery, the timings and the ranking by itself."""
    names: dict[type, list[str]] = {}
    for name, cls in ACTIVATIONS.items():
        names.setdefault(cls, []).append(name)
    return {group[0]: group for group in names.values()}


# ---- the activations, drawn from the registry ---------------------------------------------------------------------


def stretches(x: torch.Tensor, mask: torch.Tensor) -> str:
    """Where on the grid `x` the `mask` holds, as text ("x <= -4.6, x >= 4.6"); "nowhere" when it never does."""
    edges = torch.diff(mask.int(), prepend=torch.zeros(1, dtype=torch.int), append=torch.zeros(1, dtype=torch.int))
    parts = []
    for start, stop in zip((edges == 1).nonzero().flatten(), (edges == -1).nonzero().flatten() - 1, strict=True):
        low = f"{x[start]:.1f} <= " if start > 0 else ""
        high = f" <= {x[stop]:.1f}" if stop < len(x) - 1 else ""
        parts.append(f"{low}x{high}" if low or high else "everywhere")
    return ", ".join(parts) or "nowhere"


def gallery(study: Study, s: dict) -> Report:
    # The unit counts' own threshold (conf/callbacks/default.yaml): the gallery shades what they call saturated.
    saturation = compose_config().callbacks.unit_health.saturation

    def report() -> Written:
        acts = registered()
        x = torch.linspace(-6, 6, 1201, requires_grad=True)
        cols = 4
        fig, axes = plt.subplots(math.ceil(len(acts) / cols), cols, figsize=(13, 2.6 * math.ceil(len(acts) / cols)))
        rows = []
        for ax, (name, names) in zip(axes.flat, acts.items(), strict=False):
            y = make_activation(name)(x)
            (slope,) = torch.autograd.grad(y.sum(), x)
            xs, y, slope = x.detach(), y.detach(), slope.detach()
            flat = slope.abs() < saturation
            ax.fill_between(xs, 0, 1, where=flat, transform=ax.get_xaxis_transform(), color="0.88", lw=0)
            ax.plot(xs, y, label="f(x)")
            ax.plot(xs, slope, "--", label="f'(x)")
            ax.axhline(0, color="grey", lw=0.5)
            ax.set_title(" = ".join(names), fontsize=10)
            at_zero = len(xs) // 2
            rows.append(
                [
                    " = ".join(names),
                    f"{y.min():.3g} to {y.max():.3g}",
                    f"{y[at_zero]:.3g}",
                    f"{slope[at_zero]:.3g}",
                    f"{slope.max():.3g}",
                    stretches(xs, flat),
                ]
            )
        for ax in axes.flat[len(acts) :]:
            ax.axis("off")
        axes.flat[0].legend(fontsize=8)
        fig.suptitle(f"Every registered activation and its derivative (autograd); grey: |f'(x)| < {saturation:g}")
        image = study.figure(fig, "activations.png")
        lines = [
            f"Each activation fcexp registers (`fcexp.net.ACTIVATIONS`; a new one appears here by itself) on x in "
            f"[-6, 6], with its derivative from autograd. Grey marks where the derivative is within {saturation:g} of "
            "0, the unit counts' threshold (`callbacks.unit_health.saturation`): there a unit passes back almost no "
            "gradient, it is saturated. (The unit counts compare the mean derivative itself with the threshold, so a "
            "gelu, silu or mish unit held where its derivative is negative counts as saturated too.) prelu is drawn "
            "at its initial slope.",
            "",
            image,
            "",
            *table(
                ["activation", "f on [-6, 6]", "f(0)", "f'(0)", "max f'", f"|f'| < {saturation:g} (saturated)"], rows
            ),
        ]
        return lines, []

    return report


# ---- 1. vanishing gradients -------------------------------------------------------------------------------------


def depth_arm(study: Study, s: dict, act: str, depth: int, bn: bool = False, callbacks: list[str] = LEAN) -> Arm:
    """A net of `depth` hidden layers of the study's width, no dropout or L2, at the depth runs' steps."""
    hidden = "[" + ",".join([str(s["width"])] * depth) + "]"
    overrides = ["model.dropout=0", "model.l2=0", *steps_overrides(*s["depth"]), f"activation={act}"]
    overrides += [f"model.hidden={hidden}", f"model.batch_norm={str(bn).lower()}"]
    return study.arm(f"depth{depth}_{act}{'_bn' if bn else ''}", overrides, callbacks)


def ratio_start(run: Run) -> float:
    return run.series["grad_norm/first_over_last"][0][1]


def vanishing(study: Study, s: dict) -> Report:
    columns = [(act, False) for act in ACTS] + [("sigmoid", True)]
    arms = {(act, bn, depth): depth_arm(study, s, act, depth, bn) for act, bn in columns for depth in DEPTHS}

    def label(act: str, bn: bool) -> str:
        return f"{act} + BN" if bn else act

    def ratio_end(run: Run) -> float:
        return run.series["grad_norm/first_over_last"][-1][1]

    def at_end(kind: str) -> Callable[[Run], float]:
        return lambda run: run.mean_over_layers(f"units/{kind}")[-1][1]

    def report() -> Written:
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

        rows = []
        for act, bn in columns:
            for depth in DEPTHS:
                arm = arms[act, bn, depth]
                rows.append(
                    [
                        label(act, bn),
                        str(depth),
                        ci_ratio(per_seed(arm, ratio_start)),
                        ci_ratio(per_seed(arm, ratio_end)),
                    ]
                    + [ci(per_seed(arm, at_end(kind))) for kind in ("saturated", "sparsity")]
                    + [ci(per_seed(arm, test_acc))]
                )
        header = ["activation", "hidden layers", "first/last gradient at start", "at end", "saturated units (end)"]
        header += ["sparsity (end)", "test accuracy"]

        def below(bn: bool) -> list[int]:
            """The depths where sigmoid's first/last ratio at the start is below VANISHED, its whole interval too."""
            return [
                d
                for d in DEPTHS
                if log_interval(per_seed(arms["sigmoid", bn, d], ratio_start)).high < math.log10(VANISHED)
            ]

        def verdict(bn: bool) -> str:
            ratios = "; ".join(f"{ci_ratio(per_seed(arms['sigmoid', bn, d], ratio_start))} at {d}" for d in DEPTHS)
            where = f"at **{', '.join(map(str, below(bn)))} hidden layers**" if below(bn) else "at no depth tried"
            return f"is below 1% of the output layer's, its whole 95% interval included, {where} (ratios {ratios})"

        def over_depths(kind: str, act: str) -> dict[int, float]:
            """Mean over depths and layers, per seed."""
            runs = [arms[act, False, d] for d in DEPTHS]
            return {seed: sum(at_end(kind)(arm[seed]) for arm in runs) / len(runs) for seed in study.seeds}

        deep = DEPTHS[-1]
        log_ratio = {
            label(a, bn): per_seed(arms[a, bn, deep], lambda r: math.log10(ratio_start(r))) for a, bn in columns
        }
        deep_acc = {label(a, bn): per_seed(arms[a, bn, deep], test_acc) for a, bn in columns}
        claims = [
            Claim(f"test accuracy, {deep} hidden layers", deep_acc, "sigmoid", "relu"),
            Claim(f"log10 of first/last gradient at start, {deep} hidden layers", log_ratio, "sigmoid", "relu", 2),
            Claim(f"test accuracy, {deep} hidden layers", deep_acc, "sigmoid", "sigmoid + BN"),
        ]
        lines = [
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
            f"layers): sigmoid {ci(over_depths('saturated', 'sigmoid'))}, tanh {ci(over_depths('saturated', 'tanh'))}"
            f". Activation sparsity (outputs exactly 0): relu {ci(over_depths('sparsity', 'relu'))}, leaky_relu "
            f"{ci(over_depths('sparsity', 'leaky_relu'))}, tanh {ci(over_depths('sparsity', 'tanh'))}.",
            "",
            *details(judge(claims), image, header, rows),
        ]
        sigmoid_deep = per_seed(arms["sigmoid", False, deep], ratio_start)

        def vanishes(depths: list[int], against_relu: Claim) -> str:
            if not depths:
                return "not supported: at no depth tried is it below 1% of the output layer's"
            where = f"below 1% at {', '.join(map(str, depths))} hidden layers"
            if against_relu.diff.significant and against_relu.diff.delta > 0:
                return f"supported: {where}, and relu's is larger" + closeness([against_relu])
            return f"partly: {where}, but relu's cannot be told from it" + closeness([against_relu])

        relu_zeros = interval(list(over_depths("sparsity", "relu").values()))
        others_zeros = max(max(over_depths("sparsity", a).values()) for a in ACTS if a != "relu")
        findings = [
            Finding(
                "Sigmoid's gradient vanishes in deep nets",
                f"first-layer / output-layer gradient norm at the first step, {deep} hidden layers of sigmoid; relu's",
                f"{ci_ratio(sigmoid_deep)}; log10 {claims[1].shown()}",
                vanishes(below(False), claims[1]),
            ),
            Finding(
                "Deep sigmoid nets do not train; ReLU ones do",
                f"test accuracy, {deep} hidden layers",
                f"sigmoid {ci(deep_acc['sigmoid'])}, relu {ci(deep_acc['relu'])}",
                supports([claims[0]], +1),
            ),
            Finding(
                "Batch norm keeps a deep sigmoid net's gradient",
                f"test accuracy, {deep} hidden layers of sigmoid with batch norm",
                f"{ci(deep_acc['sigmoid + BN'])}; {claims[2].shown()}",
                supports([claims[2]], +1),
            ),
            Finding(
                "ReLU makes a net's activations sparse",
                "share of hidden outputs exactly 0 at the end, mean over depths and layers",
                f"relu {relu_zeros}; sigmoid, tanh, leaky_relu at most {others_zeros:.2g}",
                "supported" if relu_zeros.low > others_zeros else "not supported",
            ),
        ]
        return lines, findings

    return report


# ---- 2. dying ReLU ----------------------------------------------------------------------------------------------

LEARNING_RATES = {"normal": 1e-3, "too high": 3e-2}


def dying_arm(study: Study, s: dict, act: str, lr: float, seeds: list[int] | None = None) -> Arm:
    """The seed's net without batch norm at a learning rate, validated 20 times (every 30 steps in the full study) on
    2,000 validation images: dead-unit curves for section 2, convergence curves for section 7."""
    images, epochs = s["dying"]
    every = max(1, images // 128 * epochs // 20)
    overrides = ["model.batch_norm=false", f"+trainer.val_check_interval={every}", "++trainer.limit_val_batches=1"]
    overrides += [*steps_overrides(images, epochs), f"activation={act}", f"optimizer.lr={lr}"]
    return study.arm(f"dying_{act}_lr{lr:g}", overrides, seeds=seeds)


def dying(study: Study, s: dict) -> Report:
    high, normal = LEARNING_RATES["too high"], LEARNING_RATES["normal"]
    acts = ("relu", "leaky_relu")
    # At the too-high rate, leaky vs relu sat at p = 0.05: more seeds there.
    arms = {
        (act, lr): dying_arm(study, s, act, lr, study.more_seeds if lr == high else None)
        for act in acts
        for lr in LEARNING_RATES.values()
    }

    def report() -> Written:
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

        layers = range(len(arms["relu", normal][first].layer_series("units/dead")))
        rows = [
            [
                act,
                f"{lr:g}",
                str(len(arm)),
                " / ".join(ci(per_seed(arm, at_end("dead", i))) for i in layers),
                " / ".join(ci(per_seed(arm, at_end("inactive", i))) for i in layers),
                ci(per_seed(arm, test_acc)),
            ]
            for (act, lr), arm in arms.items()
        ]
        header = ["activation", "learning rate", "seeds", "dead units, layer 1 / 2", "inactive units, layer 1 / 2"]
        header.append("test accuracy")
        dead = {k: per_seed(arm, at_end("dead")) for k, arm in arms.items()}
        acc = {k: per_seed(arm, test_acc) for k, arm in arms.items()}
        claims = [
            Claim(f"dead fraction at lr {high:g}", {a: dead[a, high] for a in acts}, "leaky_relu", "relu"),
            Claim(
                "relu's dead fraction",
                {f"lr {lr:g}": dead["relu", lr] for lr in LEARNING_RATES.values()},
                f"lr {normal:g}",
                f"lr {high:g}",
            ),
            Claim(f"test accuracy at lr {high:g}", {a: acc[a, high] for a in acts}, "relu", "leaky_relu"),
        ]
        lines = [
            f"The seed's net (hidden {arms['relu', normal][first].cfg.model.hidden}, dropout 0.2) without batch "
            f"norm, {arms['relu', normal][first].steps} steps, Adam at a normal and a too-high learning rate. Units "
            "are counted on the first 1,000 validation images at every validation (every "
            f"{arms['relu', normal][first].cfg.trainer.val_check_interval} steps); fractions are means over the "
            f"hidden layers. The runs at lr {high:g} have {len(study.more_seeds)} seeds: with 3, leaky vs relu's "
            "accuracy sat at p = 0.05 and flipped between two machines.",
            "",
            f"- ReLU at lr {high:g} ends with a fraction {ci(dead['relu', high])} of its hidden units dead (at lr "
            f"{normal:g}: {ci(dead['relu', normal])}); test accuracy {ci(acc['relu', high])} against "
            f"{ci(acc['relu', normal])}.",
            f"- Leaky ReLU cannot die (its output is never exactly 0; dead fraction {ci(dead['leaky_relu', high])}): "
            f"at lr {high:g}, a fraction {ci(per_seed(arms['leaky_relu', high], at_end('inactive')))} of its units are "
            f"negative on every image yet still pass a 0.01 gradient; test accuracy {ci(acc['leaky_relu', high])}.",
            "",
            *details(judge(claims), image, header, rows),
        ]
        findings = [
            Finding(
                "A too-high learning rate kills ReLU units",
                f"share of hidden units dead at the end, relu at lr {high:g} against {normal:g}",
                f"{ci(dead['relu', high])} against {ci(dead['relu', normal])}",
                supports([claims[1]], +1),
            ),
            Finding(
                "Leaky ReLU keeps them alive",
                f"share dead at lr {high:g}, relu against leaky_relu",
                claims[0].shown(),
                supports([claims[0]], +1),
            ),
            Finding(
                "... and so trains better at that rate",
                f"test accuracy at lr {high:g} ({len(study.more_seeds)} seeds)",
                claims[2].shown(),
                supports([claims[2]], +1),
            ),
        ]
        return lines, findings

    return report


# ---- 3. Q1: input normalization ---------------------------------------------------------------------------------


def loss_curves(ax: plt.Axes, runs: dict[str, Run]) -> None:
    for label, run in runs.items():
        steps, losses = zip(*run.series["train/loss_step"], strict=True)
        ax.plot(steps, losses, label=label)
    ax.set(xlabel="step", ylabel="training loss (batch)", yscale="log")
    ax.legend(fontsize=8)


def normalization(study: Study, s: dict) -> Report:
    # (label, overrides, seeds): Adam on the seed's net, where the verdict sat at p = 0.05 and flipped between two
    # machines (more seeds); SGD on the same net, one epoch; SGD without its batch norm (the section's text says why).
    sgd = [*steps_overrides(*s["sgd"]), "optimizer=sgd"]
    optimizers = {
        "Adam": ("normalize_", steps_overrides(*s["data"]), study.more_seeds),
        "SGD": ("normalize_sgd_", sgd, None),
        "SGD, no batch norm": ("normalize_sgd_nobn_", [*sgd, "model.batch_norm=false"], None),
    }
    arms = {
        (opt, how): study.arm(
            f"{prefix}{how}",
            [*extra, f"data.normalize={how}"],
            SEED_RUN if (opt, how) == ("Adam", "scale") else LEAN,
            seeds,
            may_diverge=how == "none",  # raw bytes may blow a step up: what the claim is about, a result
        )
        for opt, (prefix, extra, seeds) in optimizers.items()
        for how in NORMALIZATIONS
    }

    def accuracy(run: Run) -> float:
        return CHANCE if run.diverged else test_acc(run)

    def report() -> Written:
        first = study.seeds[0]
        fig, axes = plt.subplots(1, len(optimizers), figsize=(15, 3.8), sharey=True)
        for ax, opt in zip(axes, optimizers, strict=True):
            loss_curves(ax, {f"normalize={how}": arms[opt, how][first] for how in NORMALIZATIONS})
            ax.set_title(f"{opt} (seed {first})")
        image = study.figure(fig, "normalization.png")
        rows = []
        for (opt, how), arm in arms.items():
            trained = {seed: run for seed, run in arm.items() if not run.diverged}
            losses = [ci(per_seed(trained, lambda r: r.last("train/loss"))), ci(per_seed(trained, test_loss))]
            rows.append([opt, how, str(len(arm)), str(len(arm) - len(trained)), *losses, ci(per_seed(arm, accuracy))])
        header = ["optimizer", "data.normalize", "seeds", "diverged", "final training loss", "test loss"]
        header.append("test accuracy")
        diverged = [f"{run.name} ({run.diverged})" for arm in arms.values() for run in arm.values() if run.diverged]
        acc = {key: per_seed(arm, accuracy) for key, arm in arms.items()}
        claims = {
            (opt, how): Claim(f"{opt}: test accuracy", {h: acc[opt, h] for h in NORMALIZATIONS}, "none", how)
            for opt in optimizers
            for how in NORMALIZATIONS
            if how != "none"
        }
        comparisons = judge(list(claims.values()))
        best = {opt: max(NORMALIZATIONS, key=lambda h: statistics.fmean(acc[opt, h].values())) for opt in optimizers}
        figures = f"runs/normalize_scale_seed{first}/figures"
        lines = [
            "The seed's net; pixels as bytes (none), /255 (scale, the seed) or standardized (mean 0, sd 1). Under "
            f"Adam (the seed's optimizer, {arms['Adam', 'scale'][first].steps} steps, {len(study.more_seeds)} seeds: "
            "with 3 its verdict sat at p = 0.05 and flipped between two machines), under SGD "
            f"(`conf/optimizer/sgd.yaml`: lr 0.01, momentum 0.9; {arms['SGD', 'scale'][first].steps} steps) on the "
            "same net, and under SGD without the net's batch norm. Why the last: the seed's net is all but blind to "
            "the pixels' scale, since a ReLU layer passes a scaled input on scaled by the same factor and the batch "
            "norm after the second layer divides it out (exactly so but for the first layer's biases); without it, "
            "the scale reaches the logits and the gradients.",
            "",
            (
                f"Runs whose loss stopped being finite (diverged): {', '.join(diverged)}. Each counts at chance "
                f"accuracy, {CHANCE:g}, in the accuracies and tests; the losses are the other runs'."
                if diverged
                else "No run diverged."
            ),
            "",
            "Highest mean test accuracy: "
            + "; ".join(f"{opt}: **{best[opt]}** ({ci(acc[opt, best[opt]])})" for opt in optimizers)
            + ". Each normalization against raw bytes:",
            "",
            *comparisons,
            "",
            image,
            "",
            *table(header, rows),
            "",
            f"The seed run's own figures (seed {first}; TensorBoard's Images tab shows the same):",
            "",
            f"![training digits]({figures}/train_digits.png) ![confusion matrix]({figures}/confusion_matrix.png) "
            f"![confident mistakes]({figures}/confident_mistakes.png)",
        ]
        findings = []
        for opt in optimizers:
            against_raw = [claims[opt, how] for how in NORMALIZATIONS if how != "none"]
            findings.append(
                Finding(
                    f"Normalizing the inputs helps gradient descent ({opt})",
                    "test accuracy against raw bytes",
                    "; ".join(c.shown() for c in against_raw),
                    supports(against_raw, +1),
                )
            )
        return lines, findings

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
    # As many seeds as the one-hot arm, so that both train in packs of one shape: a pack's shape sets its float
    # rounding, and runs in packs of 3 and of 6 drift apart from it within a few dozen steps.
    index = study.arm("labels_index", [*common, "data.labels=index"], TESTED, study.planned["normalize_scale"][1])
    smooth = study.arm("labels_onehot_smoothing0.1", [*common, "model.label_smoothing=0.1"], TESTED)

    def report() -> Written:
        smoothed = "one-hot + smoothing 0.1"
        arms = {"one-hot": onehot, "class indices": index, smoothed: smooth}
        same_logits_gap, curve_gap = 0.0, 0.0
        for seed in onehot:
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

        acc = {label: per_seed(arm, test_acc) for label, arm in arms.items()}
        loss, top, top_wrong = measure("loss"), measure("top"), measure("top on mistakes")
        rows = [[label, ci(acc[label]), ci(loss[label]), ci(top[label]), ci(top_wrong[label])] for label in arms]
        header = ["targets", "test accuracy", "test cross-entropy (no smoothing)", "mean top probability"]
        header.append("... on mistakes")
        claims = [
            Claim("test accuracy", acc, "one-hot", "class indices"),
            Claim("test cross-entropy", loss, "one-hot", "class indices"),
            Claim(
                "mean top probability",
                {"one-hot": {seed: top["one-hot"][seed] for seed in smooth}, smoothed: top[smoothed]},  # paired
                "one-hot",
                smoothed,
            ),
        ]
        lines = [
            f"Same net, seeds and data order, {onehot[first].steps} steps, targets one-hot (the seed) or as class "
            "indices.",
            "",
            f"- On the same logits (each one-hot run's, all 10,000 test images) the two losses differ by at most "
            f"{same_logits_gap:.2g} per example.",
            f"- Trained side by side, seed for seed, the logged training losses differ by at most {curve_gap:.2g}.",
            "- What one-hot (probability) targets make possible: label smoothing, i.e. targets of 0.91 / 0.01 instead "
            "of 1 / 0; the last comparison asks whether it changes how sure the net is.",
            "",
            *details(judge(claims), image, header, rows),
        ]
        same = same_logits_gap < 1e-5 and curve_gap < 1e-4
        findings = [
            Finding(
                "One-hot targets and class indices train the same net (Q2)",
                "cross-entropy of both on the same logits; training losses of runs side by side",
                f"differ by at most {same_logits_gap:.2g} per example and {curve_gap:.2g} per step; test accuracy "
                f"{claims[0].shown()}",
                "supported: the same loss to float rounding" if same else "not supported: the losses differ",
            ),
        ]
        return lines, findings

    return report


def output_rule(study: Study, s: dict) -> Report:
    arm = study.arms["normalize_scale"]

    def report() -> Written:
        sum_gap, low, high, agrees, acc = 0.0, 1.0, 0.0, 1.0, {}
        for seed, run in arm.items():
            logits, probs, targets = test_outputs(run)
            sum_gap = max(sum_gap, (probs.sum(1) - 1).abs().max().item())
            low, high = min(low, probs.min().item()), max(high, probs.max().item())
            agrees = min(agrees, (probs.argmax(1) == logits.argmax(1)).float().mean().item())
            acc[seed] = (probs.argmax(1) == targets).float().mean().item()
        lines = [
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
        findings = [
            Finding(
                "A softmax output gives class probabilities whose argmax is the prediction",
                f"rows of predict_step on the test set, {len(arm)} seeds",
                f"rows sum to 1 within {sum_gap:.1e}; argmax agrees with the logits' on {agrees:.2%} of rows",
                "supported" if sum_gap < 1e-5 and agrees == 1.0 else "not supported",
            )
        ]
        return lines, findings

    return report


# ---- 6. depth without an activation -----------------------------------------------------------------------------


@torch.no_grad()
def collapse_gap(run: Run) -> float:
    """How far an identity net's logits are from one matrix product: the largest |net(x) - (x W + b)| over the test
    set, relative to the largest logit, where W and b multiply out every layer of the run's trained net."""
    net = run.model.net
    weight, bias = net.weights[0][0], net.biases[0][0, 0]
    for w, b in zip(net.weights[1:], net.biases[1:], strict=True):
        weight, bias = weight @ w[0], bias @ w[0] + b[0, 0]
    logits, _, _ = test_outputs(run)
    x = torch.cat([x for x, _ in run.datamodule.test_dataloader()])
    return ((logits - (x @ weight + bias)).abs().max() / logits.abs().max()).item()


def linear_depth(study: Study, s: dict) -> Report:
    linear = depth_arm(study, s, "identity", 0)  # no hidden layer: a linear classifier
    identity = {d: depth_arm(study, s, "identity", d, callbacks=TESTED) for d in DEPTHS}
    relu = {d: depth_arm(study, s, "relu", d) for d in DEPTHS}

    def report() -> Written:
        acc = {"linear": per_seed(linear, test_acc)}
        acc |= {f"identity x{d}": per_seed(identity[d], test_acc) for d in DEPTHS}
        acc |= {f"relu x{d}": per_seed(relu[d], test_acc) for d in DEPTHS}
        gaps = {d: max(collapse_gap(run) for run in identity[d].values()) for d in DEPTHS}
        fig, ax = plt.subplots(figsize=(6, 3.8))
        for label, depths in (("identity", (0, *DEPTHS)), ("relu", DEPTHS)):
            keys = ["linear" if d == 0 else f"{label} x{d}" for d in depths]
            errorbars(ax, depths, [acc[k] for k in keys], fmt="-o", label=label)
        ax.set(xlabel="hidden layers (0: linear classifier)", ylabel="test accuracy (mean, 95% interval)")
        ax.set(xticks=(0, *DEPTHS), title="activation=identity against relu, same steps")
        ax.legend()
        image = study.figure(fig, "linear_depth.png")
        claims = [Claim("test accuracy", acc, "linear", f"identity x{d}") for d in DEPTHS]
        claims += [Claim("test accuracy", acc, f"identity x{d}", f"relu x{d}") for d in DEPTHS]
        comparisons = judge(claims)
        rows = [["0 (linear classifier)", ci(acc["linear"]), "-", "-"]]
        rows += [[str(d), ci(acc[f"identity x{d}"]), f"{gaps[d]:.1e}", ci(acc[f"relu x{d}"])] for d in DEPTHS]
        header = ["hidden layers", "identity: test accuracy", "identity: distance from one matrix", "relu: test acc"]
        lines = [
            f"The depth runs' nets (width {s['width']}, no batch norm, dropout or L2, "
            f"{linear[study.seeds[0]].steps} steps) with `activation=identity` at {', '.join(map(str, DEPTHS))} "
            "hidden layers, beside a linear classifier (`model.hidden=[]`: one Linear layer from pixels to logits) "
            "and relu at the same depths. Every identity net, trained, multiplies out to one 784 x 10 matrix and "
            "bias: its logits on the test set differ from that product by at most "
            + ", ".join(f"{gaps[d]:.1e} ({d} layers)" for d in DEPTHS)
            + " of the largest logit, float rounding: whatever its depth, it is a linear classifier.",
            "",
            *details(comparisons, image, header, rows),
        ]
        better = [c for c in claims[: len(DEPTHS)] if c.diff.significant and c.diff.delta > 0]
        worse = [c for c in claims[: len(DEPTHS)] if c.diff.significant and c.diff.delta < 0]
        if better:
            verdict = (
                f"not supported in accuracy: {', '.join(c.other for c in better)} beat the linear classifier in these "
                "steps, though each is one matrix: depth changed the optimization, not what the net can represent"
            )
        elif worse:
            verdict = (
                f"supported: no depth adds accuracy, and {', '.join(c.other for c in worse)} lose some in these steps"
            )
        else:
            verdict = "supported: no depth tried can be told from the linear classifier"
        deep = DEPTHS[-1]
        findings = [
            Finding(
                "Without an activation, depth adds nothing: the net stays linear",
                "test accuracy of identity nets against a linear classifier; their distance from one matrix product",
                f"{claims[len(DEPTHS) - 1].shown()}; one matrix to {max(gaps.values()):.1e}",
                verdict + closeness(claims[: len(DEPTHS)]),
            ),
            Finding(
                "... while a nonlinearity makes depth count",
                f"test accuracy, relu against identity at {deep} hidden layers",
                claims[-1].shown(),
                supports([claims[-1]], +1),
            ),
        ]
        return lines, findings

    return report


# ---- 7. tanh against sigmoid ------------------------------------------------------------------------------------


def steps_to(run: Run, threshold: float = THRESHOLD) -> tuple[int, bool]:
    """The steps a run had trained when its validation accuracy first reached `threshold`, and whether it did: one
    that never did counts as its total steps (censored: its true count is larger)."""
    for step, value in run.series["val/acc"]:
        if value >= threshold:
            return step + 1, True  # logged at the last step trained (fcexp.module.Classifier.end_epoch)
    return run.steps, False


def convergence(study: Study, s: dict) -> Report:
    lr = LEARNING_RATES["normal"]
    arms = {act: dying_arm(study, s, act, lr) for act in ACTS}

    def report() -> Written:
        reached = {act: {seed: steps_to(run) for seed, run in arm.items()} for act, arm in arms.items()}
        steps = {act: {seed: n for seed, (n, _) in by_seed.items()} for act, by_seed in reached.items()}
        censored = {act: sum(not ok for _, ok in by_seed.values()) for act, by_seed in reached.items()}
        final = {act: per_seed(arm, lambda r: r.last("val/acc")) for act, arm in arms.items()}
        acc = {act: per_seed(arm, test_acc) for act, arm in arms.items()}
        fig, ax = plt.subplots(figsize=(7, 4))
        for k, (act, arm) in enumerate(arms.items()):
            curves = [run.series["val/acc"] for run in arm.values()]
            x = [step + 1 for step, _ in curves[0]]
            mean = [statistics.fmean(c[i][1] for c in curves) for i in range(len(x))]
            ax.plot(x, mean, color=f"C{k}", label=f"{act} (mean of {len(curves)} seeds)")
            for c in curves:
                ax.plot(x, [v for _, v in c], color=f"C{k}", alpha=0.25, lw=0.8)
        ax.axhline(THRESHOLD, color="grey", ls=":", label=f"threshold {THRESHOLD:g}")
        ax.set(xlabel="step", ylabel="validation accuracy (2,000 images)", ylim=(0.5, 1.0))
        ax.set_title(f"Adam at lr {lr:g}, the seed's net without batch norm")
        ax.legend(fontsize=8)
        image = study.figure(fig, "convergence.png")
        total = arms["sigmoid"][study.seeds[0]].steps
        claims = [
            Claim(f"steps to validation accuracy {THRESHOLD:g}", steps, "sigmoid", "tanh", 0),
            Claim("test accuracy at the end", acc, "sigmoid", "tanh"),
        ]
        comparisons = judge(claims)

        def shown(act: str) -> str:
            return ci(steps[act], 0) if censored[act] == 0 else f"> {ci(steps[act], 0)} ({censored[act]} censored)"

        rows = [
            [act, shown(act), f"{len(steps[act]) - censored[act]} of {len(steps[act])}", ci(final[act]), ci(acc[act])]
            for act in arms
        ]
        header = ["activation", f"steps to {THRESHOLD:g}", "seeds that got there", "final val accuracy", "test acc"]
        missed = sum(censored.values())
        note = (
            "Every run got there."
            if missed == 0
            else f"{missed} of {sum(map(len, steps.values()))} runs never got there: each counts as its {total} steps, "
            "fewer than it would have needed (censored), which flatters its activation in the test."
        )
        every = arms["sigmoid"][study.seeds[0]].cfg.trainer.val_check_interval
        lines = [
            f"Section 2's nets at lr {lr:g}, {total} steps, validated every {every} steps on the first 2,000 "
            f"validation images; only the activation differs. A run has converged when its validation accuracy first "
            f"reaches {THRESHOLD:g}. {note}",
            "",
            *details(comparisons, image, header, rows),
        ]
        findings = [
            Finding(
                "tanh converges faster than sigmoid (it is zero-centred)",
                f"steps to {THRESHOLD:g} validation accuracy, same net and settings",
                f"tanh {shown('tanh')}, sigmoid {shown('sigmoid')}; {claims[0].shown()}",
                supports([claims[0]], -1),
            ),
        ]
        return lines, findings

    return report


# ---- 8. what an activation costs --------------------------------------------------------------------------------


def seconds(stmt: str, number: int, blocks: int = 3, **names: object) -> float:
    """Seconds of one run of `stmt` (torch.utils.benchmark, on this process's threads): the fastest of `blocks`
    blocks' means of `number` runs each. On a shared machine another job only ever adds time, so the fastest
    block is the one it interrupted least."""
    # Imported once it is needed, quieted: it imports cpp_extension, which says on a machine without CUDA that it
    # found none.
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    from torch.utils import benchmark

    timer = benchmark.Timer(stmt, globals=names, num_threads=torch.get_num_threads())
    return min(timer.timeit(number).mean for _ in range(blocks))


def cost(study: Study, s: dict) -> Report:
    shapes = {"one layer, 128 x 512": (128, 512), "a pack of 16, 16 x 128 x 512": (16, 128, 512)}
    step = "a training step"
    quick = s["repeats"] < 3

    def report() -> Written:
        names = list(registered())
        layers = {name: make_activation(name) for name in names}
        inputs = {shape: (torch.randn(shape, requires_grad=True), torch.randn(shape)) for shape in shapes.values()}
        cfg = compose_config(*s["overrides"])  # the seed's net (the study's own in quick mode)
        nets = {}
        for name in names:
            net = instantiate(cfg.model, activation={"name": name}, seed=0)
            nets[name] = (net, net.configure_optimizers())
        x, y = torch.rand(128, 784), F.one_hot(torch.randint(0, 10, (128,)), 10).float()
        times: dict[str, dict[str, dict[int, float]]] = defaultdict(lambda: defaultdict(dict))  # what, name, repeat
        # Round-robin: each repeat times every activation once, in turn, so that a busy spell on the machine falls on
        # all of them alike; repeat r of one is paired with repeat r of another in the tests.
        for r in range(s["repeats"]):
            for name in names:
                for what, shape in shapes.items():
                    h, grad = inputs[shape]
                    number = 2 if quick else 30 if len(shape) == 2 else 3
                    stmt = "h.grad = None; act(h).backward(grad)"
                    times[what][name][r] = 1e6 * seconds(stmt, number, h=h, grad=grad, act=layers[name])
                net, opt = nets[name]
                stmt = "opt.zero_grad(); net.losses(net.net(x), y).sum().backward(); net.add_l2_gradients(); opt.step()"
                times[step][name][r] = 1e3 * seconds(stmt, 1, 2 if quick else 3, net=net, opt=opt, x=x, y=y)
        # The activation's share of a step: its forward and backward at each hidden layer, timed alone, over the step.
        depth = len(cfg.model.hidden)
        layer = next(iter(shapes))
        share = {n: {r: depth * t / 1e3 / times[step][n][r] for r, t in times[layer][n].items()} for n in names}
        default = compose_config()
        per_epoch = math.ceil((TRAIN_IMAGES - default.data.val_size) / default.data.batch_size)
        run_steps = default.trainer.max_epochs * per_epoch
        units = {**dict.fromkeys(shapes, ("µs", 1)), step: ("ms", 3)}
        claims = {
            (what, other): Claim(f"{what} ({unit})", times[what], "relu", other, digits, "repeats")
            for what, (unit, digits) in units.items()
            for other in ("sigmoid", "tanh")
        }
        comparisons = judge(list(claims.values()))

        def per_run(other: str) -> str:
            """What `other` adds to a default run against relu, in seconds with its interval: the difference at one
            layer, at each hidden layer, at every step."""
            d, scale = claims[layer, other].diff, depth * run_steps / 1e6
            return f"{d.delta * scale:+.2f} s [{d.low * scale:+.2f}, {d.high * scale:+.2f}]"

        fig, axes = plt.subplots(1, len(units), figsize=(15, 4))
        for ax, (what, (unit, _)) in zip(axes, units.items(), strict=True):
            colors = ["C3" if n == "relu" else "C0" for n in names]
            errorbars(ax, names, [times[what][n] for n in names], bars=True, color=colors)
            ax.set(ylabel=unit, title=what if what == step else f"{what}: forward + backward")
            ax.tick_params(axis="x", rotation=60)
        image = study.figure(fig, "activation_cost.png")
        rows = [
            [name, *(ci(times[what][name], digits) for what, (_, digits) in units.items()), ci(share[name], 3)]
            for name in names
        ]
        header = ["activation", *(f"{what} ({unit})" for what, (unit, _) in units.items()), "share of the step"]
        relu_step = statistics.fmean(times[step]["relu"].values())
        lines = [
            f"Timed on {cpu_model()}, {torch.get_num_threads()} CPU thread{'s' * (torch.get_num_threads() != 1)}, "
            "with `torch.utils.benchmark` in this "
            f"process, {s['repeats']} repeats, each timing every activation once in turn (repeat r of each is paired "
            "in the tests; a timing is the fastest of 3 blocks, the one the machine's other jobs slowed least): the "
            "activation layer alone, forward and backward, at one hidden layer's shape and at a "
            "pack's, and a whole training step of the seed's net at batch 128 (forward, loss, backward, L2 gradient "
            "and fused Adam, without Lightning's bookkeeping). The activation's share of the step is its time alone at "
            f"one layer, times the net's {depth} hidden layers, over the step's. A default run (`python -m "
            f"fcexp.train`) takes {run_steps:,} steps, about {relu_step * run_steps / 1e3:.0f} s of them with relu: "
            f"sigmoid adds {per_run('sigmoid')} to that, tanh {per_run('tanh')} (the difference at one layer, times "
            f"{depth} layers and {run_steps:,} steps). A whole step's comparisons (below) show where such a difference "
            "stands out from the step's own noise. The timings share the machine with whatever else runs on it.",
            "",
            *details(comparisons, image, header, rows),
        ]
        findings = [
            Finding(
                f"ReLU is cheaper to compute than {other}",
                f"forward + backward of the activation alone, {layer}, µs",
                claims[layer, other].shown(),
                supports([claims[layer, other]], +1),
            )
            for other in ("sigmoid", "tanh")
        ]
        whole = claims[step, "sigmoid"]
        told = supports([whole], +1) if whole.diff.significant else "cannot tell sigmoid from relu apart"
        findings.append(
            Finding(
                "... what that amounts to for a run",
                "the activation's share of a training step of the seed's net; what it adds to a default run",
                f"relu {ci(share['relu'], 3)}, sigmoid {ci(share['sigmoid'], 3)}, tanh {ci(share['tanh'], 3)} of a "
                f"step; sigmoid adds {per_run('sigmoid')}, tanh {per_run('tanh')} to a run's "
                f"{relu_step * run_steps / 1e3:.0f} s",
                f"measured: relu spends {statistics.fmean(share['relu'].values()):.1%} of a step in its activation; "
                f"a whole step {told}" + closeness([whole]),
            )
        )
        return lines, findings

    return report


# ---- 9.-11. overfitting and the activation guidance: the fit runs -----------------------------------------------


def fit_arm(study: Study, s: dict, size: int, act: str = "relu", dropout: float = 0.2) -> Arm:
    """The seed's net trained on the first `size` training images for about the fit sections' steps, validated once
    at the end, its accuracy measured on (up to FIT_IMAGES of) its own training images then."""
    _, steps = s["fit"]
    epochs = max(1, round(steps / math.ceil(size / 128)))
    overrides = [*steps_overrides(size, epochs), f"+trainer.check_val_every_n_epoch={epochs}"]
    overrides += [f"activation={act}", f"model.dropout={dropout:g}"]
    return study.arm(f"fit{size}_{act}_dropout{dropout:g}", overrides, FIT)


def train_acc(run: Run) -> float:
    """Accuracy on the run's own training images at its end, in eval mode (fcexp.callbacks.TrainAccuracy)."""
    return run.last("train/acc_eval")


def gap(run: Run) -> float:
    """Training accuracy minus test accuracy: how much of what the net learned holds only for its training set."""
    return train_acc(run) - test_acc(run)


def fit_cells(arm: Arm) -> list[str]:
    """An arm's training accuracy, test accuracy and their gap, for a table (under FIT_HEADER)."""
    return [ci(per_seed(arm, value)) for value in (train_acc, test_acc, gap)]


FIT_HEADER = ["training accuracy (eval mode)", "test accuracy", "gap (train - test)"]


def sparse_fit(study: Study, s: dict) -> Report:
    size = s["fit"][0][1]  # small enough to overfit: 2,000 images in the full study
    arms = {act: fit_arm(study, s, size, act, dropout=0) for act in ACTS}

    def report() -> Written:
        gaps = {act: per_seed(arm, gap) for act, arm in arms.items()}
        zeros = {act: per_seed(arm, sparsity) for act, arm in arms.items()}
        claims = [Claim("train-test gap", gaps, "relu", act) for act in ACTS if act != "relu"]
        comparisons = judge(claims)
        fig, ax = plt.subplots(figsize=(6, 3.8))
        for k, act in enumerate(ACTS):
            ax.scatter(list(zeros[act].values()), list(gaps[act].values()), color=f"C{k}", label=act)
        ax.set(xlabel="share of hidden outputs exactly 0 (end)", ylabel="train - test accuracy")
        ax.set_title(f"{size:,} training images, no dropout (one point per seed)")
        ax.legend(fontsize=8)
        image = study.figure(fig, "sparsity_overfitting.png")
        rows = [[act, *fit_cells(arm), ci(zeros[act])] for act, arm in arms.items()]
        first = arms["relu"][study.seeds[0]]
        lines = [
            f"The seed's net without dropout on the first {size:,} training images, {first.steps} steps "
            f"({first.cfg.trainer.max_epochs} epochs), each activation; training accuracy on those {size:,} images "
            "in eval mode at the end (`callbacks.train_accuracy`), test accuracy on the 10,000 test images. If "
            "ReLU's exact zeros eased overfitting, its gap would be smaller than the others', leaky ReLU's (which "
            "has none) included.",
            "",
            "Comparisons (each activation's gap against relu's):",
            "",
            *comparisons,
            "",
            image,
            "",
            *table(["activation", *FIT_HEADER, "sparsity (end)"], rows),
        ]
        # Leaky ReLU has no exact zeros: if it overfits no more than relu, the zeros are not what eases overfitting.
        *saturating, leaky = claims
        if not leaky.diff.significant and all(c.diff.significant and c.diff.delta > 0 for c in saturating):
            verdict = (
                f"not as the text explains it: {' and '.join(c.other for c in saturating)} overfit more than relu, "
                "but leaky_relu, which has no exact zeros, no more than relu" + closeness(claims)
            )
        else:
            verdict = supports(claims, +1)
        findings = [
            Finding(
                "ReLU's zeros make the net sparse, which eases overfitting",
                f"train - test accuracy on {size:,} training images, no dropout; relu's sparsity",
                "; ".join(c.shown() for c in claims) + f"; relu's outputs {ci(zeros['relu'])} zeros",
                verdict,
            )
        ]
        return lines, findings

    return report


def small_data(study: Study, s: dict) -> Report:
    sizes, _ = s["fit"]
    dropouts = (0.2, 0.0)  # the seed's, and none
    arms = {(n, p): fit_arm(study, s, n, dropout=p) for n in sizes for p in dropouts}

    def report() -> Written:
        gaps = {(n, p): per_seed(arm, gap) for (n, p), arm in arms.items()}
        fig, axes = plt.subplots(1, 2, figsize=(12, 4))
        for p, style in zip(dropouts, ("-", "--"), strict=True):
            for what, value, color in (("training", train_acc, "C0"), ("test", test_acc, "C1")):
                values = [per_seed(arms[n, p], value) for n in sizes]
                errorbars(axes[0], sizes, values, fmt=style + "o", color=color, label=f"{what}, dropout {p:g}")
            errorbars(axes[1], sizes, [gaps[n, p] for n in sizes], fmt=style + "o", color="C2", label=f"dropout {p:g}")
        axes[0].set(xscale="log", xlabel="training images", ylabel="accuracy (mean, 95% interval)")
        axes[0].set_title("accuracy on the training set (eval mode) and on the test set")
        axes[1].set(xscale="log", xlabel="training images", ylabel="train - test accuracy")
        axes[1].axhline(0, color="grey", lw=0.5)
        axes[1].set_title("the gap")
        for ax in axes:
            ax.set_xticks(sizes, [f"{n:,}" for n in sizes], minor=False)
            ax.minorticks_off()
            ax.legend(fontsize=8)
        image = study.figure(fig, "small_data.png")

        seed_p = dropouts[0]
        smallest, largest = sizes[0], sizes[-1]
        claims = [
            Claim(
                f"accuracy, {n:,} images, dropout {seed_p:g}",
                {"test": per_seed(arms[n, seed_p], test_acc), "train": per_seed(arms[n, seed_p], train_acc)},
                "test",
                "train",
            )
            for n in sizes
        ]
        claims.append(
            Claim(
                f"train-test gap, dropout {seed_p:g}",
                {f"{smallest:,} images": gaps[smallest, seed_p], f"{largest:,} images": gaps[largest, seed_p]},
                f"{largest:,} images",
                f"{smallest:,} images",
            )
        )
        claims += [
            Claim(
                f"train-test gap, {n:,} images",
                {f"dropout {p:g}": gaps[n, p] for p in dropouts},
                f"dropout {dropouts[1]:g}",
                f"dropout {seed_p:g}",
            )
            for n in sizes
        ]
        comparisons = judge(claims)
        rows = []
        for (n, p), arm in arms.items():
            run = arm[study.seeds[0]]
            rows.append([f"{n:,}", f"{p:g}", f"{run.steps} ({run.cfg.trainer.max_epochs})", *fit_cells(arm)])
        lines = [
            f"The seed's net (relu) with its dropout ({seed_p:g}) and without, on the first "
            f"{', '.join(f'{n:,}' for n in sizes)} training images, each for about {s['fit'][1]} steps and at least "
            "an epoch (the table's steps), so that the smaller sets see each image more often; validated once, at "
            "the end. "
            f"Training accuracy is measured then on up to {FIT_IMAGES:,} of the run's own training images in eval "
            "mode (no dropout: `callbacks.train_accuracy`), test accuracy on the 10,000 test images; the gap is "
            "their difference, per seed.",
            "",
            *details(comparisons, image, ["training images", "dropout", "steps (epochs)", *FIT_HEADER], rows),
        ]
        trend = claims[len(sizes)]
        by_dropout = claims[len(sizes) + 1 :]
        findings = [
            Finding(
                "Neural networks overfit small data sets",
                f"train - test accuracy of the seed's net at {smallest:,} against {largest:,} training images",
                f"{ci(gaps[smallest, seed_p])} against {ci(gaps[largest, seed_p])}; {trend.shown()}",
                supports([trend], +1),
            ),
            Finding(
                "Dropout eases overfitting",
                f"train - test gap with dropout {seed_p:g} against none, at each training-set size",
                "; ".join(f"{n:,}: {c.shown().split(': ', 1)[1]}" for n, c in zip(sizes, by_dropout, strict=True)),
                supports(by_dropout, -1, name=lambda c: c.measure.split(", ")[1]),
            ),
        ]
        return lines, findings

    return report


def guidance(study: Study, s: dict) -> Report:
    names = list(registered())
    # One pass over fresh images: what each activation learns, not how it overfits.
    arms = {name: study.arm(f"rank_{name}", [*steps_overrides(*s["rank"]), f"activation={name}"]) for name in names}

    def report() -> Written:
        jobs = [compare.load_job(run.run_dir) for arm in arms.values() for run in arm.values()]
        ranked = compare.group(jobs, ["activation"], metric="test")
        acc = {name: per_seed(arm, test_acc) for name, arm in arms.items()}
        rows = [
            [
                str(rank),
                " = ".join(registered()[c.hparams["activation"]]),
                str(c.test),
                "-" if c.diff is None else f"{c.diff.delta:+.4f} [{c.diff.low:+.4f}, {c.diff.high:+.4f}]",
                "-" if c.diff is None else f"{c.diff.p_adj:.2g}",
                c.verdict,
            ]
            for rank, c in enumerate(ranked, 1)
        ]
        claims = [
            Claim("test accuracy", acc, "relu", "leaky_relu"),
            Claim("test accuracy", acc, "relu", "tanh"),
            Claim("test accuracy", acc, "relu", "sigmoid"),
            Claim("test accuracy", acc, "sigmoid", "tanh"),
        ]
        comparisons = judge(claims)
        fig, ax = plt.subplots(figsize=(8, 4))
        order = [c.hparams["activation"] for c in ranked]
        errorbars(ax, list(range(len(order))), [acc[n] for n in order], fmt="o")
        ax.set_xticks(range(len(order)), order, rotation=60)
        ax.set(ylabel="test accuracy (mean, 95% interval)", title="every registered activation, ranked")
        image = study.figure(fig, "activation_ranking.png")
        verdict = {c.hparams["activation"]: c.verdict for c in ranked}
        first = arms["relu"][study.seeds[0]]
        lines = [
            "The seed's net (dropout 0.2, batch norm on layer 2) for one pass over the first "
            f"{first.cfg.data.limit_train:,} training images ({first.steps} steps), each registered activation "
            "(swish is silu under another name: one arm), ranked by mean test accuracy with `fcexp.compare`'s "
            "statistics: each against the best, paired t test, Holm-adjusted over the ranking; 'tied with best' "
            "means these seeds cannot tell it from the best; the accuracies' intervals are compare's "
            f"({compare.INTERVAL}). prelu learns its slope and trains alone, the others packed.",
            "",
            *table(
                ["rank", "activation", "test accuracy [95% CI]", "diff vs best [95% CI]", "p (Holm)", "verdict"], rows
            ),
            "",
            "The text's guidance, piece by piece:",
            "",
            *comparisons,
            "",
            image,
        ]
        leaky, _, sigmoid, tanh_sigmoid = claims
        best = order[0]
        prefer = {"best": "supported: relu ranks first", "tied with best": f"supported: tied with the best, {best}"}
        if leaky.diff.significant:
            next_ = supports([leaky], +1)
        else:
            next_ = "consistent: the data cannot tell it from relu" + closeness([leaky])
        findings = [
            Finding(
                "Hidden layers: prefer ReLU",
                f"relu's rank among {len(names)} activations by test accuracy (fcexp.compare)",
                f"rank {order.index('relu') + 1}: {ci(acc['relu'])}; best: {best} {ci(acc[best])}",
                prefer.get(verdict["relu"], f"not supported: relu is {verdict['relu']} ({best} is best)"),
            ),
            Finding("... try leaky ReLU next", "test accuracy, leaky_relu against relu", leaky.shown(), next_),
            Finding(
                "... avoid sigmoid", "test accuracy, sigmoid against relu", sigmoid.shown(), supports([sigmoid], -1)
            ),
            Finding(
                "... tanh if anything (over sigmoid)",
                "test accuracy, tanh against sigmoid",
                tanh_sigmoid.shown(),
                supports([tanh_sigmoid], +1),
            ),
        ]
        return lines, findings

    return report


# The report's sections, in order: each plans its arms and returns what writes its text once they trained.
SECTIONS: list[tuple[str, Callable[[Study, dict], Report]]] = [
    ("The activations", gallery),
    ("1. Vanishing gradients", vanishing),
    ("2. Dying ReLU", dying),
    ("3. Q1: input normalization", normalization),
    ("4. Q2: one-hot labels vs class indices", encoding),
    ("5. The output activation rule", output_rule),
    ("6. Without an activation, depth adds nothing", linear_depth),
    ("7. tanh converges faster than sigmoid", convergence),
    ("8. ReLU is cheaper to compute", cost),
    ("9. ReLU's sparsity and overfitting", sparse_fit),
    ("10. Small training sets overfit", small_data),
    ("11. The activation guidance", guidance),
]


def anchor(title: str) -> str:
    """The link target a Markdown renderer (GitHub's) gives a heading."""
    return "#" + re.sub(r"[^\w\- ]", "", title.lower()).replace(" ", "-")


def claims_table(findings: list[tuple[str, Finding]]) -> list[str]:
    rows = [
        [f.claim, f.measured, f.result, f.verdict, f"[{title.split('.')[0]}]({anchor(title)})"] for title, f in findings
    ]
    return table(["claim", "measured", "result [95% interval]", "verdict", "section"], rows)


def main(argv: list[str] | None = None) -> Path | None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a few steps per run: checks the pipeline, not the claims")
    parser.add_argument(
        "--seeds", type=int, help=f"runs per arm, seeds 0 to N-1 (default 3; 2 with --quick; N+{MORE_SEEDS} for some)"
    )
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
    for name in ("lightning.pytorch", "lightning.fabric"):  # and each fit's device notices, once per pack
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
    sections, findings, timings = [], [], []
    for title, report in reports:
        t = time.perf_counter()
        lines, found = report()
        sections.append("\n".join([f"## {title}", "", *lines]))
        findings += [(title, f) for f in found]
        timings.append(f"{title.split('. ')[-1]} {time.perf_counter() - t:.0f} s")
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
    more = sorted(name for name, (_, arm_seeds) in study.planned.items() if len(arm_seeds) > seeds)
    header = [
        "# What the text claims, measured" + (" (quick mode: too few steps to judge the claims)" if args.quick else ""),
        "",
        f"Regenerate: `{command}` ({datetime.now():%Y-%m-%d %H:%M}, {len(study.arms)} arms, {runs} runs, in "
        f"{total / 60:.1f} min on {cpu}: trained packed, {len(study.packs)} packs of "
        f"{', '.join(map(str, study.packs))} runs, in {trained:.0f} s; then the sections' figures, test passes and "
        f"timings, {', '.join(timings)}). Every number below comes from these runs and timings; each run has its "
        f"folder (`<arm>_seed<s>`) with its metrics.json and TensorBoard events: `{tensorboard}`.",
        "",
        f"Each arm (a configuration) runs seeds {', '.join(map(str, study.seeds))}, and seeds "
        f"{study.more_seeds[0]}-{study.more_seeds[-1]} for {', '.join(f'`{name}`' for name in more)}: the arms of "
        "the two comparisons whose verdict did not replicate between two machines (leaky vs relu at lr 3e-2, "
        "normalization under Adam), and section 4's class-index arm, which trains in packs of its one-hot twin's "
        "shape. The seed "
        "sets init, batch order and dropout. Runs that share a net shape and data settings trained as one pack, as "
        "`+launcher=packed` trains a sweep's jobs (fcexp.train.train_pack), each exactly as it would alone, to the "
        "rounding of its pack's shape; a run's time is its share "
        "of its pack's. Numbers are the mean [95% t interval] over seeds. Comparisons give the difference with its 95% "
        "interval and a t test over seeds, paired where both arms ran the same seeds (the seed fixes the batch order "
        "both see), Welch's otherwise; p values are Holm-adjusted within a section, and a verdict whose p lies "
        f"between {NEAR[0]:g} and {NEAR[1]:g} says it is near the threshold. 'Not significant' means these seeds "
        "cannot tell the two apart, not that they are equal. "
        f"Figures show seed {study.seeds[0]}'s runs. Steps per run: "
        + ", ".join(f"{n} ({part})" for part, n in steps.items())
        + f", about {s['fit'][1]} and at least an epoch (sections 9-10).",
        "",
        "## Claims and findings",
        "",
        "Each claim of the text, what measured it, and the verdict the numbers give (details and every comparison in "
        "the section linked):",
        "",
        *claims_table(findings),
    ]
    (out / "report.md").write_text("\n\n".join(["\n".join(header), *sections]) + "\n")
    print(f"TensorBoard, every run of the study: {tensorboard}")
    print(f"report: {out / 'report.md'} ({runs} runs in {total / 60:.1f} min on {cpu})")
    return out


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
