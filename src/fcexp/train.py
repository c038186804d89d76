"""`python -m fcexp.train [overrides]`: compose → validate → instantiate → fit → test → record → return the metric."""

from __future__ import annotations

import logging
import math
import os
import sys
import warnings
from pathlib import Path

import hydra
import lightning as L
import torch
from hydra import compose, initialize_config_module
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.types import RunMode
from hydra.utils import instantiate
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.loggers import TensorBoardLogger
from omegaconf import DictConfig, OmegaConf

from fcexp.data import DataError
from fcexp.record import RECORD, RunRecord, flat_hparams, resume_checkpoint

log = logging.getLogger("fcexp")

# What a user can fix by changing a value: reported as one line, not a traceback.
USER_ERRORS = (ValueError, DataError, MisconfigurationException)

# Lightning 2.6 under torch >= 2.10 warns at every fit about its own use of a deprecated torch API.
warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated")

# ... and advertises a cloud logger at every fit.
logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(lambda r: not r.getMessage().startswith("💡 Tip"))

# `hydra.run.dir` and `hydra.output_subdir` pick one value for a resumed run, another for a new one.
OmegaConf.register_new_resolver(
    "if_resume", lambda resume, then, otherwise: then if resume else otherwise, replace=True
)


def train(cfg: DictConfig, run_dir: Path, overrides: list[str], resume: bool = False) -> dict:
    """Train, test and record one run in `run_dir`; returns its metrics.json content.

    With `resume`, training continues from the run's newest checkpoint in the same folder and TensorBoard run.
    """
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    record = RunRecord(run_dir, flat_hparams(cfg, overrides), overrides, resume=resume)
    trainer = None
    try:
        datamodule = instantiate(cfg.data)
        model = instantiate(cfg.model)
        # The run folder is the TensorBoard run: a sweep's runs are named by their folders.
        logger = TensorBoardLogger(save_dir=run_dir, name="", version="", default_hp_metric=False)
        callbacks = [instantiate(c) for c in cfg.callbacks.values()] + [record]
        if cfg.trainer.accelerator in ("gpu", "cuda") and not torch.cuda.is_available():
            raise ValueError(
                f"trainer.accelerator={cfg.trainer.accelerator} needs CUDA, which this machine lacks; "
                "use trainer=auto or trainer=cpu"
            )
        trainer = instantiate(cfg.trainer, logger=logger, callbacks=callbacks, default_root_dir=run_dir)
        ckpt_path = resume_checkpoint(run_dir) if resume else None
        trainer.fit(model, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
        metrics = dict(trainer.callback_metrics)  # test resets callback_metrics
        # The seed evaluates the model as training left it, not the best checkpoint.
        trainer.test(model, datamodule=datamodule, verbose=False)
    except BaseException as err:
        if isinstance(err, InstantiationException) and err.__cause__ is not None:
            err = err.__cause__  # the constructor's own message, without Hydra's wrapping
        record.fail(err, trainer.callback_metrics if trainer is not None else {})
        raise err from None
    metrics |= trainer.callback_metrics
    result = record.finish(metrics)
    if trainer.is_global_zero:
        final = {
            "hp_metric": metrics["val/acc_best"],
            "final/val_acc": metrics["val/acc"],
            "final/test_acc": metrics["test/acc"],
            "final/test_loss": metrics["test/loss"],
        }
        logger.log_hyperparams(record.record["hparams"], {k: float(v) for k, v in final.items()})
        logger.finalize("success")
    return result


def compose_config(*overrides: str) -> DictConfig:
    """The config `python -m fcexp.train <overrides>` would run, composed outside the command (scripts, tests)."""
    with initialize_config_module("fcexp.conf", version_base="1.3"):
        return compose("train", overrides=list(overrides))


def resumed_config(run_dir: Path, extra: list[str]) -> tuple[DictConfig, list[str]]:
    """The config a run was started with (recomposed from its recorded overrides), plus any new overrides."""
    previous = RunRecord.load(run_dir)
    if previous is None:
        raise ValueError(f"resume={str(run_dir)!r} is not a run folder (no {RECORD}); give a folder under runs/")
    overrides = previous["overrides"] + extra
    return compose(config_name="train", overrides=overrides), overrides


@hydra.main(version_base="1.3", config_path="pkg://fcexp.conf", config_name="train")
def main(cfg: DictConfig) -> float:
    hydra_cfg = HydraConfig.get()
    run_dir = Path(hydra_cfg.runtime.output_dir)
    multirun = hydra_cfg.mode == RunMode.MULTIRUN
    overrides = list(hydra_cfg.overrides.task)
    try:
        if cfg.resume:
            extra = [o for o in overrides if not o.startswith("resume=")]
            cfg, overrides = resumed_config(run_dir, extra)
        elif cfg.skip_finished and (previous := RunRecord.load(run_dir)) and previous["status"] == "completed":
            log.info("skipping %s: finished before (skip_finished=true)", run_dir.name)
            return previous["metrics"]["val/acc_best"]
        result = train(cfg, run_dir, overrides, resume=bool(cfg.resume))
    except KeyboardInterrupt:
        log.error("interrupted; continue with: python -m fcexp.train resume=%s", run_dir)
        sys.exit(130)
    except Exception as err:
        if multirun:
            # One bad job must not end a sweep: it is recorded as failed and the others go on.
            log.error("job %s failed: %s", run_dir.name, err)
            return math.nan
        if os.environ.get("HYDRA_FULL_ERROR") == "1" or not isinstance(err, (*USER_ERRORS, FloatingPointError)):
            raise
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2 if isinstance(err, USER_ERRORS) else 1)
    best = result["metrics"]["val/acc_best"]
    log.info("test accuracy %.4f, best val accuracy %.4f", result["metrics"]["test/acc"], best)
    log.info("run folder: %s", run_dir)
    log.info("view it: tensorboard --logdir %s", run_dir.parent if multirun else run_dir)
    return best


if __name__ == "__main__":
    main()
