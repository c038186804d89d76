"""`python -m fcexp.train [overrides]`: compose → instantiate → fit → test → record → return the metric."""

from __future__ import annotations

import logging
import math
from pathlib import Path

import hydra
import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.utils import instantiate
from lightning.pytorch.loggers import TensorBoardLogger
from omegaconf import DictConfig

from fcexp.record import RunRecord, flat_hparams

log = logging.getLogger("fcexp")


def train(cfg: DictConfig, run_dir: Path, overrides: list[str]) -> dict:
    """Train, test and record one run in `run_dir`; returns its metrics.json content."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    datamodule = instantiate(cfg.data)
    model = instantiate(cfg.model)
    hparams = flat_hparams(cfg)

    record = RunRecord(run_dir, hparams, overrides)
    # The run folder is the TensorBoard run: a sweep's runs are named by their folders.
    logger = TensorBoardLogger(save_dir=run_dir, name="", version="", default_hp_metric=False)
    callbacks = [instantiate(c) for c in cfg.callbacks.values()] + [record]
    trainer: L.Trainer = instantiate(cfg.trainer, logger=logger, callbacks=callbacks, default_root_dir=run_dir)

    try:
        trainer.fit(model, datamodule=datamodule)
        metrics = dict(trainer.callback_metrics)  # test resets callback_metrics
        # The seed evaluates the model as training left it, not the best checkpoint.
        trainer.test(model, datamodule=datamodule, verbose=False)
    except BaseException as err:
        status = "interrupted" if isinstance(err, KeyboardInterrupt) else "failed"
        record.finish(status, trainer.callback_metrics, error=f"{type(err).__name__}: {err}")
        raise
    metrics |= trainer.callback_metrics
    result = record.finish("completed", metrics)
    if trainer.is_global_zero:
        final = {
            "hp_metric": metrics["val/acc_best"],
            "final/val_acc": metrics["val/acc"],
            "final/test_acc": metrics["test/acc"],
            "final/test_loss": metrics["test/loss"],
        }
        logger.log_hyperparams(hparams, {k: float(v) for k, v in final.items()})
        logger.finalize("success")
    return result


@hydra.main(version_base="1.3", config_path="pkg://fcexp.conf", config_name="train")
def main(cfg: DictConfig) -> float:
    hydra_cfg = HydraConfig.get()
    run_dir = Path(hydra_cfg.runtime.output_dir)
    multirun = hydra_cfg.mode == RunMode.MULTIRUN
    try:
        result = train(cfg, run_dir, list(hydra_cfg.overrides.task))
    except Exception as err:
        if not multirun:
            raise
        # One bad job must not end a sweep: it is recorded as failed and the others go on.
        log.error("job %s failed: %s", run_dir.name, err)
        return math.nan
    best = result["metrics"]["val/acc_best"]
    log.info("test accuracy %.4f, best val accuracy %.4f", result["metrics"]["test/acc"], best)
    log.info("run folder: %s", run_dir)
    log.info("view it: tensorboard --logdir %s", run_dir.parent if multirun else run_dir)
    return best


if __name__ == "__main__":
    main()
