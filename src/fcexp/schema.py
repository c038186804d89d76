"""The types of every config value, as dataclasses OmegaConf checks a composed config against before anything runs.

The YAML under conf/ holds the values; these classes hold only what each value must be. Groups whose keys depend
on the choice (an activation's or an optimizer's parameters) get the schema of the chosen option. Ranges are
checked where a value is understood (the net, the data module, the callbacks); `validated` checks the few
top-level ones.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Any, Optional

from hydra.types import ConvertMode
from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

# OmegaConf resolves these annotations at runtime: they use typing's names, not `X | None`.
# ruff: noqa: UP006, UP045


@dataclass
class Data:
    _target_: str = MISSING
    root: str = MISSING
    batch_size: int = MISSING
    eval_batch_size: int = MISSING
    normalize: str = MISSING
    labels: str = MISSING
    val_size: int = MISSING
    limit_train: Optional[int] = MISSING
    seed: int = MISSING


@dataclass
class Model:
    _target_: str = MISSING
    _convert_: str = MISSING
    hidden: typing.List[int] = MISSING
    # A scalar for every hidden layer or a list with one value per layer: checked by the net (net.per_layer).
    dropout: Any = MISSING
    batch_norm: Any = MISSING
    l2: Any = MISSING
    init: str = MISSING
    label_smoothing: float = MISSING
    compile: bool = MISSING
    activation: Any = MISSING
    optimizer: Any = MISSING


@dataclass
class Activation:
    name: str = MISSING


@dataclass
class LeakyReLU(Activation):
    negative_slope: float = MISSING


@dataclass
class ELU(Activation):
    alpha: float = MISSING


@dataclass
class Softplus(Activation):
    beta: float = MISSING
    threshold: float = MISSING


@dataclass
class GELU(Activation):
    approximate: str = MISSING


@dataclass
class PReLU(Activation):
    num_parameters: int = MISSING
    init: float = MISSING


@dataclass
class Optimizer:
    _target_: str = MISSING
    _partial_: bool = MISSING
    lr: float = MISSING


@dataclass
class Adam(Optimizer):
    eps: float = MISSING
    fused: bool = MISSING


@dataclass
class AdamW(Optimizer):
    weight_decay: float = MISSING
    fused: bool = MISSING


@dataclass
class SGD(Optimizer):
    momentum: float = MISSING
    nesterov: bool = MISSING
    fused: bool = MISSING


@dataclass
class RMSprop(Optimizer):
    alpha: float = MISSING
    eps: float = MISSING


@dataclass
class Trainer:
    """The Trainer arguments every trainer config sets; others (strategy, num_nodes, limit_*) pass to Lightning."""

    _target_: str = MISSING
    accelerator: str = MISSING
    devices: Any = MISSING  # an int, a list of device indices or "auto"
    max_epochs: int = MISSING
    precision: str = MISSING
    log_every_n_steps: int = MISSING
    deterministic: bool = MISSING
    enable_model_summary: bool = MISSING


@dataclass
class Checkpoint:
    _target_: str = MISSING
    monitor: str = MISSING
    mode: str = MISSING
    best: Optional[str] = MISSING
    last: Optional[str] = MISSING


@dataclass
class Progress:
    _target_: str = MISSING
    refresh_rate: int = MISSING


@dataclass
class GradNorms:
    _target_: str = MISSING
    every_n_steps: Optional[int] = MISSING


@dataclass
class UnitHealth:
    _target_: str = MISSING
    held_out: int = MISSING
    saturation: float = MISSING


@dataclass
class TrainAccuracy:
    _target_: str = MISSING
    images: int = MISSING


@dataclass
class Histograms:
    _target_: str = MISSING
    held_out: int = MISSING


@dataclass
class Figures:
    _target_: str = MISSING
    mistakes: int = MISSING
    folder: str = MISSING


@dataclass
class Callbacks:
    """fcexp's callbacks; `~callbacks.<name>` leaves one out (None), `+callbacks.<name>=…` adds another."""

    checkpoint: Optional[Checkpoint] = None
    progress: Optional[Progress] = None
    grad_norms: Optional[GradNorms] = None
    unit_health: Optional[UnitHealth] = None
    train_accuracy: Optional[TrainAccuracy] = None
    histograms: Optional[Histograms] = None
    figures: Optional[Figures] = None


@dataclass
class Train:
    data: Data = field(default_factory=Data)
    model: Model = field(default_factory=Model)
    activation: Activation = field(default_factory=Activation)
    optimizer: Optimizer = field(default_factory=Optimizer)
    trainer: Trainer = field(default_factory=Trainer)
    callbacks: Callbacks = field(default_factory=Callbacks)
    seed: int = MISSING
    resume: Optional[str] = None
    skip_finished: bool = MISSING
    threads: Optional[int] = MISSING
    replicates: int = MISSING
    runs_dir: str = MISSING


