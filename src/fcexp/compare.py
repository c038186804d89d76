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
import shlex
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra._internal.config_loader_impl import get_overrides_dirname
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException
from hydra.experimental.callback import Callback
from matplotlib.figure import Figure  # the object API needs no backend or display: PNGs on any machine
from omegaconf import DictConfig, OmegaConf

from fcexp.record import RECORD, RunRecord, fcexp_command, flat_hparams, shell_program

log = logging.getLogger("fcexp")

TABLE, CSV, CURVES, BY_KNOB = "compare.md", "compare.csv", "val_acc_curves.png", "acc_by_knob.png"
MULTIRUN = "multirun.yaml"  # the sweep's config, written by Hydra before its first job
BASIC_SWEEPER = f"{BasicSweeper.__module__}.{BasicSweeper.__name__}"  # its `_target_` in multirun.yaml
# Finished jobs first, best validation accuracy first among them; then what may still finish; then what never will.
STATUS_ORDER = {"completed": 0, "running": 1, "interrupted": 2, "failed": 3, "no record": 4}
# Overrides that say how a sweep ran, not what a job trained: left out of the rerun command.
NOT_THE_JOB = {"hydra/launcher", "hydra/sweeper", "launcher", "threads", "skip_finished", "resume"}
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

    def rerun_command(self) -> str:
        kept = [
            o
            for o in self.overrides
            if not _override_key(o).startswith("hydra.") and _override_key(o) not in NOT_THE_JOB
        ]
        return fcexp_command(*kept)


def _override_key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


def load_job(folder: Path) -> Job:
    """A job from its metrics.json; one that has not written it yet from the config Hydra saved when it started."""
    record = RunRecord.load(folder)
    if record is not None:
        return Job(
            folder,
            record["status"],
            record["hparams"],
            record["overrides"],
            record["history"],
            record["metrics"],
            record["wall_time_s"],
            record.get("error"),
            (record.get("provenance") or {}).get("git"),
        )
    job = Job(folder, "no record")
    hydra_dir = folder / ".hydra"
    if (hydra_dir / "config.yaml").is_file():
        job.hparams = flat_hparams(OmegaConf.load(hydra_dir / "config.yaml"))
    if (hydra_dir / "overrides.yaml").is_file():
        job.overrides = list(OmegaConf.load(hydra_dir / "overrides.yaml"))
    return job


def unstarted_jobs(sweep_dir: Path, started: list[Job]) -> list[Job]:
    """The jobs an interrupted sweep planned (multirun.yaml) but never started, so never gave a folder.

    Hydra's basic sweeper plans every job up front (the product of the swept values); other sweepers (Optuna) choose
    each job from the results so far, so nothing beyond their started jobs can be known.
    """
    if not (sweep_dir / MULTIRUN).is_file():
        return []
    hydra_cfg = OmegaConf.load(sweep_dir / MULTIRUN).hydra
    if hydra_cfg.sweeper._target_ != BASIC_SWEEPER:
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
        return frozenset(o for o in overrides if _override_key(o) not in exclude)

    seen = {identity(job.overrides) for job in started}
    # Only knobs the started jobs record as hparams: an override like callbacks.progress.refresh_rate is not one.
    known = {k for job in started for k in job.hparams}
    jobs = []
    for overrides in plan:
        if identity(overrides) in seen:
            continue
        parsed = parser.parse_overrides(overrides)
        folder = get_overrides_dirname(parsed, exclude, naming.item_sep, naming.kv_sep)  # as conf/train.yaml names it
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
    folders = [p for p in sweep_dir.iterdir() if p.is_dir() and ((p / RECORD).is_file() or (p / ".hydra").is_dir())]
    jobs = [load_job(p) for p in folders]
    jobs += unstarted_jobs(sweep_dir, jobs)
    if not jobs:
        raise ValueError(
            f"{str(sweep_dir)!r} holds no jobs (subfolders with {RECORD} or .hydra/); give a folder under runs/sweeps/"
        )
    return sorted(jobs, key=lambda j: (STATUS_ORDER.get(j.status, 5), -(j.val_best or 0.0), j.folder.name))


