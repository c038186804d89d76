"""A run's record: metrics.json (status, history, final metrics, hyperparameters, wall time) and its HParams entry."""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_only
from omegaconf import DictConfig, OmegaConf

RECORD = "metrics.json"
CHECKPOINTS = "checkpoints"
INTERRUPTED = "interrupted.ckpt"


def flat_hparams(cfg: DictConfig, overrides: list[str] = ()) -> dict[str, Any]:
    """The knobs of a run as flat scalars: the columns of TensorBoard's HParams tab and of `fcexp.compare`.

    Knobs set by `overrides` come first: TensorBoard shows only the first few columns until asked for more,
    and in a sweep those are the ones being compared.
    """
    model = OmegaConf.to_container(cfg.model, resolve=True)
    activation = model.pop("activation")
    optimizer = model.pop("optimizer")
    params: dict[str, Any] = {"activation": activation["name"]}
    params |= {f"activation.{k}": v for k, v in activation.items() if k != "name"}
    params |= {f"model.{k}": v for k, v in model.items() if not k.startswith("_")}
    params["model.depth"] = len(model["hidden"])
    params["optimizer"] = optimizer["_target_"].rsplit(".", 1)[-1].lower()
    params |= {f"optimizer.{k}": v for k, v in optimizer.items() if not k.startswith("_")}
    data = OmegaConf.to_container(cfg.data, resolve=True)
    params |= {f"data.{k}": data[k] for k in ("batch_size", "normalize", "labels", "limit_train")}
    params["trainer.max_epochs"] = cfg.trainer.max_epochs
    params["seed"] = cfg.seed
    # TensorBoard's HParams tab takes numbers, strings and booleans only.
    params = {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in params.items()}
    keys = [o.split("=", 1)[0].lstrip("+~") for o in overrides]
    chosen = [k for k in params if any(k == key or k.startswith(f"{key}.") for key in keys)]
    return {k: params[k] for k in chosen} | params


def _scalar(value: Any) -> float | None:
    value = float(value)
    return None if math.isnan(value) else value


def write_json(path: Path, payload: Mapping[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(payload, indent=2, allow_nan=False))
    os.replace(tmp, path)  # readers (compare on a running sweep) never see half a file


def resume_checkpoint(run_dir: Path) -> Path:
    """The newest of a run's resumable checkpoints: `last` (end of an epoch) or `interrupted` (Ctrl-C)."""
    found = [p for p in (run_dir / CHECKPOINTS / "last.ckpt", run_dir / CHECKPOINTS / INTERRUPTED) if p.is_file()]
    if not found:
        raise ValueError(f"resume={str(run_dir)!r} has no checkpoint to resume from in {CHECKPOINTS}/")
    return max(found, key=lambda p: p.stat().st_mtime)


class RunRecord(L.Callback):
    """Keeps metrics.json current: status "running" with the history so far, then the final result."""

    def __init__(self, run_dir: Path, hparams: Mapping[str, Any], overrides: list[str], resume: bool = False):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / RECORD
        self.run_dir.mkdir(parents=True, exist_ok=True)
        previous = self.load(run_dir) if resume else None
        # A resumed run keeps its history and adds to its wall time.
        self.started = time.time() - (previous["wall_time_s"] if previous else 0.0)
        self.record: dict[str, Any] = {
            "status": "running",
            "overrides": overrides,
            "hparams": dict(hparams),
            "history": previous["history"] if previous else [],
            "metrics": {},
            "wall_time_s": 0.0,
        }
        self.save()

    @staticmethod
    def load(run_dir: Path) -> dict[str, Any] | None:
        path = Path(run_dir) / RECORD
        return json.loads(path.read_text()) if path.is_file() else None

    def save(self) -> None:
        self.record["wall_time_s"] = round(time.time() - self.started, 3)
        if rank_zero_only.rank == 0:
            write_json(self.path, self.record)

    # An epoch's train and val metrics are all logged only once its last hook has run, so each epoch
    # is recorded when the next one starts, and the last one when training ends.
    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._append_epoch(trainer, trainer.current_epoch - 1)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._append_epoch(trainer, trainer.current_epoch - 1)

    def _append_epoch(self, trainer: L.Trainer, epoch: int) -> None:
        history = self.record["history"]
        if "val/acc" not in trainer.callback_metrics or (history and history[-1]["epoch"] >= epoch):
            return
        metrics = {k: _scalar(v) for k, v in trainer.callback_metrics.items() if not k.startswith("test/")}
        history.append({"epoch": epoch, "step": trainer.global_step, **metrics})
        self.save()

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        if isinstance(exception, KeyboardInterrupt):
            # Lightning turns Ctrl-C into an exit; first keep what a resume needs.
            trainer.save_checkpoint(self.run_dir / CHECKPOINTS / INTERRUPTED, weights_only=False)
            self.fail(exception, trainer.callback_metrics)
            rank_zero_info(f"interrupted; continue with: python -m fcexp.train resume={self.run_dir}")

    def fail(self, error: BaseException, metrics: Mapping[str, Any]) -> None:
        """Record a run that ended early: "interrupted" (Ctrl-C) or "failed" with its error."""
        if self.record["status"] == "interrupted":
            return  # Lightning's exit after an interrupt is not a second failure
        self.record["status"] = "interrupted" if isinstance(error, KeyboardInterrupt) else "failed"
        self.record["error"] = f"{type(error).__name__}: {error}"
        self.record["metrics"] = {k: _scalar(v) for k, v in metrics.items()}
        self.save()

    def finish(self, metrics: Mapping[str, Any]) -> dict[str, Any]:
        self.record["status"] = "completed"
        self.record.pop("error", None)
        self.record["metrics"] = {k: _scalar(v) for k, v in metrics.items()}
        self.save()
        return self.record
