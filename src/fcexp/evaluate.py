"""`python -m fcexp.evaluate ckpt_path=<file or run folder>`: test loss and accuracy of a saved run, on its own data
settings."""

from __future__ import annotations

import sys
from pathlib import Path

import hydra
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from fcexp.data import DataError, MNISTDataModule
from fcexp.module import Classifier
from fcexp.record import CHECKPOINTS, RECORD, read_checkpoint, resume_checkpoint, take_paths_as_typed
from fcexp.train import quiet_lightning

USAGE = "usage: python -m fcexp.evaluate ckpt_path=<checkpoint file or run folder> [data_root=<folder>]"


def checkpoint_of(ckpt_path: str | Path) -> tuple[Path, list[str]]:
    """The checkpoint to evaluate: the file given, or a run folder's newest checkpoint that loads; and why each
    newer one of the folder's was skipped."""
    path = Path(ckpt_path).expanduser()
    if path.is_dir():
        if not (path / RECORD).is_file():
            raise ValueError(f"ckpt_path {str(path)!r} is a folder but not a run's; give a .ckpt file or a run folder")
        found, skipped = resume_checkpoint(path)
        if found is None:
            reasons = f": {'; '.join(skipped)}" if skipped else ""
            raise ValueError(f"run {str(path)!r} has no checkpoint that loads in {CHECKPOINTS}/{reasons}")
        return found, skipped
    if not path.is_file():
        raise ValueError(f"ckpt_path {str(path)!r} is not a file; runs keep theirs in <run folder>/checkpoints/")
    return path, []


def evaluate(path: Path, trainer_cfg: DictConfig, data_root: str | None = None) -> dict[str, float]:
    """Test metrics of a checkpoint file; model and data settings (normalization, labels) come from the checkpoint."""
    read_checkpoint(path)  # one line naming the file when it is damaged, foreign or from a newer fcexp
    model = Classifier.load_from_checkpoint(path, map_location="cpu", weights_only=True)
    overrides = {"root": data_root} if data_root else {}
    datamodule = MNISTDataModule.load_from_checkpoint(path, weights_only=True, **overrides)
    trainer = instantiate(
        trainer_cfg,
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=sys.stderr.isatty(),  # a bar's redraws are for a terminal, not a log file
    )
    (metrics,) = trainer.test(model, datamodule=datamodule, verbose=False)
    return metrics


@hydra.main(version_base="1.3", config_path="pkg://fcexp.conf", config_name="evaluate")
def main(cfg: DictConfig) -> None:
    quiet_lightning()
    if OmegaConf.is_missing(cfg, "ckpt_path"):
        print(USAGE, file=sys.stderr)
        sys.exit(2)
    try:
        path, skipped = checkpoint_of(cfg.ckpt_path)
        for reason in skipped:  # a run folder's newer checkpoints that do not load: the user learns which was used
            print(f"skipped {reason}", file=sys.stderr)
        metrics = evaluate(path, cfg.trainer, cfg.data_root)
    except (ValueError, DataError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    print(f"{path}: test loss {metrics['test/loss']:.4f}, test accuracy {metrics['test/acc']:.4f}")


def cli() -> None:
    """`python -m fcexp.evaluate`: main, with each path on the command line taken as the shell gave it."""
    take_paths_as_typed()
    main()


if __name__ == "__main__":
    cli()
