"""`python -m fcexp.compare <sweep folder>`: rank a sweep's jobs, plot them, and name the best with its rerun command.

Runs by itself at the end of every multirun (`CompareAtEnd`, under `hydra.callbacks` in conf/train.yaml). It reads only
what the jobs wrote (metrics.json, else .hydra/) and what the sweep planned (multirun.yaml), so it also reports on a
sweep that is still running or was killed, down to the jobs it never started.
"""

from __future__ import annotations

import argparse
import csv
import logging
import math
import os
import shlex
import shutil
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Hydra's own: the folder name it gives a job's overrides (a rerun must land in the same folder), and the basic
# sweeper's class, to tell a grid from a search. Neither has a public equivalent.
from hydra._internal.config_loader_impl import get_overrides_dirname
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException
from hydra.experimental.callback import Callback
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from matplotlib.figure import Figure  # the object API needs no backend or display: PNGs on any machine
from omegaconf import DictConfig, OmegaConf
from tensorboard.compat.proto.summary_pb2 import Summary
from tensorboard.plugins.hparams import api_pb2, plugin_data_pb2
from tensorboard.plugins.hparams import metadata as hparams_metadata

from fcexp.record import (
    RECORD,
    RecordError,
    RunRecord,
    fcexp_command,
    flat_hparams,
    override_key,
    shell_program,
)
from fcexp.stats import ALPHA, INTERVAL, MODERATE_FROM, Difference, Interval, accuracy_interval, versus_best

log = logging.getLogger("fcexp")

TABLE, CSV, CONFIGS_CSV = "compare.md", "compare.csv", "configs.csv"
CURVES, BY_KNOB = "val_acc_curves.png", "acc_by_knob.png"
CONFIG_RUN = "configurations"  # the sweep's TensorBoard run of per-configuration means, beside the jobs' runs
REPLICATES = 3  # the seeds a single-seed sweep is told to add
MULTIRUN = "multirun.yaml"  # the sweep's config, written by Hydra before its first job
BASIC_SWEEPER = f"{BasicSweeper.__module__}.{BasicSweeper.__name__}"  # its `_target_` in multirun.yaml
# Finished jobs first, best validation accuracy first among them; then what may still finish; then what never will.
STATUS_ORDER = {
    "completed": 0,
    "stopped": 1,  # by a race (fcexp.race) at a rung: its numbers are that epoch's
    "running": 2,
    "interrupted": 3,
    "cancelled": 4,
    "failed": 5,
    "unreadable": 6,  # its metrics.json is damaged: what it did is unknown
    "no record": 7,
}
# Overrides that say how a sweep ran, not what a job trained: left out of the rerun command. Threads are not among
# the job's settings here, yet their number changes its results (the order of float sums): a rerun gets the number
# the job's record says it trained with.
NOT_THE_JOB = {"hydra/launcher", "hydra/sweeper", "threads", "skip_finished", "resume"}
# Presets that say what to sweep or how to launch and set nothing else a job trains with but threads: a single
# job's rerun does not need them. The others stay: conf/sweep/depth.yaml fixes batch norm and L2, and
# launcher=slurm_gpu and slurm_ddp choose the trainer (a GPU; DDP over a node's GPUs).
SWEEP_ONLY_PRESETS = {
    "sweep=grid",
    "sweep=activations",
    "sweep=regularization",
    "hparams_search=optuna",
    "launcher=parallel",
    "launcher=packed",
    "launcher=race",
    "launcher=slurm",
}
# What train.py logs with each job's hparams at its end: the HParams tab's metric columns.
HPARAMS_METRICS = ("hp_metric", "final/val_acc", "final/test_acc", "final/test_loss")
EXPERIMENT_SUFFIX = ".sweep-hparams"  # the sweep's own HParams experiment, an events file in the sweep folder
HIGHLIGHTED = 8  # curves drawn in colour and named in the legend; the rest are grey context


@dataclass
class Job:
    """One job of a sweep, as far as it got."""

    folder: Path
    status: str
    hparams: dict[str, Any] = field(default_factory=dict)
    overrides: list[str] = field(default_factory=list)
    history: list[dict[str, Any]] = field(default_factory=list)
    metrics: dict[str, float | None] = field(default_factory=dict)
    wall_time_s: float | None = None
    error: str | None = None
    git: dict[str, Any] | None = None  # {"commit", "dirty"} of the checkout it ran from; None outside one
    # False for a job of an interrupted sweep that never began: its hparams are only those its overrides set.
    started: bool = True
    threads: int | None = None  # the CPU threads it trained with
    cwd: str | None = None  # where it was started: the directory its overrides' relative paths are relative to
    stopped: dict[str, Any] | None = None  # a race's evidence for stopping it (fcexp.race.decide)

    @property
    def val_curve(self) -> list[tuple[int, float]]:
        return [(h["epoch"] + 1, h["val/acc"]) for h in self.history if h.get("val/acc") is not None]

    @property
    def val_best(self) -> float | None:
        # A job still running has no final metrics yet, but its history says how far it got.
        best = self.metrics.get("val/acc_best")
        return best if best is not None else max((acc for _, acc in self.val_curve), default=None)

    @property
    def val_final(self) -> float | None:
        final = self.metrics.get("val/acc")
        return final if final is not None else (self.val_curve[-1][1] if self.val_curve else None)

    @property
    def test(self) -> float | None:
        return self.metrics.get("test/acc")

    @property
    def commit(self) -> str | None:
        """The short commit it ran from, `+dirty` when the checkout had uncommitted changes."""
        if self.git is None:
            return None
        return self.git["commit"][:7] + ("+dirty" if self.git["dirty"] else "")

    @property
    def packed(self) -> bool:
        return any(o.lstrip("+") in ("launcher=packed", "launcher=race") for o in self.overrides)

    def rerun_command(self, *, without: tuple[str, ...] = ()) -> list[str]:
        """The overrides that rerun this job alone (less the keys in `without`), with the threads it trained with."""
        kept = [
            o
            for o in self.overrides
            if not override_key(o).startswith("hydra.")
            and override_key(o) not in {*NOT_THE_JOB, *without}
            and o.lstrip("+") not in SWEEP_ONLY_PRESETS
        ]
        return kept + ([f"threads={self.threads}"] if self.threads is not None else [])


