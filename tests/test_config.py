import sys
from importlib.resources import files

import pytest
from hydra.core.global_hydra import GlobalHydra
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch import nn

from fcexp.net import make_activation
from fcexp.train import compose_config, gpu_of_job, main, spread_over_gpus

CONF = files("fcexp.conf")
GROUPS = {
    g: sorted(p.name.removesuffix(".yaml") for p in CONF.joinpath(g).iterdir() if p.name.endswith(".yaml"))
    for g in ("activation", "optimizer", "trainer", "data", "model", "callbacks")
}


@pytest.mark.parametrize(("group", "option"), [(g, o) for g, opts in GROUPS.items() for o in opts])
def test_every_config_composes(group, option):
    cfg = compose_config(f"{group}={option}")
    assert cfg.trainer.max_epochs == 4


def test_default_is_the_seed():
    cfg = compose_config()
    assert cfg.model.hidden == [512, 512] and cfg.model.dropout == 0.2
    assert list(cfg.model.batch_norm) == [False, True] and list(cfg.model.l2) == [0.0, 0.001]
    assert cfg.activation.name == "relu" and cfg.optimizer._target_ == "torch.optim.Adam"
    assert cfg.optimizer.lr == 0.001 and cfg.data.batch_size == 128 and cfg.data.labels == "onehot"


def test_leaky_relu_override_builds_its_configured_slope():
    model = instantiate(compose_config("activation=leaky_relu", "activation.negative_slope=0.2").model)
    layers = [m for m in model.net.member(0) if isinstance(m, nn.LeakyReLU)]
    assert len(layers) == 2 and all(m.negative_slope == 0.2 for m in layers)


def test_short_overrides_reach_the_net():
    cfg = compose_config(
        "model.hidden=[64,32,16]", "model.dropout=0.5", "model.batch_norm=true", "model.l2=0.001", "optimizer=sgd"
    )
    model = instantiate(cfg.model)
    assert [m.p for m in model.net.member(0) if isinstance(m, nn.Dropout)] == [0.5] * 3
    assert sum(isinstance(m, nn.BatchNorm1d) for m in model.net.member(0)) == 3
    assert type(model.configure_optimizers()).__name__ == "SGD"


def test_slurm_gpu_presets_compose():
    gpu = compose_config("+launcher=slurm_gpu", with_hydra=True)
    assert gpu.hydra.launcher._target_ == "hydra_plugins.fcexp_slurm.slurm_launcher.SlurmLauncher"
    assert gpu.hydra.launcher.gpus_per_node == 1 and gpu.hydra.launcher.tasks_per_node == 1
    assert gpu.trainer.accelerator == "gpu" and gpu.trainer.devices == 1
    ddp = compose_config("+launcher=slurm_ddp", "hydra.launcher.tasks_per_node=8", with_hydra=True)
    assert ddp.hydra.launcher.gpus_per_node == 8  # one GPU per task
    assert ddp.trainer.strategy == "ddp" and ddp.trainer.accelerator == "gpu"
    # Read in the job, where hydra: resolves: as many devices as SLURM tasks, which Lightning requires.
    assert OmegaConf.to_container(ddp.trainer)["devices"] == "${hydra:launcher.tasks_per_node}"
    assert ddp.trainer.sync_batchnorm is False


def test_parallel_jobs_take_the_gpus_in_turn():
    assert [gpu_of_job(i, 4) for i in range(6)] == [0, 1, 2, 3, 0, 1]
    assert [gpu_of_job(i, 1) for i in range(3)] == [0, 0, 0]
    # Outside a parallel sweep (or on CPU) a trainer keeps its devices.
    cfg = compose_config("+launcher=parallel")
    spread_over_gpus(cfg)
    assert cfg.trainer.devices == 1


def test_help_lists_the_callback_sets_only(capsys, monkeypatch):
    """`--help` names each config group's options: for callbacks, the sets a run can be given (each keeps its
    checkpoints), not the pieces they are made of."""
    monkeypatch.setattr(sys, "argv", ["fcexp.train", "--help"])
    GlobalHydra.instance().clear()
    with pytest.raises(SystemExit):
        main()
    (line,) = [x for x in capsys.readouterr().out.splitlines() if x.startswith("callbacks: ")]
    assert line == "callbacks: default, plain"
    for option in GROUPS["callbacks"]:
        assert compose_config(f"callbacks={option}").callbacks.checkpoint is not None


@pytest.mark.parametrize("option", GROUPS["activation"])
def test_every_activation_setting_is_the_torch_layers_own(option):
    """Each conf/activation file lists its layer's settings, so `activation.<setting>=…` needs no `+`."""
    cfg = compose_config(f"activation={option}")
    settings = {k: v for k, v in OmegaConf.to_container(cfg.activation).items() if k != "name"}
    layer = make_activation(cfg.activation)
    assert all(getattr(layer, k, None) == v or k in ("num_parameters", "init") for k, v in settings.items())


def test_gelu_takes_its_approximation_as_a_plain_override():
    layer = make_activation(compose_config("activation=gelu", "activation.approximate=tanh").activation)
    assert layer.approximate == "tanh"


def test_checkpoint_settings_that_would_keep_the_wrong_file_are_refused():
    from fcexp.pack import Checkpoints

    with pytest.raises(ValueError, match=r"mode=max would keep the worst val/loss as best; .*mode=min"):
        Checkpoints(monitor="val/loss")
    assert Checkpoints(monitor="val/loss", mode="min").mode == "min"
    with pytest.raises(ValueError, match=r"callbacks.checkpoint.last must be a file name \(no /\) or null, got ''"):
        Checkpoints(last="")
    with pytest.raises(ValueError, match=r"callbacks.checkpoint.best must be a file name"):
        Checkpoints(best="sub/best")
