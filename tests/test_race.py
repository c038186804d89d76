"""Races (`+launcher=race`): the configurations the evidence shows worse stop at a rung, the others go on in packs
re-formed without them, each still the run it would be in the unshrunk pack."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
from pathlib import Path

import lightning as L
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from test_faults import run_main

from fcexp import evaluate
from fcexp.compare import Job, load_sweep
from fcexp.race import Race, decide
from fcexp.train import cli

QUIET = ["callbacks.progress.refresh_rate=0", "trainer.enable_model_summary=false"]
# Five hidden layers of 64: sigmoid barely trains there in 20 steps, ReLU and leaky ReLU do, alike.
DEEP = ["model.hidden=[64,64,64,64,64]", "model.batch_norm=false", "model.l2=0", "data.limit_train=2560"]
# Without the diagnostics a run's figures and histograms would cost more than its 60 steps.
RACE = ["-m", "+launcher=race", *DEEP, "trainer.max_epochs=3", "seed=0,1,2", "callbacks=plain", *QUIET]


def records(sweep: Path) -> dict[str, dict]:
    return {p.parent.name: json.loads(p.read_text()) for p in sorted(sweep.glob("*/metrics.json"))}


def by_activation(sweep: Path) -> dict[str, list[tuple[Path, dict]]]:
    runs: dict[str, list[tuple[Path, dict]]] = {}
    for name, record in records(sweep).items():
        runs.setdefault(record["hparams"]["activation"], []).append((sweep / name, record))
    return runs


def only_sweep(cwd: Path) -> Path:
    (sweep,) = (cwd / "runs" / "sweeps").iterdir()
    return sweep


@pytest.fixture(scope="module")
def race(mnist_root, tmp_path_factory) -> tuple[Path, Path, list[str]]:
    """The race of ReLU, leaky ReLU and sigmoid over three seeds, and the same sweep packed without racing."""
    cwd = tmp_path_factory.mktemp("race")
    mp = pytest.MonkeyPatch()
    args = [*RACE, "activation=relu,leaky_relu,sigmoid"]
    try:
        assert run_main(args, cwd, mp, cli) is None
        raced = only_sweep(cwd)
        whole = cwd / "whole"
        unraced = ["-m", "+launcher=packed", *RACE[2:], "activation=relu,leaky_relu,sigmoid"]
        assert run_main([*unraced, f"hydra.sweep.dir={whole}"], cwd, mp, cli) is None
    finally:
        mp.undo()
    return raced, whole, args


def test_a_clearly_worse_configuration_stops_at_the_first_rung_and_the_rest_finish(race):
    raced, _, _ = race
    runs = by_activation(raced)
    for path, record in runs["sigmoid"]:
        assert record["status"] == "stopped"
        stopped = record["stopped"]
        assert stopped["rung"] == 1 and stopped["lost_to"] in ("activation=relu", "activation=leaky_relu")
        assert stopped["difference"] < 0 and stopped["interval"][1] < 0 and stopped["p_adj"] < 0.05
        # Its history, checkpoints and TensorBoard curves end at the rung; it was tested there.
        assert [h["epoch"] for h in record["history"]] == [0]
        assert record["metrics"]["test/acc"] < 0.3
        events = EventAccumulator(str(path))
        events.Reload()
        assert [e.step for e in events.Scalars("val/acc")] == [19]
        # Its test at the rung's step, where TensorBoard puts it beside the last validation (not at step 0).
        assert [e.step for e in events.Scalars("test/acc")] == [19]
    for activation in ("relu", "leaky_relu"):
        for _, record in runs[activation]:
            assert record["status"] == "completed" and len(record["history"]) == 3
            assert record["metrics"]["test/acc"] > 0.5
            # Each later leg continued it from the rung's step, in a pack re-formed without the three stopped runs.
            assert record["race"] == [{"from_step": 20, "pack": 6}, {"from_step": 40, "pack": 6}]


def test_a_re_formed_pack_continues_each_member_from_the_state_it_had(race):
    raced, whole, _ = race
    for name, record in records(raced).items():
        alone = json.loads((whole / name / "metrics.json").read_text())
        # The first leg is the unshrunk pack itself: equal shapes, equal bits.
        assert record["history"][0] == alone["history"][0]
        if record["status"] == "completed":
            # Later legs: 6 members instead of 9, the same weights, moments, batches and dropout streams; the products
            # agree within the summation order of another pack size.
            for raced_epoch, whole_epoch in zip(record["history"], alone["history"], strict=True):
                assert raced_epoch["val/loss"] == pytest.approx(whole_epoch["val/loss"], rel=1e-4)
                assert raced_epoch["step"] == whole_epoch["step"]


def test_a_stopped_run_evaluates_to_its_record_and_resumes_to_the_end_by_hand(race, tmp_path, monkeypatch, capsys):
    raced, _, _ = race
    path, record = by_activation(raced)["sigmoid"][0]
    assert run_main([f"ckpt_path={path / 'checkpoints' / 'last.ckpt'}"], tmp_path, monkeypatch, evaluate.cli) is None
    assert f"test accuracy {record['metrics']['test/acc']:.4f}" in capsys.readouterr().out
    copy = tmp_path / "runs" / path.name  # the other tests read the race as it ended
    shutil.copytree(path, copy)
    assert run_main([f"resume={copy}", *QUIET], tmp_path, monkeypatch, cli) is None
    resumed = json.loads((copy / "metrics.json").read_text())
    assert resumed["status"] == "completed" and "stopped" not in resumed
    assert [h["epoch"] for h in resumed["history"]] == [0, 1, 2]
    assert resumed["resumes"][-1]["from_step"] == 20


def test_a_race_rerun_makes_the_same_decisions_and_trains_nothing(race, monkeypatch, capsys):
    raced, _, args = race
    # The decisions come from the records: read again, they are the ones the race made, evidence and all.
    stopped = {raced / name: r["stopped"] for name, r in records(raced).items() if r["status"] == "stopped"}
    assert decide(load_sweep(raced), 1, Race()) == stopped and len(stopped) == 3
    before = {name: (raced / name / "metrics.json").read_bytes() for name in records(raced)}
    capsys.readouterr()
    assert run_main([*args, f"hydra.sweep.dir={raced}", "skip_finished=true"], raced.parent, monkeypatch, cli) is None
    out = capsys.readouterr().out
    assert {name: (raced / name / "metrics.json").read_bytes() for name in before} == before
    assert "9 jobs in" in out and "6 completed, 3 stopped" in out
    assert "stopped: activation=sigmoid (3 runs): stopped at epoch 1: worse than activation=" in out


class StopInSecondLeg(L.Callback):
    """A real Ctrl-C (SIGINT) in the middle of the race's second leg (epoch 2, step 30 of 20-40), mid-step."""

    fired = False

    def on_before_backward(self, trainer, pl_module, loss) -> None:
        if trainer.global_step == 30 and not StopInSecondLeg.fired:
            StopInSecondLeg.fired = True
            os.kill(os.getpid(), signal.SIGINT)