# What compare reads of a record, and the JSON type each must have.
def load_job(folder: Path) -> Job:
    """A job from its metrics.json; one that has not written it yet (or wrote a damaged one: status "unreadable",
    the reason its error) from the config Hydra saved when it started."""
    try:
        record, problem = RunRecord.load(folder), None
    except RecordError as err:
        record, problem = None, err.reason
    if record is not None and problem is None:
        provenance = record.get("provenance") or {}
        threads = (provenance.get("device") or {}).get("threads")
        return Job(
            folder,
            record["status"],
            record["hparams"],
            record["overrides"],
            record["history"],
            record["metrics"],
            record.get("wall_time_s"),
            record.get("error") or (record.get("stopped") or {}).get("reason"),
            provenance.get("git"),
            threads=threads if isinstance(threads, int) else None,
            cwd=provenance.get("cwd"),
            stopped=record.get("stopped"),
        )
    job = Job(folder, "no record" if problem is None else "unreadable", error=problem)
    hydra_dir = folder / ".hydra"
    if (hydra_dir / "config.yaml").is_file():
        job.hparams = flat_hparams(OmegaConf.load(hydra_dir / "config.yaml"))
    if (hydra_dir / "overrides.yaml").is_file():
        job.overrides = list(OmegaConf.load(hydra_dir / "overrides.yaml"))
    return job


def multirun_hydra(sweep_dir: Path) -> DictConfig | None:
    """The Hydra part of the config the sweep started with (its multirun.yaml), None if it wrote none."""
    return OmegaConf.load(sweep_dir / MULTIRUN).hydra if (sweep_dir / MULTIRUN).is_file() else None


def plans_ahead(hydra_cfg: DictConfig) -> bool:
    """Whether the sweeper plans every job up front (Hydra's basic sweeper: the product of the swept values); others
    (Optuna) choose each job from the results so far."""
    return hydra_cfg.sweeper._target_ == BASIC_SWEEPER


def unstarted_jobs(sweep_dir: Path, started: list[Job]) -> list[Job]:
    """The jobs an interrupted sweep planned (multirun.yaml) but never started, so never gave a folder; only a sweeper
    that plans ahead knows them."""
    hydra_cfg = multirun_hydra(sweep_dir)
    if hydra_cfg is None or not plans_ahead(hydra_cfg):
        return []
    # As BasicSweeper.sweep: a preset's params, then the command line's overrides (the later wins for a key).
    params = hydra_cfg.sweeper.get("params") or {}
    arguments = [f"{k}={v}" for k, v in params.items()] + list(hydra_cfg.overrides.task)
    parser = OverridesParser.create()
    try:
        (plan,) = BasicSweeper.split_arguments(parser.parse_overrides(arguments), max_batch_size=None)  # one batch
    except HydraException:
        return []  # e.g. a glob(...) sweep, whose values only the config loader of the sweep itself can list
    naming = hydra_cfg.job.config.override_dirname
    exclude = list(naming.exclude_keys)

    def identity(overrides: list[str]) -> frozenset[str]:
        # How a sweep runs is no part of what a job is: a rerun adds skip_finished=true to the jobs it reaches.
        return frozenset(o for o in overrides if override_key(o) not in exclude)

    seen = {identity(job.overrides) for job in started}
    # Only knobs the started jobs record as hparams: an override like callbacks.progress.refresh_rate is not one.
    known = {k for job in started for k in job.hparams}
    jobs = []
    for overrides in plan:
        parsed = parser.parse_overrides(overrides)
        folder = get_overrides_dirname(parsed, exclude, naming.item_sep, naming.kv_sep)  # as conf/train.yaml names it
        if identity(overrides) in seen or (sweep_dir / folder).is_dir():  # the folder: a job of replicates
            continue
        # As flat_hparams stores them: TensorBoard's scalars as they are, anything else as text.
        values = {o.key_or_group: o.value() for o in parsed if not o.is_delete()}
        hparams = {
            k: v if isinstance(v, (int, float, str, bool)) else str(v)
            for k, v in values.items()
            if not known or k in known
        }
        jobs.append(Job(sweep_dir / folder, "no record", hparams, list(overrides), started=False))
    return jobs


