import pytest
import torch
from torch import nn

from fcexp.net import ACTIVATIONS, DropoutStreams, PackedMLP, build_mlp, linear_layers, make_activation


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
        ({"hidden": [512, 0]}, r"list of positive integers \(\[\] for none\)"),
        ({"dropout": 1.0}, r"dropout must be in \[0, 1\)"),
        ({"dropout": [0.1, 0.2, 0.3]}, "dropout has 3 values"),
        ({"init": "orthogonal"}, "unknown init 'orthogonal'"),
    ],
)
def test_bad_architecture_is_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        build_mlp(784, **{"hidden": [8, 8], **kwargs}, out_features=10)


def member(**knobs):
    return {"activation": "relu", "dropout": 0.0, "batch_norm": False, "init": "torch", "seed": 0} | knobs


def test_l2_is_keras_sum_of_squares_on_chosen_kernels_only():
    net = PackedMLP(3, [2, 2], 2, [member(batch_norm=[False, True])] * 2)
    with torch.no_grad():
        net.weights[0].fill_(1.0)  # 3 x 2 weights a member
        net.weights[1].copy_(torch.tensor([[1.0, 2.0], [3.0, 4.0]]))
    penalty = net.l2_penalty(torch.tensor([[0.0, 0.001], [0.5, 0.5]]), layers=[0, 1])
    assert penalty.tolist() == pytest.approx([0.001 * (1 + 4 + 9 + 16), 0.5 * (6 + 30)])


def test_dropout_keeps_the_expected_value_per_member():  # the CPU's int16 coins (CUDA's floats: gpu_check.sh)
    streams = DropoutStreams([0, 1], [[0.25], [0.0]])
    x = torch.ones(2, 200, 1000)
    out = streams(x, 0)
    assert (out[0] == 0).float().mean().item() == pytest.approx(0.25, abs=0.01)
    assert out[0].mean().item() == pytest.approx(1.0, abs=0.02)
    assert torch.equal(out[1], x[1])  # a member without dropout is untouched


def test_a_members_masks_are_its_own_whoever_its_pack_mates_are():
    x = torch.ones(3, 64, 100)
    alone = DropoutStreams([3], [[0.2, 0.2]])
    packed = DropoutStreams([3, 5, 3], [[0.2, 0.2], [0.5, 0.0], [0.2, 0.0]])
    for _ in range(2):  # two steps: the streams advance alike
        for k in range(2):
            mine = alone(x[:1], k)
            theirs = packed(x, k)
            assert torch.equal(theirs[0], mine[0])
    # The third member has its seed but no dropout in layer 2: a stream of its own, equal in layer 1 only.
    assert packed.group == [0, 1, 2]
    fresh = DropoutStreams([3, 3], [[0.2, 0.2], [0.2, 0.2]])
    assert fresh.group == [0, 0]  # the same seed and layers: one generator, one draw
    out = fresh(x[:2], 0)
    assert torch.equal(out[0], out[1])


def test_dropout_streams_continue_from_their_saved_states():
    x = torch.ones(2, 64, 100)
    streams = DropoutStreams([3, 4], [[0.2], [0.5]])
    streams(x, 0)
    states = streams.states()
    expected = streams(x, 0)
    resumed = DropoutStreams([3, 4], [[0.2], [0.5]])
    resumed.load(states)
    assert torch.equal(resumed(x, 0), expected)


def test_a_member_is_the_net_build_mlp_makes_with_its_seed():
    knobs = [member(seed=3, batch_norm=[False, True]), member(seed=4, activation="tanh", dropout=0.5)]
    pack = PackedMLP(784, [64, 32], 10, knobs)
    x = torch.randn(50, 784)
    pack.train()
    pack(x).sum().backward()  # one training step's batch statistics
    pack.eval()
    for i, k in enumerate(knobs):
        torch.manual_seed(k["seed"])
        alone = build_mlp(784, [64, 32], 10, k["activation"], k["dropout"], k["batch_norm"], k["init"])
        first = [layer.weight for layer in linear_layers(alone)]
        assert all(torch.equal(w, pack.weights[n][i].t()) for n, w in enumerate(first))
        view = pack.member(i).eval()
        assert [type(m) for m in view] == [type(m) for m in alone]
        torch.testing.assert_close(view(x), pack(x)[i])
        assert view[0].weight.grad is not None  # the pack's gradients, what GradientNorms reads


def test_no_hidden_layer_is_a_linear_classifier():
    net = build_mlp(784, [], 10, "sigmoid")
    assert [type(m) for m in net] == [nn.Linear]
    knobs = [member(seed=s, activation=act) for s, act in ((0, "sigmoid"), (1, "relu"))]
    pack = PackedMLP(784, [], 10, knobs)
    x = torch.randn(20, 784)
    for i, k in enumerate(knobs):
        torch.manual_seed(k["seed"])
        (linear,) = build_mlp(784, [], 10, k["activation"])
        torch.testing.assert_close(pack(x)[i], linear(x))  # no activation anywhere: the logits are x W + b
        assert [type(m) for m in pack.member(i)] == [nn.Linear]


def test_members_are_independent():
    pack = PackedMLP(784, [32, 32], 10, [member(seed=s, batch_norm=True) for s in range(3)])
    x = torch.randn(3, 16, 784)
    x[1, 0, 0] = float("nan")  # member 1's batch holds a NaN
    out = pack(x)
    out.sum().backward()
    assert out[1].isnan().all() and not out[[0, 2]].isnan().any()
    assert not pack.weights[0].grad[[0, 2]].isnan().any()
    clean = PackedMLP(784, [32, 32], 10, [member(seed=s, batch_norm=True) for s in (0, 2)])
    torch.testing.assert_close(clean(x[[0, 2]]), out[[0, 2]])


def test_learned_activations_do_not_pack():
    with pytest.raises(ValueError, match="prelu"):
        PackedMLP(784, [8], 10, [member(activation="prelu")] * 2)
