"""A pack's members as runs of their own. The pack is the unit every part of a run works on: fcexp's callbacks are
ordinary callbacks on the pack's trainer that compute for every member at once, and fan out to each member's
folder, record, TensorBoard run and checkpoints only at the edge (`PackRuns`, `Checkpoints`).

A single run is a pack of one, so this is also how every run is trained (fcexp.train.train_pack).
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Checkpoint
from lightning.pytorch.loggers import TensorBoardLogger
from omegaconf import DictConfig, OmegaConf

from fcexp.data import MNISTDataModule
from fcexp.module import DROPOUT_STREAMS, Classifier
from fcexp.record import CHECKPOINTS, INTERRUPTED, INTERRUPTS, RunRecord


@dataclass
class Member:
    """One run of a pack: its folder, record, logger and data."""

    index: int
    run_dir: Path
    record: RunRecord
    logger: TensorBoardLogger | None = None
    datamodule: MNISTDataModule | None = None
    error: BaseException | None = None  # set when it failed while the others went on


def living(members: Sequence[Member]) -> list[Member]:
    return [m for m in members if m.error is None]


def runs_of(trainer: L.Trainer, module: Classifier) -> list[Member]:
    """The runs a module trains, where each member's files go: what fcexp.train gave it (`module.runs`), or, for a
    module in a plain Trainer, one run in the trainer's folder with its TensorBoard logger."""
    if module.runs:
        return living(module.runs)
    logger = next((lg for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)), None)
    return [Member(0, Path(trainer.default_root_dir), None, logger)]


def save_members(trainer: L.Trainer, module: Classifier, members: Sequence[Member], paths: Sequence[Path]) -> None:
    """Write each of `members` the checkpoint it would have written alone, to its path: all cut from one gather of
    the pack's state."""
    if not members:
        return
    # Lightning has no public call that returns a checkpoint instead of writing it; trainer.save_checkpoint writes
    # one file, the pack's, where each member needs its own.
    pack = trainer._checkpoint_connector.dump_checkpoint(weights_only=False)
    for member, path in zip(members, paths, strict=True):
        trainer.strategy.save_checkpoint(member_checkpoint(pack, module, member), path)
    trainer.strategy.barrier("fcexp.pack.save_members")


class PackRuns(L.Callback):
    """The edge of a pack: each member's record (metrics.json) follows the training, from the per-member metrics the
    module keeps; Ctrl-C or SIGTERM leaves each member its interrupted.ckpt. In checkpoints it carries the random
    state of the process (the data order and dropout masks have generators of their own)."""

    def __init__(self, members: Sequence[Member]):
        self.members = list(members)

    def state_dict(self) -> dict[str, Any]:
        rng = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        return {"rng": rng}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        rng = state_dict["rng"]
        torch.set_rng_state(rng["torch"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])

    def on_train_start(self, trainer: L.Trainer, pl_module: Classifier) -> None:
        for member in living(self.members):
            member.record.start(trainer)

    # An epoch's train and val metrics are all logged only once its last hook has run, so each epoch is recorded
    # when the next one starts, and the last one when training ends.
    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: Classifier) -> None:
        self._record_epoch(trainer, pl_module, trainer.current_epoch - 1)

    def on_train_end(self, trainer: L.Trainer, pl_module: Classifier) -> None:
        self._record_epoch(trainer, pl_module, trainer.current_epoch - 1)

    def _record_epoch(self, trainer: L.Trainer, pl_module: Classifier, epoch: int) -> None:
        for member in living(self.members):
            member.record.epoch(epoch, trainer.global_step, pl_module.member_metrics[member.index])

    def on_exception(self, trainer: L.Trainer, pl_module: Classifier, exception: BaseException) -> None:
        if isinstance(exception, INTERRUPTS):
            # Lightning turns Ctrl-C and SIGTERM into an exit; first keep what a resume needs.
            members = living(self.members)
            save_members(trainer, pl_module, members, [m.run_dir / CHECKPOINTS / INTERRUPTED for m in members])
            for member in members:
                member.record.fail(exception, pl_module.member_metrics[member.index])