def load_sweep(sweep_dir: Path) -> list[Job]:
    """Every job of a sweep, ranked: finished jobs by best validation accuracy, then the unfinished and unstarted."""
    if not sweep_dir.is_dir():
        raise ValueError(f"sweep folder {str(sweep_dir)!r} does not exist; give a folder under runs/sweeps/")
    folders = []
    for p in sorted(sweep_dir.iterdir()):
        # A job with replicates > 1 holds one run per seed in <job>/seed=<s>: those are the sweep's runs.
        inner = [q for q in sorted(p.glob("seed=*")) if (q / RECORD).is_file()] if p.is_dir() else []
        if inner and not (p / RECORD).is_file():
            folders += inner
        elif p.is_dir() and ((p / RECORD).is_file() or (p / ".hydra").is_dir()):
            folders.append(p)
    jobs = [load_job(p) for p in folders]
    jobs += unstarted_jobs(sweep_dir, jobs)
    if not jobs:
        raise ValueError(
            f"{str(sweep_dir)!r} holds no jobs (subfolders with {RECORD} or .hydra/); give a folder under runs/sweeps/"
        )
    last = len(STATUS_ORDER)
    return sorted(jobs, key=lambda j: (STATUS_ORDER.get(j.status, last), -(j.val_best or 0.0), j.folder.name))


def swept_knobs(jobs: list[Job]) -> list[str]:
    """The hyperparameters whose values differ between jobs: the table's columns and the plots' panels."""
    keys = dict.fromkeys(k for job in jobs for k in job.hparams)
    # A job that never started knows only the knobs its overrides set: a key it lacks is unknown, not None.
    differ = [
        k
        for k in keys
        if len({repr(job.hparams.get(k)) for job in jobs if job.hparams and (job.started or k in job.hparams)}) > 1
    ]
    # A choice's own parameters (activation.negative_slope when the activation was swept) belong to that choice;
    # they are knobs only when swept themselves.
    overridden = {override_key(o) for job in jobs for o in job.overrides}
    return [k for k in differ if k.rpartition(".")[0] not in differ or k in overridden]


def commits_differ(jobs: list[Job]) -> bool:
    """Whether the recorded jobs ran from different code (another commit, or uncommitted changes in some): then the
    table says which each ran."""
    return len({repr(job.git) for job in jobs if job.status != "no record"}) > 1


def _fmt(value: Any, digits: int | None = None) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}" if digits is not None else f"{value:g}"
    return str(value)


def table_rows(jobs: list[Job], knobs: list[str]) -> tuple[list[str], list[list[str]]]:
    code = ["commit"] if commits_differ(jobs) else []
    header = ["rank", *knobs, *code, "val_acc_best", "val_acc_final", "test_acc", "epochs", "train_time_s", "status"]
    rows = [
        [
            str(rank),
            *(_fmt(job.hparams.get(k)) for k in knobs),
            *([_fmt(job.commit)] if code else []),
            _fmt(job.val_best, 4),
            _fmt(job.val_final, 4),
            _fmt(job.test, 4),
            str(len(job.val_curve)) if job.status != "unreadable" else "-",  # what it trained is unknown
            _fmt(job.wall_time_s, 1),
            job.status,
        ]
        for rank, job in enumerate(jobs, 1)
    ]
    return header, rows


@dataclass
class Config:
    """A configuration (every swept knob but the seed) and its jobs, one per seed."""

    hparams: dict[str, Any]
    jobs: list[Job]
    diff: Difference | None = None  # from the best configuration, in the metric it was ranked by

    def by_seed(self, metric: str) -> dict[int, float]:
        return {
            job.hparams.get("seed", i): value
            for i, job in enumerate(self.jobs)
            if job.status == "completed" and (value := getattr(job, metric)) is not None
        }

    @property
    def val(self) -> Interval | None:
        values = self.by_seed("val_best")
        return accuracy_interval(list(values.values())) if values else None

    @property
    def test(self) -> Interval | None:
        values = self.by_seed("test")
        return accuracy_interval(list(values.values())) if values else None

    @property
    def verdict(self) -> str:
        if self.val is None:
            stopped = next((job.stopped for job in self.jobs if job.stopped), None)
            return f"stopped at epoch {stopped['rung']}" if stopped else "no result"
        if self.diff is None:
            return "best"
        return {None: "-", False: "tied with best", True: "worse"}[self.diff.significant]


def group(jobs: list[Job], knobs: list[str], metric: str = "val_best") -> list[Config]:
    """The jobs grouped into configurations, ranked by the mean of `metric` (a Job property: best validation
    accuracy, or "test"), each but the best with its difference from the best (adjusted for all of them;
    fcexp.stats)."""
    keys = [k for k in knobs if k != "seed"]
    groups: dict[tuple[str, ...], Config] = {}
    for job in jobs:
        key = tuple(repr(job.hparams.get(k)) for k in keys)
        groups.setdefault(key, Config({k: job.hparams.get(k) for k in keys}, [])).jobs.append(job)
    ranked = sorted(
        ((c, c.by_seed(metric)) for c in groups.values()),
        key=lambda ranked: -statistics.fmean(ranked[1].values()) if ranked[1] else math.inf,
    )
    scored = [(c, values) for c, values in ranked if values]
    if scored:
        (_, best), rest = scored[0], scored[1:]
        for (config, _), diff in zip(rest, versus_best(best, [values for _, values in rest]), strict=True):
            config.diff = diff
    return [c for c, _ in ranked]


def replicated(configs: list[Config]) -> bool:
    return any(c.val is not None and c.val.n > 1 for c in configs)


