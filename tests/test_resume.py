"""Resume and evaluate against what users' folders really hold: a changed config, damaged checkpoints and records, a
kill during a save, paths with a sweep's `=` and `,`. A resume that cannot continue changes nothing."""

from __future__ import annotations

import json
import shlex
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import ClassVar

import lightning as L
import pytest
import torch
from test_faults import run_main

from fcexp import evaluate, record
from fcexp import train as train_module
from fcexp.record import INTERRUPTED, AtomicCheckpointIO, checkpoint_step, provenance, take_paths_as_typed
from fcexp.train import cli, compose_config, finish_sweep_command, train

# 10 steps an epoch; the best epoch's checkpoint and last.ckpt are both kept.
TINY = ["data.limit_train=1280", "trainer.max_epochs=2", "callbacks=plain", "callbacks.progress.refresh_rate=0"]


@pytest.fixture(scope="module")
def finished(mnist_root, tmp_path_factory) -> Path:
    """A completed two-epoch run, trained once; each test works on its own copy."""
    run_dir = tmp_path_factory.mktemp("finished") / "run"
    train(compose_config(*TINY), run_dir, TINY)
    return run_dir


@pytest.fixture
def run_copy(finished, tmp_path) -> Path:
    copy = tmp_path / "runs" / finished.name
    shutil.copytree(finished, copy)
    return copy


