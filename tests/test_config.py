from importlib.resources import files

import pytest
from hydra.utils import instantiate
from torch import nn

from fcexp.train import compose_config

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
