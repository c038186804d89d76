"""Races: a packed sweep that stops the configurations its records show worse at rungs (epochs), so that the rest
train on in smaller, cheaper packs (`+launcher=race`, README "Races").

At each rung every configuration still running is compared with the best one on its best validation accuracy up
to that epoch, by compare's statistics (fcexp.stats.versus_best): with replicates, a paired t test over seeds per
configuration (moderated from 10 comparisons with the best on, then Tukey-adjusted; else Holm-adjusted over
the comparisons); a configuration worse at adjusted p below `level` stops, all its seeds together.
Without replicates there is nothing to test: successive halving keeps the best `keep` share by rank, and says that
such a ranking carries no intervals; `rule=halving` ranks so even with replicates (by the mean over seeds), for a
user who would rather have the speed than the evidence. The decisions are read from the runs' records, so a race rerun
(`skip_finished=true`) makes the same ones from the same numbers.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fcexp.compare import Job, swept_knobs
from fcexp.stats import Difference, versus_best

STOPPED = "stopped"


RULES = ("test", "halving")


@dataclass(frozen=True)
class Race:
    """`rungs`: the epochs after which the race decides (those at or past a run's last epoch are its end); `level`:
    the adjusted p below which a configuration stops; `keep`: the share successive halving keeps; `rule`:
    `test` (the paired t test where there are replicates, successive halving where there are none) or `halving`
    (successive halving by the mean over seeds even with replicates: faster, and without evidence)."""

    rungs: tuple[int, ...] = (1, 2)
    level: float = 0.05
    keep: float = 0.5
    rule: str = "test"

    @classmethod
    def of(cls, conf: Any) -> Race:
        """The race `hydra.launcher.race` describes (PackedLauncherConf.race), checked."""
        return cls(tuple(conf.rungs), conf.level, conf.keep, conf.rule)

    def __post_init__(self):
        rungs = list(self.rungs)
        if not rungs or any(not isinstance(r, int) or isinstance(r, bool) or r < 1 for r in rungs):
            raise ValueError(f"hydra.launcher.race.rungs must be a list of epochs >= 1, got {rungs}")
        if rungs != sorted(set(rungs)):
            raise ValueError(f"hydra.launcher.race.rungs must increase, got {rungs}")
        if not 0 < self.level < 1:
            raise ValueError(f"hydra.launcher.race.level must be in (0, 1), got {self.level}")
        if not 0 < self.keep < 1:
            raise ValueError(f"hydra.launcher.race.keep must be in (0, 1), got {self.keep}")
        if self.rule not in RULES:
            raise ValueError(f"hydra.launcher.race.rule must be one of {', '.join(RULES)}, got {self.rule!r}")
        object.__setattr__(self, "rungs", tuple(rungs))


def best_until(job: Job, rung: int) -> float | None:
    """A run's best validation accuracy over its first `rung` epochs; None before it has trained them."""
    curve = [acc for epoch, acc in job.val_curve if epoch <= rung]
    return max(curve) if len(curve) == rung else None


def label(hparams: dict[str, Any], keys: Sequence[str]) -> str:
    return ",".join(f"{k}={hparams.get(k)}" for k in keys) or "the one configuration"


def racing(job: Job, rung: int) -> bool:
    """Whether `job` was still in the race at `rung`: not failed, and not stopped at an earlier rung."""
    if job.status in ("failed", "unreadable", "no record"):
        return False
    stopped = job.stopped
    return stopped is None or stopped["rung"] >= rung


def decide(jobs: list[Job], rung: int, race: Race) -> dict[Path, dict[str, Any]]:
    """The runs to stop at `rung`, each with the evidence: its configuration, the one it lost to, the difference of
    their mean best validation accuracies with its interval and adjusted p (with replicates) or its rank (without)."""
    jobs = [j for j in jobs if racing(j, rung) and best_until(j, rung) is not None]
    keys = [k for k in swept_knobs(jobs) if k != "seed"]
    configs: dict[str, dict[int, float]] = {}
    runs: dict[str, list[Job]] = {}
    for i, job in enumerate(jobs):
        name = label(job.hparams, keys)
        configs.setdefault(name, {})[job.hparams.get("seed", i)] = best_until(job, rung)
        runs.setdefault(name, []).append(job)
    if len(configs) < 2:
        return {}
    ranked = sorted(configs, key=lambda c: -math.fsum(configs[c].values()) / len(configs[c]))
    best, others = ranked[0], ranked[1:]
    common = {"rung": rung, "metric": f"best val/acc over epochs 1-{rung}", "lost_to": best}
    stops: dict[str, dict[str, Any]] = {}
    replicated = all(len(seeds) >= 2 for seeds in configs.values())
    if race.rule == "test" and replicated:
        diffs = versus_best(configs[best], [configs[c] for c in others])
        for name, diff in zip(others, diffs, strict=True):
            if diff.p_adj is not None and diff.p_adj < race.level and diff.delta < 0:
                stops[name] = common | {
                    "rule": f"{diff.test} t test over seeds, {adjustment(diff, len(others))}, level {race.level}",
                    "difference": diff.delta,
                    "interval": [diff.low, diff.high],
                    "p_adj": diff.p_adj,
                    "adjusted_by": diff.adjusted_by,
                }
    else:
        kept = max(1, math.ceil(race.keep * len(ranked)))
        why = "by their mean over seeds (rule=halving)" if replicated else "single runs"
        for rank, name in enumerate(ranked[kept:], kept + 1):
            mean = math.fsum(configs[name].values()) / len(configs[name])
            stops[name] = common | {
                "rule": f"successive halving: kept the best {kept} of {len(ranked)} by rank; {why}, so this "
                "ranking carries no intervals",
                "difference": mean - math.fsum(configs[best].values()) / len(configs[best]),
                "rank": rank,
            }
    return {
        job.folder: {"configuration": name, **evidence, "reason": reason(evidence)}
        for name, evidence in stops.items()
        for job in runs[name]
    }


def adjustment(diff: Difference, comparisons: int) -> str:
    if diff.adjusted_by == "Tukey":
        return f"Tukey-adjusted (the studentized range of {comparisons + 1} configurations)"
    return f"Holm-adjusted over {comparisons} comparisons"


def reason(evidence: dict[str, Any]) -> str:
    """Why a run stopped, in a line: what compare shows in its error column."""
    if "p_adj" in evidence:
        low, high = evidence["interval"]
        p = f"{evidence['adjusted_by']} p = {evidence['p_adj']:.2g}"
        why = f"{evidence['difference']:+.4f} [{low:+.4f}, {high:+.4f}], {p}"
    else:
        why = f"rank {evidence['rank']}, {evidence['difference']:+.4f}; a ranking without intervals"
    return f"stopped at epoch {evidence['rung']}: worse than {evidence['lost_to']} ({why})"
