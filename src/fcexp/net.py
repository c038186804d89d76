"""The fully connected net: one activation registry and one function that builds any depth and width."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

# Adding an activation is one line here; everything else asks `make_activation`.
ACTIVATIONS: dict[str, type[nn.Module]] = {
    "sigmoid": nn.Sigmoid,
    "tanh": nn.Tanh,
    "relu": nn.ReLU,
    "leaky_relu": nn.LeakyReLU,
    "elu": nn.ELU,
    "selu": nn.SELU,
    "gelu": nn.GELU,
    "silu": nn.SiLU,
    "swish": nn.SiLU,
    "mish": nn.Mish,
    "softplus": nn.Softplus,
    "prelu": nn.PReLU,
    "identity": nn.Identity,
}

# Keras' initializers by their Keras names; "torch" keeps PyTorch's own default.
INITS = {
    "torch": None,
    "glorot_uniform": nn.init.xavier_uniform_,
    "glorot_normal": nn.init.xavier_normal_,
    "he_uniform": lambda w: nn.init.kaiming_uniform_(w, nonlinearity="relu"),
    "he_normal": lambda w: nn.init.kaiming_normal_(w, nonlinearity="relu"),
    "lecun_normal": lambda w: nn.init.kaiming_normal_(w, nonlinearity="linear"),
}

# The seed's output-activation rule: what turns the last layer's logits into what is reported.
OUTPUT_ACTIVATIONS = {"multiclass": nn.Softmax(dim=-1), "binary": nn.Sigmoid(), "regression": nn.Identity()}

ActivationSpec = str | Mapping[str, Any]


class Dropout(nn.Dropout):
    """nn.Dropout, but on the CPU each unit's coin is a 16-bit slice of a 64-bit random integer: four coins per draw
    of the generator, a quarter of the time of torch's bernoulli kernel (p is rounded to a multiple of 1/65536)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0 or x.is_cuda:
            return super().forward(x)
        n = x.numel()
        draws = torch.randint(-(2**63), 2**63 - 1, ((n + 3) // 4,), dtype=torch.int64)
        coins = draws.view(torch.int16)[:n].view(x.shape)  # uniform over -32768..32767
        dropped = round(self.p * 65536)
        return x * (coins >= dropped - 32768) * (65536 / (65536 - dropped))


def make_activation(spec: ActivationSpec) -> nn.Module:
    """A fresh activation layer from a name (`"tanh"`) or a mapping (`{"name": "leaky_relu", "negative_slope": 0.1}`).

    Unknown names fail here, and only here.
    """
    params = dict(spec) if isinstance(spec, Mapping) else {"name": spec}
    name = params.pop("name", None)
    if name not in ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r}; known: {', '.join(ACTIVATIONS)}")
    try:
        return ACTIVATIONS[name](**params)
    except TypeError as err:
        raise ValueError(f"activation {name!r} does not take {params}: {err}") from None


def _is_list(value: Any) -> bool:
    return isinstance(value, Sequence) and not isinstance(value, str)


def per_layer(name: str, value: Any, depth: int, kind: type = float) -> list:
    """Broadcast a scalar to every hidden layer, or check that a list gives one value per layer, each of `kind`."""
    values = list(value) if _is_list(value) else [value] * depth
    fits = (
        (lambda v: isinstance(v, bool))
        if kind is bool
        else (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool))
    )
    if not all(map(fits, values)):
        what = "true or false" if kind is bool else "a number"
        raise ValueError(f"{name} must be {what} or a list of them (one per hidden layer), got {value!r}")
    if len(values) != depth:
        raise ValueError(
            f"{name} has {len(values)} values {values} but the net has {depth} hidden layers; "
            f"give one value for all layers or a list of {depth}"
        )
    return values


def check_per_layer(depth: int, values: Mapping[str, tuple[Any, type]]) -> None:
    """Check each per-layer knob's type, then name every list whose length is not the net's depth in one message,
    so that one retry fixes them all. `values` maps a knob's name to its value and the type of its entries."""
    for name, (value, kind) in values.items():
        per_layer(name, value, len(value) if _is_list(value) else depth, kind)
    wrong = [
        f"{name} has {len(v)} value{'s' * (len(v) != 1)} {list(v)}"
        for name, (v, _) in values.items()
        if _is_list(v) and len(v) != depth
    ]
    if wrong:
        raise ValueError(
            f"the net has {depth} hidden layers but {' and '.join(wrong)}; "
            f"give one value for all layers or a list of {depth} each"
        )


def check_hidden(hidden: Sequence[int]) -> list[int]:
    sizes = list(hidden) if isinstance(hidden, Sequence) and not isinstance(hidden, str) else [hidden]
    if not sizes or any(not isinstance(s, int) or isinstance(s, bool) or s <= 0 for s in sizes):
        raise ValueError(f"hidden sizes must be a non-empty list of positive integers, got {hidden!r}")
    return sizes


def build_mlp(
    in_features: int,
    hidden: Sequence[int],
    out_features: int,
    activation: ActivationSpec = "relu",
    dropout: float | Sequence[float] = 0.0,
    batch_norm: bool | Sequence[bool] = False,
    init: str = "torch",
) -> nn.Sequential:
    """Linear → [BatchNorm] → activation → [Dropout] per hidden layer, then a Linear to logits.

    `dropout` and `batch_norm` take one value for every hidden layer or a list with one per layer.
    """
    sizes = check_hidden(hidden)
    dropouts = per_layer("dropout", dropout, len(sizes))
    norms = per_layer("batch_norm", batch_norm, len(sizes), kind=bool)
    for p in dropouts:
        if not 0.0 <= p < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {p}")
    if init not in INITS:
        raise ValueError(f"unknown init {init!r}; known: {', '.join(INITS)}")

    layers: list[nn.Module] = []
    width = in_features
    for size, p, norm in zip(sizes, dropouts, norms, strict=True):
        # A bias before BatchNorm is cancelled by its mean subtraction, as Keras users learn the hard way.
        layers.append(nn.Linear(width, size, bias=not norm))
        if norm:
            layers.append(nn.BatchNorm1d(size))
        layers.append(make_activation(activation))
        if p > 0:
            layers.append(Dropout(p))
        width = size
    layers.append(nn.Linear(width, out_features))

    if INITS[init] is not None:
        for layer in layers:
            if isinstance(layer, nn.Linear):
                INITS[init](layer.weight)
                if layer.bias is not None:
                    nn.init.zeros_(layer.bias)
    return nn.Sequential(*layers)


def linear_layers(net: nn.Module) -> list[nn.Linear]:
    """The net's Linear layers in order; the last one produces the logits."""
    return [m for m in net.modules() if isinstance(m, nn.Linear)]


def l2_penalty(net: nn.Module, l2: float | Sequence[float]) -> torch.Tensor:
    """Keras' kernel_regularizer=l2(λ): λ·Σw² over each hidden Linear's weight (not biases, not BatchNorm)."""
    hidden = linear_layers(net)[:-1]
    total = torch.zeros((), device=hidden[0].weight.device)
    for layer, lam in zip(hidden, per_layer("l2", l2, len(hidden)), strict=True):
        if lam:
            total = total + lam * layer.weight.square().sum()
    return total
