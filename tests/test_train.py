"""The real entry points on real MNIST, in small doses."""

from __future__ import annotations

import contextlib
import json
import os
import pty
import subprocess
import sys
from collections import Counter
from typing import ClassVar

import lightning as L
import pytest
import torch
from conftest import QUICK, printed, run_cli, run_in_process, run_printed
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from fcexp.train import Job, compose_config, train, train_pack

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def quick_run(mnist_root, tmp_path_factory):
    """One short real run (300 steps) through `python -m fcexp.train`, from a foreign working directory."""
    cwd = tmp_path_factory.mktemp("user")
    proc = run_cli("fcexp.train", *QUICK, cwd=cwd)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run_dir,) = (cwd / "runs").iterdir()
    return run_dir, proc, cwd


def test_short_run_learns(quick_run):
    run_dir, _, _ = quick_run
    record = json.loads((run_dir / "metrics.json").read_text())
    assert record["status"] == "completed"
    assert record["metrics"]["val/acc_best"] > 0.90
    assert record["metrics"]["test/acc"] > 0.90
    assert [h["epoch"] for h in record["history"]] == [0, 1, 2]
    assert record["history"][-1]["step"] == 300
    assert record["hparams"]["activation"] == "relu" and record["wall_time_s"] > 0
    versions = record["provenance"]["versions"]
    assert versions["torch"] == torch.__version__ and versions["torch_cuda"] == torch.version.cuda  # the build


def test_output_to_a_file_reads_as_a_log(quick_run):
    """Output to a pipe: Lightning's plain model summary (its terminal table is cut to 80 columns), no bars;
    train.log holds one line per epoch."""
    run_dir, proc, _ = quick_run
    output = proc.stdout + proc.stderr
    assert "PackedMLP" in output and "┏" not in output and "\r" not in output
    # callbacks.progress.refresh_rate=0 (QUICK): no progress on stdout, but the epochs in train.log.
    assert "] - epoch " not in output
    assert len([line for line in (run_dir / "train.log").read_text().splitlines() if "] - epoch " in line]) == 3


def test_train_log_holds_each_epoch_when_output_goes_to_a_terminal(mnist_root, tmp_path):
    """On a terminal tqdm's bars show the epochs; train.log still gets one line per epoch."""
    primary, replica = pty.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-m", "fcexp.train", *QUICK, "data.limit_train=1280", "callbacks=plain"],
        cwd=tmp_path,
        stdout=replica,
        stderr=replica,
        env={**os.environ, "FCEXP_DATA": mnist_root},
    )
    os.close(replica)
    shown = b""
    with contextlib.suppress(OSError):  # the terminal closes with the run
        while chunk := os.read(primary, 65536):
            shown += chunk
    assert proc.wait(timeout=300) == 0, shown[-2000:]
    (run_dir,) = (tmp_path / "runs").iterdir()
    log = (run_dir / "train.log").read_text()
    assert [line.split("] - ")[1].split(":")[0] for line in log.splitlines() if "] - epoch " in line] == [
        "epoch 1/3",
        "epoch 2/3",
        "epoch 3/3",
    ]
    assert b"\r" in shown and b"] - epoch " not in shown  # the bars, not the lines, on the terminal


def test_run_folder_holds_config_checkpoints_and_events(quick_run):
    run_dir, proc, cwd = quick_run
    assert (run_dir / ".hydra" / "config.yaml").is_file()
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
    assert list((run_dir / "checkpoints").glob("best-epoch*.ckpt"))
    view = run_printed(printed(proc.stdout, "view it") + " --inspect", cwd)  # runs as printed
    assert view.returncode == 0 and str(run_dir.name) in view.stdout, view.stderr[-2000:]