def test_a_race_interrupted_in_a_leg_finishes_as_the_uninterrupted_race(race, tmp_path, monkeypatch, capsys):
    raced, _, args = race
    stopper = [f"+callbacks.stopper._target_={__name__}.StopInSecondLeg"]
    assert run_main([*args, *stopper], tmp_path, monkeypatch, cli) == 130
    sweep = only_sweep(tmp_path)
    err = capsys.readouterr().err
    (finish,) = [line.split(": ", 1)[1] for line in err.splitlines() if line.startswith("finish the sweep with: ")]
    statuses = {r["hparams"]["activation"]: r["status"] for r in records(sweep).values()}
    assert statuses == {"sigmoid": "stopped", "relu": "interrupted", "leaky_relu": "interrupted"}
    assert (
        run_main(shlex.split(finish)[3:], tmp_path, monkeypatch, cli) is None
    )  # as printed, less `python -m fcexp.train`

    def outcome(sweep: Path) -> dict[tuple[str, int], tuple]:
        return {
            (r["hparams"]["activation"], r["hparams"]["seed"]): (r["status"], r["metrics"], r.get("stopped"))
            for r in records(sweep).values()
        }

    # The same decisions, and the same numbers: the interrupted leg continued exactly where it stopped.
    assert outcome(sweep) == outcome(raced)


def test_an_a_a_race_stops_nothing(mnist_root, tmp_path, monkeypatch):
    # silu and swish are one layer under two names: no evidence can tell them apart.
    args = [
        "-m",
        "+launcher=race",
        *DEEP[:3],
        "data.limit_train=1280",
        "trainer.max_epochs=2",
        "callbacks=plain",
        *QUIET,
    ]
    assert (
        run_main([*args, "activation=silu,swish", "seed=0,1,2", "hydra.launcher.race.level=0.2"], tmp_path, monkeypatch)
        is None
    )
    assert {r["status"] for r in records(only_sweep(tmp_path)).values()} == {"completed"}


def job(folder: str, seed: int, accuracies: list[float], **hparams) -> Job:
    history = [{"epoch": e, "step": 10 * (e + 1), "val/acc": a} for e, a in enumerate(accuracies)]
    return Job(Path(folder), "running", {"seed": seed, **hparams}, history=history)