def swept_knobs(jobs: list[Job]) -> list[str]:
    """The hyperparameters whose values differ between jobs: the table's columns and the plots' panels."""
    keys = dict.fromkeys(k for job in jobs for k in job.hparams)
    # A job that never started knows only the knobs its overrides set: a key it lacks is unknown, not None.
    return [
        k
        for k in keys
        if len({repr(job.hparams.get(k)) for job in jobs if job.hparams and (job.started or k in job.hparams)}) > 1
    ]


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
            str(len(job.val_curve)),
            _fmt(job.wall_time_s, 1),
            job.status,
        ]
        for rank, job in enumerate(jobs, 1)
    ]
    return header, rows


def format_table(header: list[str], rows: list[list[str]], markdown: bool = False) -> str:
    if markdown:
        return "\n".join("| " + " | ".join(row) + " |" for row in [header, ["---"] * len(header), *rows])
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in [header, *rows]
    )


def _label(job: Job, knobs: list[str]) -> str:
    return ", ".join(f"{k.rsplit('.', 1)[-1]}={_fmt(job.hparams.get(k))}" for k in knobs) or job.folder.name


def plot_curves(jobs: list[Job], knobs: list[str], path: Path) -> None:
    """Validation accuracy per epoch, a line per job: the best few named, the rest grey, the legend beside the axes."""
    ranked = [(rank, job) for rank, job in enumerate(jobs, 1) if job.val_curve]
    fig = Figure(figsize=(12, 5.5), layout="constrained")
    ax = fig.add_subplot()
    # Drawn in rank order so the legend reads best first; the best lies on top.
    for i, (rank, job) in enumerate(ranked[:HIGHLIGHTED]):
        epochs, accs = zip(*job.val_curve, strict=True)
        label = f"{rank}. {_label(job, knobs)}"
        ax.plot(epochs, accs, color=f"C{i}", lw=2, marker="o", ms=4, zorder=3 + HIGHLIGHTED - i, label=label)
    others = ranked[HIGHLIGHTED:]
    for i, (_, job) in enumerate(others):
        epochs, accs = zip(*job.val_curve, strict=True)
        label = f"{len(others)} other jobs" if i == 0 else None
        ax.plot(epochs, accs, color="0.75", lw=0.8, marker=".", zorder=1, label=label)
    points = sorted(acc for _, job in ranked for _, acc in job.val_curve)
    # Diverged jobs sit near chance (0.1); showing them in full would flatten the differences that matter.
    low = points[len(points) // 10]
    ax.set_ylim(max(0.0, low - 0.02), min(1.0, points[-1] + 0.01))
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small", title="rank. swept knobs")
    last_epoch = max(epoch for _, job in ranked for epoch, _ in job.val_curve)
    ax.set_xticks(range(1, last_epoch + 1, max(1, last_epoch // 10)))  # whole epochs, even for one
    ax.set_xlim(0.8, last_epoch + 0.2)
    ax.set_xlabel("epoch")
    ax.set_ylabel("validation accuracy")
    ax.grid(alpha=0.3)
    ax.set_title(f"{path.parent.name}: validation accuracy of {len(ranked)} jobs")
    fig.savefig(path, dpi=110)


def _sort_values(values: list[Any]) -> list[Any]:
    numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
    return sorted(values) if numeric else sorted(values, key=str)


def plot_by_knob(jobs: list[Job], knobs: list[str], path: Path) -> None:
    """Test accuracy grouped by each swept knob: every job a dot, the mean and its spread over the other knobs a bar."""
    done = [job for job in jobs if job.test is not None]
    cols = min(len(knobs), 3)
    rows = math.ceil(len(knobs) / cols)
    # At least 9 inches wide: the title must fit even when a single knob was swept.
    fig = Figure(figsize=(max(4.5 * cols, 9), 3.8 * rows), layout="constrained")
    for i, knob in enumerate(knobs):
        ax = fig.add_subplot(rows, cols, i + 1)
        groups: dict[Any, list[float]] = {}
        for job in done:
            groups.setdefault(job.hparams.get(knob), []).append(job.test)
        values = _sort_values(list(groups))
        numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
        if numeric and len(values) > 6:
            # A continuous knob (an Optuna search's learning rate): a scatter on its own scale, no groups.
            ax.scatter([job.hparams[knob] for job in done], [job.test for job in done], s=14, color="C0")
            if min(values) > 0 and max(values) / min(values) >= 20:
                ax.set_xscale("log")
        else:
            for x, value in enumerate(values):
                accs = groups[value]
                offsets = [(j - (len(accs) - 1) / 2) * 0.25 / max(len(accs), 1) for j in range(len(accs))]
                ax.scatter([x + o for o in offsets], accs, s=10, color="0.6", zorder=2)
                spread = statistics.pstdev(accs) if len(accs) > 1 else 0.0
                ax.errorbar(x, statistics.fmean(accs), yerr=spread, fmt="o", color="C3", ms=7, capsize=5, zorder=3)
            ax.set_xticks(range(len(values)), [_fmt(v) for v in values], rotation=20 if len(values) > 4 else 0)
            ax.set_xlim(-0.5, len(values) - 0.5)
        ax.set_title(knob)
        ax.grid(alpha=0.3)
        if i % cols == 0:
            ax.set_ylabel("test accuracy")
    fig.suptitle(f"{path.parent.name}: test accuracy by swept knob (red: mean ± std over the other knobs)")
    fig.savefig(path, dpi=110)


def report(sweep_dir: Path) -> str:
    """Write the sweep's table (Markdown, CSV) and plots into its folder; return the text to print."""
    sweep_dir = Path(sweep_dir)
    jobs = load_sweep(sweep_dir)
    knobs = swept_knobs(jobs)
    header, rows = table_rows(jobs, knobs)
    with open(sweep_dir / CSV, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow([*header, "error", "folder"])
        writer.writerows([*row, job.error or "", job.folder.name] for row, job in zip(rows, jobs, strict=True))
    counts = {s: sum(j.status == s for j in jobs) for s in STATUS_ORDER if any(j.status == s for j in jobs)}
    lines = [
        f"{len(jobs)} job{'s' * (len(jobs) != 1)} in {sweep_dir}: " + ", ".join(f"{n} {s}" for s, n in counts.items())
    ]
    lines += [f"{job.status}: {job.folder.name}: {job.error}" for job in jobs if job.error]
    best = jobs[0] if jobs[0].status == "completed" else None
    if best:
        lines.append(
            f"best: {_label(best, knobs)} (val acc {best.val_best:.4f}, test acc {_fmt(best.test, 4)}) in {best.folder}"
        )
        lines.append(f"rerun it: {best.rerun_command()}")
    else:
        lines.append("best: none yet (no job has completed)")
    (sweep_dir / TABLE).write_text(
        f"# {sweep_dir.name}\n\n{format_table(header, rows, markdown=True)}\n\n" + "\n\n".join(lines[1:]) + "\n"
    )
    if any(job.val_curve for job in jobs):
        plot_curves(jobs, knobs, sweep_dir / CURVES)
    if knobs and any(job.test is not None for job in jobs):
        plot_by_knob(jobs, knobs, sweep_dir / BY_KNOB)
    written = [str(sweep_dir / name) for name in (TABLE, CSV, CURVES, BY_KNOB) if (sweep_dir / name).is_file()]
    lines.append("wrote " + ", ".join(written))
    return "\n".join([format_table(header, rows), "", *lines])


class CompareAtEnd(Callback):
    """At the end of a multirun: the comparison of its jobs, and the TensorBoard command that shows them all."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        try:
            print(report(sweep_dir))
        except Exception as err:  # the jobs' results are safe on disk; a failed report must not fail the sweep
            log.error(
                "compare failed (%s); retry with: %s -m fcexp.compare %s", err, shell_program("python"), sweep_dir
            )
        print(f"view it: {shell_program('tensorboard')} --logdir {shlex.quote(str(sweep_dir))}")


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