def contents(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def refused(args: list[str], cwd: Path, monkeypatch, capsys) -> str:
    """The one error line of a refused `python -m fcexp.train <args>`."""
    assert run_main(args, cwd, monkeypatch) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    (line,) = [x for x in err.splitlines() if x.startswith("error: ")]
    return line


def truncate(path: Path) -> None:
    blob = path.read_bytes()
    path.write_bytes(blob[: len(blob) // 2])  # what a kill during a plain write leaves


@pytest.mark.parametrize(
    ("change", "named"),
    [
        ("model.hidden=[256,256]", "model.hidden=[256, 256] changes the net {run} trained (model.hidden=[512, 512])"),
        (
            "model.batch_norm=true",
            "model.batch_norm=True changes the net {run} trained (model.batch_norm=[False, True])",
        ),
    ],
)
def test_a_resume_that_changes_the_nets_shape_is_refused_and_writes_nothing(
    change, named, run_copy, monkeypatch, capsys
):
    before = contents(run_copy)
    # Its epochs are done too, but no number of epochs would let it continue: the net is what it is told.
    line = refused([f"resume={run_copy}", change], run_copy.parent, monkeypatch, capsys)
    assert named.format(run=run_copy) in line and "a resume continues the same net" in line
    assert contents(run_copy) == before  # byte for byte: record, config, logs, checkpoints
    # Also with a checkpoint to skip: the resume says which only once it continues.
    truncate(run_copy / "checkpoints" / "last.ckpt")
    before = contents(run_copy)
    assert named.format(run=run_copy) in refused([f"resume={run_copy}", change], run_copy.parent, monkeypatch, capsys)
    assert contents(run_copy) == before


def test_a_resume_with_no_checkpoint_that_loads_is_refused_and_writes_nothing(run_copy, monkeypatch, capsys):
    checkpoints = sorted((run_copy / "checkpoints").glob("*.ckpt"))
    assert len(checkpoints) == 2
    for path in checkpoints:
        truncate(path)
    before = contents(run_copy)
    line = refused([f"resume={run_copy}", "trainer.max_epochs=3"], run_copy.parent, monkeypatch, capsys)
    assert line.startswith(f"error: no checkpoint of {run_copy} loads: ")
    assert all(f"{p} does not load (truncated, damaged or not a checkpoint)" in line for p in checkpoints)
    assert contents(run_copy) == before


def test_a_resume_skips_a_truncated_checkpoint_for_the_newest_that_loads(run_copy, monkeypatch):
    last = run_copy / "checkpoints" / "last.ckpt"
    (best,) = (run_copy / "checkpoints").glob("best-*.ckpt")
    step = checkpoint_step(best)
    truncate(last)
    assert run_main([f"resume={run_copy}", "trainer.max_epochs=3"], run_copy.parent, monkeypatch) is None
    log = (run_copy / "train.log").read_text()
    assert f"skipped {last} does not load (truncated, damaged or not a checkpoint)" in log
    assert f"continuing {run_copy} from checkpoints/{best.name} (step {step})" in log
    record = json.loads((run_copy / "metrics.json").read_text())
    assert record["status"] == "completed" and record["resumes"][-1]["from_step"] == step
    assert checkpoint_step(last) == 30  # rewritten whole by the resumed run


def test_a_resume_of_a_run_that_kept_no_checkpoints_is_refused(mnist_root, tmp_path, monkeypatch, capsys):
    bare = [*TINY, "trainer.max_epochs=1", "~callbacks.checkpoint"]
    run_dir = tmp_path / "runs" / "bare"
    train(compose_config(*bare), run_dir, bare)
    before = contents(run_dir)
    line = refused([f"resume={run_dir}", "trainer.max_epochs=2"], tmp_path, monkeypatch, capsys)
    assert line == f"error: {run_dir} kept no checkpoints (its callbacks have none): nothing to resume from"
    assert contents(run_dir) == before


@pytest.mark.parametrize("damage", [b'{"status": "completed", \x01', b"[]"])
def test_a_damaged_record_is_named(damage, run_copy, monkeypatch, capsys):
    (run_copy / "metrics.json").write_bytes(damage)
    line = refused([f"resume={run_copy}", "trainer.max_epochs=3"], run_copy.parent, monkeypatch, capsys)
    assert line.startswith(f"error: {run_copy / 'metrics.json'} is damaged (")


def test_an_empty_path_is_refused_before_hydra_reads_it(tmp_path, monkeypatch, capsys):
    """Hydra takes `hydra.run.dir=` for the working directory: the run would land in the checkout itself."""
    for key in ("hydra.run.dir", "runs_dir", "resume"):
        assert run_main([f"{key}="], tmp_path, monkeypatch, entry=cli) == 2
        assert capsys.readouterr().err == f"error: {key} must be a path, got ''\n"
    assert list(tmp_path.iterdir()) == []


def test_printed_commands_repeat_paths_as_typed(tmp_path, monkeypatch):
    """What fcexp prints (a run's command, a sweep's finish command) carries the path the user typed, in the
    shell's quotes only: not Hydra's quotes nested inside them."""
    monkeypatch.setattr(sys, "argv", [str(Path(train_module.__file__)), "-m", "runs_dir=my runs", "seed=0,1"])
    monkeypatch.setattr(record, "TYPED", [])
    take_paths_as_typed()
    assert sys.argv[2] == "runs_dir='my runs'"  # what Hydra reads
    assert provenance()["command"].endswith(" -m 'runs_dir=my runs' seed=0,1")
    finish = finish_sweep_command(tmp_path / "a sweep")
    assert f"'hydra.sweep.dir={tmp_path / 'a sweep'}'" in finish and "'\"'\"'" not in finish
    assert shlex.split(finish)[3:6] == ["-m", "runs_dir=my runs", "seed=0,1"]


def test_rerunning_a_finished_sweep_without_skip_finished_leaves_its_jobs_as_they_were(
    mnist_root, tmp_path, monkeypatch, capsys
):
    sweep = tmp_path / "sweep"
    args = ["-m", "data.limit_train=640", "trainer.max_epochs=1", "callbacks=plain", f"hydra.sweep.dir={sweep}"]
    assert run_main(args, tmp_path, monkeypatch) is None
    (job,) = [p for p in sweep.iterdir() if (p / "metrics.json").is_file()]
    before = contents(job)
    assert run_main(args, tmp_path, monkeypatch) is None
    assert f"error: job {job.name} refused: {job} holds a completed run" in capsys.readouterr().err
    assert contents(job) == before  # its train.log too


class CheckpointIOProbe(L.Callback):
    """Keeps the checkpoint writer of the trainer it runs in."""

    seen: ClassVar[list] = []

    def on_train_start(self, trainer, pl_module) -> None:
        CheckpointIOProbe.seen.append(trainer.strategy.checkpoint_io)


SAVER = textwrap.dedent(
    """
    import sys, torch
    from fcexp.record import AtomicCheckpointIO
    io = AtomicCheckpointIO()
    for n in range(1000):  # 64 MB a save: a kill lands inside one
        io.save_checkpoint({"n": n, "w": torch.full((16_000_000,), float(n))}, sys.argv[1])
    """
)


def test_a_kill_during_a_checkpoint_save_leaves_a_loadable_checkpoint(mnist_root, tmp_path):
    # fcexp's trainers write through AtomicCheckpointIO ...
    CheckpointIOProbe.seen.clear()
    probe = [*TINY, "trainer.max_epochs=1", f"+callbacks.probe._target_={__name__}.CheckpointIOProbe"]
    train(compose_config(*probe), tmp_path / "probed", probe)
    assert [type(io) for io in CheckpointIOProbe.seen] == [AtomicCheckpointIO]
    # ... which a SIGKILL in the middle of a save cannot leave half written.
    target = tmp_path / "ckpt" / "last.ckpt"
    proc = subprocess.Popen([sys.executable, "-c", SAVER, str(target)])
    deadline = time.time() + 60
    while not (target.is_file() and list(target.parent.glob(".last.ckpt.*.tmp"))):  # a second save under way
        assert proc.poll() is None and time.time() < deadline
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    saved = torch.load(target, weights_only=True)
    assert torch.equal(saved["w"], torch.full((16_000_000,), float(saved["n"])))
    AtomicCheckpointIO().save_checkpoint({"n": -1}, target)  # the next save clears what the killed one left
    assert [p.name for p in target.parent.iterdir()] == ["last.ckpt"]


def test_evaluate_names_a_file_it_cannot_use_in_one_line(finished, tmp_path, monkeypatch, capsys):
    main = evaluate.main

    def one_line(args: list[str]) -> str:
        assert run_main(args, tmp_path, monkeypatch, entry=main) == 2
        err = capsys.readouterr().err
        assert "Traceback" not in err and len(err.strip().splitlines()) == 1
        return err.strip()

    assert one_line([]).startswith("usage: python -m fcexp.evaluate ckpt_path=")
    truncated = tmp_path / "truncated.ckpt"
    shutil.copy(finished / "checkpoints" / "last.ckpt", truncated)
    truncate(truncated)
    assert (
        one_line([f"ckpt_path={truncated}"])
        == f"error: {truncated} does not load (truncated, damaged or not a checkpoint)"
    )
    text = tmp_path / "notes.ckpt"
    text.write_text("not a checkpoint")
    assert one_line([f"ckpt_path={text}"]) == f"error: {text} does not load (truncated, damaged or not a checkpoint)"
    foreign = tmp_path / "foreign.ckpt"
    torch.save({"state_dict": {"layer.weight": torch.zeros(2)}}, foreign)
    assert one_line([f"ckpt_path={foreign}"]) == f"error: {foreign} is not an fcexp checkpoint (it holds no fcexp net)"
    future = tmp_path / "future.ckpt"
    checkpoint = torch.load(finished / "checkpoints" / "last.ckpt", weights_only=True)
    torch.save(checkpoint | {"fcexp_checkpoint_format": 99}, future)
    assert "is in checkpoint format 99, from a newer fcexp (this one reads up to 1)" in one_line(
        [f"ckpt_path={future}"]
    )


def test_evaluate_of_a_run_folder_names_the_checkpoint_it_used_and_those_it_skipped(
    run_copy, tmp_path, monkeypatch, capsys
):
    last = run_copy / "checkpoints" / "last.ckpt"
    truncate(last)
    assert run_main([f"ckpt_path={run_copy}"], tmp_path, monkeypatch, entry=evaluate.main) is None
    out, err = capsys.readouterr()
    assert err.splitlines() == [f"skipped {last} does not load (truncated, damaged or not a checkpoint)"]
    (best,) = (run_copy / "checkpoints").glob("best-epoch*.ckpt")
    assert out.startswith(f"{best}: test loss ")


def test_paths_are_taken_as_the_shell_gives_them(mnist_root, tmp_path, monkeypatch, capsys):
    """A sweep member's folder (`=`, `,`) under a folder with a space, unquoted, as tab completion types it, through
    the entry points' command-line handling: the run starts there, evaluate reads its checkpoint, resume continues
    it."""
    run_dir = tmp_path / "my runs" / "activation=relu,model.dropout=0.2"
    args = ["data.limit_train=1280", "trainer.max_epochs=1", "callbacks=plain", "callbacks.progress.refresh_rate=0"]
    assert run_main([*args, f"hydra.run.dir={run_dir}"], tmp_path, monkeypatch, entry=cli) is None
    record = json.loads((run_dir / "metrics.json").read_text())
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    capsys.readouterr()
    assert run_main([f"ckpt_path={ckpt}"], tmp_path, monkeypatch, entry=evaluate.cli) is None
    assert f"test accuracy {record['metrics']['test/acc']:.4f}" in capsys.readouterr().out
    assert run_main([f"resume={run_dir}", "trainer.max_epochs=2"], tmp_path, monkeypatch, entry=cli) is None
    record = json.loads((run_dir / "metrics.json").read_text())
    assert record["status"] == "completed" and record["resumes"][0]["from_step"] == 10
    assert not (run_dir / "checkpoints" / INTERRUPTED).exists()
