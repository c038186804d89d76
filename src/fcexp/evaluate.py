"""`python -m fcexp.evaluate ckpt_path=<file>`: test loss and accuracy of a saved run, on its own data settings."""

from __future__ import annotations

import sys
from pathlib import Path

import hydra
from hydra.utils import instantiate
from omegaconf import DictConfig

from fcexp.data import DataError, MNISTDataModule
from fcexp.module import Classifier
from fcexp.train import quiet_lightning


def evaluate(ckpt_path: str | Path, trainer_cfg: DictConfig, data_root: str | None = None) -> dict[str, float]:
    """Test metrics of a checkpoint; model and data settings (normalization, labels) come from the checkpoint."""
    path = Path(ckpt_path).expanduser()
    if not path.is_file():
        raise ValueError(f"ckpt_path {str(path)!r} is not a file; runs keep theirs in <run folder>/checkpoints/")
    model = Classifier.load_from_checkpoint(path, map_location="cpu", weights_only=True)
    overrides = {"root": data_root} if data_root else {}
    datamodule = MNISTDataModule.load_from_checkpoint(path, weights_only=True, **overrides)
    trainer = instantiate(trainer_cfg, logger=False, enable_checkpointing=False, enable_model_summary=False)
    (metrics,) = trainer.test(model, datamodule=datamodule, verbose=False)
    return metrics


@hydra.main(version_base="1.3", config_path="pkg://fcexp.conf", config_name="evaluate")
def main(cfg: DictConfig) -> None:
    quiet_lightning()
    try:
        metrics = evaluate(cfg.ckpt_path, cfg.trainer, cfg.data_root)
    except (ValueError, DataError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    print(f"{cfg.ckpt_path}: test loss {metrics['test/loss']:.4f}, test accuracy {metrics['test/acc']:.4f}")


if __name__ == "__main__":
    main()
