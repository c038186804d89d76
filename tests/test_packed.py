"""Packed sweeps (`+launcher=packed`): each member is the run it would be alone, isolated from the others, resumable,
with every artifact a solo run has."""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
from functools import partial
from pathlib import Path

import lightning as L
import pytest
import torch
from conftest import run_here, run_in_process, start_cli
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import plugin_data_pb2
from test_faults import run_main, wait_for

from fcexp.module import Classifier
from fcexp.pack import Member, member_checkpoint, merged_checkpoint, pack_sizes
from fcexp.record import checkpoint_step
from fcexp.train import Job, compose_config, train, train_pack

PACKED = ["-m", "+launcher=packed", "callbacks.progress.refresh_rate=0", "trainer.enable_model_summary=false"]
# The seed's net (BatchNorm on layer 2, L2), 50 steps an epoch, the step loss logged at every step.
EXACT = ["data.limit_train=6400", "trainer.max_epochs=2", "model.dropout=0", "trainer.log_every_n_steps=1"]


def records(sweep: Path) -> dict[str, dict]:
    return {p.parent.name: json.loads(p.read_text()) for p in sweep.glob("*/metrics.json")}


def member_dir(sweep: Path, **hparams) -> Path:
    """The job folder of the sweep whose recorded hyperparameters include `hparams`."""
    (found,) = [
        p.parent
        for p in sweep.glob("*/metrics.json")
        if hparams.items() <= json.loads(p.read_text())["hparams"].items()
    ]
    return found


def only_sweep(cwd: Path) -> Path:
    (sweep,) = (cwd / "runs" / "sweeps").iterdir()
    return sweep


def events(run_dir: Path) -> EventAccumulator:
    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0, "histograms": 0, "images": 0})
    acc.Reload()
    return acc


@pytest.fixture(scope="module")
def packed_sweep(mnist_root, tmp_path_factory) -> tuple[Path, str]:
    """Four members in one pack: two activations, two seeds (so two batch orders), no dropout."""
    cwd = tmp_path_factory.mktemp("packed")
    with pytest.MonkeyPatch.context() as patch, contextlib.redirect_stdout(io.StringIO()) as out:
        assert run_main([*PACKED, *EXACT, "activation=relu,tanh", "seed=0,1"], cwd, patch) is None
    assert "training a pack of 4" in out.getvalue()
    return only_sweep(cwd), out.getvalue()


@pytest.mark.slow
@pytest.mark.parametrize(("activation", "seed"), [("tanh", 0), ("relu", 1)])
def test_a_member_trains_as_it_would_alone(packed_sweep, tmp_path, activation, seed):
    sweep, _ = packed_sweep
    overrides = [*EXACT, f"activation={activation}", f"seed={seed}", "callbacks.progress.refresh_rate=0"]
    alone = train(compose_config(*overrides), tmp_path, overrides)
    member = member_dir(sweep, activation=activation, seed=seed)
    packed, solo = events(member), events(tmp_path)
    losses = [[e.value for e in ev.Scalars("train/loss_step")][:50] for ev in (packed, solo)]
    assert len(losses[0]) == 50
    # A pack of 4 against a pack of 1: other shapes, so other summation orders in the batched products, and the
    # difference grows as training amplifies it. Measured over these 50 steps on the AMD EPYC: at most 2.7e-7
    # relative (5.9e-7 over both epochs); the Intel Xeon's BLAS differs more (1e-3 in val loss after 2 epochs).
    # 1e-4 holds either, and a member trained on another's batches or seed would be off by far more.
    assert losses[0] == pytest.approx(losses[1], rel=1e-4)
    record = json.loads((member / "metrics.json").read_text())
    for mine, theirs in zip(record["history"], alone["history"], strict=True):
        assert abs(mine["val/acc"] - theirs["val/acc"]) <= 0.001


