"""A pack's members as runs of their own: each member's callbacks see the pack's trainer and module as if the member
trained alone, and its checkpoints are the checkpoints that member would have written alone.

A single run is a pack of one, so this is also how every run is trained (fcexp.train.train_pack).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import pairwise
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from omegaconf import DictConfig, OmegaConf

from fcexp.data import MNISTDataModule
from fcexp.module import DROPOUT_STREAMS, Classifier
from fcexp.record import RunRecord


@dataclass
class Member:
    """One run of a pack: its folder, record, logger, callbacks and data, and its latest epoch metrics."""

    index: int
    run_dir: Path
    record: RunRecord
    logger: TensorBoardLogger | None = None
    callbacks: list[L.Callback] = field(default_factory=list)
    datamodule: MNISTDataModule | None = None
    error: BaseException | None = None  # set when it failed while the others went on

    def trainer(self, trainer: L.Trainer) -> MemberTrainer:
        return MemberTrainer(trainer, self)


class MemberTrainer:
    """The pack's trainer as one member's callbacks see it: that member's logger, metrics, folder and data, and a
    save_checkpoint that writes that member's checkpoint. Everything else is the pack's trainer."""

    def __init__(self, trainer: L.Trainer, member: Member):
        self._trainer, self._member = trainer, member

    def __getattr__(self, name: str) -> Any:
        return getattr(self._trainer, name)

    def __setattr__(self, name: str, value: Any) -> None:
        # A callback's writes (EarlyStopping's should_stop) reach the pack's trainer.
        if name in ("_trainer", "_member"):
            object.__setattr__(self, name, value)
        else:
            setattr(self._trainer, name, value)

    @property
    def loggers(self) -> list:
        return [self._member.logger] if self._member.logger is not None else []

    @property
    def logger(self):
        return self._member.logger

    @property
    def callback_metrics(self) -> dict[str, torch.Tensor]:
        return self._trainer.lightning_module.member_metrics[self._member.index]

    @property
    def default_root_dir(self) -> str:
        return str(self._member.run_dir)

    @property
    def log_dir(self) -> str:
        return str(self._member.run_dir)

    @property
    def datamodule(self) -> MNISTDataModule | None:
        return self._member.datamodule

    def save_checkpoint(self, filepath, weights_only: bool = False, storage_options: Any = None) -> None:
        trainer = self._trainer
        pack = trainer._checkpoint_connector.dump_checkpoint(weights_only)
        checkpoint = member_checkpoint(pack, trainer.lightning_module, self._member)
        trainer.strategy.save_checkpoint(checkpoint, filepath, storage_options=storage_options)
        trainer.strategy.barrier("Trainer.save_checkpoint")


class MemberModule:
    """The pack's module as one member's callbacks see it: `net` is that member's net alone (views of the pack's
    tensors and gradients), `predict_step` its probabilities."""

    def __init__(self, module: Classifier, index: int):
        self._module, self._index = module, index

    def __getattr__(self, name: str) -> Any:
        return getattr(self._module, name)

    @property
    def net(self) -> torch.nn.Sequential:
        return self._module.net.member(self._index)

    def predict_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        cached = self._module.test_probs
        if cached is not None and cached[0] is batch[0]:  # test_step just computed every member's
            return cached[1][self._index]
        return self._module.output_activation(self._module.net(batch[0])[self._index])


# The callback hooks a member's callbacks get, with the member's view of trainer and module.
HOOKS = (
    "setup",
    "teardown",
    "on_fit_start",
    "on_fit_end",
    "on_sanity_check_start",
    "on_sanity_check_end",
    "on_train_batch_start",
    "on_train_batch_end",
    "on_train_epoch_start",
    "on_train_epoch_end",
    "on_validation_epoch_start",
    "on_validation_epoch_end",
    "on_test_epoch_start",
    "on_test_epoch_end",
    "on_validation_batch_start",
    "on_validation_batch_end",
    "on_test_batch_start",
    "on_test_batch_end",
    "on_train_start",
    "on_train_end",
    "on_validation_start",
    "on_validation_end",
    "on_test_start",
    "on_test_end",
    "on_exception",
    "on_before_backward",
    "on_after_backward",
    "on_before_optimizer_step",
    "on_before_zero_grad",
)


class Members(L.Callback):
    """Runs each member's own callbacks on its view of the pack (members that failed are left out); their state
    goes into checkpoints member by member."""

    def __init__(self, members: Sequence[Member]):
        self.members = list(members)

    def state_dict(self) -> dict[str, Any]:
        return {"members": [{cb.state_key: cb.state_dict() for cb in m.callbacks} for m in self.members]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        for member, states in zip(self.members, state_dict["members"], strict=True):
            for cb in member.callbacks:
                if cb.state_key in states:
                    cb.load_state_dict(states[cb.state_key])


def _dispatch(hook: str):
    def call(self: Members, trainer: L.Trainer, pl_module: Classifier, *args: Any, **kwargs: Any) -> None:
        for member in self.members:
            if member.error is None:
                view, module = member.trainer(trainer), MemberModule(pl_module, member.index)
                for cb in member.callbacks:
                    getattr(cb, hook)(view, module, *args, **kwargs)

    call.__name__ = hook
    return call


for _hook in HOOKS:
    setattr(Members, _hook, _dispatch(_hook))


def _slice(value: Any, start: int, stop: int) -> Any:
    """A member's rows of a pack's tensor (a copy: saving a view would save the whole pack); scalars as they are."""
    return value[start:stop].clone() if torch.is_tensor(value) and value.dim() else value


def own_keys(module: Classifier, i: int) -> set[str]:
    """The keys of the pack's state that member `i` has alone: all but the batch norms of the layers where its own
    net has none (a pack holds one for a layer as soon as one member uses it)."""
    norms = module.net.norms
    foreign = {f"net.norms.{k}." for k, norm in norms.items() if not norm.enabled[i]}
    return {k for k in module.state_dict() if not k.startswith(tuple(foreign))}


def member_checkpoint(pack: dict[str, Any], module: Classifier, member: Member) -> dict[str, Any]:
    """The checkpoint a member would have written training alone, cut from the pack's: what `fcexp.evaluate` and a
    resume read."""
    i = member.index
    keys = own_keys(module, i)
    checkpoint = dict(pack)
    checkpoint["state_dict"] = {k: _slice(v, i, i + 1) for k, v in pack["state_dict"].items() if k in keys}
    if "optimizer_states" in pack:
        (optimizer,) = pack["optimizer_states"]
        g = next(g for g, (a, b) in enumerate(module.ranges) if a <= i < b)
        offset = module.ranges[g][0]
        group = optimizer["param_groups"][g]
        # The group lists the pack's parameters in module order; the member keeps its own, renumbered.
        names = [n for n, _ in module.named_parameters()]
        mine = [p for n, p in zip(names, group["params"], strict=True) if n in keys]
        state = {
            j: {k: _slice(v, i - offset, i - offset + 1) for k, v in optimizer["state"][p].items()}
            for j, p in enumerate(mine)
            if p in optimizer["state"]
        }
        params = list(range(len(mine)))
        checkpoint["optimizer_states"] = [{"state": state, "param_groups": [dict(group, params=params)]}]
    if DROPOUT_STREAMS in pack:
        checkpoint[DROPOUT_STREAMS] = [pack[DROPOUT_STREAMS][i]]
    states = pack.get("callbacks", {}).get(Members.__qualname__)
    checkpoint["callbacks"] = states["members"][i] if states else {}
    hparams = dict(pack["hyper_parameters"])
    checkpoint["hyper_parameters"] = {k: v for k, v in hparams.items() if k != "members"} | (
        hparams["members"][i] if "members" in hparams else {}
    )
    if member.datamodule is not None:
        checkpoint["datamodule_hparams_name"] = member.datamodule._hparams_name
        checkpoint["datamodule_hyper_parameters"] = dict(member.datamodule.hparams_initial)
    return checkpoint


def merged_checkpoint(checkpoints: Sequence[dict[str, Any]], module: Classifier) -> dict[str, Any]:
    """The pack's checkpoint from its members' own (the inverse of member_checkpoint): what resumes a pack. What a
    member lacks (a batch norm only its pack-mates use) starts as the fresh pack has it, with no optimizer state."""
    steps = {c["global_step"] for c in checkpoints}
    if len(steps) > 1:
        raise ValueError(f"the members' checkpoints are at different steps {sorted(steps)}; they cannot resume as one")
    fresh = module.state_dict()
    merged = dict(checkpoints[0])
    merged["state_dict"] = {
        # A count (a 0-dim tensor) is the same for all members: the first one's.
        k: torch.cat([c["state_dict"].get(k, v[i : i + 1]) for i, c in enumerate(checkpoints)])
        if v.dim()
        else checkpoints[0]["state_dict"][k]
        for k, v in fresh.items()
    }
    if all("optimizer_states" in c for c in checkpoints):
        names = [n for n, _ in module.named_parameters()]
        # Each member's optimizer state by parameter name (its own parameters, in module order).
        by_name = []
        for i, c in enumerate(checkpoints):
            mine = [n for n in names if n in own_keys(module, i)]
            by_name.append({mine[j]: entry for j, entry in c["optimizer_states"][0]["state"].items()})
        state, groups = {}, []
        for g, (a, b) in enumerate(module.ranges):
            ids = [g * len(names) + j for j in range(len(names))]
            for name, p in zip(names, ids, strict=True):
                entries = [by_name[m].get(name) for m in range(a, b)]
                present = next((e for e in entries if e is not None), None)
                if present is None:
                    continue
                state[p] = {
                    k: torch.cat([(e or {}).get(k, torch.zeros_like(v)) for e in entries])
                    if torch.is_tensor(v) and v.dim()
                    else v
                    for k, v in present.items()
                }
            group = dict(checkpoints[a]["optimizer_states"][0]["param_groups"][0], params=ids)
            groups.append(group)
        merged["optimizer_states"] = [{"state": state, "param_groups": groups}]
    if all(DROPOUT_STREAMS in c for c in checkpoints):
        merged[DROPOUT_STREAMS] = [state for c in checkpoints for state in c[DROPOUT_STREAMS]]
    merged["callbacks"] = {Members.__qualname__: {"members": [c.get("callbacks", {}) for c in checkpoints]}}
    merged["hyper_parameters"] = dict(module.hparams)
    return merged


class StackedLoader:
    """Each member's batches in its own order (its seed), stacked: (members, batch, ...)."""

    batch_sampler = None

    def __init__(self, loaders: Sequence):
        self.loaders = list(loaders)
        self.sampler = self  # Lightning calls sampler.set_epoch before each epoch

    def set_epoch(self, epoch: int) -> None:
        for loader in self.loaders:
            loader.sampler.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.loaders[0])

    def __iter__(self):
        for batches in zip(*self.loaders, strict=True):
            xs, ys = zip(*batches, strict=True)
            yield torch.stack(xs), torch.stack(ys)