def config_rows(configs: list[Config], knobs: list[str]) -> tuple[list[str], list[list[str]]]:
    """The configurations as text, each interval beside its mean: compare.md and the terminal."""
    keys = [k for k in knobs if k != "seed"]
    header = ["rank", *keys, "n", "val_acc_best [95% CI]", "sd", "test_acc [95% CI]", "diff vs best [95% CI]"]
    header += ["test", "p_adj", "verdict"]
    rows = []
    for rank, c in enumerate(configs, 1):
        val, test, d = c.val, c.test, c.diff
        rows.append(
            [
                str(rank),
                *(_fmt(c.hparams.get(k)) for k in keys),
                str(val.n if val else 0),
                str(val) if val else "-",
                _fmt(val.sd if val else None, 4),
                str(test) if test else "-",
                "-"
                if d is None
                else f"{d.delta:+.4f}" + (f" [{d.low:+.4f}, {d.high:+.4f}]" if d.low is not None else ""),
                d.test if d and d.test else "-",
                _fmt(d.p_adj if d else None, 3),
                c.verdict,
            ]
        )
    return header, rows


def config_csv_rows(configs: list[Config], knobs: list[str]) -> tuple[list[str], list[list[Any]]]:
    """The configurations as numbers, a column each (configs.csv): empty where there is none."""
    keys = [k for k in knobs if k != "seed"]
    accuracies = [f"{m}_{part}" for m in ("val_acc", "test_acc") for part in ("mean", "low", "high", "sd")]
    header = ["rank", *keys, "n", *accuracies, "diff", "diff_low", "diff_high", "test", "p", "p_adj", "verdict"]
    rows = []
    for rank, c in enumerate(configs, 1):
        d = c.diff
        numbers = [getattr(i, part) if i else None for i in (c.val, c.test) for part in ("mean", "low", "high", "sd")]
        numbers += [d.delta, d.low, d.high] if d else [None] * 3
        row = [rank, *(c.hparams.get(k) for k in keys), c.val.n if c.val else 0, *numbers]
        row += [d.test if d else None, d.p if d else None, d.p_adj if d else None, c.verdict]
        rows.append(["" if v is None else v for v in row])
    return header, rows


def method_note(configs: list[Config]) -> str:
    tests = sum(c.diff is not None and c.diff.p is not None for c in configs)
    ranked = (
        f"Configurations are ranked by mean best validation accuracy over their seeds; each accuracy's interval is a "
        f"{INTERVAL}."
    )
    if tests == 0:
        stopped = sum(c.verdict.startswith("stopped") for c in configs)
        why = f" (a race stopped the other {stopped}, on the evidence in its stopped: lines)" if stopped else ""
        return f"{ranked} No other finished configuration with replicates is left to compare with the best{why}."
    moderated = any(c.diff is not None and c.diff.test == "moderated paired" for c in configs)
    paired = (
        f"paired t test where both ran the same seeds, moderated ({MODERATE_FROM} or more such comparisons: each "
        "configuration's variance over seeds shrunk toward what all of them show, Smyth 2004) and adjusted by the "
        f"studentized range of the {tests + 1} configurations (Tukey's: the best was picked from the same numbers); "
        "Welch's otherwise, Holm-adjusted"
        if moderated
        else f"paired t test where both ran the same seeds, Welch's otherwise; p values are Holm-adjusted over the "
        f"{tests} comparison{'s' * (tests != 1)}"
    )
    return (
        f"{ranked} Each is compared with the best: {paired}. "
        f"'tied with best' means not "
        f"significantly different at {ALPHA:g}: the data do not tell them apart, not that they are equal."
    )


def format_table(header: list[str], rows: list[list[str]], markdown: bool = False) -> str:
    if markdown:
        return "\n".join("| " + " | ".join(row) + " |" for row in [header, ["---"] * len(header), *rows])
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in [header, *rows]
    )


def _label(hparams: dict[str, Any], knobs: list[str], fallback: str = "") -> str:
    return ", ".join(f"{k.rsplit('.', 1)[-1]}={_fmt(hparams.get(k))}" for k in knobs if k != "seed") or fallback


def mean_curve(config: Config) -> tuple[list[int], list[Interval]]:
    """Validation accuracy per epoch over the config's seeds: the epochs every finished seed reached."""
    curves = [dict(job.val_curve) for job in config.jobs if job.val_curve]
    epochs = sorted(set.intersection(*(set(c) for c in curves))) if curves else []
    return epochs, [accuracy_interval([c[e] for c in curves]) for e in epochs]


