"""Sweeps end to end: presets compose, real multiruns on small MNIST subsets, and what compare makes of them."""

from __future__ import annotations

import csv
import json
import math
import shutil
from pathlib import Path

import pytest
from conftest import printed, run_cli, run_here, run_in_process, run_printed, train_in_process
from hydra import compose, initialize_config_module
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.utils import instantiate
from omegaconf import OmegaConf
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
from tensorboard.plugins.custom_scalar import layout_pb2
from tensorboard.plugins.hparams import plugin_data_pb2

from fcexp import compare
from fcexp.train import compose_config

CONF = Path(__file__).parents[1] / "conf"
# One epoch on 2,000 images with a small net: a job costs about a second once imports are paid.
SMALL = [
    "data.limit_train=2000",
    "trainer.max_epochs=1",
    "callbacks.progress.refresh_rate=0",
    "trainer.enable_model_summary=false",
    "model.hidden=[64]",
    "model.l2=0",
    "model.batch_norm=false",
]
PRESETS = [
    f"+{p.parent.name}={p.stem}"
    for group in ("sweep", "hparams_search", "launcher")
    for p in CONF.glob(f"{group}/*.yaml")
]
SWEEP_SIZES = {"grid": 48, "activations": 12, "regularization": 18, "depth": 16}


def read_csv(sweep: Path) -> list[dict[str, str]]:
    with open(sweep / compare.CSV) as f:
        return list(csv.DictReader(f))


def only_sweep(cwd: Path) -> Path:
    (sweep,) = (cwd / "runs" / "sweeps").iterdir()
    return sweep


@pytest.mark.parametrize("preset", PRESETS)
def test_every_preset_composes(preset):
    with initialize_config_module("fcexp.conf", version_base="1.3"):
        cfg = compose("train", overrides=[preset], return_hydra_config=True)
    group, name = preset[1:].split("=")
    if group == "launcher":
        # A launcher preset says how many cores a job gets (slurm's resolves only inside a job); a packed sweep
        # (or race) trains in this one process, on every core.
        assert (OmegaConf.to_container(cfg)["threads"] is None) == (name in ("packed", "race"))
    else:
        assert cfg.hydra.sweeper.params
    if group != "sweep":
        return
    # The comment's size is the grid's, and its first and last jobs (the deepest net) build.
    sweeps = OverridesParser.create().parse_overrides([f"{k}={v}" for k, v in cfg.hydra.sweeper.params.items()])
    choices = [[f"{o.key_or_group}={v}" for v in o.sweep_string_iterator()] for o in sweeps]
    assert math.prod(map(len, choices)) == SWEEP_SIZES[name]
    assert f"{SWEEP_SIZES[name]} jobs" in (CONF / "sweep" / f"{name}.yaml").read_text()
    for pick in (0, -1):
        job = compose_config(preset, *(c[pick] for c in choices))
        instantiate(job.model)


@pytest.fixture(scope="module")
def grid_2x2(mnist_root, tmp_path_factory) -> tuple[Path, str]:
    """A real 2x2 multirun with the default in-process launcher."""
    cwd = tmp_path_factory.mktemp("grid")
    stdout = train_in_process("-m", *SMALL, "activation=relu,sigmoid", "model.dropout=0,0.2", cwd=cwd)
    return only_sweep(cwd), stdout, cwd


@pytest.mark.slow
def test_each_job_is_a_tensorboard_run_with_its_hparams(grid_2x2):
    sweep, stdout, cwd = grid_2x2
    jobs = sorted(p for p in sweep.iterdir() if p.is_dir())
    assert len(jobs) == 4
    for job in jobs:
        assert job.name.startswith("activation=")  # TensorBoard names a run by its folder
        events = EventAccumulator(str(job))
        events.Reload()
        content = events.PluginTagToContent("hparams")["_hparams_/session_start_info"]
        hparams = plugin_data_pb2.HParamsPluginData.FromString(content).session_start_info.hparams
        record = json.loads((job / "metrics.json").read_text())
        assert hparams["activation"].string_value == record["hparams"]["activation"]
        assert hparams["model.dropout"].number_value == record["hparams"]["model.dropout"]
        assert events.Scalars("hp_metric")[-1].value == pytest.approx(record["metrics"]["val/acc_best"])
    view = run_printed(printed(stdout, "view it") + " --inspect", cwd)  # as printed, from where it was printed
    assert view.returncode == 0 and all(job.name in view.stdout for job in jobs), view.stderr[-2000:]


