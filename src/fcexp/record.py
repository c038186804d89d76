"""A run's record: metrics.json (status, history, final metrics, hyperparameters, wall time, how to reproduce it)
and what a resume needs to continue exactly where the run stopped."""

from __future__ import annotations

import contextlib
import json
import math
import os
import platform
import shlex
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Mapping
from datetime import datetime
from importlib import metadata
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities.exceptions import SIGTERMException
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from omegaconf import DictConfig, OmegaConf

RECORD = "metrics.json"
CHECKPOINTS = "checkpoints"
INTERRUPTED = "interrupted.ckpt"
# What stops a run that is to go on later: Ctrl-C, and SIGTERM (SLURM's preemption, requeue, scancel, and, through
# fcexp.train, submitit's warning of the time limit), which Lightning turns into SIGTERMException at the next step.
INTERRUPTS = (KeyboardInterrupt, SIGTERMException)


def override_key(override: str) -> str:
    """The key an override sets: `model.dropout` of `model.dropout=0.5`, `sweep` of `+sweep=grid`."""
    return override.split("=", 1)[0].lstrip("+~")


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
    keys = [override_key(o) for o in overrides]
    chosen = [k for k in params if any(k == key or k.startswith(f"{key}.") for key in keys)]
    return {k: params[k] for k in chosen} | params


def _scalar(value: Any) -> float | None:
    value = float(value)
    return None if math.isnan(value) else value


