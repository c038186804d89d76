"""compare on sweep folders written here, as the jobs and Hydra write them: no training, so each test takes a blink."""

from __future__ import annotations

import csv
import json
import random
from pathlib import Path

import pytest
from conftest import printed
from omegaconf import OmegaConf
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import plugin_data_pb2

from fcexp import compare, stats
from fcexp.stats import INTERVAL, accuracy_interval, interval

OPTUNA = "hydra_plugins.hydra_optuna_sweeper.optuna_sweeper.OptunaSweeper"
HPARAMS = {"data.batch_size": 128, "model.batch_norm": False, "model.hidden": "[512, 512]", "trainer.max_epochs": 1}


def write_job(folder: Path, overrides: list[str], val: float, test: float, threads: int = 2, cwd: str = "/start"):
    """A completed job's folder with its metrics.json: the overrides' values are its hparams."""
    folder.mkdir(parents=True)
    hparams = {"activation": "relu", "model.dropout": 0.0, "seed": 0, **HPARAMS}
    hparams |= {k.lstrip("+"): json.loads(v) if v[0].isdigit() else v for k, v in (o.split("=") for o in overrides)}
    record = {
        "status": "completed",
        "overrides": overrides,
        "hparams": hparams,
        "history": [{"epoch": 0, "step": 16, "val/acc": val}],
        "metrics": {"val/acc_best": val, "val/acc": val, "test/acc": test, "test/loss": 0.3},
        "wall_time_s": 1.5,
        "provenance": {"cwd": cwd, "git": None, "device": {"cpu": "x", "threads": threads}},
    }
    (folder / "metrics.json").write_text(json.dumps(record))


def write_multirun(sweep: Path, task: list[str], sweeper: str = compare.BASIC_SWEEPER, cwd: str = "/start"):
    """The sweep's multirun.yaml, as far as compare reads it."""
    naming = {"kv_sep": "=", "item_sep": ",", "exclude_keys": ["launcher", "threads"]}
    hydra = {
        "sweeper": {"_target_": sweeper, "params": {}},
        "overrides": {"task": task, "hydra": ["hydra.mode=MULTIRUN"]},
        "runtime": {"cwd": cwd},
        "job": {"config": {"override_dirname": naming}},
    }
    OmegaConf.save({"hydra": hydra}, sweep / "multirun.yaml")


def grid(tmp_path: Path, extra: tuple[str, ...] = (), threads: int = 2, cwd: str = "/start") -> Path:
    """A finished 2 x 2 sweep of activation and dropout, one seed each, started in `cwd` with `extra` overrides."""
    sweep = tmp_path / "runs" / "sweeps" / "2026-12-01_10-00-00"
    accuracies = {("relu", "0"): 0.95, ("relu", "0.2"): 0.96, ("tanh", "0"): 0.93, ("tanh", "0.2"): 0.94}
    for (activation, dropout), acc in accuracies.items():
        overrides = [f"activation={activation}", f"model.dropout={dropout}", *extra]
        folder = sweep / f"activation={activation},model.dropout={dropout}"
        write_job(folder, overrides, acc, acc - 0.01, threads=threads, cwd=cwd)
    write_multirun(sweep, ["activation=relu,tanh", "model.dropout=0,0.2", *extra], cwd=cwd)
    return sweep


@pytest.mark.parametrize(
    "damage, reason",
    [
        ('{"status": "completed", "error": "a\x01b"}', "Invalid control character at: line 1 column 36 (char 35)"),
        ('{"status": "complet', "Unterminated string starting at: line 1 column 12 (char 11)"),
        ("[1, 2]", "a JSON list where a run record (an object) is expected"),
        ('{"status": "completed", "hparams": 3}', "'hparams' is 3, expected a JSON object"),
    ],
)
def test_a_damaged_record_is_listed_unreadable_and_the_rest_compared(tmp_path, capsys, damage, reason):
    sweep = grid(tmp_path)
    damaged = sweep / "activation=relu,model.dropout=0.2"
    (damaged / "metrics.json").write_text(damage)
    compare.main([str(sweep)])
    out = capsys.readouterr().out
    assert "4 jobs in" in out and "3 completed, 1 unreadable" in out
    line = f"unreadable: {damaged.name}/metrics.json: {reason}"
    assert line in out.splitlines() and line in (sweep / compare.TABLE).read_text().splitlines()
    with open(sweep / compare.CSV) as f:
        rows = list(csv.DictReader(f))
    assert [(r["folder"], r["status"]) for r in rows][-1] == (damaged.name, "unreadable")
    assert rows[-1]["error"] == reason and float(rows[0]["val_acc_best"]) == 0.95  # the rest ranked
    assert "best: activation=relu, dropout=0 (val acc 0.9500" in out
    assert (sweep / compare.BY_KNOB).is_file() and (sweep / compare.CURVES).is_file()
    # The same at the end of a multirun, where Hydra hands the callback the sweep's config.
    compare.CompareAtEnd().on_multirun_end(OmegaConf.create({"hydra": {"sweep": {"dir": str(sweep)}}}))
    assert line in capsys.readouterr().out.splitlines()


