"""A run's record: metrics.json (status, history, final metrics, hyperparameters, wall time, how to reproduce it)
and what a resume needs to continue exactly where the run stopped."""

from __future__ import annotations

import contextlib
import json
import math
import os
import platform
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import zipfile
from collections.abc import Mapping
from datetime import datetime
from importlib import metadata
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities.exceptions import SIGTERMException
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from omegaconf import DictConfig, OmegaConf

RECORD = "metrics.json"
CHECKPOINTS = "checkpoints"
INTERRUPTED = "interrupted.ckpt"
# The layout of fcexp's checkpoints, stamped into each (fcexp.module.Classifier.on_save_checkpoint): a newer fcexp that
# changes it raises the number, and this one refuses such a file by name instead of misreading it.
CHECKPOINT_FORMAT, CHECKPOINT_FORMAT_KEY = 1, "fcexp_checkpoint_format"
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


class CheckpointError(ValueError):
    """A checkpoint fcexp cannot continue or evaluate: truncated, damaged, foreign, or from a newer fcexp."""


def _first_line(err: BaseException) -> str:
    line = next((x.strip() for x in str(err).splitlines() if x.strip()), type(err).__name__)
    return line if len(line) <= 120 else line[:117] + "..."


def read_checkpoint(path: Path) -> dict[str, Any]:
    """A checkpoint's content, checked to be fcexp's and readable by this fcexp; else CheckpointError naming it."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path} is not a file")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises RuntimeError, UnpicklingError, KeyError, … for what is not a checkpoint
        # torch writes zip archives: one cut short (a kill during a save) has lost its directory at the end.
        why = _first_line(err).split(". ")[0] if zipfile.is_zipfile(path) else "truncated, damaged or not a checkpoint"
        raise CheckpointError(f"{path} does not load ({why})") from None
    hparams = checkpoint.get("hyper_parameters") if isinstance(checkpoint, dict) else None
    if not isinstance(hparams, dict) or "hidden" not in hparams or "state_dict" not in checkpoint:
        raise CheckpointError(f"{path} is not an fcexp checkpoint (it holds no fcexp net)")
    written = checkpoint.get(CHECKPOINT_FORMAT_KEY, 1)
    if written > CHECKPOINT_FORMAT:
        raise CheckpointError(
            f"{path} is in checkpoint format {written}, from a newer fcexp (this one reads up to "
            f"{CHECKPOINT_FORMAT}); update fcexp to use it"
        )
    return checkpoint


def resume_checkpoint(run_dir: Path) -> tuple[Path | None, list[str]]:
    """The newest of a run's checkpoints that loads (`last`, `interrupted` or `best-*`: each holds the whole training
    state), and why each newer one was skipped."""
    folder = Path(run_dir) / CHECKPOINTS
    found = sorted(folder.glob("*.ckpt"), key=lambda p: p.stat().st_mtime_ns, reverse=True) if folder.is_dir() else []
    skipped = []
    for path in found:
        try:
            read_checkpoint(path)
        except CheckpointError as err:
            skipped.append(str(err))
            continue
        return path, skipped
    return None, skipped


def checkpoint_step(path: Path) -> int:
    """The number of optimizer steps a checkpoint has taken: where a run resumed from it continues."""
    return torch.load(path, map_location="cpu", weights_only=True, mmap=True)["global_step"]


class AtomicCheckpointIO(TorchCheckpointIO):
    """Checkpoints written whole or not at all: a temporary file in the checkpoint's own folder, then a rename, so
    that a kill during a save (Ctrl-C twice, SIGKILL, a node failure) leaves the previous file intact. Lightning's
    own save goes through a temporary file in the system's temp folder, and its move onto another file system
    (/tmp local, runs on NFS) is a copy that a kill cuts short.

    `in_memory` maps a path to the checkpoint that loading it gives instead: a pack resumes from its members'
    checkpoints merged in memory (fcexp.train.train_pack), with no file written for it."""

    def __init__(self) -> None:
        super().__init__()
        self.in_memory: dict[str, dict[str, Any]] = {}

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any = None) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        for stale in path.parent.glob(f".{path.name}.*.tmp"):  # left by a writer killed mid-save
            stale.unlink(missing_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            with open(tmp, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)

    def load_checkpoint(self, path, map_location: Any = None, weights_only: bool | None = None) -> dict[str, Any]:
        if str(path) in self.in_memory:
            return self.in_memory.pop(str(path))
        return super().load_checkpoint(path, map_location=map_location, weights_only=weights_only)


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
    if not any(c in text for c in "=,:[]{}()'\" \\"):
        return f"{key}={text}"
    quote = "'" if "'" not in text or '"' in text else '"'
    # Hydra's escapes inside quotes: the quote itself, and backslashes before a quote or the closing one, doubled.
    escaped = re.sub(rf"(\\+)(?={quote}|$)", lambda m: m.group(1) * 2, text).replace(quote, "\\" + quote)
    return f"{key}={quote}{escaped}{quote}"


# The settings that take a file or folder: on the command line, each is the path the shell gave (quote_paths).
PATH_KEYS = ("ckpt_path", "resume", "hydra.run.dir", "hydra.sweep.dir", "runs_dir", "data.root", "data_root")


def quote_paths(args: list[str]) -> list[str]:
    """Command-line arguments with every path value (PATH_KEYS) in Hydra's quotes, so that a path arrives as typed:
    a sweep job's folder holds `=` and `,`, which Hydra would read as syntax, and a folder may hold spaces. A value
    the user quoted already is left as it is."""
    quoted = []
    for arg in args:
        key, sep, value = arg.partition("=")
        if not (sep and key.lstrip("+") in PATH_KEYS):
            quoted.append(arg)
            continue
        if not value.strip("'\" "):  # Hydra would take '' for the working directory: a run in the checkout
            raise ValueError(f"{key.lstrip('+')} must be a path, got {value!r}")
        bare = not (len(value) > 1 and value[0] == value[-1] and value[0] in "'\"")
        quoted.append(override(key, value) if bare else arg)
    return quoted


# The command line as the user typed it, before take_paths_as_typed quoted its paths for Hydra: what printed
# commands repeat (only the shell's quotes, not Hydra's inside them).
TYPED: list[str] = []


def typed_args() -> list[str]:
    """The entry point's arguments as the user typed them."""
    return TYPED or sys.argv[1:]