@pytest.mark.slow
def test_compare_ranks_the_sweep_at_its_end(grid_2x2):
    sweep, stdout, cwd = grid_2x2
    rows = read_csv(sweep)
    assert len(rows) == 4 and {r["status"] for r in rows} == {"completed"}
    assert set(rows[0]) >= {"activation", "model.dropout", "val_acc_best", "test_acc", "train_time_s"}
    assert "model.hidden" not in rows[0]  # not swept, so not a column
    best = [float(r["val_acc_best"]) for r in rows]
    assert best == sorted(best, reverse=True) and best[0] > 0.5  # well above chance (0.1) after 16 steps
    assert (sweep / compare.TABLE).read_text().count("| completed |") == 4
    for png in (compare.CURVES, compare.BY_KNOB):
        assert (sweep / png).read_bytes().startswith(b"\x89PNG")
    assert f"best: activation={rows[0]['activation']}, dropout={rows[0]['model.dropout']}" in stdout
    rerun = printed(stdout, "rerun it")
    assert f"-m fcexp.train {' '.join(SMALL[:3])}" in rerun and "activation=" in rerun
    again = run_here(rerun, cwd)
    assert again.returncode == 0, again.stderr[-2000:]
    (run,) = [p for p in (cwd / "runs").iterdir() if p.name != "sweeps"]
    assert json.loads((run / "metrics.json").read_text())["hparams"]["activation"] == rows[0]["activation"]


@pytest.mark.slow
def test_compare_reports_a_sweep_still_running(grid_2x2, tmp_path):
    sweep = tmp_path / "sweep"
    shutil.copytree(grid_2x2[0], sweep)
    first, second, *_ = sorted(p for p in sweep.iterdir() if p.is_dir())
    record = json.loads((first / "metrics.json").read_text())
    record |= {"status": "running", "metrics": {}}
    (first / "metrics.json").write_text(json.dumps(record))
    (second / "metrics.json").unlink()  # started, nothing recorded yet
    text = compare.report(sweep)
    assert "4 jobs" in text and "2 completed, 1 running, 1 no record" in text
    rows = read_csv(sweep)
    assert [r["status"] for r in rows] == ["completed", "completed", "running", "no record"]
    assert rows[2]["val_acc_best"] != "-" and rows[2]["test_acc"] == "-"  # its history so far
    assert rows[3]["activation"] in ("relu", "sigmoid")  # read from the config Hydra saved


@pytest.mark.slow
def test_compare_lists_the_jobs_an_interrupted_sweep_never_started(grid_2x2, tmp_path):
    sweep = tmp_path / "sweep"
    shutil.copytree(grid_2x2[0], sweep)
    (never,) = [p for p in sweep.iterdir() if p.name.startswith("activation=sigmoid,") and "dropout=0.2," in p.name]
    hparams = json.loads((never / "metrics.json").read_text())["hparams"]
    shutil.rmtree(never)  # stopped before Hydra made its folder: only multirun.yaml knows it
    text = compare.report(sweep)
    assert "4 jobs" in text and "3 completed, 1 no record" in text
    *started, unstarted = read_csv(sweep)
    assert unstarted["status"] == "no record" and unstarted["folder"] == never.name
    assert (unstarted["activation"], unstarted["model.dropout"]) == ("sigmoid", "0.2")
    assert (hparams["activation"], hparams["model.dropout"]) == ("sigmoid", 0.2)
    assert ("sigmoid", "0.2") not in {(r["activation"], r["model.dropout"]) for r in started}
    # Knowing only its overrides (no seed, no depth) does not make knobs of what the others record.
    assert list(unstarted)[1:4] == ["activation", "model.dropout", "val_acc_best"]
    # An Optuna study picks each trial from the results so far: it has no plan to find unstarted jobs in.
    multirun = OmegaConf.load(sweep / "multirun.yaml")
    multirun.hydra.sweeper._target_ = "hydra_plugins.hydra_optuna_sweeper.optuna_sweeper.OptunaSweeper"
    OmegaConf.save(multirun, sweep / "multirun.yaml")
    assert "3 jobs" in compare.report(sweep)


