"""The diagnostics callbacks on tiny real runs: what they log to TensorBoard and write into the run folder."""

import math
from functools import partial

import lightning as L
import matplotlib.image
import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from fcexp.callbacks import GradientNorms, TrainAccuracy, UnitHealth, hidden_activity, histograms, unit_stats
from fcexp.data import MNISTDataModule
from fcexp.module import Classifier
from fcexp.net import PackedMLP
from fcexp.train import compose_config, train

TINY = [
    "data.limit_train=1280",
    "trainer.max_epochs=2",
    "trainer.log_every_n_steps=2",
    "callbacks.progress.refresh_rate=0",
]


def events(run_dir) -> EventAccumulator:
    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0, "histograms": 0, "images": 0})
    acc.Reload()
    return acc


@pytest.fixture(scope="module")
def default_run(mnist_root, tmp_path_factory):
    """fcexp.train.train with the default callbacks (every diagnostic on): 20 steps of the seed's net."""
    run_dir = tmp_path_factory.mktemp("run")
    train(compose_config(*TINY, f"runs_dir={run_dir}"), run_dir, TINY)
    return run_dir, events(run_dir)


@pytest.mark.slow
def test_gradient_norms_are_finite_and_per_layer(default_run):
    _, ev = default_run
    tags = ev.Tags()["scalars"]
    layers = sorted(t for t in tags if t.startswith("grad_norm/layer"))
    assert layers == ["grad_norm/layer01", "grad_norm/layer02", "grad_norm/layer03"]  # two hidden + output
    for tag in [*layers, "grad_norm/first_over_last"]:
        values = ev.Scalars(tag)
        assert [e.step for e in values] == list(range(0, 20, 2))  # every log_every_n_steps
        assert all(math.isfinite(e.value) and e.value > 0 for e in values)
    first, last = ev.Scalars("grad_norm/layer01")[0].value, ev.Scalars("grad_norm/layer03")[0].value
    assert ev.Scalars("grad_norm/first_over_last")[0].value == pytest.approx(first / last, rel=1e-5)


@pytest.mark.slow
def test_unit_health_and_histograms_are_logged_per_layer(default_run):
    _, ev = default_run
    tags = ev.Tags()
    for kind in ("dead", "inactive", "saturated", "sparsity"):
        for layer in ("layer01", "layer02"):
            values = ev.Scalars(f"units/{kind}/{layer}")
            assert [e.step for e in values] == [0, 9, 19]  # training start, then each validation, at its last step
            assert all(0.0 <= e.value <= 1.0 for e in values)
    # A freshly initialized ReLU net: about half its outputs are zero, and no unit is dead on 1,000 images.
    assert 0.3 < ev.Scalars("units/sparsity/layer01")[0].value < 0.7
    assert ev.Scalars("units/dead/layer01")[0].value < 0.05
    expected = {f"{kind}/layer0{i}" for kind in ("preactivations", "activations") for i in (1, 2)}
    expected |= {f"weights/layer0{i}" for i in (1, 2, 3)}
    assert expected <= set(tags["histograms"])


@pytest.mark.slow
def test_train_accuracy_is_the_last_nets_in_eval_mode_on_the_first_training_images(default_run, mnist_root):
    run_dir, ev = default_run
    acc, loss = ev.Scalars("train/acc_eval"), ev.Scalars("train/loss_eval")
    assert [e.step for e in acc] == [e.step for e in loss] == [9, 19]  # each validation, as the unit counts
    # The last measurement, again: the net as training left it (last.ckpt), no dropout, the first 1,000 images.
    model = Classifier.load_from_checkpoint(run_dir / "checkpoints" / "last.ckpt", map_location="cpu").eval()
    data = MNISTDataModule(root=mnist_root, limit_train=1280)
    data.setup("fit")
    x, y = data.tensors["train"]
    with torch.no_grad():
        logits = model(x[:1000])
    assert acc[-1].value == pytest.approx(model.accuracies(logits, y[:1000]).item(), abs=1e-6)
    assert loss[-1].value == pytest.approx(model.losses(logits.unsqueeze(0), y[:1000]).item(), rel=1e-5)
    with pytest.raises(ValueError, match=r"callbacks\.train_accuracy\.images must be > 0, got 0"):
        TrainAccuracy(images=0)


@pytest.mark.slow
def test_figures_are_pngs_in_the_run_folder_and_in_tensorboard(default_run):
    run_dir, ev = default_run
    for name in ("train_digits", "confusion_matrix", "confident_mistakes"):
        path = run_dir / "figures" / f"{name}.png"
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        pixels = matplotlib.image.imread(path)
        assert pixels.ndim == 3 and min(pixels.shape[:2]) > 200
        assert f"figures/{name}" in ev.Tags()["images"]