def write_json(path: Path, payload: Mapping[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(payload, indent=2, allow_nan=False))
    os.replace(tmp, path)  # readers (compare on a running sweep) never see half a file


def resume_checkpoint(run_dir: Path) -> Path | None:
    """The newest of a run's resumable checkpoints: `last` (end of an epoch) or `interrupted` (Ctrl-C, SIGTERM)."""
    found = [p for p in (run_dir / CHECKPOINTS / "last.ckpt", run_dir / CHECKPOINTS / INTERRUPTED) if p.is_file()]
    return max(found, key=lambda p: p.stat().st_mtime) if found else None


def checkpoint_step(path: Path) -> int:
    """The number of optimizer steps a checkpoint has taken: where a run resumed from it continues."""
    return torch.load(path, map_location="cpu", weights_only=True, mmap=True)["global_step"]


def shell_program(name: str, start: str | None = None) -> str:
    """How the user's shell reaches this environment's `name` (python, tensorboard): the bare name when PATH finds
    this environment's copy first (an activated venv), else its path, relative when under the directory the command
    runs from (`start`, by default the working directory)."""
    here = os.path.join(os.path.dirname(os.path.abspath(sys.executable)), name)
    found = shutil.which(name)
    if found and os.path.abspath(found) == here:
        return name
    relative = os.path.relpath(here, start)
    return relative if not relative.startswith("..") else here


def override(key: str, value: object) -> str:
    """`key=value` as Hydra parses it: a value with Hydra's special characters (a sweep job's folder has `=` and `,`)
    goes in quotes."""
    text = str(value)
    return f'{key}="{text}"' if any(c in text for c in "=,:[]{}()'\" ") else f"{key}={text}"


def fcexp_command(*args: str, start: str | None = None) -> str:
    """`python -m fcexp.train <args>` as it runs from the user's shell, in `start` (by default the working
    directory)."""
    return shlex.join([shell_program("python", start), "-m", "fcexp.train", *args])


def _git_state() -> dict[str, Any] | None:
    """The commit of the checkout fcexp runs from, and whether it has changes; None for an installed copy."""
    source = Path(__file__).resolve().parent

    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(["git", "-C", str(source), *args], capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    # Dirty: a tracked file differs from the commit. Untracked files (a log, a notebook) change no code that ran.
    dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    return None if commit is None else {"commit": commit, "dirty": dirty}


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def slurm_job() -> str | None:
    """The SLURM job this process runs in (`<job>_<task>` for an array task), None outside SLURM. It stays the same
    when SLURM requeues the job: a restarted job finds its run by it."""
    env = os.environ
    if "SLURM_ARRAY_JOB_ID" in env:
        return f"{env['SLURM_ARRAY_JOB_ID']}_{env.get('SLURM_ARRAY_TASK_ID')}"
    return env.get("SLURM_JOB_ID")


def requeued(previous: Mapping[str, Any]) -> bool:
    """Whether this process is SLURM restarting (a requeue, a preemption) the job that started the run `previous`."""
    restarts = os.environ.get("SLURM_RESTART_COUNT", "0")
    job = (previous.get("provenance") or {}).get("slurm_job")
    return job is not None and job == slurm_job() and restarts.isdigit() and int(restarts) > 0


def provenance() -> dict[str, Any]:
    """What reproducing a run needs besides its config: the command, code version, libraries, device and host."""
    versions = {"python": platform.python_version()}
    for package in ("torch", "lightning", "hydra-core", "torchmetrics", "fcexp"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    device: dict[str, Any] = {"cpu": _cpu_model(), "threads": torch.get_num_threads()}
    if torch.cuda.is_available():  # NVML's answer: CUDA stays uninitialised, so ddp_fork can still fork
        device |= {"gpus": torch.cuda.device_count(), "cuda": torch.version.cuda}
    # `python -m fcexp.train` leaves the module's path in argv[0]; a sweep's workers have their launcher's argv.
    command = fcexp_command(*sys.argv[1:]) if sys.argv and sys.argv[0].endswith("train.py") else None
    return {
        "command": command,
        "cwd": os.getcwd(),
        "git": _git_state(),
        "versions": versions,
        "device": device,
        "host": socket.gethostname(),
        "slurm_job": slurm_job(),
        "started": datetime.now().astimezone().isoformat(timespec="seconds"),
    }


def _reason(error: BaseException) -> str:
    if isinstance(error, KeyboardInterrupt):
        return "Ctrl-C"
    if isinstance(error, SIGTERMException):
        job = slurm_job()
        return f"SIGTERM (SLURM job {job}: preempted, requeued, cancelled or near its time limit)" if job else "SIGTERM"
    return f"{type(error).__name__}: {error}"


class RunRecord(L.Callback):
    """Keeps metrics.json current: status "running" with the history so far, then the final result.

    It also carries, in every checkpoint, the random state a resumed run needs to draw the same dropout masks as
    an uninterrupted one (the data order is a function of seed and epoch alone).
    """

    def __init__(self, run_dir: Path, overrides: list[str], resume: bool = False):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / RECORD
        self.run_dir.mkdir(parents=True, exist_ok=True)
        previous = self.load(run_dir) if resume else None
        # A resumed run keeps its history, provenance and hyperparameters and adds to its wall time.
        self.started = time.time() - (previous["wall_time_s"] if previous else 0.0)
        self.record: dict[str, Any] = {
            "status": "running",
            "overrides": overrides,
            "hparams": previous["hparams"] if previous else {},
            "history": previous["history"] if previous else [],
            "metrics": {},
            "wall_time_s": 0.0,
            "provenance": previous.get("provenance") if previous else provenance(),
            "resumes": previous.get("resumes", []) if previous else [],
        }
        self.resumed = previous is not None
        if self.resumed:
            self.record["resumes"].append(
                {k: v for k, v in provenance().items() if k in ("command", "host", "slurm_job", "started")}
            )
        self.save()

    def describe(self, hparams: Mapping[str, Any]) -> None:
        self.record["hparams"] = dict(hparams)
        self.save()

    @staticmethod
    def load(run_dir: Path) -> dict[str, Any] | None:
        path = Path(run_dir) / RECORD
        return json.loads(path.read_text()) if path.is_file() else None

    def save(self) -> None:
        self.record["wall_time_s"] = round(time.time() - self.started, 3)
        if rank_zero_only.rank == 0:
            write_json(self.path, self.record)

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

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Epochs a killed run recorded after its newest checkpoint are trained again: they are recorded again.
        self.record["history"] = [h for h in self.record["history"] if h["step"] <= trainer.global_step]
        if self.resumed:
            self.record["resumes"][-1]["from_step"] = trainer.global_step
        # The device it trains on (which GPU, in a parallel sweep that spreads its jobs over several) and its CPU
        # threads, as set once the config was read; a resume's, in its own entry.
        used = {"used": str(trainer.strategy.root_device), "threads": torch.get_num_threads()}
        if trainer.strategy.root_device.type == "cuda":
            used["gpu"] = torch.cuda.get_device_name(trainer.strategy.root_device)
        (self.record["resumes"][-1] if self.resumed else self.record["provenance"]["device"]).update(used)
        self.save()

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
        if isinstance(exception, INTERRUPTS):
            # Lightning turns Ctrl-C and SIGTERM into an exit; first keep what a resume needs.
            trainer.save_checkpoint(self.run_dir / CHECKPOINTS / INTERRUPTED, weights_only=False)
            self.fail(exception, trainer.callback_metrics)

    def fail(self, error: BaseException, metrics: Mapping[str, Any]) -> None:
        """Record a run that ended early: "interrupted" (Ctrl-C, SIGTERM) or "failed" with its error."""
        if self.record["status"] == "interrupted":
            return  # Lightning's exit after an interrupt is not a second failure
        self.record["status"] = "interrupted" if isinstance(error, INTERRUPTS) else "failed"
        self.record["error"] = _reason(error)
        self.record["metrics"] = {k: _scalar(v) for k, v in metrics.items()}
        self.save()

    def finish(self, metrics: Mapping[str, Any]) -> dict[str, Any]:
        self.record["status"] = "completed"
        self.record.pop("error", None)
        self.record["metrics"] = {k: _scalar(v) for k, v in metrics.items()}
        self.save()
        return self.record


def mark(cfg: DictConfig, run_dir: Path, overrides: list[str], status: str, error: str) -> None:
    """Set a run's status from outside its process: a job SLURM ended before the run could (scancel, its time limit,
    a node failure), or a packed sweep's job refused before it started. A run with no record yet gets one, with its
    knobs. Its checkpoints stay, for a sweep rerun with skip_finished to continue from."""
    record = RunRecord.load(run_dir)
    if record is None:
        new = RunRecord(run_dir, overrides)
        with contextlib.suppress(Exception):  # its knobs, for compare's columns, where they can be read
            new.describe(flat_hparams(cfg, overrides))
        record = new.record
    record["status"], record["error"] = status, error
    write_json(run_dir / RECORD, record)
