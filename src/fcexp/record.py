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
from omegaconf import DictConfig, OmegaConf

RECORD = "metrics.json"


def flat_hparams(cfg: DictConfig) -> dict[str, Any]:
    """The knobs of a run as flat scalars: the columns of TensorBoard's HParams tab and of `fcexp.compare`."""
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
    return {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in params.items()}


def _scalar(value: Any) -> float | None:
    value = float(value)
    return None if math.isnan(value) else value


def write_json(path: Path, payload: Mapping[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(payload, indent=2, allow_nan=False))
    os.replace(tmp, path)  # readers (compare on a running sweep) never see half a file


class RunRecord(L.Callback):
    """Keeps metrics.json current: status "running" with the history so far, then the final result."""

    def __init__(self, run_dir: Path, hparams: Mapping[str, Any], overrides: list[str]):
        self.path = Path(run_dir) / RECORD
        self.started = time.time()
        self.record: dict[str, Any] = {
            "status": "running",
            "overrides": overrides,
            "hparams": dict(hparams),
            "history": [],
            "metrics": {},
            "wall_time_s": 0.0,
        }
        self.save()

    def save(self) -> None:
        self.record["wall_time_s"] = round(time.time() - self.started, 3)
        if os.environ.get("LOCAL_RANK", "0") == "0":
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

    def finish(self, status: str, metrics: Mapping[str, Any], error: str | None = None) -> dict[str, Any]:
        self.record["status"] = status
        self.record["metrics"] = {k: _scalar(v) for k, v in metrics.items()}
        if error is not None:
            self.record["error"] = error
        self.save()
        return self.record