def test_accuracy_intervals_stay_within_0_1_and_configs_csv_holds_numbers(tmp_path):
    # Two seeds 0.05 apart near 1: a t interval on the accuracies runs to 1.24.
    assert interval([0.90, 0.95]).high == pytest.approx(1.2427, abs=1e-4)
    assert accuracy_interval([0.90, 0.95]).high == pytest.approx(0.99934, abs=1e-5)
    assert accuracy_interval([0.5]).low is None and accuracy_interval([1.0, 1.0]).high == 1.0
    with pytest.raises(ValueError, match=r"an accuracy must be in \[0, 1\], got 1.2"):
        accuracy_interval([0.9, 1.2])
    sweep = tmp_path / "sweep"
    for activation, accuracies in (("relu", (0.97, 0.99)), ("tanh", (0.80, 0.95))):
        for seed, acc in enumerate(accuracies):
            write_job(
                sweep / f"activation={activation},seed={seed}", [f"activation={activation}", f"seed={seed}"], acc, acc
            )
    text = compare.report(sweep)
    with open(sweep / compare.CONFIGS_CSV) as f:
        rows = list(csv.DictReader(f))
    assert [r["activation"] for r in rows] == ["relu", "tanh"]
    for row in rows:
        for metric in ("val_acc", "test_acc"):
            low, mean, high = (float(row[f"{metric}_{part}"]) for part in ("low", "mean", "high"))
            assert 0 <= low <= mean <= high <= 1
    tanh = rows[1]
    assert float(tanh["val_acc_mean"]) == pytest.approx(0.875) and float(tanh["val_acc_sd"]) > 0
    assert float(tanh["diff"]) == pytest.approx(-0.105) and float(tanh["diff_low"]) < float(tanh["diff_high"])
    assert tanh["test"] == "paired" and 0 < float(tanh["p"]) <= float(tanh["p_adj"]) <= 1
    assert rows[0]["diff"] == "" and rows[0]["verdict"] == "best"
    assert INTERVAL in text and INTERVAL in (sweep / compare.TABLE).read_text()


@pytest.mark.parametrize("sweeper, more", [(compare.BASIC_SWEEPER, "seed=0,1,2"), (OPTUNA, "replicates=3")])
def test_a_single_seed_sweep_is_told_how_to_replicate_it(tmp_path, capsys, sweeper, more):
    sweep = grid(tmp_path)
    write_multirun(
        sweep, ["+hparams_search=optuna", "model.l2=0"] if sweeper == OPTUNA else ["activation=relu,tanh"], sweeper
    )
    compare.main([str(sweep)])
    command = printed(capsys.readouterr().out, "replicate it with")
    assert command.endswith(
        f"-m {'+hparams_search=optuna model.l2=0' if sweeper == OPTUNA else 'activation=relu,tanh'} {more}"
    )
    assert ("seed=" in command) == (sweeper == compare.BASIC_SWEEPER)  # a searched seed is no replicate


@pytest.mark.parametrize(
    "launcher, kept",
    [
        ("+launcher=parallel", False),
        ("+launcher=packed", False),
        ("+launcher=slurm", False),
        ("+launcher=slurm_ddp", True),
    ],
)
def test_a_rerun_carries_the_threads_its_job_trained_with(tmp_path, capsys, launcher, kept):
    sweep = grid(tmp_path, (launcher, "threads=3"), threads=1)  # threads=3: what it asked; 1: what it got
    compare.main([str(sweep)])
    out = capsys.readouterr().out
    rerun = printed(out, "rerun it")
    assert rerun.endswith("-m fcexp.train activation=relu model.dropout=0.2" + f" {launcher}" * kept + " threads=1")
    assert ("trained in a pack" in out) == (launcher == "+launcher=packed")