class PackedData(L.LightningDataModule):
    """The members' data modules as one: the data loaded once and shared; training batches shared when the members
    share a seed, else each member's own order, stacked. Validation and test batches are the same for all."""

    def __init__(self, members: Sequence[MNISTDataModule]):
        super().__init__()
        settings = [{k: v for k, v in dm.hparams.items() if k != "seed"} for dm in members]
        if any(s != settings[0] for s in settings):
            raise ValueError("the members of a pack share their data settings; only data.seed may differ")
        self.members = list(members)

    def prepare_data(self) -> None:
        self.members[0].prepare_data()

    def setup(self, stage: str | None = None) -> None:
        first = self.members[0]
        for dm in self.members:
            dm.trainer = self.trainer  # their loaders read the fit loop's progress (a mid-epoch resume)
        first.setup(stage)
        for dm in self.members[1:]:
            dm.tensors = first.tensors

    def train_dataloader(self):
        loaders = [dm.train_dataloader() for dm in self.members]
        if len({dm.hparams.seed for dm in self.members}) == 1:
            return loaders[0]
        return StackedLoader(loaders)

    def val_dataloader(self):
        return self.members[0].val_dataloader()

    def test_dataloader(self):
        return self.members[0].test_dataloader()


def pack_key(cfg: DictConfig) -> str:
    """What jobs must share to train as one pack: everything but the knobs a member may have of its own
    (fcexp.module.MEMBER_KNOBS, the seed, the optimizer's settings) and where its results go."""
    shared = OmegaConf.to_container(cfg, resolve=True)
    for key in ("seed", "resume", "skip_finished", "replicates", "runs_dir", "activation"):
        shared.pop(key, None)
    for key in ("activation", "dropout", "batch_norm", "l2", "init", "label_smoothing"):
        shared["model"].pop(key, None)
    shared["model"]["optimizer"] = shared["model"]["optimizer"]["_target_"]
    shared.pop("optimizer", None)
    shared["data"].pop("seed", None)
    return repr(shared)


def member_bytes(cfg: DictConfig) -> int:
    """About what one member adds to a pack's memory: weights, their gradients and two optimizer moments, and the
    activations of an evaluation batch (the largest batch) kept for the backward pass or the metrics."""
    widths = [cfg.model.get("in_features", 784), *cfg.model.hidden, cfg.model.get("num_classes", 10)]
    params = sum((i + 1) * o for i, o in pairwise(widths))
    batch = max(cfg.data.batch_size, cfg.data.eval_batch_size)
    return 4 * (4 * params + 3 * batch * sum(widths[1:]))


def pack_sizes(jobs: int, limit: int) -> list[int]:
    """`jobs` split into the fewest packs of at most `limit`, as even as can be: 48 by 32 is 24 + 24, not 32 + 16."""
    packs = math.ceil(jobs / max(1, limit))
    return [jobs // packs + (k < jobs % packs) for k in range(packs)]