@pytest.mark.slow
def test_compare_shows_the_commit_only_when_jobs_ran_from_different_code(grid_2x2, tmp_path):
    sweep = tmp_path / "sweep"
    shutil.copytree(grid_2x2[0], sweep)
    jobs = sorted(p for p in sweep.iterdir() if p.is_dir())
    old, new = "ffe330b" + "0" * 33, "2da120d" + "0" * 33

    def ran_from(job: Path, git: dict | None) -> None:
        record = json.loads((job / "metrics.json").read_text())
        record["provenance"]["git"] = git
        (job / "metrics.json").write_text(json.dumps(record))

    for git in (None, {"commit": new, "dirty": True}):  # an installed copy; one checkout, changes and all
        for job in jobs:
            ran_from(job, git)
        assert "commit" not in compare.report(sweep).splitlines()[0].split()
        assert "commit" not in read_csv(sweep)[0]
    ran_from(jobs[0], {"commit": old, "dirty": False})
    ran_from(jobs[1], {"commit": new, "dirty": False})
    text = compare.report(sweep)
    assert "commit" in text.splitlines()[0].split()
    assert "| commit |" in (sweep / compare.TABLE).read_text()
    commits = {r["folder"]: r["commit"] for r in read_csv(sweep)}
    assert [commits[job.name] for job in jobs] == ["ffe330b", "2da120d", "2da120d+dirty", "2da120d+dirty"]