def test_compare_md_reads_the_same_from_any_directory(tmp_path, monkeypatch):
    sweep = grid(tmp_path, cwd=str(tmp_path))
    texts = []
    for here, name in ((tmp_path, "runs/sweeps/2026-12-01_10-00-00"), (sweep.parent, sweep.name), (sweep, ".")):
        monkeypatch.chdir(here)
        compare.main([name])
        texts.append((sweep / compare.TABLE).read_bytes())
    assert texts[0] == texts[1] == texts[2]
    notes = texts[0].decode()
    assert notes.startswith("# 2026-12-01_10-00-00\n")
    assert f"Commands run from {tmp_path}." in notes  # multirun.yaml's hydra.runtime.cwd
    assert "best: activation=relu, dropout=0.2 (val acc 0.9600, test acc 0.9500) in activation=relu," in notes


def read_experiment(sweep: Path) -> tuple[list[tuple[str, bool]], list[str]]:
    events = EventAccumulator(str(sweep))  # the sweep folder's own run, not its jobs'
    events.Reload()
    content = events.PluginTagToContent("hparams")["_hparams_/experiment"]
    experiment = plugin_data_pb2.HParamsPluginData.FromString(content).experiment
    return [(h.name, h.differs) for h in experiment.hparam_infos], [m.name.tag for m in experiment.metric_infos]


def test_tensorboard_is_told_the_sweeps_knobs_first(tmp_path):
    sweep = grid(tmp_path)
    compare.report(sweep)
    hparams, metrics = read_experiment(sweep)
    assert hparams[:2] == [("activation", True), ("model.dropout", True)]
    assert {name for name, _ in hparams[2:]} == {"seed", *HPARAMS} and not any(d for _, d in hparams[2:])
    assert metrics == ["hp_metric", "final/val_acc", "final/test_acc", "final/test_loss"]
    compare.report(sweep)  # rewritten, not added to
    assert len(list(sweep.glob("events.out.tfevents.*"))) == 1


def test_a_multirun_tells_tensorboard_its_knobs_when_it_starts(tmp_path):
    from fcexp.train import compose_config

    config = compose_config(with_hydra=True)
    OmegaConf.set_readonly(config, False)
    config.hydra.sweep.dir = str(tmp_path)
    config.hydra.overrides.task = ["model.l2=0", "model.dropout=0,0.2", "seed=range(3)"]
    config.hydra.sweeper.params = {"activation": "relu,tanh"}  # as a preset sets them
    compare.CompareAtEnd().on_multirun_start(config)
    hparams, _ = read_experiment(tmp_path)
    assert set(hparams[:3]) == {("model.dropout", True), ("seed", True), ("activation", True)}
    assert ("model.l2", False) in hparams and not any(differs for _, differs in hparams[3:])


def seeds(mean: float, noise: tuple[float, float, float]) -> dict[int, float]:
    return {s: mean + e for s, e in enumerate(noise)}


NOISE = [(0.001, -0.002, 0.001), (-0.001, 0.002, -0.001), (0.002, -0.001, -0.001), (-0.002, 0.001, 0.001)]


def test_many_paired_comparisons_moderate_their_variances():
    """Twelve configurations with the same seed spread: each comparison's 2 degrees of freedom gain the prior's, so
    a gap of 3 spreads that a plain paired t test with Holm over 12 cannot call is called; with fewer than
    MODERATE_FROM comparisons the tests stay plain."""
    best = seeds(0.95, (0.0, 0.0, 0.0))
    others = [seeds(0.95 - 0.006 * (i == 0), NOISE[i % 4]) for i in range(stats.MODERATE_FROM + 2)]
    plain = stats.holm([stats.difference(best, o) for o in others])
    moderated = stats.versus_best(best, others)
    assert [d.test for d in moderated] == ["moderated paired"] * len(others)
    assert [d.delta for d in moderated] == [d.delta for d in plain]
    assert plain[0].p_adj > 0.05 and moderated[0].p_adj < 0.05
    assert all(d.p_adj > 0.05 for d in moderated[1:])  # the ties stay ties
    assert moderated[0].high < 0 and moderated[0].high - moderated[0].low < plain[0].high - plain[0].low
    few = others[: stats.MODERATE_FROM - 1]
    assert stats.versus_best(best, few) == stats.holm([stats.difference(best, o) for o in few])


