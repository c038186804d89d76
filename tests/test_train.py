"""The real entry points on real MNIST, in small doses."""

import json

import pytest
from conftest import QUICK, printed, run_cli, run_printed
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from fcexp.train import compose_config, train

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
    proc = run_cli("fcexp.evaluate", f"ckpt_path='{run_dir / 'checkpoints' / 'last.ckpt'}'", cwd=run_dir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"test accuracy {record['metrics']['test/acc']:.4f}" in proc.stdout


def test_tensor_batches_honour_lightning_limits(tmp_path, mnist_root):
    overrides = [*QUICK, "trainer.max_epochs=1", "+trainer.limit_train_batches=30", "+trainer.val_check_interval=10"]
    result = train(compose_config(*overrides), tmp_path, overrides)
    assert result["history"][-1]["step"] == 30
    events = EventAccumulator(str(tmp_path))
    events.Reload()
    assert [e.step for e in events.Scalars("val/acc")] == [9, 19, 29]
