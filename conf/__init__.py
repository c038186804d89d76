"""Hydra configs, shipped inside the fcexp package as fcexp.conf so installed copies find them too.

Importing this package (Hydra does, to read the configs) registers the resolvers they use, so the configs compose
wherever they are read: `python -m fcexp.train`, Hydra's compose API, a joblib or SLURM worker.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

from omegaconf import OmegaConf

RUN_DIR_FORMAT = "%Y-%m-%d_%H-%M-%S"


def claim_folder(parent: str | os.PathLike, now: float | None = None) -> Path:
    """Create and return a new folder under `parent` named by the time, never one another process also got.

    `mkdir` succeeds for exactly one caller, also on NFS, so runs started in the same second get `<time>`,
    `<time>_01`, `<time>_02`, …: readable, and sorted by start time.
    """
    stamp = time.strftime(RUN_DIR_FORMAT, time.localtime(now))
    Path(parent).mkdir(parents=True, exist_ok=True)
    for n in range(100):
        folder = Path(parent) / (stamp if n == 0 else f"{stamp}_{n:02d}")
        try:
            folder.mkdir()
        except FileExistsError:
            continue
        return folder
    raise FileExistsError(f"100 runs started under {parent} in the second {stamp}; start fewer at once")


def refuse(message: str) -> None:
    # Raised inside Hydra's job set-up an exception would print as a traceback; this is the user's one line.
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def _new_folder(parent: object, key: str) -> str:
    if not isinstance(parent, str) or not parent.strip():
        refuse(f"{key} must be a folder (e.g. {key}=runs), got {parent!r}")
    try:
        return str(claim_folder(parent))
    except OSError as err:
        refuse(f"{key} {parent!r} is not writable ({err.strerror}); choose another {key}")


def _run_dir(runs_dir: object, resume: object) -> str:
    # A resumed run continues in its own folder; a new one claims a fresh folder.
    if resume is None:
        step = os.environ.get("SLURM_STEP_ID")
        if step is not None and "SLURM_JOB_ID" in os.environ and isinstance(runs_dir, str):
            # Started by srun: every rank of a DDP run, and the job again when SLURM requeues it, share one folder
            # named by the job step (the time would differ between them).
            folder = Path(runs_dir) / f"slurm-{os.environ['SLURM_JOB_ID']}.{step}"
            folder.mkdir(parents=True, exist_ok=True)
            return str(folder)
        return _new_folder(runs_dir, "runs_dir")
    if not isinstance(resume, str) or not (Path(resume) / "metrics.json").is_file():
        refuse(f"resume={resume!r} is not a run folder (no metrics.json); give a folder under runs/")
    return resume


def _config_subdir(output_dir: str, resume: str | None) -> str | None:
    # Ranks other than 0 of a DDP run started by srun or torchrun share rank 0's folder and config: none of their own.
    if int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0"))) > 0:
        return None
    # A second invocation in a run's folder (a resume, a sweep rerun) keeps the config the run started with, and
    # one refused (the folder holds a completed run) or skipped (skip_finished) writes nothing there. A resume
    # writes its config itself (.hydra/resumed), once its checks have passed and it trains.
    if resume:
        return None
    record = Path(output_dir) / "metrics.json"
    if record.is_file():
        try:
            if json.loads(record.read_text()).get("status") == "completed":
                return None
        except (OSError, ValueError, AttributeError):
            return None  # a damaged record: the run refuses it (fcexp.record.RunRecord.load) and writes nothing
    return ".hydra/rerun" if (Path(output_dir) / ".hydra" / "config.yaml").is_file() else ".hydra"


# Cached: Hydra resolves `hydra.run.dir` and `hydra.sweep.dir` more than once (and copies the cache into every
# job of a sweep), and each must get the folder claimed the first time.
OmegaConf.register_new_resolver("fcexp.run_dir", _run_dir, use_cache=True, replace=True)
OmegaConf.register_new_resolver(
    "fcexp.sweep_dir", lambda runs_dir: _new_folder(f"{runs_dir}/sweeps", "runs_dir"), use_cache=True, replace=True
)
OmegaConf.register_new_resolver("fcexp.config_subdir", _config_subdir, replace=True)