def test_a_comparison_noisier_than_the_rest_keeps_its_own_doubt():
    """Shrinking toward the others' variance must not make a comparison whose seeds disagree a sure one."""
    best = seeds(0.95, (0.0, 0.0, 0.0))
    others = [seeds(0.95, NOISE[i % 4]) for i in range(11)] + [seeds(0.93, (0.03, -0.04, -0.05))]
    noisy = stats.versus_best(best, others)[-1]
    assert noisy.test == "moderated paired" and noisy.p_adj > 0.05 and noisy.low < -0.05


def test_equal_variances_pool_into_one():
    d0, s0 = stats.prior([2e-6] * 20, 2)
    assert d0 == 40 and s0 == pytest.approx(2e-6)
    d0, s0 = stats.prior([1e-6 * 10 ** (k % 5) for k in range(20)], 2)  # spread far beyond sampling
    assert d0 < 5


def test_moderated_comparisons_with_a_best_picked_from_the_same_numbers_rarely_call_a_tie_worse():
    """A/A: 100 draws of 12 equal configurations over 3 paired seeds. Against the highest of them, adjusted by the
    studentized range (which covers the best having been picked), under 3% of the configurations are called worse,
    and at most 8 draws call any. Moderating each difference's variance with the best instead (all of them holding
    the best's noise) called some in 15 of these draws; Holm's adjustment 4-5% of the configurations."""
    rng = random.Random(0)
    called = draws_calling = 0
    for _ in range(100):
        shared = [rng.gauss(0, 0.003) for _ in range(3)]  # what a seed does to every configuration alike
        runs = [{s: 0.95 + shared[s] + rng.gauss(0, 0.002) for s in range(3)} for _ in range(12)]
        runs.sort(key=lambda r: -sum(r.values()))
        diffs = stats.versus_best(runs[0], runs[1:])
        assert {d.adjusted_by for d in diffs} == {"Tukey"}
        calls = sum(d.significant for d in diffs)
        called += calls
        draws_calling += calls > 0
    assert called < 0.03 * 100 * 12, called
    assert draws_calling <= 8, draws_calling


def test_a_sweep_whose_pooled_accuracies_are_skewed_is_plotted(tmp_path, capsys):
    """Twenty relu runs near 0.97 and two that barely trained: pooled, their plain mean (0.93) lies below the
    interval of their mean logit [0.95, 0.97]. The 144-run grid met this and compare failed at the end of the sweep
    ("'yerr' must not contain negative values"); the bars are drawn from the interval's own bounds."""
    sweep = tmp_path / "sweep"
    for seed in range(22):
        acc = 0.5 if seed < 2 else 0.97 + 0.001 * (seed % 3)
        for activation, shift in (("relu", 0.0), ("tanh", -0.01)):
            overrides = [f"activation={activation}", f"seed={seed}"]
            write_job(sweep / f"activation={activation},seed={seed}", overrides, acc + shift, acc + shift)
    write_multirun(sweep, ["activation=relu,tanh", "seed=range(0,22)"])
    pooled = accuracy_interval([0.5, 0.5] + [0.97 + 0.001 * (s % 3) for s in range(2, 22)])
    assert pooled.mean < pooled.low  # what made the plot fail
    compare.main([str(sweep)])
    assert "44 jobs in" in capsys.readouterr().out
    assert (sweep / compare.BY_KNOB).stat().st_size > 0 and (sweep / compare.CURVES).stat().st_size > 0


def test_a_race_that_left_one_configuration_says_why_nothing_was_compared(tmp_path, capsys):
    sweep = tmp_path / "sweep"
    for activation, val in (("relu", 0.95), ("sigmoid", 0.5)):
        for seed in range(2):
            folder = sweep / f"activation={activation},seed={seed}"
            write_job(folder, [f"activation={activation}", f"seed={seed}"], val + 0.001 * seed, val)
            if activation == "sigmoid":  # as a race leaves a run it stopped at its first rung
                record = json.loads((folder / "metrics.json").read_text())
                evidence = {"rung": 1, "configuration": "activation=sigmoid", "reason": "stopped at epoch 1: worse"}
                record |= {"status": "stopped", "stopped": evidence}
                (folder / "metrics.json").write_text(json.dumps(record))
    write_multirun(sweep, ["activation=relu,sigmoid", "seed=0,1"])
    compare.main([str(sweep)])
    out = capsys.readouterr().out
    assert "is left to compare with the best (a race stopped the other 1, on the evidence in its stopped: lines)" in out
    assert "stopped at epoch 1" in (sweep / compare.TABLE).read_text()