@pytest.mark.slow
def test_each_member_is_a_run_with_everything_a_solo_run_has(packed_sweep):
    sweep, stdout = packed_sweep
    folders = sorted(p.parent for p in sweep.glob("*/metrics.json"))
    assert len(folders) == 4
    for folder in folders:
        record = json.loads((folder / "metrics.json").read_text())
        assert record["status"] == "completed" and record["provenance"]["git"] is not None
        # Its time is its share of the pack's: a sweep's times add up to the sweep's.
        assert record["pack"]["members"] == 4
        assert record["wall_time_s"] == pytest.approx(record["pack"]["wall_time_s"] / 4, abs=0.01)
        assert (folder / ".hydra" / "config.yaml").is_file() and (folder / "train.log").stat().st_size > 0
        assert {p.name for p in (folder / "figures").iterdir()} >= {"confusion_matrix.png", "train_digits.png"}
        ev = events(folder)
        tags = ev.Tags()
        assert {"grad_norm/layer01", "units/dead/layer01", "val/acc", "hp_metric"} <= set(tags["scalars"])
        assert "weights/layer01" in tags["histograms"]
        content = ev.PluginTagToContent("hparams")["_hparams_/session_start_info"]
        hparams = plugin_data_pb2.HParamsPluginData.FromString(content).session_start_info.hparams
        assert hparams["activation"].string_value == record["hparams"]["activation"]
        assert hparams["seed"].number_value == record["hparams"]["seed"]
    # The diagnostics are each member's own: the two activations' nets differ, and so do their gradients.
    grads = {f.name: events(f).Scalars("grad_norm/layer01")[-1].value for f in folders}
    assert len(set(grads.values())) == 4
    # A member's checkpoint is a solo run's: fcexp.evaluate reproduces its test accuracy.
    record = json.loads((folders[0] / "metrics.json").read_text())
    proc = run_in_process("fcexp.evaluate", f"ckpt_path='{folders[0] / 'checkpoints' / 'last.ckpt'}'", cwd=sweep)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"test accuracy {record['metrics']['test/acc']:.4f}" in proc.stdout
    assert "4 jobs" in stdout and (sweep / "compare.md").is_file()  # the sweep compared itself


SMALL = ["data.limit_train=5000", "trainer.max_epochs=1", "model.hidden=[128]", "model.batch_norm=false", "model.l2=0"]


# The case was the seed's net with its dropout, seed 3, 2 epochs on 5,000 images: before each member drew its
# masks from a stream of its own, its val loss was 0.3007 in a pack of four seeds and 0.2834 alone (6% apart). Here 2
# epochs on 2,560 images: on 5,000 the Intel Xeon's summation-order differences between a pack of 4 and one of 1
# grew to 2% in some step losses by step 60 and 0.86% in the last val loss, with the same masks (its first steps
# agreed within 1e-7); on 2,560 both epochs' val losses agree within 1e-6 there.
TWIN = ["data.limit_train=2560", "trainer.max_epochs=2", "callbacks=plain", "trainer.log_every_n_steps=1"]


def pack_of(tmp_path: Path, folder: str, *members: list[str]) -> list[dict]:
    """Train one pack whose members have these overrides (besides TWIN): each member's metrics.json content."""
    jobs = [Job(compose_config(*TWIN, *o), tmp_path / folder / str(i), [*TWIN, *o]) for i, o in enumerate(members)]
    return train_pack(jobs)


def val_losses(result: dict) -> list[float]:
    return [h["val/loss"] for h in result["history"]]


@pytest.mark.slow
def test_a_member_with_dropout_trains_as_its_solo_twin(mnist_root, tmp_path):
    packed = pack_of(tmp_path, "pack", *[[f"seed={s}"] for s in range(4)])[3]
    (alone,) = pack_of(tmp_path, "alone", ["seed=3"])
    # The same masks and batches from the first step (with another member's dropout stream the alone run's first step
    # losses differed by 0.2% at step 0 and up to 15% within 20 steps)...
    steps = [
        [e.value for e in events(d).Scalars("train/loss_step")][:20]
        for d in (tmp_path / "pack" / "3", tmp_path / "alone" / "0")
    ]
    assert len(steps[0]) == 20 and steps[0] == pytest.approx(steps[1], rel=1e-5)
    # ...and then other summation orders in the products of a pack of 4 and one of 1.
    assert val_losses(packed) == pytest.approx(val_losses(alone), rel=5e-3)
    assert packed["metrics"]["test/acc"] == pytest.approx(alone["metrics"]["test/acc"], abs=0.002)