def test_compare_names_a_folder_without_jobs(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        compare.main([str(tmp_path)])
    assert exit_.value.code == 2
    assert f"error: '{tmp_path}' holds no jobs" in capsys.readouterr().err


@pytest.mark.slow
def test_parallel_launcher_keeps_going_past_a_failed_job(mnist_root, tmp_path):
    proc = run_in_process("fcexp.train", "-m", "+launcher=parallel", *SMALL, "model.dropout=0.2,1.5", cwd=tmp_path)
    sweep = only_sweep(tmp_path)
    # The sweep went on past the failure and compared both jobs, then said so in its exit status.
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert (
        proc.stderr.splitlines()[-1]
        == f"error: 1 of 2 jobs failed; their errors are in {(sweep / 'compare.md').relative_to(tmp_path)}"
    )
    good, bad = read_csv(sweep)
    assert good["status"] == "completed" and float(good["test_acc"]) > 0.5
    assert bad["status"] == "failed" and "dropout must be in [0, 1), got 1.5" in bad["error"]
    assert "threads" not in bad["folder"]  # how a sweep runs is not part of a job's name
    assert "1 completed, 1 failed" in proc.stdout
    # Its rerun trains on the one thread the launcher gave it, which the order of its float sums depends on.
    rerun = printed(proc.stdout, "rerun it")
    assert rerun.endswith(" threads=1") and "launcher" not in rerun
    again = run_here(rerun, tmp_path)
    assert again.returncode == 0, again.stderr[-2000:]
    (run,) = [p for p in (tmp_path / "runs").iterdir() if p.name != "sweeps"]
    ran = [json.loads((folder / "metrics.json").read_text())["metrics"] for folder in (sweep / good["folder"], run)]
    assert ran[0]["test/acc"] == ran[1]["test/acc"] and ran[0]["val/acc"] == ran[1]["val/acc"]


@pytest.fixture(scope="module")
def replicated(mnist_root, tmp_path_factory) -> tuple[Path, str]:
    """Three configurations over three seeds: silu and swish are the same layer; sigmoid five layers deep barely
    trains in 16 steps."""
    cwd = tmp_path_factory.mktemp("replicated")
    deep = [o for o in SMALL if not o.startswith("model.hidden=")] + ["model.hidden=[64,64,64,64,64]"]
    stdout = train_in_process("-m", *deep, "activation=silu,swish,sigmoid", "seed=0,1,2", cwd=cwd)
    return only_sweep(cwd), stdout


@pytest.mark.slow
def test_replicated_sweep_groups_seeds_into_configurations_with_intervals(replicated):
    sweep, stdout = replicated
    with open(sweep / compare.CONFIGS_CSV) as f:
        rows = list(csv.DictReader(f))
    assert [r["activation"] for r in rows][2] == "sigmoid" and len(rows) == 3
    assert "seed" not in rows[0] and all(r["n"] == "3" for r in rows)
    for row in rows:
        assert 0 <= float(row["val_acc_low"]) <= float(row["val_acc_mean"]) <= float(row["val_acc_high"]) <= 1
    # The same layer under two names: the same numbers seed by seed, so tied with the best.
    parts = [f"val_acc_{part}" for part in ("mean", "low", "high")]
    assert [rows[0][k] for k in parts] == [rows[1][k] for k in parts]
    assert rows[0]["verdict"] == "best" and rows[1]["verdict"] == "tied with best"
    assert rows[2]["verdict"] == "worse" and rows[2]["test"] == "paired" and float(rows[2]["p_adj"]) < 0.05
    assert "Holm-adjusted over the 2 comparisons" in stdout and "1 other configuration tied with it" in stdout
    assert f"{compare.CONFIGS_CSV}" in stdout and "seed=0,1,2" in printed(stdout, "rerun it")
    table = (sweep / compare.TABLE).read_text()
    assert "## Configurations" in table and table.count("| tied with best |") == 1
    for png in (compare.CURVES, compare.BY_KNOB):
        assert (sweep / png).read_bytes().startswith(b"\x89PNG")
    # TensorBoard: a run of configuration means beside the jobs', laid out as margin charts.
    events = EventAccumulator(str(sweep / compare.CONFIG_RUN))
    events.Reload()
    tags = [f"val_acc_by_configuration/03/{part}" for part in ("mean", "low", "high")]
    mean, low, high = (events.Scalars(tag)[0] for tag in tags)
    assert low.value <= mean.value <= high.value and low.value < high.value
    assert mean.value == pytest.approx(float(rows[2]["val_acc_mean"]), abs=1e-4)
    assert mean.step == 15  # where the jobs' own val/acc of that epoch sits
    (events_file,) = (sweep / compare.CONFIG_RUN).glob("events.out.tfevents.*")
    (layout,) = [
        v.tensor.string_val[0]
        for e in EventFileLoader(str(events_file)).Load()
        for v in e.summary.value
        if v.metadata.plugin_data.plugin_name == "custom_scalars"
    ]
    (category,) = layout_pb2.Layout.FromString(layout).category
    assert [chart.title for chart in category.chart] == [
        "1. activation=silu (n=3)",
        "2. activation=swish (n=3)",
        "3. activation=sigmoid (n=3)",
    ]
    series = category.chart[2].margin.series[0]
    assert [series.value, series.lower, series.upper] == tags


def test_a_single_seed_sweep_says_its_ranking_has_no_intervals(grid_2x2):
    _, stdout, _ = grid_2x2
    assert "one seed per configuration: this ranking carries no intervals" in stdout
    command = printed(stdout, "replicate it with")
    assert command.endswith("seed=0,1,2") and "activation=relu,sigmoid" in command


@pytest.mark.slow
def test_optuna_study_finishes_and_scores_each_trial_by_the_mean_over_its_replicates(mnist_root, tmp_path):
    proc = run_cli(
        "fcexp.train", "-m", "+hparams_search=optuna", "hydra.sweeper.n_trials=2", "replicates=2", *SMALL, cwd=tmp_path
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    sweep = only_sweep(tmp_path)
    trials = sorted(p for p in sweep.iterdir() if (p / ".hydra").is_dir())
    assert len(trials) == 2
    scores = []
    for trial in trials:
        records = [json.loads((trial / f"seed={s}" / "metrics.json").read_text()) for s in (0, 1)]
        assert [r["hparams"]["seed"] for r in records] == [0, 1] and all(r["status"] == "completed" for r in records)
        scores.append(sum(r["metrics"]["val/acc_best"] for r in records) / 2)
    results = OmegaConf.load(sweep / "optimization_results.yaml")
    assert results.best_value == pytest.approx(max(scores))  # the objective is the mean over seeds
    with open(sweep / compare.CONFIGS_CSV) as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 and all(r["n"] == "2" for r in rows)
    assert {"activation", "optimizer.lr"} <= set(rows[0])  # the searched knobs, as columns
    assert float(rows[0]["val_acc_mean"]) == pytest.approx(results.best_value, abs=1e-4)  # ranked first: the best
    # Off a terminal Optuna's lines carry no colour codes; they come through Hydra's logging.
    assert "\x1b[" not in proc.stdout + proc.stderr and "A new study created in memory" in proc.stdout
    assert "alembic" not in proc.stdout  # the plugins Optuna's storage sets up at import: nothing to act on