def take_paths_as_typed() -> None:
    """An entry point's command line (sys.argv) with its paths quoted for Hydra (quote_paths); an empty one is
    refused in one line."""
    TYPED[:] = sys.argv[1:]
    try:
        sys.argv[1:] = quote_paths(sys.argv[1:])
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


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


def cpu_model() -> str:
    """The CPU's model name: what run records, the study and the bench name beside their figures."""
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
    # torch as it names its own build (2.14.1+cu130 and 2.14.1+cpu differ), and the CUDA it was built for.
    versions = {"python": platform.python_version(), "torch": torch.__version__, "torch_cuda": torch.version.cuda}
    for package in ("lightning", "hydra-core", "torchmetrics", "fcexp"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    device: dict[str, Any] = {"cpu": cpu_model(), "threads": torch.get_num_threads()}
    if torch.cuda.is_available():  # NVML's answer: CUDA stays uninitialised, so ddp_fork can still fork
        device |= {"gpus": torch.cuda.device_count(), "cuda": torch.version.cuda}
    # `python -m fcexp.train` leaves the module's path in argv[0]; a sweep's workers have their launcher's argv.
    command = fcexp_command(*typed_args()) if sys.argv and sys.argv[0].endswith("train.py") else None
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


class RecordError(ValueError):
    """A metrics.json that cannot be read as a run record: damaged, or not one; `reason` says why."""

    def __init__(self, path: Path, reason: str):
        super().__init__(f"{path} is damaged ({reason})")
        self.reason = reason


RECORD_FIELDS = {"status": str, "hparams": dict, "overrides": list, "history": list, "metrics": dict}


def _record_problem(record: Any) -> str | None:
    """Why a parsed metrics.json cannot be read as a run record; None when it can."""
    if not isinstance(record, dict):
        return f"a JSON {type(record).__name__} where a run record (an object) is expected"
    for key, kind in RECORD_FIELDS.items():
        if not isinstance(record.get(key), kind):
            return f"{key!r} is {record.get(key)!r}, expected a JSON {'object' if kind is dict else kind.__name__}"
    numbers = [("metrics", record["metrics"])] + [("history", h) for h in record["history"]]
    for where, entry in numbers:
        if not isinstance(entry, dict):
            return f"a {where} entry is {entry!r}, expected a JSON object"
        for key, value in entry.items():
            if value is not None and (not isinstance(value, (int, float)) or isinstance(value, bool)):
                return f"{where} {key!r} is {value!r}, expected a number or null"
    if any(not isinstance(h.get("epoch"), int) or not isinstance(h.get("step"), int) for h in record["history"]):
        return "a history entry lacks its integer 'epoch' or 'step'"
    return None


class RunRecord:
    """Keeps metrics.json current: status "running" with the history so far, then the final result (fed by
    fcexp.pack.PackRuns as the run trains)."""

    def __init__(
        self,
        run_dir: Path,
        overrides: list[str],
        resume: bool = False,
        config: DictConfig | None = None,
        pack: int = 1,
        origin: dict[str, Any] | None = None,
        race: bool = False,
    ):
        """`config`: what a resume trains with, kept in .hydra/resumed once it trains (the run's first config stays
        in .hydra). `pack`: the members of the pack the run trains in; its wall time is its share of the pack's.
        `origin`: its provenance, where the pack's members share one (taken once per pack). `race`: a race
        (fcexp.race) continues the run past a rung in a re-formed pack, or stops it there: not a resume of the
        user's, so it is listed under "race", not "resumes"."""
        self.config, self.pack, self.race = config, pack, race
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / RECORD
        self.run_dir.mkdir(parents=True, exist_ok=True)
        previous = self.load(run_dir) if resume else None
        # A resumed run keeps its history, provenance and hyperparameters and adds to its wall time.
        self.started, self.before = time.time(), previous["wall_time_s"] if previous else 0.0
        self.record: dict[str, Any] = {
            "status": "running",
            "overrides": overrides,
            "hparams": previous["hparams"] if previous else {},
            "history": previous["history"] if previous else [],
            "metrics": {},
            "wall_time_s": 0.0,
            "provenance": previous.get("provenance") if previous else dict(origin or provenance()),
            "resumes": previous.get("resumes", []) if previous else [],
        }
        if previous and "race" in previous:  # where a race re-formed its pack; a resume by hand keeps that
            self.record["race"] = previous["race"]
        self.resumed = previous is not None and not race
        if self.resumed:
            self.record["resumes"].append(
                {k: v for k, v in (origin or provenance()).items() if k in ("command", "host", "slurm_job", "started")}
            )
        # A new run is recorded at once; a resumed one only once it trains: a resume refused or failing before that
        # leaves the record as it was (a completed run's results stay).
        self.writing = not self.resumed
        self.save()

    def describe(self, hparams: Mapping[str, Any]) -> None:
        self.record["hparams"] = dict(hparams)
        self.save()

    @staticmethod
    def load(run_dir: Path) -> dict[str, Any] | None:
        """A run's record; None where it has none yet; RecordError naming the file where it cannot be read."""
        path = Path(run_dir) / RECORD
        if not path.is_file():
            return None
        try:
            record = json.loads(path.read_text())
        except (OSError, ValueError) as err:  # ValueError: bad JSON, or bytes that are not UTF-8
            raise RecordError(path, _first_line(err)) from None
        problem = _record_problem(record)
        if problem is not None:
            raise RecordError(path, problem)
        return record

    def save(self) -> None:
        if not self.writing:
            return
        elapsed = time.time() - self.started
        self.record["wall_time_s"] = round(self.before + elapsed / self.pack, 3)
        if self.pack > 1:  # what the whole pack took, this process's part of it (a resume adds its own)
            self.record["pack"] = {"members": self.pack, "wall_time_s": round(elapsed, 3)}
        if rank_zero_only.rank == 0:
            write_json(self.path, self.record)

    def start(self, trainer: L.Trainer) -> None:
        """Training starts (or continues, in a resumed run, from the trainer's step)."""
        if self.resumed and not self.writing and self.config is not None and rank_zero_only.rank == 0:
            kept = self.run_dir / ".hydra" / "resumed"
            kept.mkdir(parents=True, exist_ok=True)
            OmegaConf.save(self.config, kept / "config.yaml")
            OmegaConf.save(OmegaConf.create(self.record["overrides"]), kept / "overrides.yaml")
        self.writing = True
        # Epochs a killed run recorded after its newest checkpoint are trained again: they are recorded again.
        self.record["history"] = [h for h in self.record["history"] if h["step"] <= trainer.global_step]
        if self.resumed:
            self.record["resumes"][-1]["from_step"] = trainer.global_step
        if self.race:  # the step a re-formed pack continues it from, and that pack's size
            self.record.setdefault("race", []).append({"from_step": trainer.global_step, "pack": self.pack})
            self.save()
            return
        # The device it trains on (which GPU, in a parallel sweep that spreads its jobs over several) and its CPU
        # threads, as set once the config was read; a resume's, in its own entry.
        used = {"used": str(trainer.strategy.root_device), "threads": torch.get_num_threads()}
        if trainer.strategy.root_device.type == "cuda":
            used["gpu"] = torch.cuda.get_device_name(trainer.strategy.root_device)
        (self.record["resumes"][-1] if self.resumed else self.record["provenance"]["device"]).update(used)
        self.save()

    def epoch(self, epoch: int, step: int, metrics: Mapping[str, Any]) -> None:
        """Epoch `epoch` ended at `step` with these metrics: added to the history, once."""
        history = self.record["history"]
        if "val/acc" not in metrics or (history and history[-1]["epoch"] >= epoch):
            return
        history.append({"epoch": epoch, "step": step, **{k: _scalar(v) for k, v in metrics.items()}})
        self.save()

    def fail(self, error: BaseException, metrics: Mapping[str, Any]) -> None:
        """Record a run that ended early: "interrupted" (Ctrl-C, SIGTERM) or "failed" with its error."""
        if self.record["status"] == "interrupted":
            return  # Lightning's exit after an interrupt is not a second failure
        self.record["status"] = "interrupted" if isinstance(error, INTERRUPTS) else "failed"
        self.record["error"] = _reason(error)
        self.record["metrics"] = {k: _scalar(v) for k, v in metrics.items()}
        self.save()

    def stop(self, metrics: Mapping[str, Any], evidence: Mapping[str, Any]) -> dict[str, Any]:
        """A race stopped the run at a rung (fcexp.race): its metrics are that epoch's and its test's."""
        self.writing = True
        self.record["status"] = "stopped"
        self.record["stopped"] = dict(evidence)
        self.record["metrics"] = {k: _scalar(v) for k, v in metrics.items()}
        self.save()
        return self.record

    def finish(self, metrics: Mapping[str, Any]) -> dict[str, Any]:
        self.record["status"] = "completed"
        self.record.pop("error", None)
        self.record["metrics"] = {k: _scalar(v) for k, v in metrics.items()}
        self.save()
        return self.record


class StepBoundaryCtrlC(L.Callback):
    """While training, Ctrl-C takes effect at the next step or validation batch, so the checkpoint it leaves
    (fcexp.pack.PackRuns.on_exception) holds whole steps: the weights, optimizer moments, epoch sums and random
    streams of the last step done, from which a resumed run draws the same dropout masks as an uninterrupted one.
    Pressed again, it stops at once."""

    def __init__(self) -> None:
        self.pressed = False
        self.previous: Any = None

    def _press(self, signum: int, frame: Any) -> None:
        if self.pressed:
            raise KeyboardInterrupt
        self.pressed = True

    def _stop_if_pressed(self, *args: Any) -> None:
        if self.pressed:
            raise KeyboardInterrupt

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if threading.current_thread() is threading.main_thread():  # signal handlers belong to the main thread
            self.previous = signal.signal(signal.SIGINT, self._press)

    on_train_batch_start = on_validation_batch_start = _stop_if_pressed

    def _restore(self) -> None:
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)
            self.previous = None

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._restore()
        self._stop_if_pressed()  # pressed in the last validation: the run stops before its test

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._restore()


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