def measure_units(model: Classifier, run_dir) -> EventAccumulator:
    """A real fit of one step with UnitHealth, whose first measurement (step 0) is taken before that step."""
    trainer = L.Trainer(
        max_steps=1,
        logger=TensorBoardLogger(run_dir, name="", version=""),
        callbacks=[UnitHealth(held_out=500)],
        limit_val_batches=1,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    trainer.fit(model, datamodule=MNISTDataModule(limit_train=256))
    return events(run_dir)


def at_start(ev: EventAccumulator, tag: str) -> float:
    (first, *_) = ev.Scalars(tag)
    assert first.step == 0
    return first.value


@pytest.mark.slow
def test_a_relu_layer_pushed_negative_is_measured_dead(mnist_root, tmp_path):
    model = Classifier(hidden=[32, 32], activation="relu", optimizer=partial(torch.optim.SGD, lr=0.01))
    with torch.no_grad():
        model.net.biases[0].fill_(-100.0)  # no MNIST image can lift a unit of layer 1 above zero
    ev = measure_units(model, tmp_path)
    assert at_start(ev, "units/dead/layer01") == 1.0
    assert at_start(ev, "units/sparsity/layer01") == 1.0
    assert at_start(ev, "units/inactive/layer01") == 1.0


@pytest.mark.slow
def test_a_sigmoid_layer_pushed_into_saturation_is_measured_saturated(mnist_root, tmp_path):
    model = Classifier(hidden=[32, 32], activation="sigmoid", optimizer=partial(torch.optim.SGD, lr=0.01))
    with torch.no_grad():
        model.net.biases[0].fill_(100.0)  # sigmoid(100) = 1 in float32: derivative 0 for every image
    ev = measure_units(model, tmp_path)
    assert at_start(ev, "units/saturated/layer01") == 1.0
    assert at_start(ev, "units/dead/layer01") == 0.0
    # Layer 2 sees a constant input of ones: whatever it does, it is the same for every image.
    assert at_start(ev, "units/saturated/layer02") < 1.0


def test_unit_stats_on_known_activations():
    tanh = {"activation": "tanh", "dropout": 0.0, "batch_norm": False, "init": "torch", "seed": 0}
    net = PackedMLP(4, [3], 2, [tanh, tanh | {"activation": "relu"}])
    with torch.no_grad():
        net.weights[0].zero_()
        net.biases[0].copy_(torch.tensor([0.0, 5.0, -5.0]))  # tanh'(0) = 1, tanh'(±5) ≈ 1.8e-4; relu: 0, 5, 0
    ((pre, post),) = hidden_activity(net, torch.randn(8, 4))
    stats = {k: v.tolist() for k, v in unit_stats(net, pre, post, saturation=0.01).items()}
    assert stats["saturated"] == pytest.approx([2 / 3, 2 / 3])  # relu'(0) and relu'(-5) are 0
    assert stats["inactive"] == pytest.approx([2 / 3, 2 / 3])  # pre-activations 0 and -5 are <= 0
    assert stats["dead"] == pytest.approx([1 / 3, 2 / 3])  # tanh(0) = 0; relu(0) = relu(-5) = 0
    assert stats["sparsity"] == pytest.approx([1 / 3, 2 / 3])


def test_histograms_count_each_member_alone():
    values = torch.tensor([[[0.0, 1.0, 2.0, 3.0]], [[5.0, 5.0, 5.0, 5.0]]])
    first, second = histograms(values, bins=2).tolist()
    assert first == [0.0, 3.0, 4.0, 6.0, 14.0, 1.5, 3.0, 2.0, 2.0]
    assert second == [5.0, 5.0, 4.0, 20.0, 100.0, 5.0, 5.5, 0.0, 4.0]  # one value: widened by 0.5, as numpy's


def test_diagnostics_read_a_compiled_net_as_an_uncompiled_one():
    """model.compile=true compiles the pack's call; the diagnostics capture its activations through its plain
    forward (no second compilation), and read the same values either way."""
    x = torch.randn(16, 784)
    readings = []
    for compile in (True, False):
        torch.manual_seed(0)
        module = Classifier(hidden=[32, 16], activation={"name": "tanh"}, batch_norm=[False, True], compile=compile)
        assert (getattr(module.net, "_compiled_call_impl", None) is not None) == compile
        readings.append(hidden_activity(module.net, x))
    assert len(readings[0]) == 2
    for (pre_c, post_c), (pre, post) in zip(*readings, strict=True):
        torch.testing.assert_close(pre_c, pre)
        torch.testing.assert_close(post_c, post)


def test_diagnostics_switch_off_one_by_one_or_all():
    assert {"grad_norms", "unit_health", "histograms", "figures"} <= set(compose_config().callbacks)
    assert "histograms" not in compose_config("~callbacks.histograms").callbacks
    plain = compose_config("callbacks=plain").callbacks
    assert {k for k, v in plain.items() if v is not None} == {"checkpoint", "progress"}


def test_bad_settings_name_the_value():
    with pytest.raises(ValueError, match="every_n_steps must be a positive integer or null, got 0"):
        GradientNorms(every_n_steps=0)
    with pytest.raises(ValueError, match=r"saturation in \(0, 1\), got 1000 and 2"):
        UnitHealth(held_out=1000, saturation=2)