@pytest.mark.slow
def test_a_members_numbers_do_not_depend_on_its_pack_mates_settings(mnist_root, tmp_path):
    """The same member beside two pack-mates of other settings, in packs of the same size: equal bits. One mate
    shares its dropout stream (same seed, dropout in the same layers, another rate), the other draws none."""
    member = ["seed=3", "model.dropout=0.2"]
    beside_shared = pack_of(tmp_path, "a", member, ["seed=3", "model.dropout=0.5", "activation=tanh"])[0]
    beside_none = pack_of(tmp_path, "b", member, ["seed=3", "model.dropout=0", "model.l2=0"])[0]
    assert beside_shared["history"] == beside_none["history"]
    assert beside_shared["metrics"] == beside_none["metrics"]


@pytest.mark.slow
def test_a_diverging_member_fails_alone(mnist_root, tmp_path, monkeypatch, capsys):
    """Members may differ in learning rate; the one that diverges is stopped and recorded, the other is unchanged:
    exactly what it is beside a healthy pack-mate of a learning rate close to its own, in a pack of the same size
    (a pack of another size sums its batched products in another order: equal only within that rounding)."""
    args = ["data.limit_train=5000", "trainer.max_epochs=1", "model.dropout=0", "optimizer=sgd", "callbacks=plain"]
    args += ["trainer.log_every_n_steps=5"]
    assert run_main([*PACKED, *args, "optimizer.lr=0.05,10000"], tmp_path, monkeypatch) == 1  # a job failed
    assert "training a pack of 2" in capsys.readouterr().out
    by_lr = {r["hparams"]["optimizer.lr"]: r for r in records(only_sweep(tmp_path)).values()}
    assert by_lr[10000]["status"] == "failed" and "loss is nan" in by_lr[10000]["error"]
    assert by_lr[0.05]["status"] == "completed"
    assert run_main([*PACKED, *args, "optimizer.lr=0.05,0.05001", "runs_dir=healthy"], tmp_path, monkeypatch) is None
    assert "training a pack of 2" in capsys.readouterr().out
    reference = {
        r["hparams"]["optimizer.lr"]: r for r in records(next((tmp_path / "healthy" / "sweeps").iterdir())).values()
    }
    for key in ("val/acc", "val/loss", "test/acc", "train/loss"):
        assert by_lr[0.05]["metrics"][key] == reference[0.05]["metrics"][key], key


