"""How sure a comparison is: mean accuracies over seeds with their intervals, and each configuration's difference
from the best.

A configuration is every knob but the seed; its replicates are its runs over seeds. The interval of a mean accuracy
is a t interval of the mean logit, mapped back: an accuracy lives in [0, 1] and its spread shrinks near 1, so a t
interval on the accuracies themselves (symmetric, from 2 or 3 seeds with t = 12.7 or 4.3) runs past 1.0; on the logit
scale it cannot, and near 1 it is skewed downwards as the accuracies are. Differences from the best are
tested with a paired t test where both have the same seeds (the seed fixes init, batch order and dropout masks, so
pairing removes that shared noise) and Welch's t test otherwise; where many configurations are paired with the best,
their paired tests are moderated (versus_best). The p values of the comparisons with the best are adjusted with
Holm's step-down method, which keeps the chance of calling any tie a difference under 5%, or for moderated tests by
the studentized range (Tukey's), which also allows for the best having been picked from the same numbers
(versus_best says how far that holds).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

from scipy import optimize, special, stats

CONFIDENCE = 0.95
ALPHA = 1 - CONFIDENCE
# How an accuracy's interval is made, for the tables' notes and the plots' titles.
INTERVAL = f"{CONFIDENCE:.0%} t interval of the mean logit, mapped back to [0, 1]"
# An accuracy of exactly 0 or 1 has no logit: it counts as this far inside, which widens its interval, as so few
# seeds should.
EDGE = 1e-6


@dataclass(frozen=True)
class Interval:
    """Mean and standard deviation of n accuracies, and the interval of their mean (`INTERVAL`; none below n = 2)."""

    n: int
    mean: float
    sd: float | None
    low: float | None
    high: float | None

    def __str__(self) -> str:
        if self.low is None:
            return f"{self.mean:.4f}"
        return f"{self.mean:.4f} [{self.low:.4f}, {self.high:.4f}]"


def _t_interval(values: Sequence[float]) -> tuple[float, float]:
    n = len(values)
    low, high = stats.t.interval(
        CONFIDENCE, n - 1, loc=statistics.fmean(values), scale=statistics.stdev(values) / n**0.5
    )
    return float(low), float(high)


def interval(values: Sequence[float]) -> Interval:
    """The mean of any values with its 95% t interval (a loss, a gradient ratio's logarithm, seconds)."""
    n, mean = len(values), statistics.fmean(values)
    if n < 2:
        return Interval(n, mean, None, None, None)
    sd = statistics.stdev(values)
    return Interval(n, mean, sd, mean, mean) if sd == 0 else Interval(n, mean, sd, *_t_interval(values))


def accuracy_interval(accuracies: Sequence[float]) -> Interval:
    """The mean of accuracies (each in [0, 1]) with its interval (`INTERVAL`), which stays inside (0, 1)."""
    outside = [a for a in accuracies if not 0 <= a <= 1]
    if outside:
        raise ValueError(f"an accuracy must be in [0, 1], got {outside[0]!r}")
    plain = interval(accuracies)
    if plain.low is None or plain.sd == 0:
        return plain
    low, high = _t_interval(special.logit([min(max(a, EDGE), 1 - EDGE) for a in accuracies]))
    return Interval(plain.n, plain.mean, plain.sd, float(special.expit(low)), float(special.expit(high)))


@dataclass(frozen=True)
class Difference:
    """`other - best`, its 95% interval, the test that gave it and its p value before and after the adjustment for
    the comparisons made beside it (`adjusted_by`: Holm's, or Tukey's for moderated tests; versus_best)."""

    delta: float
    low: float | None
    high: float | None
    test: str  # "paired", "moderated paired" (versus_best) or "Welch"; "" when either side has a single run
    p: float | None
    p_adj: float | None = None
    adjusted_by: str = ""  # "Holm" or "Tukey"

    @property
    def significant(self) -> bool | None:
        return None if self.p_adj is None else self.p_adj < ALPHA


def difference(best: Mapping[int, float], other: Mapping[int, float]) -> Difference:
    """`other` minus `best`, both keyed by seed."""
    delta = statistics.fmean(other.values()) - statistics.fmean(best.values())
    if len(best) < 2 or len(other) < 2:
        return Difference(delta, None, None, "", None)
    if set(best) == set(other):
        seeds = sorted(best)
        diffs = [other[s] - best[s] for s in seeds]
        if statistics.pstdev(diffs) == 0:  # identical runs: no noise left to test against
            return Difference(delta, delta, delta, "paired", 1.0 if delta == 0 else 0.0)
        result = stats.ttest_rel([other[s] for s in seeds], [best[s] for s in seeds])
        test = "paired"
    else:
        result = stats.ttest_ind(list(other.values()), list(best.values()), equal_var=False)
        test = "Welch"
    ci = result.confidence_interval(CONFIDENCE)
    return Difference(delta, float(ci.low), float(ci.high), test, float(result.pvalue))


def holm(differences: list[Difference]) -> list[Difference]:
    """The same differences with Holm-adjusted p values: the i-th smallest of m is multiplied by m - i, then made
    non-decreasing, so that all the comparisons together wrongly call a difference at most 5% of the time."""
    tested = sorted((d.p, i) for i, d in enumerate(differences) if d.p is not None)
    adjusted: dict[int, float] = {}
    running = 0.0
    for rank, (p, i) in enumerate(tested):
        running = max(running, min(1.0, p * (len(tested) - rank)))
        adjusted[i] = running
    return [
        replace(d, p_adj=adjusted[i], adjusted_by="Holm") if d.p is not None else d for i, d in enumerate(differences)
    ]


# From this many paired comparisons on, versus_best moderates their variances: with fewer, the spread of the
# variances says too little about their common size.
MODERATE_FROM = 10


def _trigamma_inverse(x: float) -> float:
    """The y > 0 whose trigamma is x (trigamma falls from infinity to 0 on (0, infinity))."""
    return optimize.brentq(lambda y: special.polygamma(1, y) - x, 1e-8, 1e8)


def prior(variances: Sequence[float], df: int) -> tuple[float, float]:
    """The prior of many variances that each have `df` degrees of freedom (Smyth 2004, limma's fitFDist): its
    degrees of freedom d0 and its value s0^2, from the mean and the spread of their logarithms. When the logarithms
    spread no more than sampling alone makes them, the variances are one variance: d0 is then all their degrees of
    freedom together and s0^2 their mean."""
    e = [math.log(v) - special.digamma(df / 2) + math.log(df / 2) for v in variances]
    excess = statistics.variance(e) - special.polygamma(1, df / 2)
    if excess <= 0:
        return len(variances) * df, statistics.fmean(variances)
    d0 = min(2 * _trigamma_inverse(excess), len(variances) * df)
    return d0, math.exp(statistics.fmean(e) + special.digamma(d0 / 2) - math.log(d0 / 2))


def versus_best(best: Mapping[int, float], others: Sequence[Mapping[int, float]]) -> list[Difference]:
    """Each of `others` minus `best` (all keyed by seed), adjusted for the comparisons made beside it.

    Where at least MODERATE_FROM of them are paired with the best over the same seeds, their t tests are moderated
    (Smyth 2004, as limma tests thousands of genes on three replicates). Each configuration's own variance over
    seeds is its residual in a fit of configuration plus seed (what pairing by seed leaves), and it is shrunk toward
    the prior that all of them show (`prior`); a comparison's variance is its two configurations' moderated ones,
    and its t test gains the prior's degrees of freedom. With 3 seeds a plain paired t test has 2, and Holm over
    dozens of comparisons then calls a difference only at about 20 times its seed spread; the moderated variance
    borrows from the other configurations where they agree and stays each one's own where they do not. The
    variances are the configurations' own, not each difference's with the best: those would all hold the best's
    noise, and a prior fitted to them as if independent overstated its degrees of freedom (12 equal configurations:
    at least one called worse in 14% of simulated draws). So much power makes it matter that the best was picked
    from the same numbers: a moderated comparison's p is therefore adjusted by the studentized range over all the
    configurations (Tukey's), which covers the comparison of any two of them, the best among them. Simulated over 3
    seeds (README, Races, False stops), 12 and 16 equal configurations have any one called worse in 7% and 5.5% of
    draws with equal seed spreads, 10% with spreads that differ threefold: somewhat over 5%, as the prior is fitted
    to the same seeds. The others are Holm-adjusted over all the comparisons, as before. Each interval is its
    comparison's own 95% t interval, not a simultaneous one."""
    plain = holm([difference(best, other) for other in others])
    seeds = sorted(best)
    paired = [i for i, d in enumerate(plain) if d.test == "paired"]
    if len(paired) < MODERATE_FROM:
        return plain
    table = [best, *(others[i] for i in paired)]
    n, configurations = len(seeds), len(others) + 1
    rows = [statistics.fmean(t[s] for s in seeds) for t in table]
    columns = [statistics.fmean(t[s] for t in table) for s in seeds]
    grand = statistics.fmean(rows)
    # A residual gives up a share 1/k of its configuration's variance to the seeds' means; k/(k-1) restores it.
    scale = len(table) / (len(table) - 1)
    variances = [
        scale
        * math.fsum((t[s] - row - column + grand) ** 2 for s, column in zip(seeds, columns, strict=True))
        / (n - 1)
        for t, row in zip(table, rows, strict=True)
    ]
    if sum(v > 0 for v in variances) < MODERATE_FROM:  # no spread left to learn a prior from: identical runs
        return plain
    d0, s0 = prior([v for v in variances if v > 0], n - 1)
    df = d0 + n - 1
    moderated_variances = [(d0 * s0 + (n - 1) * v) / df for v in variances]
    moderated = list(plain)
    for j, i in enumerate(paired, 1):  # the best is the table's row 0
        se = math.sqrt((moderated_variances[0] + moderated_variances[j]) / n)
        delta = plain[i].delta
        half = stats.t.ppf(1 - ALPHA / 2, df) * se
        t = abs(delta) / se
        moderated[i] = replace(
            plain[i],
            low=delta - half,
            high=delta + half,
            test="moderated paired",
            p=float(2 * stats.t.sf(t, df)),
            p_adj=float(min(1.0, stats.studentized_range.sf(t * math.sqrt(2), configurations, df))),
            adjusted_by="Tukey",
        )
    return moderated