def test_tensorboard_reads_scalars_and_hparams(quick_run):
    run_dir, _, _ = quick_run
    events = EventAccumulator(str(run_dir))
    events.Reload()
    tags = events.Tags()["scalars"]
    assert {"train/loss_step", "train/acc", "val/acc", "test/acc", "hp_metric"} <= set(tags)
    record = json.loads((run_dir / "metrics.json").read_text())
    assert events.Scalars("hp_metric")[-1].value == pytest.approx(record["metrics"]["val/acc_best"])
    plugins = events.PluginTagToContent("hparams")
    assert "_hparams_/session_start_info" in plugins
    assert b"model.dropout" in plugins["_hparams_/session_start_info"]


def test_evaluate_reproduces_the_test_accuracy(quick_run):
    run_dir, _, _ = quick_run
    record = json.loads((run_dir / "metrics.json").read_text())
    proc = run_in_process("fcexp.evaluate", f"ckpt_path='{run_dir / 'checkpoints' / 'last.ckpt'}'", cwd=run_dir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"test accuracy {record['metrics']['test/acc']:.4f}" in proc.stdout


def test_tensor_batches_honour_lightning_limits(tmp_path, mnist_root):
    overrides = [*QUICK, "trainer.max_epochs=1", "+trainer.limit_train_batches=30", "+trainer.val_check_interval=10"]
    result = train(compose_config(*overrides), tmp_path, overrides)
    assert result["history"][-1]["step"] == 30
    events = EventAccumulator(str(tmp_path))
    events.Reload()
    assert [e.step for e in events.Scalars("val/acc")] == [9, 19, 29]


class SyncCounter(L.Callback):
    """Counts the calls that make the host wait for the device (reading a tensor's value), from the start of each
    training batch that is not a logging step to its end: the step, backward, optimizer and the batch-end hooks of
    the callbacks after it. With CUDA it also makes torch raise at any synchronizing call in that window. Each one
    made is kept in `made` (a pack's members each get one; the first one there counts)."""

    WAITS = ("item", "tolist", "cpu", "numpy", "__bool__", "__int__", "__float__")
    made: ClassVar[list[SyncCounter]] = []

    def __init__(self) -> None:
        self.calls: Counter[str] = Counter()
        self.steps = 0
        self.originals: dict[str, object] = {}
        SyncCounter.made.append(self)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step % trainer.log_every_n_steps == 0 or hasattr(torch.Tensor.item, "counted"):
            return
        self.steps += 1
        for name in self.WAITS:
            original = self.originals[name] = getattr(torch.Tensor, name)

            def counted(*args, _name=name, _original=original, **kwargs):
                self.calls[_name] += 1
                return _original(*args, **kwargs)

            counted.counted = True
            setattr(torch.Tensor, name, counted)
        if torch.cuda.is_available():
            torch.cuda.set_sync_debug_mode("error")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if not self.originals:
            return
        if torch.cuda.is_available():
            torch.cuda.set_sync_debug_mode("default")
        for name, original in self.originals.items():
            setattr(torch.Tensor, name, original)
        self.originals.clear()


@pytest.mark.parametrize("members", [1, 2])
def test_a_training_step_reads_nothing_from_the_device_between_logging_steps(members, tmp_path, mnist_root):
    """The host can run ahead of a GPU: a diverged loss is a device flag read at logging steps, metrics are summed on
    the device. A pack (here two members, each its own run) the same."""
    SyncCounter.made.clear()
    overrides = [
        "data.limit_train=1280",
        "trainer.max_epochs=1",
        "trainer.log_every_n_steps=5",
        "callbacks.progress.refresh_rate=0",
        "+callbacks.sync_counter._target_=test_train.SyncCounter",
    ]
    jobs = [Job(compose_config(*overrides, f"seed={s}"), tmp_path / str(s), [f"seed={s}"]) for s in range(members)]
    results = train_pack(jobs)
    assert all(r["status"] == "completed" for r in results)
    counter = SyncCounter.made[0]
    assert counter.steps == 8  # 10 steps, of which 0 and 5 log
    assert counter.calls == Counter()
