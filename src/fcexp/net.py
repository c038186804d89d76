"""The fully connected net: one activation registry and one function that builds any depth and width."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
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

ACTIVATION_TYPES = tuple(set(ACTIVATIONS.values()))

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


def make_activation(spec: ActivationSpec) -> nn.Module:
    """A fresh activation layer from a name (`"tanh"`) or a mapping (`{"name": "leaky_relu", "negative_slope": 0.1}`).

    Unknown names fail here, and only here.
    """
    params = dict(spec) if isinstance(spec, Mapping) else {"name": spec}
    name = params.pop("name", None)
    if name not in ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r}; known: {', '.join(ACTIVATIONS)}")
    try:
        layer = ACTIVATIONS[name](**params)
        # Some settings are refused only when applied (gelu's approximate): apply it once, to a unit per parameter.
        layer(torch.zeros(1, getattr(layer, "num_parameters", 1)))
    except (TypeError, ValueError, RuntimeError) as err:
        raise ValueError(f"activation {name!r} does not take {params}: {_first_line(err)}") from None
    return layer


def _first_line(err: Exception) -> str:
    return str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__


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
    """The hidden layers' sizes; none (`[]`) is a linear classifier, the input's one Linear layer to the logits."""
    sizes = list(hidden) if isinstance(hidden, Sequence) and not isinstance(hidden, str) else [hidden]
    if any(not isinstance(s, int) or isinstance(s, bool) or s <= 0 for s in sizes):
        raise ValueError(f"hidden sizes must be a list of positive integers ([] for none), got {hidden!r}")
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
            layers.append(nn.Dropout(p))
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


def coins(generator: torch.Generator, shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """Uniform random numbers of `shape` from `generator`, for dropout masks: int16 over -32768..32767 on the CPU,
    floats in [0, 1) elsewhere (CUDA, MPS).

    On the CPU each coin is a 16-bit slice of a 64-bit random integer: four coins per draw of the generator, a
    quarter of the time of torch's bernoulli kernel (a rate is then rounded to a multiple of 1/65536)."""
    n = math.prod(shape)
    if device.type != "cpu":
        return torch.rand(shape, generator=generator, device=device)
    draws = torch.randint(-(2**63), 2**63 - 1, ((n + 3) // 4,), dtype=torch.int64, generator=generator)
    return draws.view(torch.int16)[:n].view(shape)


def stream_seed(seed: int) -> int:
    """A member's dropout seed, from its seed: not the seed itself, which would replay the stream its initial
    weights were drawn from."""
    return (seed * 0x9E3779B97F4A7C15 + 0x632BE59BD9B4E019) % 2**63


class DropoutStreams:
    """Every member's dropout masks from a random generator of its own, seeded from its seed: a member draws the
    masks its solo twin (same seed, same settings) draws, whoever its pack-mates are.

    Members with the same seed and dropout in the same layers are always in the same state: they share one
    generator and one draw, so a grid on one seed draws each layer's coins once, however many members it has."""

    def __init__(self, seeds: Sequence[int], rates: Sequence[Sequence[float]]):
        keys = [(seed, tuple(r > 0 for r in layer)) for seed, layer in zip(seeds, rates, strict=True)]
        self.keys = list(dict.fromkeys(keys))
        self.group = [self.keys.index(k) for k in keys]  # member -> its stream
        self.rates = [torch.tensor([float(layer[k]) for layer in rates]).view(-1, 1, 1) for k in range(len(rates[0]))]
        self.generators: list[torch.Generator] = []
        self.pending: Sequence[torch.Tensor] | None = None  # states to continue from, once on their device
        self.device: torch.device | None = None
        self.to(torch.device("cpu"))

    def to(self, device: torch.device) -> None:
        """The generators and each layer's thresholds on `device`, where the streams continue."""
        if device == self.device:
            return
        states = self.pending or (self.states() if self.generators else None)
        self.generators = [torch.Generator(device).manual_seed(stream_seed(seed)) for seed, _ in self.keys]
        self.load(states)
        self.device = device
        self.layers: list[tuple | None] = []  # per layer: the streams that draw, thresholds, scales, rows
        for k, p in enumerate(self.rates):
            drawing = [g for g, (_, pattern) in enumerate(self.keys) if pattern[k]]
            if not drawing:
                self.layers.append(None)
                continue
            # Each member's row of the layer's draws (a member without dropout here keeps every unit: p = 0).
            rows = [drawing.index(g) if g in drawing else 0 for g in self.group]
            rows = None if len(drawing) == 1 else torch.tensor(rows)
            if device.type == "cpu":  # int16 coins: kept at or above the threshold
                dropped = torch.round(p * 65536)
                keep, scale = (dropped - 32768).to(torch.int16), 65536 / (65536 - dropped)
            else:  # uniform floats in [0, 1)
                keep, scale = p, 1 / (1 - p)
            if bool((p == p[0]).all()) and rows is None:
                # One rate for all: a number keeps the comparison and the scale scalar, nothing to broadcast.
                keep, scale = int(keep[0]) if device.type == "cpu" else float(keep[0]), float(scale[0])
            else:
                keep, scale = keep.to(device), scale.to(device)
            self.layers.append((drawing, keep, scale, None if rows is None else rows.to(device)))

    def states(self) -> list[torch.Tensor]:
        """Each member's generator state (for a checkpoint)."""
        return [self.generators[g].get_state() for g in self.group]

    def load(self, states: Sequence[torch.Tensor] | None) -> None:
        """Continue from the members' `states` (a checkpoint's). States of another kind of generator wait for the
        streams to move to their device (a checkpoint loads before Lightning moves the net); on the CPU, a CUDA
        run's states never fit, and its streams restart from their seeds."""
        if states is None:
            return
        fits = [states[self.group.index(g)].numel() == gen.get_state().numel() for g, gen in enumerate(self.generators)]
        for g, generator in enumerate(self.generators):
            if fits[g]:
                generator.set_state(states[self.group.index(g)])
        self.pending = None if all(fits) else states

    def __call__(self, h: torch.Tensor, k: int) -> torch.Tensor:
        """Layer `k`'s dropout on `h` (members, batch, units)."""
        if h.device != self.device:
            self.to(h.device)
        layer = self.layers[k]
        if layer is None:
            return h
        drawing, keep, scale, rows = layer
        shape = (1, *h.shape[1:])
        draws = [coins(self.generators[g], shape, h.device) for g in drawing]
        draws = draws[0] if rows is None else torch.cat(draws)[rows]
        return h * (draws >= keep) * scale


def _seeded_mlp(seed: int | None, *args: Any) -> nn.Sequential:
    """`build_mlp(*args)` drawing its initial weights from `seed` (None: from the current random state)."""
    if seed is None:
        return build_mlp(*args)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build_mlp(*args)


class PackedMLP(nn.Module):
    """Several nets of one shape trained as one: a layer's weights are stacked along a leading member dimension, so a
    step costs a few batched matrix products however many members there are. A single net is a pack of one.

    Each member is given by a mapping with its `activation`, `dropout`, `batch_norm`, `init` and `seed`. It starts
    from exactly the weights `build_mlp` gives with that seed. Inputs are (batch, features), shared by all members,
    or (members, batch, features); outputs are (members, batch, classes). Members are independent: no gradient,
    statistic or random draw of one depends on another's values.
    """

    def __init__(self, in_features: int, hidden: Sequence[int], out_features: int, members: Sequence[Mapping]):
        super().__init__()
        sizes = check_hidden(hidden)
        nets = [
            _seeded_mlp(
                m.get("seed"),
                in_features,
                sizes,
                out_features,
                m["activation"],
                m["dropout"],
                m["batch_norm"],
                m["init"],
            )
            for m in members
        ]
        self.members = len(nets)
        linears = [linear_layers(net) for net in nets]
        self.depth = len(sizes)
        self.in_features, self.out_features = in_features, out_features
        # Weights as (members, in, out), so that a layer is one torch.bmm; biases (members, 1, out).
        self.weights = nn.ParameterList(
            torch.stack([ls[k].weight.detach().t() for ls in linears]) for k in range(self.depth + 1)
        )
        self.biases = nn.ParameterList(
            torch.stack([_bias(ls[k]) for ls in linears]).unsqueeze(1) for k in range(self.depth + 1)
        )
        flags = [per_layer("batch_norm", m["batch_norm"], self.depth, kind=bool) for m in members]
        self.norm_layers = [k for k in range(self.depth) if any(f[k] for f in flags)]
        self.norms = nn.ModuleDict({str(k): _StackedNorm(sizes[k], [f[k] for f in flags]) for k in self.norm_layers})
        # Per layer: which members add a bias (a layer followed by batch norm has none in build_mlp).
        # Decided here, on the host, so that a step never waits for the device to answer them.
        self.bias_everywhere = [all(not f[k] for f in flags) for k in range(self.depth)]
        for k in range(self.depth):
            mask = torch.tensor([not f[k] for f in flags]).view(-1, 1, 1).float()
            self.register_buffer(f"bias_mask{k}", mask, persistent=False)
        self.rates = [per_layer("dropout", m["dropout"], self.depth) for m in members]  # per member, per layer
        # A member without a seed (a net built outside fcexp.train) takes one from the current random state.
        seeds = [int(torch.randint(2**62, ())) if m.get("seed") is None else m["seed"] for m in members]
        self.dropout = DropoutStreams(seeds, self.rates)
        # Members with the same parameter-free activation share one call; runs of them are applied in turn.
        self.specs = [m["activation"] for m in members]
        acts = []
        for net, m in zip(nets, members, strict=True):
            act = next((layer for layer in net if isinstance(layer, ACTIVATION_TYPES)), None)
            # A linear classifier (no hidden layer) has none in its net: its own is built, and never applied.
            acts.append(make_activation(m["activation"]) if act is None else act)
        if self.members > 1 and any(any(True for _ in a.parameters()) for a in acts):
            raise ValueError("an activation with learned parameters (prelu) trains only in a pack of one")
        self.runs: list[tuple[int, int]] = []
        for i, spec in enumerate(self.specs):
            if self.runs and self.specs[self.runs[-1][0]] == spec:
                self.runs[-1] = (self.runs[-1][0], i + 1)
            else:
                self.runs.append((i, i + 1))
        self.activations = nn.ModuleList(acts[a] for a, _ in self.runs)

    def activate(self, h: torch.Tensor) -> torch.Tensor:
        if len(self.runs) == 1:
            return self.activations[0](h)
        return torch.cat([act(h[a:b]) for act, (a, b) in zip(self.activations, self.runs, strict=True)])

    def member_activation(self, i: int) -> nn.Module:
        return next(act for act, (a, b) in zip(self.activations, self.runs, strict=True) if a <= i < b)

    def forward(self, x: torch.Tensor, capture: list | None = None) -> torch.Tensor:
        """Logits (members, batch, classes). With `capture`, (pre-activation, activation) per hidden layer is
        appended to it."""
        h = x.expand(self.members, *x.shape) if x.dim() == 2 else x
        for k in range(self.depth):
            # A masked bias still takes part (with a zero gradient): DDP wants every parameter used.
            bias = self.biases[k] if self.bias_everywhere[k] else self.biases[k] * getattr(self, f"bias_mask{k}")
            h = torch.baddbmm(bias, h, self.weights[k])
            if k in self.norm_layers:
                h = self.norms[str(k)](h)
            pre, h = h, self.activate(h)
            if capture is not None:
                capture.append((pre, h))
            if self.training:
                h = self.dropout(h, k)
        return torch.baddbmm(self.biases[-1], h, self.weights[-1])

    def l2_penalty(self, l2: torch.Tensor, layers: Sequence[int]) -> torch.Tensor:
        """Keras' kernel_regularizer per member: `l2` is (members, hidden layers); each member's λ·Σw² (members,)
        over the hidden `layers` where some member has a λ."""
        total = torch.zeros(self.members, device=l2.device)
        for k in layers:
            total = total + l2[:, k] * self.weights[k].square().sum((1, 2))
        return total

    def member(self, i: int) -> nn.Sequential:
        """Member `i` as the nn.Sequential `build_mlp` makes, its tensors views of the pack's: what the diagnostics
        read. Its gradients are the pack's current ones."""
        layers: list[nn.Module] = []
        for k in range(self.depth + 1):
            w = self.weights[k]
            has_bias = k == self.depth or bool(getattr(self, f"bias_mask{k}")[i])
            linear = nn.Linear(w.shape[1], w.shape[2], bias=has_bias, device="meta")
            linear.weight = nn.Parameter(w.detach()[i].t(), requires_grad=False)
            linear.weight.grad = None if w.grad is None else w.grad[i].t()
            if has_bias:
                linear.bias = nn.Parameter(self.biases[k].detach()[i, 0], requires_grad=False)
            layers.append(linear)
            if k == self.depth:
                break
            if str(k) in self.norms and self.norms[str(k)].enabled[i]:
                layers.append(self.norms[str(k)].member(i))
            layers.append(self.member_activation(i))
            if self.rates[i][k] > 0:
                layers.append(nn.Dropout(self.rates[i][k]))
        return nn.Sequential(*layers)


def _bias(linear: nn.Linear) -> torch.Tensor:
    return linear.bias.detach() if linear.bias is not None else torch.zeros(linear.out_features)


class _StackedNorm(nn.Module):
    """BatchNorm1d per member over (members, batch, units), for the members whose flag is set; the others pass
    through unchanged. Same statistics, momentum and epsilon as nn.BatchNorm1d."""

    momentum, eps = 0.1, 1e-5

    def __init__(self, units: int, enabled: Sequence[bool]):
        super().__init__()
        members = len(enabled)
        self.enabled = list(enabled)
        self.weight = nn.Parameter(torch.ones(members, 1, units))
        self.bias = nn.Parameter(torch.zeros(members, 1, units))
        self.register_buffer("running_mean", torch.zeros(members, 1, units))
        self.register_buffer("running_var", torch.ones(members, 1, units))
        self.register_buffer("mask", torch.tensor(enabled).view(-1, 1, 1), persistent=False)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        members, batch, units = h.shape
        # torch's fused batch norm over (batch, members x units): every member's units are channels of their own.
        flat = h[0] if members == 1 else h.transpose(0, 1).reshape(batch, members * units)
        out = F.batch_norm(
            flat,
            self.running_mean.view(-1),
            self.running_var.view(-1),
            self.weight.view(-1),
            self.bias.view(-1),
            self.training,
            self.momentum,
            self.eps,
        )
        out = out.unsqueeze(0) if members == 1 else out.view(batch, members, units).transpose(0, 1)
        return out if all(self.enabled) else torch.where(self.mask, out, h)

    def member(self, i: int) -> nn.BatchNorm1d:
        norm = nn.BatchNorm1d(self.weight.shape[-1], device="meta")
        norm.weight = nn.Parameter(self.weight.detach()[i, 0], requires_grad=False)
        norm.bias = nn.Parameter(self.bias.detach()[i, 0], requires_grad=False)
        norm.running_mean, norm.running_var = self.running_mean[i, 0], self.running_var[i, 0]
        norm.num_batches_tracked = torch.zeros((), dtype=torch.long)
        return norm