@pytest.mark.slow
def test_ctrl_c_leaves_every_member_resumable_and_the_rerun_finishes_the_sweep(mnist_root, tmp_path):
    """Two packs (two widths); a real SIGINT in the second. The printed rerun skips the first pack's members and
    continues the second's from their checkpoints."""
    args = ["data.limit_train=25600", "trainer.max_epochs=3", "model.hidden=[64],[96]", "seed=0,1", *SMALL[3:]]
    proc = start_cli("fcexp.train", *PACKED, *args, cwd=tmp_path)
    wait_for(tmp_path / "runs" / "sweeps", proc)
    sweep = only_sweep(tmp_path)
    job = "data.limit_train=25600,model.batch_norm=False,model.hidden=[96],model.l2=0,seed={},"
    second = [sweep / (job.format(s) + "trainer.enable_model_summary=False,trainer.max_epochs=3") for s in (0, 1)]
    wait_for(second[1] / "checkpoints" / "last.ckpt", proc)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err[-2000:]
    assert "each of the pack's 2 runs kept its checkpoint" in err
    for folder in second:
        assert json.loads((folder / "metrics.json").read_text())["status"] == "interrupted"
        assert (folder / "checkpoints" / "interrupted.ckpt").is_file()
    (finish,) = [line.split(": ", 1)[1] for line in err.splitlines() if line.startswith("finish the sweep with: ")]
    done = run_here(finish, tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("finished before (skip_finished=true)") == 2  # the first pack is not trained again
    resumed = records(sweep)
    assert [r["status"] for r in resumed.values()] == ["completed"] * 4
    for folder in second:
        # Continued, not restarted (that it ends as an uninterrupted pack does is the next test's).
        step = checkpoint_step(folder / "checkpoints" / "last.ckpt")
        assert 0 < resumed[folder.name]["resumes"][0]["from_step"] < step


class StopMidEpoch(L.Callback):
    """A real Ctrl-C (SIGINT) in the middle of the second epoch's eighth step, after its dropout masks were drawn
    and before its backward pass: where a user's Ctrl-C most often lands."""

    fired = False

    def on_before_backward(self, trainer, pl_module, loss) -> None:
        if trainer.current_epoch == 1 and trainer.global_step == 27 and not StopMidEpoch.fired:
            StopMidEpoch.fired = True
            os.kill(os.getpid(), signal.SIGINT)


@pytest.mark.parametrize("members", [1, 2])
def test_a_pack_interrupted_mid_epoch_ends_as_an_uninterrupted_one(members, mnist_root, tmp_path):
    """A run, and a pack of two members with their own seeds (so their own batch orders), with dropout: Ctrl-C in
    the middle of a step stops at its end, and the resumed run continues each member's epoch, optimizer, dropout
    draws and epoch sums exactly."""
    base = [*SMALL, "data.limit_train=2560", "trainer.max_epochs=3", "callbacks=plain"]
    stop = [*base, f"+callbacks.stop._target_={__name__}.StopMidEpoch"]

    def jobs(folder: str, overrides: list[str], resume: bool = False) -> list[Job]:
        # Member 1 has batch norm, member 0 not: the pack holds a norm that member 0's checkpoints must leave out.
        own = [[f"seed={s}", f"model.batch_norm={bool(s)}"] for s in range(members)]
        return [
            Job(compose_config(*overrides, *o), tmp_path / folder / str(s), [*overrides, *o], resume)
            for s, o in enumerate(own)
        ]

    StopMidEpoch.fired = False
    with pytest.raises(KeyboardInterrupt):
        train_pack(jobs("stopped", stop))
    signal.signal(signal.SIGINT, signal.default_int_handler)  # Lightning ignores a second Ctrl-C after the first
    resumed = train_pack(jobs("stopped", stop, resume=True))
    whole = train_pack(jobs("whole", base))
    for mine, theirs in zip(resumed, whole, strict=True):
        assert mine["resumes"][0]["from_step"] == 20 + 8  # the interrupted step finished, then the run stopped
        assert mine["metrics"] == theirs["metrics"]  # equal shapes (a pack of the same size): equal bits
        assert [h["train/loss"] for h in mine["history"]] == [h["train/loss"] for h in theirs["history"]]
    # Each member's checkpoint is its solo net's: it loads strictly into a net of its own config.
    for s in range(members):
        model = Classifier.load_from_checkpoint(tmp_path / "stopped" / str(s) / "checkpoints" / "last.ckpt")
        assert len(model.net.norm_layers) == s
    # In TensorBoard the resumed runs' epoch points sit at the uninterrupted runs' steps.
    for s in range(members):
        # Sorted: in one process within one second, the event files' names (time, pid, a counter) sort by the
        # counter as text, which puts the resumed run's file before the first one's once it reaches 10.
        steps = [sorted(e.step for e in events(tmp_path / f / str(s)).Scalars("val/acc")) for f in ("stopped", "whole")]
        assert steps[0] == steps[1] == [19, 39, 59]


def test_bf16_mixed_trains_on_cpu(mnist_root, tmp_path):
    # 40 steps of a 256-256 net; validated and tested on 1,280 images (a CPU without AMX emulates bf16 slowly).
    overrides = ["data.limit_train=5000", "trainer.max_epochs=1", "trainer.precision=bf16-mixed", "callbacks=plain"]
    overrides += ["model.hidden=[256,256]", "+trainer.limit_val_batches=10", "+trainer.limit_test_batches=10"]
    result = train(compose_config(*overrides), tmp_path, overrides)
    assert result["metrics"]["val/acc"] > 0.85


def test_packs_split_evenly():
    assert pack_sizes(48, 32) == [24, 24]
    assert pack_sizes(5, 32) == [5]
    assert pack_sizes(7, 3) == [3, 2, 2]
    assert sum(pack_sizes(240, 16)) == 240


def test_members_that_cannot_share_a_model_train_in_separate_packs(mnist_root, tmp_path, monkeypatch, capsys):
    args = [*SMALL, "data.limit_train=1000", "callbacks=plain", "model.hidden=[32],[48]", "activation=relu,tanh,prelu"]
    assert run_main([*PACKED, *args, "optimizer=adam,sgd"], tmp_path, monkeypatch) is None
    # Widths and optimizer types split the 12 jobs four ways; a learned activation (prelu) trains alone.
    sizes = [
        int(line.split("training a pack of ")[1].split(":")[0])
        for line in capsys.readouterr().out.splitlines()
        if "training a pack of " in line
    ]
    assert sorted(sizes) == [1, 1, 1, 1, 2, 2, 2, 2]
    assert [r["status"] for r in records(only_sweep(tmp_path)).values()] == ["completed"] * 12


@pytest.mark.slow
def test_one_gather_per_save_writes_each_members_files_once(mnist_root, tmp_path, monkeypatch):
    """Three members, three epochs: at each validation one dump of the pack's state, every member's last.ckpt once,
    and its best only when it improved (a member made to get worse keeps its first best)."""
    from lightning.pytorch.trainer.connectors.checkpoint_connector import _CheckpointConnector

    from fcexp.record import AtomicCheckpointIO

    dumps, writes = [], []
    dump, save = _CheckpointConnector.dump_checkpoint, AtomicCheckpointIO.save_checkpoint
    monkeypatch.setattr(
        _CheckpointConnector, "dump_checkpoint", lambda self, *a, **k: dumps.append(1) or dump(self, *a, **k)
    )
    monkeypatch.setattr(
        AtomicCheckpointIO,
        "save_checkpoint",
        lambda self, c, path, *a, **k: writes.append(Path(path)) or save(self, c, path, *a, **k),
    )
    # Member 2's learning rate grows past usefulness after epoch 1 (lr 1: Adam overshoots), so it stops improving.
    jobs = [["seed=0"], ["seed=1"], ["seed=2", "optimizer.lr=1.0"]]
    overrides = ["data.limit_train=1280", "trainer.max_epochs=3", "callbacks=plain", "model.dropout=0"]
    results = train_pack(
        [Job(compose_config(*overrides, *o), tmp_path / str(i), [*overrides, *o]) for i, o in enumerate(jobs)]
    )
    assert len(dumps) == 3  # one per validation, for the whole pack
    for i, result in enumerate(results):
        mine = [w for w in writes if w.parent.parent == tmp_path / str(i)]
        assert [w.name for w in mine].count("last.ckpt") == 3
        accs = [h["val/acc"] for h in result["history"]]
        improved = [a > max(accs[:e], default=-1) for e, a in enumerate(accs)]
        assert [w.name for w in mine if w.name.startswith("best")] == [
            f"best-epoch{e:02d}.ckpt" for e, better in enumerate(improved) if better
        ]
        (best,) = (tmp_path / str(i) / "checkpoints").glob("best-*.ckpt")  # the older ones removed
        assert best.name == f"best-epoch{accs.index(max(accs)):02d}.ckpt"
    assert not all(
        h > 0 for h in [results[2]["history"][e]["val/acc"] - results[2]["history"][e - 1]["val/acc"] for e in (1, 2)]
    )


def test_member_checkpoints_cut_and_merge_back_exactly():
    """Three members, two optimizer settings (two parameter groups), batch norm on one only: each member's cut is a
    solo checkpoint (it loads strictly, optimizer included), and merging the cuts gives the pack's state back."""
    members = [
        {
            "activation": "relu",
            "dropout": 0.0,
            "batch_norm": bn,
            "l2": 0.0,
            "init": "torch",
            "label_smoothing": 0.0,
            "seed": i,
            "optimizer": partial(torch.optim.Adam, lr=lr),
        }
        for i, (bn, lr) in enumerate([(False, 1e-3), (True, 1e-3), (False, 1e-2)])
    ]
    pack = Classifier(hidden=[16, 8], in_features=12, num_classes=3, members=members)
    optimizer = pack.configure_optimizers()
    for _ in range(2):
        pack(torch.randn(5, 12)).square().sum().backward()
        pack.on_before_optimizer_step(optimizer)
        optimizer.step()
        pack.optimizer_zero_grad(0, 0, optimizer)
    whole = {
        "state_dict": pack.state_dict(),
        "optimizer_states": [optimizer.state_dict()],
        "global_step": 2,
        "hyper_parameters": dict(pack.hparams),
        "callbacks": {},
    }
    cuts = [member_checkpoint(whole, pack, Member(i, Path("."), None)) for i in range(3)]
    for i, cut in enumerate(cuts):
        alone = Classifier(**cut["hyper_parameters"], optimizer=members[i]["optimizer"])
        alone.load_state_dict(cut["state_dict"])  # strict: exactly its own keys
        alone.configure_optimizers().load_state_dict(cut["optimizer_states"][0])
        assert bool(alone.net.norm_layers) == (i == 1)
    fresh = Classifier(hidden=[16, 8], in_features=12, num_classes=3, members=members)
    merged = merged_checkpoint(cuts, fresh)
    for key, value in whole["state_dict"].items():
        if key.startswith("net.norms"):  # the members without batch norm get the fresh pack's values back
            assert torch.equal(merged["state_dict"][key][1], value[1]), key
        else:
            assert torch.equal(merged["state_dict"][key], value), key
    fresh.load_state_dict(merged["state_dict"])
    restored = fresh.configure_optimizers()
    restored.load_state_dict(merged["optimizer_states"][0])
    names = [n for n, _ in pack.named_parameters()]
    before, after = optimizer.state_dict()["state"], restored.state_dict()["state"]
    assert [g["lr"] for g in restored.param_groups] == [1e-3, 1e-2]  # members 0-1 and member 2
    for p, entry in before.items():
        name = names[p % len(names)]
        # A norm only member 1 (row 1 of group 0) has: the others' moments restart at zero.
        rows = [1] if name.startswith("net.norms") and p < len(names) else slice(None)
        if name.startswith("net.norms") and p >= len(names):
            assert p not in after  # member 2, alone in group 1, has no norm: no state to restore
            continue
        for moment in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(after[p][moment][rows], entry[moment][rows]), (name, moment)


def test_a_refused_value_fails_its_job_and_the_rest_still_pack(mnist_root, tmp_path, monkeypatch, capsys):
    args = ["data.limit_train=1000", "callbacks=plain", "model.hidden=[32]", *SMALL[1:2], *SMALL[3:]]
    assert run_main([*PACKED, *args, "model.dropout=0,0.2,1.5"], tmp_path, monkeypatch) == 1  # a job failed
    out = capsys.readouterr().out
    assert "training a pack of 2" in out and "one by one" not in out
    by_dropout = {r["hparams"]["model.dropout"]: r for r in records(only_sweep(tmp_path)).values()}
    assert by_dropout[1.5]["status"] == "failed" and "dropout must be in [0, 1), got 1.5" in by_dropout[1.5]["error"]
    assert by_dropout[0]["status"] == by_dropout[0.2]["status"] == "completed"