def test_the_rule_stops_only_what_the_evidence_shows_worse():
    good = [job(f"a{s}", s, [0.90 + 0.01 * s, 0.95], activation="relu") for s in range(3)]
    tied = [job(f"b{s}", s, [0.90 + 0.01 * s + (-0.002, 0.001, -0.001)[s], 0.95], activation="tanh") for s in range(3)]
    bad = [job(f"c{s}", s, [0.50 + 0.01 * s, 0.60], activation="sigmoid") for s in range(3)]
    stops = decide([*good, *tied, *bad], 1, Race())
    assert set(stops) == {Path(f"c{s}") for s in range(3)}
    evidence = stops[Path("c0")]
    assert evidence["lost_to"] == "activation=relu" and evidence["configuration"] == "activation=sigmoid"
    assert evidence["difference"] == pytest.approx(-0.40) and evidence["p_adj"] < 0.05
    assert evidence["reason"].startswith("stopped at epoch 1: worse than activation=relu (-0.4000 [")
    # A run a race stopped at an earlier rung is out of the later ones; a stopped run counts at its own rung.
    bad[0].status, bad[0].stopped = "stopped", {"rung": 1}
    assert set(decide([*good, *tied, *bad], 1, Race())) >= {Path("c1")}
    assert Path("c0") not in decide([*good, *tied, bad[0]], 2, Race())
    # One configuration under two names: identical numbers, nothing to stop.
    same = [job(f"d{s}", s, [0.90 + 0.01 * s], activation="swish") for s in range(3)]
    assert decide([*good, *same], 1, Race(level=0.5)) == {}


def test_a_race_of_many_configurations_moderates_its_tests_as_compare_does():
    """Twelve configurations at one seed spread, three of them 0.6-1 point behind: the moderated paired t tests stop
    those three and say which test they used; among 3 comparisons (plain tests, 2 degrees of freedom) the
    0.6-point gap stops nothing."""
    spread = [(0.001, -0.002, 0.001), (-0.001, 0.002, -0.001), (0.002, -0.001, -0.001)]
    noise = [(0.0, 0.0, 0.0)] + [spread[i % 3] for i in range(11)]
    runs = [
        job(f"{name}{s}", s, [0.95 - gap + noise[i][s]], activation=name)
        for i, (name, gap) in enumerate(zip("abcdefghijkl", [0] * 9 + [0.006, 0.008, 0.01], strict=True))
        for s in range(3)
    ]
    stops = decide(runs, 1, Race())
    assert {folder.name[0] for folder in stops} == {"j", "k", "l"}
    evidence = stops[Path("l0")]
    assert evidence["rule"].startswith(
        "moderated paired t test over seeds, Tukey-adjusted (the studentized range of 12"
    )
    assert evidence["p_adj"] < 0.05 and evidence["interval"][1] < 0
    # j's runs among 3 comparisons: plain paired t tests, under which its gap is not enough.
    assert decide([r for r in runs if r.hparams["activation"] in "abcj"], 1, Race()) == {}


def test_without_replicates_the_race_halves_by_rank_and_says_it_has_no_intervals():
    runs = [job(f"r{i}", 0, [0.5 + 0.1 * i], activation=name) for i, name in enumerate("abcde")]
    stops = decide(runs, 1, Race(keep=0.5))
    assert set(stops) == {Path("r0"), Path("r1")}  # ceil(0.5 x 5) = 3 kept, by rank
    assert stops[Path("r0")]["rank"] == 5 and "carries no intervals" in stops[Path("r0")]["rule"]


def test_rule_halving_ranks_replicated_configurations_by_their_mean():
    """The tied configuration that the t test keeps, rule=halving stops when it ranks in the lower half."""
    good = [job(f"a{s}", s, [0.90 + 0.01 * s], activation="relu") for s in range(3)]
    tied = [job(f"b{s}", s, [0.90 + 0.01 * s + (-0.002, 0.001, -0.001)[s]], activation="tanh") for s in range(3)]
    runs = [*good, *tied]
    assert decide(runs, 1, Race()) == {}
    stops = decide(runs, 1, Race(rule="halving"))
    assert set(stops) == {Path(f"b{s}") for s in range(3)}
    assert stops[Path("b0")]["rank"] == 2 and "by their mean over seeds" in stops[Path("b0")]["rule"]
    assert "p_adj" not in stops[Path("b0")] and "a ranking without intervals" in stops[Path("b0")]["reason"]


@pytest.mark.parametrize(
    ("race", "message"),
    [
        ({"rungs": ()}, "hydra.launcher.race.rungs must be a list of epochs >= 1, got []"),
        ({"rungs": (2, 1)}, "hydra.launcher.race.rungs must increase, got [2, 1]"),
        ({"level": 1.5}, "hydra.launcher.race.level must be in (0, 1), got 1.5"),
        ({"keep": 0}, "hydra.launcher.race.keep must be in (0, 1), got 0"),
        ({"rule": "holm"}, "hydra.launcher.race.rule must be one of test, halving, got 'holm'"),
    ],
)
def test_a_bad_rule_is_refused_naming_it(race, message):
    with pytest.raises(ValueError) as err:
        Race(**race)
    assert str(err.value) == message


def test_a_race_with_a_bad_rule_is_refused_in_one_line_before_anything_is_written(tmp_path, monkeypatch, capsys):
    args = ["-m", "+launcher=race", "hydra.launcher.race.level=2", "seed=0,1"]
    assert run_main(args, tmp_path, monkeypatch, cli) == 2
    assert capsys.readouterr().err == "error: hydra.launcher.race.level must be in (0, 1), got 2.0\n"
    assert not (tmp_path / "runs").exists()
