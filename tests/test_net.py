import pytest
import torch
from torch import nn

from fcexp.net import ACTIVATIONS, build_mlp, l2_penalty, linear_layers, make_activation


@pytest.mark.parametrize("name", sorted(ACTIVATIONS))
@pytest.mark.parametrize("hidden", [[7], [16, 8], [4] * 10])
def test_every_activation_builds_any_depth(name, hidden):
    net = build_mlp(784, hidden, 10, activation=name, dropout=0.1, batch_norm=True)
    out = net(torch.rand(5, 784))
    assert out.shape == (5, 10)
    assert [m.out_features for m in linear_layers(net)] == [*hidden, 10]
    assert sum(isinstance(m, ACTIVATIONS[name]) for m in net) == len(hidden)


def test_seed_architecture_in_keras_order():
    net = build_mlp(784, [512, 512], 10, "relu", dropout=0.2, batch_norm=[False, True])
    kinds = [type(m).__name__ for m in net]
    assert kinds == ["Linear", "ReLU", "Dropout", "Linear", "BatchNorm1d", "ReLU", "Dropout", "Linear"]
    assert sum(p.numel() for p in net.parameters()) == 784 * 512 + 512 + 512 * 512 + 2 * 512 + 512 * 10 + 10


def test_activation_parameters_reach_the_layer():
    layer = make_activation({"name": "leaky_relu", "negative_slope": 0.3})
    assert isinstance(layer, nn.LeakyReLU) and layer.negative_slope == 0.3


def test_unknown_activation_lists_the_known_ones():
    with pytest.raises(ValueError, match=r"unknown activation 'relu6'; known: sigmoid, tanh, relu, leaky_relu"):
        make_activation("relu6")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"hidden": []}, "non-empty list of positive integers"),
        ({"hidden": [512, 0]}, "non-empty list of positive integers"),
        ({"dropout": 1.0}, r"dropout must be in \[0, 1\)"),
        ({"dropout": [0.1, 0.2, 0.3]}, "dropout has 3 values"),
        ({"init": "orthogonal"}, "unknown init 'orthogonal'"),
    ],
)
def test_bad_architecture_is_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        build_mlp(784, **{"hidden": [8, 8], **kwargs}, out_features=10)


def test_l2_is_keras_sum_of_squares_on_chosen_kernels_only():
    net = build_mlp(3, [2, 2], 2, batch_norm=[False, True])
    first, second, _ = linear_layers(net)
    with torch.no_grad():
        first.weight.fill_(1.0)  # 4 weights
        second.weight.copy_(torch.tensor([[1.0, 2.0], [3.0, 4.0]]))
    assert l2_penalty(net, [0.0, 0.001]).item() == pytest.approx(0.001 * (1 + 4 + 9 + 16))
    assert l2_penalty(net, 0.5).item() == pytest.approx(0.5 * (6 + 30))


def test_dropout_keeps_the_expected_value():
    net = build_mlp(1000, [1000], 1, "identity", dropout=0.25)
    drop = net[2]
    x = torch.ones(200, 1000)
    out = drop(x)
    assert (out == 0).float().mean().item() == pytest.approx(0.25, abs=0.01)
    assert out.mean().item() == pytest.approx(1.0, abs=0.02)
    drop.eval()
    assert torch.equal(drop(x), x)