def plot_curves(configs: list[Config], knobs: list[str], path: Path) -> None:
    """Validation accuracy per epoch, a line per configuration (the mean over its seeds, with its 95% interval as a
    band): the best few named, the rest grey, the legend beside the axes."""
    ranked = [(rank, c, *mean_curve(c)) for rank, c in enumerate(configs, 1)]
    ranked = [r for r in ranked if r[2]]
    fig = Figure(figsize=(12, 5.5), layout="constrained")
    ax = fig.add_subplot()
    # Drawn in rank order so the legend reads best first; the best lies on top.
    for i, (rank, config, epochs, points) in enumerate(ranked):
        named = i < HIGHLIGHTED
        means = [p.mean for p in points]
        if named:
            n = max(p.n for p in points)
            label = f"{rank}. {_label(config.hparams, knobs, config.jobs[0].folder.name)}" + (
                f" (n={n})" if n > 1 else ""
            )
            ax.plot(epochs, means, color=f"C{i}", lw=2, marker="o", ms=4, zorder=3 + HIGHLIGHTED - i, label=label)
            if any(p.low is not None for p in points):
                lows = [p.low if p.low is not None else p.mean for p in points]
                highs = [p.high if p.high is not None else p.mean for p in points]
                ax.fill_between(epochs, lows, highs, color=f"C{i}", alpha=0.15, lw=0, zorder=2)
                # Bars too: a band has no width at a single epoch.
                interval_bars(ax, epochs, lows, highs, color=f"C{i}", capsize=4, lw=1, zorder=2)
        else:
            label = f"{len(ranked) - HIGHLIGHTED} other configurations" if i == HIGHLIGHTED else None
            ax.plot(epochs, means, color="0.75", lw=0.8, marker=".", zorder=1, label=label)
    points = sorted(p.mean for *_, curve in ranked for p in curve)
    # Diverged runs sit near chance (0.1); showing them in full would flatten the differences that matter. At the
    # top, the named configurations' intervals show whole.
    highs = [p.high for *_, curve in ranked[:HIGHLIGHTED] for p in curve if p.high is not None]
    low = points[len(points) // 10]
    ax.set_ylim(max(0.0, low - 0.02), min(1.0, max([points[-1], *highs]) + 0.01))
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small", title="rank. configuration")
    last_epoch = max(epoch for _, _, epochs, _ in ranked for epoch in epochs)
    ax.set_xticks(range(1, last_epoch + 1, max(1, last_epoch // 10)))  # whole epochs, even for one
    ax.set_xlim(0.8, last_epoch + 0.2)
    ax.set_xlabel("epoch")
    ax.set_ylabel("validation accuracy")
    ax.grid(alpha=0.3)
    band = f"\n(mean over seeds, band: {INTERVAL})" if replicated(configs) else ""
    ax.set_title(f"{path.parent.absolute().name}: validation accuracy of {len(ranked)} configurations{band}")
    fig.savefig(path, dpi=110)


def write_config_curves(configs: list[Config], knobs: list[str], folder: Path) -> None:
    """A TensorBoard run beside the jobs': each replicated configuration's validation accuracy, the mean over its
    seeds with its interval (fcexp.stats.INTERVAL), as a margin chart in the Custom Scalars tab (x: the step its
    epochs end at, as in the jobs' own val/acc)."""
    from torch.utils.tensorboard import SummaryWriter

    shutil.rmtree(folder, ignore_errors=True)  # rewritten whole, from the jobs' records, each time compare runs
    charts = {}
    with SummaryWriter(str(folder)) as writer:
        for rank, config in enumerate(configs, 1):
            epochs, points = mean_curve(config)
            if not points or max(p.n for p in points) < 2:
                continue
            steps = {h["epoch"] + 1: h["step"] - 1 for job in config.jobs for h in job.history}
            tags = [f"val_acc_by_configuration/{rank:02d}/{part}" for part in ("mean", "low", "high")]
            for epoch, p in zip(epochs, points, strict=True):
                low, high = (p.low, p.high) if p.low is not None else (p.mean, p.mean)
                for tag, value in zip(tags, (p.mean, low, high), strict=True):
                    writer.add_scalar(tag, value, steps.get(epoch, epoch))
            charts[f"{rank}. {_label(config.hparams, knobs)} (n={max(p.n for p in points)})"] = ["Margin", tags]
        writer.add_custom_scalars({f"validation accuracy by configuration: mean over seeds, {INTERVAL}": charts})


def interval_bars(ax: Any, x: list, lows: list[float], highs: list[float], **style: Any) -> None:
    """Capped bars from each low to its high. Drawn from the bounds, not as distances from the mean: an accuracy
    interval is the mean logit's, and for skewed accuracies (many runs pooled, a few far below the rest) the plain
    mean can lie outside it, where a bar measured from the mean would need a negative length."""
    middles = [(lo + hi) / 2 for lo, hi in zip(lows, highs, strict=True)]
    halves = [(hi - lo) / 2 for lo, hi in zip(lows, highs, strict=True)]
    ax.errorbar(x, middles, yerr=halves, fmt="none", ecolor=style.pop("color"), **style)


def _sort_values(values: list[Any]) -> list[Any]:
    numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
    return sorted(values) if numeric else sorted(values, key=str)


def plot_by_knob(configs: list[Config], knobs: list[str], path: Path) -> None:
    """Test accuracy by each swept knob: each configuration's mean a dot, and at each value the mean over all its
    runs with its interval (fcexp.stats.INTERVAL, over the other knobs and the seeds) as a bar."""
    knobs = [k for k in knobs if k != "seed"]
    done = [c for c in configs if c.test is not None]
    cols = min(len(knobs), 3)
    rows = math.ceil(len(knobs) / cols)
    # At least 9 inches wide: the title must fit even when a single knob was swept.
    fig = Figure(figsize=(max(4.5 * cols, 9), 3.8 * rows), layout="constrained")
    for i, knob in enumerate(knobs):
        ax = fig.add_subplot(rows, cols, i + 1)
        groups: dict[Any, list[Config]] = {}
        for c in done:
            groups.setdefault(c.hparams.get(knob), []).append(c)
        values = _sort_values(list(groups))
        numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
        if numeric and len(values) > 6:
            # A continuous knob (an Optuna search's learning rate): a scatter on its own scale, no groups.
            ax.scatter([c.hparams[knob] for c in done], [c.test.mean for c in done], s=14, color="C0")
            if min(values) > 0 and max(values) / min(values) >= 20:
                ax.set_xscale("log")
        else:
            for x, value in enumerate(values):
                means = [c.test.mean for c in groups[value]]
                offsets = [(j - (len(means) - 1) / 2) * 0.25 / max(len(means), 1) for j in range(len(means))]
                ax.scatter([x + o for o in offsets], means, s=10, color="0.6", zorder=2)
                runs = accuracy_interval([v for c in groups[value] for v in c.by_seed("test").values()])
                ax.scatter([x], [runs.mean], s=49, color="C3", zorder=3)
                if runs.low is not None:
                    interval_bars(ax, [x], [runs.low], [runs.high], color="C3", capsize=5, zorder=3)
            labels = [_fmt(v) for v in values]
            # Long names (leaky_relu, softplus) side by side overlap: slant them when they would.
            slant = sum(len(t) for t in labels) > 40 / cols * 3
            ax.set_xticks(range(len(values)), labels, rotation=35 if slant else 0, ha="right" if slant else "center")
            ax.set_xlim(-0.5, len(values) - 0.5)
        ax.set_title(knob)
        ax.grid(alpha=0.3)
        if i % cols == 0:
            ax.set_ylabel("test accuracy")
    sweep = path.parent.absolute().name
    fig.suptitle(f"{sweep}: test accuracy by swept knob\n(red: mean over its runs and its {INTERVAL})")
    fig.savefig(path, dpi=110)


def sweep_command(sweep_dir: Path, without: tuple[str, ...] = ()) -> list[str] | None:
    """The overrides the sweep was started with (its multirun.yaml), if it recorded them, but `without` and
    skip_finished: the task's, and how it was launched (hydra.launcher.*: a SLURM sweep's partition and CPUs)."""
    hydra_cfg = multirun_hydra(sweep_dir)
    if hydra_cfg is None:
        return None
    overrides = hydra_cfg.overrides
    launcher = [
        o for o in overrides.hydra if override_key(o).startswith(("hydra/", "hydra.launcher.", "hydra.sweeper."))
    ]
    return [o for o in overrides.task if override_key(o) not in (*without, "skip_finished")] + launcher


def replicate_command(sweep_dir: Path, start: str | None) -> str:
    """The sweep again with REPLICATES seeds per configuration. A sweeper that plans ahead sweeps the seed too
    (seed=0,1,2); a search (Optuna) would make a swept seed one more parameter to search, so there every trial trains
    the seeds itself (replicates=3) and is scored by their mean."""
    hydra_cfg = multirun_hydra(sweep_dir)
    seeds = f"seed={','.join(map(str, range(REPLICATES)))}"
    if hydra_cfg is None:
        return f"the sweep's command with {seeds}"
    more = seeds if plans_ahead(hydra_cfg) else f"replicates={REPLICATES}"
    return fcexp_command("-m", *sweep_command(sweep_dir, without=("seed", "replicates")), more, start=start)


def sweep_start(sweep_dir: Path, jobs: list[Job]) -> str:
    """The directory the sweep was started in (multirun.yaml, else a job's record; else this one), where its
    overrides' relative paths (runs_dir, data.root) lead where they led the jobs."""
    hydra_cfg = multirun_hydra(sweep_dir)
    recorded = OmegaConf.select(hydra_cfg, "runtime.cwd") if hydra_cfg is not None else None
    return recorded or next((job.cwd for job in jobs if job.cwd), None) or os.getcwd()


def summary(sweep_dir: Path, jobs: list[Job], configs: list[Config], knobs: list[str], start: str | None) -> list[str]:
    """What the tables do not say: the jobs' errors, the best configuration and the command that reruns it, and for a
    single-seed sweep how to replicate it. For the terminal (`start` None) commands run from the working directory
    and folders are named from it; for compare.md commands run from `start` and folders are named inside the sweep
    folder, so that the file reads the same wherever compare ran."""
    lines = []
    stopped: dict[str, list[Job]] = {}  # a race stops a configuration's runs together: one line for them
    for job in jobs:
        if job.stopped and job.status == "stopped":
            stopped.setdefault(job.stopped["configuration"], []).append(job)
        elif job.error:
            name = job.folder.relative_to(sweep_dir)
            lines.append(f"{job.status}: {name / RECORD if job.status == 'unreadable' else name}: {job.error}")
    for configuration, runs in stopped.items():
        lines.append(f"stopped: {configuration} ({len(runs)} run{'s' * (len(runs) != 1)}): {runs[0].error}")
    best = configs[0] if configs and configs[0].val is not None else None
    if best is None:
        return [*lines, "best: none yet (no job has completed)"]
    job = best.jobs[0]
    if replicated(configs):
        ties = [c for c in configs if c.diff is not None and c.diff.significant is False]
        tied = f"; {len(ties)} other configuration{'s' * (len(ties) != 1)} tied with it" if len(configs) > 1 else ""
        lines.append(
            f"best: {_label(best.hparams, knobs, 'the only configuration')} (n={best.val.n}; val acc {best.val}, "
            f"test acc {best.test}{tied})"
        )
        seeds = ",".join(str(s) for s in sorted(best.by_seed("val_best")))
        rerun = fcexp_command("-m", *job.rerun_command(without=("seed",)), f"seed={seeds}", start=start)
    else:
        folder = job.folder if start is None else job.folder.relative_to(sweep_dir)
        label = _label(best.hparams, knobs, job.folder.name)
        lines.append(f"best: {label} (val acc {job.val_best:.4f}, test acc {_fmt(job.test, 4)}) in {folder}")
        rerun = fcexp_command(*job.rerun_command(), start=start)
    lines.append(f"rerun it: {rerun}")
    if job.packed:
        lines.append(
            "it trained in a pack: rerun alone it draws the same batches and dropout masks, and gives the same numbers "
            "within the rounding of the pack's other summation order (val loss within 5e-3 relative after 2 epochs)"
        )
    if replicated(configs):
        lines.append(method_note(configs))
    else:
        lines.append(
            "one seed per configuration: this ranking carries no intervals; replicate it with: "
            + replicate_command(sweep_dir, start)
        )
    return lines


def write_hparams_experiment(sweep_dir: Path, values: dict[str, list[Any]], swept: list[str]) -> None:
    """Tell TensorBoard's HParams tab the sweep's hyperparameters, swept knobs first and marked as differing, and the
    metrics its jobs log at their end. `values`: each hparam's values in the jobs (none: its type is not known yet).

    Every job's run carries an experiment of its own (torch's `hparams()`, under Lightning's log_hyperparams) with all
    its hparams, none marked as differing. TensorBoard takes the first experiment it finds, the sweep folder's own
    (run ".") before its jobs', sorts its hparams differing first, then by name, and shows the first five: without
    this, activation and data.* (alike in every row), the swept knobs unticked."""
    for old in sweep_dir.glob(f"events.out.tfevents.*{EXPERIMENT_SUFFIX}"):
        old.unlink()  # rewritten whole each time, from what is known now
    infos = []
    for name in [*swept, *(k for k in values if k not in swept)]:
        seen = values.get(name, [])
        info = api_pb2.HParamInfo(name=name, differs=name in swept)
        if seen and all(isinstance(v, str) for v in seen):
            info.type = api_pb2.DATA_TYPE_STRING
            info.domain_discrete.extend(sorted(set(seen)))
        elif seen and all(isinstance(v, (int, float)) for v in seen):  # booleans too: torch logs them as numbers
            info.type = api_pb2.DATA_TYPE_FLOAT64
            info.domain_interval.min_value, info.domain_interval.max_value = min(seen), max(seen)
        infos.append(info)
    metrics = [api_pb2.MetricInfo(name=api_pb2.MetricName(tag=tag)) for tag in HPARAMS_METRICS]
    content = plugin_data_pb2.HParamsPluginData(
        experiment=api_pb2.Experiment(hparam_infos=infos, metric_infos=metrics),
        version=hparams_metadata.PLUGIN_DATA_VERSION,
    )
    value = Summary.Value(
        tag=hparams_metadata.EXPERIMENT_TAG, metadata=hparams_metadata.create_summary_metadata(content)
    )
    from torch.utils.tensorboard import SummaryWriter

    with SummaryWriter(str(sweep_dir), filename_suffix=EXPERIMENT_SUFFIX) as writer:
        writer.file_writer.add_summary(Summary(value=[value]))


def planned_hparams(config: DictConfig) -> tuple[dict[str, list[Any]], list[str]]:
    """A multirun's hparams before any of its jobs ran: the values its config sets, and the keys it sweeps (its
    command line's sweeps, `model.dropout=0,0.2`, and its sweeper's params: a preset's, Optuna's), whose values the
    jobs will tell."""
    task = list(config.hydra.overrides.task)
    keys = {o.key_or_group for o in OverridesParser.create().parse_overrides(task) if o.is_sweep_override()}
    keys |= set(config.hydra.sweeper.get("params") or {})
    params = flat_hparams(config, task)
    swept = [k for k in params if k in keys]
    return {k: [] if k in swept else [v] for k, v in params.items()}, swept


def report(sweep_dir: Path, jobs: list[Job] | None = None) -> str:
    """Write the sweep's tables (Markdown, CSV), plots and HParams experiment into its folder; return the text to
    print. `jobs`: the sweep's, when the caller has loaded them."""
    sweep_dir = Path(sweep_dir)
    jobs = load_sweep(sweep_dir) if jobs is None else jobs
    knobs = swept_knobs(jobs)
    configs = group(jobs, knobs)
    header, rows = table_rows(jobs, knobs)
    with open(sweep_dir / CSV, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow([*header, "error", "folder"])
        writer.writerows([*row, job.error or "", job.folder.name] for row, job in zip(rows, jobs, strict=True))
    with open(sweep_dir / CONFIGS_CSV, "w", newline="") as f:
        csv_header, csv_rows = config_csv_rows(configs, knobs)
        csv.writer(f).writerows([csv_header, *csv_rows])
    config_header, config_table = config_rows(configs, knobs)
    replicates = replicated(configs)
    tables = (
        f"## Configurations\n\n{format_table(config_header, config_table, markdown=True)}\n\n" if replicates else ""
    )
    start = sweep_start(sweep_dir, jobs)
    notes = [f"Commands run from {start}.", *summary(sweep_dir, jobs, configs, knobs, start)]
    (sweep_dir / TABLE).write_text(
        f"# {sweep_dir.absolute().name}\n\n{tables}## Jobs\n\n{format_table(header, rows, markdown=True)}\n\n"
        + "\n\n".join(notes)
        + "\n"
    )
    if any(job.val_curve for job in jobs):
        plot_curves(configs, knobs, sweep_dir / CURVES)
    if [k for k in knobs if k != "seed"] and any(c.test is not None for c in configs):
        plot_by_knob(configs, knobs, sweep_dir / BY_KNOB)
    if replicates:
        write_config_curves(configs, knobs, sweep_dir / CONFIG_RUN)
    names = dict.fromkeys(k for job in jobs for k in job.hparams)
    write_hparams_experiment(sweep_dir, {k: [j.hparams[k] for j in jobs if k in j.hparams] for k in names}, knobs)
    counts = {s: sum(j.status == s for j in jobs) for s in STATUS_ORDER if any(j.status == s for j in jobs)}
    lines = [
        f"{len(jobs)} job{'s' * (len(jobs) != 1)} in {sweep_dir}: " + ", ".join(f"{n} {s}" for s, n in counts.items()),
        *summary(sweep_dir, jobs, configs, knobs, None),
    ]
    written = [str(sweep_dir / n) for n in (TABLE, CSV, CONFIGS_CSV, CURVES, BY_KNOB) if (sweep_dir / n).is_file()]
    lines.append("wrote " + ", ".join(written))
    command = sweep_command(sweep_dir)
    if command is not None and any(j.status in ("interrupted", "cancelled") for j in jobs):
        # Last, where it does not scroll away: how the stopped jobs continue from their checkpoints.
        finish = fcexp_command("-m", *command, f"hydra.sweep.dir={sweep_dir.absolute()}", "skip_finished=true")
        lines.append(f"finish the sweep with: {finish}")
    shown = format_table(config_header, config_table) if replicates else format_table(header, rows)
    return "\n".join([shown, "", *lines])


def remove_if_unstarted(sweep_dir: Path) -> None:
    """Remove a sweep's folder when it holds only what its start wrote (its config, its HParams experiment): a
    sweep refused before any job ran leaves nothing behind."""
    if sweep_dir.is_dir() and all(
        p.name == MULTIRUN or p.name.endswith(EXPERIMENT_SUFFIX) for p in sweep_dir.iterdir()
    ):
        shutil.rmtree(sweep_dir)


class CompareAtEnd(Callback):
    """At the start of a multirun: the sweep's HParams experiment, so TensorBoard shows its swept knobs first while
    it runs. At its end: the comparison of its jobs, the TensorBoard command that shows them all, and exit status 1
    when any job failed (the others' results are written by then), so that a script sees it."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        if rank_zero_only.rank != 0:
            return
        race = config.hydra.launcher.get("race")
        if race is not None:
            # Checked here, before the sweep's folder exists: Hydra would build the launcher (which refuses the
            # same values) only after this, and report it in several lines.
            from fcexp.race import Race  # fcexp.race reads sweeps with this module

            try:
                Race.of(race)
            except ValueError as err:
                print(f"error: {err}", file=sys.stderr)
                sys.exit(2)
        sweep_dir = Path(config.hydra.sweep.dir)  # claimed here, first: the sweep's jobs get the same folder
        if not (sweep_dir / MULTIRUN).is_file():
            # Hydra's basic sweeper writes the sweep's config; Optuna's does not, and compare reads from it how the
            # sweep ran (its sweeper, its command) for the replicate and finish commands.
            sweep_dir.mkdir(parents=True, exist_ok=True)
            OmegaConf.save(config, sweep_dir / MULTIRUN)
        try:
            write_hparams_experiment(sweep_dir, *planned_hparams(config))
        except Exception as err:  # TensorBoard's column order is no reason to stop a sweep; compare writes it again
            log.warning("the sweep's HParams experiment was not written (%s); compare writes it at the end", err)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        if rank_zero_only.rank != 0:  # a DDP trainer's other ranks run the multirun too: rank 0 compares it
            return
        sweep_dir = Path(config.hydra.sweep.dir)
        jobs: list[Job] = []
        try:
            jobs = load_sweep(sweep_dir)
            print(report(sweep_dir, jobs))
        except Exception as err:  # the jobs' results are safe on disk; a failed report must not fail the sweep
            log.error(
                "compare failed (%s); retry with: %s -m fcexp.compare %s", err, shell_program("python"), sweep_dir
            )
        print(f"view it: {shell_program('tensorboard')} --logdir {shlex.quote(str(sweep_dir))}")
        failed = sum(job.status == "failed" for job in jobs)
        if failed:
            # SystemExit passes Hydra's callback guard (it catches Exception); this callback is the last to end.
            print(
                f"error: {failed} of {len(jobs)} jobs failed; their errors are in {sweep_dir / TABLE}", file=sys.stderr
            )
            sys.exit(1)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m fcexp.compare", description=__doc__.splitlines()[0])
    parser.add_argument("sweep_dir", type=Path, help="a sweep folder, e.g. runs/sweeps/2026-11-29_01-55-26")
    args = parser.parse_args(argv)
    try:
        print(report(args.sweep_dir))
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