ACTIVATIONS = {"leaky_relu": LeakyReLU, "elu": ELU, "softplus": Softplus, "prelu": PReLU, "gelu": GELU}
OPTIMIZERS = {
    "torch.optim.Adam": Adam,
    "torch.optim.AdamW": AdamW,
    "torch.optim.SGD": SGD,
    "torch.optim.RMSprop": RMSprop,
}
TYPE_NAMES = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}
SEED_RANGE = (0, 2**32 - 1)  # what every generator a run seeds (python, numpy, torch) accepts


def _type_name(annotation: Any) -> str:
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if typing.get_origin(annotation) in (list, typing.List):
        return f"a list of {TYPE_NAMES.get(args[0], 'values').removeprefix('an ').removeprefix('a ')}s"
    if typing.get_origin(annotation) is typing.Union:
        return f"{_type_name(args[0])} or null"
    return TYPE_NAMES.get(annotation, getattr(annotation, "__name__", str(annotation)))


def _schema(cfg: DictConfig) -> DictConfig:
    """The schema for this composition: the chosen activation's and optimizer's own parameters typed too."""
    schema = OmegaConf.structured(Train)
    activation = cfg.get("activation")
    optimizer = cfg.get("optimizer")
    name = activation.get("name") if isinstance(activation, DictConfig) else None
    target = optimizer.get("_target_") if isinstance(optimizer, DictConfig) else None
    schema.activation = OmegaConf.structured(ACTIVATIONS.get(name, Activation))
    schema.optimizer = OmegaConf.structured(OPTIMIZERS.get(target, Optimizer))
    # Lightning's Trainer, user-added callbacks and options without a class here take keys these classes don't
    # name; those go unchecked here and to the constructor, which names what it refuses.
    open_nodes = [schema.trainer, schema.callbacks]
    open_nodes += [
        node
        for node, known in ((schema.activation, name in ACTIVATIONS), (schema.optimizer, target in OPTIMIZERS))
        if not known
    ]
    for node in open_nodes:
        OmegaConf.set_struct(node, False)
    return schema


def _annotation(schema: DictConfig, full_key: str) -> Any:
    """The type the schema gives `full_key` (Any where it names none), read from the dataclasses' annotations."""
    head, *rest = full_key.split(".")
    # OmegaConf's node of a key, not its value: only the node knows the type it was declared with.
    node = schema._get_node(head) if head in schema else None
    annotation = OmegaConf.get_type(node) if rest and isinstance(node, DictConfig) else Train
    for part in rest or [head]:
        cls = next((a for a in (annotation, *typing.get_args(annotation)) if dataclasses.is_dataclass(a)), None)
        annotation = typing.get_type_hints(cls).get(part, Any) if cls is not None else Any
    return annotation


def validated(cfg: DictConfig) -> DictConfig:
    """`cfg` typed by the schema; a wrong type or an unknown key is a ValueError naming the key and what it takes."""
    schema = _schema(cfg)
    try:
        typed = OmegaConf.merge(schema, cfg)
        OmegaConf.to_container(typed, resolve=True, throw_on_missing=True)  # interpolations resolve to their types
    except OmegaConfBaseException as err:
        key = err.full_key or "config"
        expected = _annotation(schema, key)
        if expected is Any or "not in" in str(err):
            raise ValueError(f"{key}: {str(err).splitlines()[0]}") from None
        raise ValueError(f"{key} must be {_type_name(expected)}, got {err.value!r}") from None
    modes = [m.value for m in ConvertMode]
    if typed.model._convert_ not in modes:
        raise ValueError(f"model._convert_ must be one of {', '.join(modes)} (Hydra's), got {typed.model._convert_!r}")
    for key in ("activation", "optimizer"):
        if not isinstance(typed.model[key], DictConfig):
            raise ValueError(f"model.{key} must be the {key}'s settings (${{{key}}}), got {typed.model[key]!r}")
    if not SEED_RANGE[0] <= typed.seed <= SEED_RANGE[1]:
        raise ValueError(f"seed must be an integer from {SEED_RANGE[0]} to {SEED_RANGE[1]}, got {typed.seed}")
    for key in ("max_epochs", "log_every_n_steps"):
        if typed.trainer[key] < 1:
            raise ValueError(f"trainer.{key} must be a positive integer, got {typed.trainer[key]}")
    if typed.replicates < 1:
        raise ValueError(f"replicates must be a positive integer (runs per configuration), got {typed.replicates}")
    if typed.threads is not None and typed.threads <= 0:
        raise ValueError(f"threads must be a positive integer or null (all cores), got {typed.threads}")
    return typed