class Checkpoints(Checkpoint):
    """Each member's checkpoints, in <run folder>/checkpoints, at every epoch's end: `best` (the epoch with the
    best `monitor`; its older file removed), rewritten only for the members that improved, and `last`, the newest
    state, which a resume continues from and `fcexp.evaluate` is pointed at. Either name may be None (not kept);
    `best` may hold {epoch} and {step}. All files of one epoch come from one gather of the pack's state.

    As Lightning's ModelCheckpoint (and, as a Checkpoint, after the other callbacks), it saves at the training
    epoch's end, once the epoch's validation ran: a resume then starts with the next epoch."""

    def __init__(
        self,
        monitor: str = "val/acc",
        mode: str = "max",
        best: str | None = "best-epoch{epoch:02d}",
        last: str | None = "last",
    ):
        if mode not in ("max", "min"):
            raise ValueError(f"callbacks.checkpoint.mode must be max or min, got {mode!r}")
        if monitor not in ("val/acc", "val/loss"):
            raise ValueError(f"callbacks.checkpoint.monitor must be val/acc or val/loss, got {monitor!r}")
        if (monitor, mode) in (("val/loss", "max"), ("val/acc", "min")):
            better = "min" if monitor == "val/loss" else "max"
            raise ValueError(
                f"callbacks.checkpoint.mode={mode} would keep the worst {monitor} as best; with "
                f"monitor={monitor} add callbacks.checkpoint.mode={better}"
            )
        for key, name in (("best", best), ("last", last)):
            if name is not None and (not isinstance(name, str) or not name.strip() or "/" in name):
                raise ValueError(f"callbacks.checkpoint.{key} must be a file name (no /) or null, got {name!r}")
        try:
            (best or "").format(epoch=0, step=0)
        except (KeyError, IndexError, ValueError) as err:
            raise ValueError(
                f"callbacks.checkpoint.best may hold only {{epoch}} and {{step}}, got {best!r} ({err})"
            ) from None
        self.monitor, self.mode, self.best_name, self.last_name = monitor, mode, best, last
        self.members: list[Member] = []
        self.best: torch.Tensor | None = None  # each member's best `monitor` so far; in checkpoints

    def setup(self, trainer: L.Trainer, pl_module: Classifier, stage: str) -> None:
        if self.best is None:
            self.best = torch.full((pl_module.members,), -math.inf if self.mode == "max" else math.inf)

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.best = state_dict["best"]

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: Classifier) -> None:
        members = runs_of(trainer, pl_module)
        writes: list[tuple[Member, Path]] = []
        folders = [m.run_dir / CHECKPOINTS for m in members]
        validated = all(self.monitor in pl_module.member_metrics[m.index] for m in members)
        if self.best_name is not None and validated:
            value = torch.tensor([pl_module.member_metrics[m.index][self.monitor] for m in members])  # host floats
            best = self.best[[m.index for m in members]]
            improved = value > best if self.mode == "max" else value < best
            name = self.best_name.format(epoch=trainer.current_epoch, step=trainer.global_step) + ".ckpt"
            for m, folder, better in zip(members, folders, improved.tolist(), strict=True):
                if better:
                    self.best[m.index] = value[members.index(m)]
                    writes.append((m, folder / name))
        if self.last_name is not None:
            writes += [(m, folder / f"{self.last_name}.ckpt") for m, folder in zip(members, folders, strict=True)]
        if not writes:
            return
        for _, path in writes:
            path.parent.mkdir(parents=True, exist_ok=True)
        save_members(trainer, pl_module, [m for m, _ in writes], [path for _, path in writes])
        if self.best_name is not None and trainer.is_global_zero:  # the member's older best, once the new one is in
            pattern = re.sub(r"\{[^}]*\}", "*", self.best_name) + ".ckpt"
            for _, path in writes:
                if path.name != f"{self.last_name}.ckpt":
                    for old in path.parent.glob(pattern):
                        if old != path:
                            old.unlink(missing_ok=True)


def _per_member(value: Any, members: int) -> bool:
    return torch.is_tensor(value) and value.dim() > 0 and value.shape[0] == members


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
    # Callback states: a tensor with a leading member dimension is each member's own.
    members = module.members
    checkpoint["callbacks"] = {
        key: {k: _slice(v, i, i + 1) if _per_member(v, members) else v for k, v in state.items()}
        for key, state in pack.get("callbacks", {}).items()
    }
    hparams = dict(pack["hyper_parameters"])
    checkpoint["hyper_parameters"] = {k: v for k, v in hparams.items() if k != "members"} | (
        hparams["members"][i] if "members" in hparams else {}
    )
    if member.datamodule is not None:  # what Lightning's own save writes for the datamodule, from the same attribute
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
    merged["callbacks"] = {
        key: {
            k: torch.cat([c["callbacks"][key][k] for c in checkpoints]) if _per_member(v, 1) else v
            for k, v in state.items()
        }
        for key, state in checkpoints[0].get("callbacks", {}).items()
    }
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

    def train_eval_dataloader(self):
        return self.members[0].train_eval_dataloader()  # the members share their training images

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
