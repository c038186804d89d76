"""Training speed of fcexp beside the common Lightning recipe, a hand-written loop and the arithmetic bound.

`python scripts/bench.py [--quick] [--json out.json]`. Every method trains the seed's model (784-512-512-10,
ReLU, dropout 0.2, BatchNorm + L2 on layer 2, Adam, batch 128) on the same MNIST files. The methods take turns,
repetition after repetition, so that noise from other processes on the machine hits them all alike; each
figure is the median over repetitions of training samples/s, timed after a few warm-up steps.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import io
import json
import logging
import math
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from datetime import date
from itertools import pairwise
from pathlib import Path
from typing import Any, ClassVar

import lightning as L
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from lightning.pytorch.loggers import TensorBoardLogger
from torch import nn
from torch.utils.data import DataLoader
from torchvision import transforms
from torchvision.datasets import MNIST

from fcexp.data import MEAN, STD, encode, ensure_mnist, normalize, read_idx
from fcexp.race import Race
from fcexp.record import cpu_model, fcexp_command
from fcexp.train import compose_config, quiet_lightning, train

DATA_ROOT = os.environ.get("FCEXP_DATA", str(Path("~/.cache/fcexp").expanduser()))
BATCH = 128
WIDTHS = [784, 512, 512, 10]  # the seed's layer widths, for the arithmetic bound
TRAIN_SIZE = 50_000  # fcexp trains on the first 50,000 images; the last 10,000 validate

# Hydra instantiates the timer by import path; run as a script, this module is __main__. A sweep's own processes
# (and their joblib workers) import it as `bench`, from this folder put on their PYTHONPATH.
TIMER_TARGET = f"{__name__}.StepTimer"
SWEEP_TIMER_TARGET = f"{Path(__file__).stem}.StepTimer"
STEP_LOG = "FCEXP_BENCH_STEP_LOG"  # a file: each fit's training-step time, a JSON line per fit


class StepTimer(L.Callback):
    """Times a fit's training batches, each from its batch-start hook to its batch-end hook (forward, backward,
    optimizer step and the callbacks' hooks between; validation, test and everything else between batches fall
    outside): samples/s over an epoch's batches after the first `warmup`, and the fit's total training-step time.

    The state is the class's, an entry per fit: Hydra builds the timer inside fcexp.train, out of our reach, and
    builds it once per member of a pack (each member's callbacks see the pack's trainer through a view of its own)
    or once for the pack. Every instance finds the fit's entry by the fit loop, which the views forward to the
    pack's; the first to reach a hook times it and the others find it done. With `steps`, the fit's total goes as a
    JSON line to the file named by $FCEXP_BENCH_STEP_LOG when its training ends; on CUDA every step then waits for
    the device, so that it is timed whole.
    """

    warmup = 5
    measured: ClassVar[list[float]] = []  # samples/s, one entry per epoch
    fits: ClassVar[dict[int, dict]] = {}

    def __init__(self, steps: bool = False):
        self.steps = steps

    @staticmethod
    def fit(trainer: L.Trainer) -> dict:
        new = {"batch_start": None, "steps_s": 0.0, "batches": 0, "since": None, "samples": 0}
        return StepTimer.fits.setdefault(id(trainer.fit_loop), new)

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch, batch_idx: int) -> None:
        fit = self.fit(trainer)
        if fit["batch_start"] is not None:  # another instance on this fit has started the clock
            return
        if self.steps or batch_idx == self.warmup:
            sync(pl_module.device)
        fit["batch_start"] = time.perf_counter()
        if batch_idx == self.warmup:
            fit["since"], fit["samples"] = fit["batch_start"], 0

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx) -> None:
        fit = self.fit(trainer)
        if fit["batch_start"] is None:  # another instance on this fit has stopped it
            return
        last = batch_idx + 1 == trainer.num_training_batches
        if self.steps or last:
            sync(pl_module.device)
        now = time.perf_counter()
        fit["steps_s"] += now - fit["batch_start"]
        fit["batches"] += 1
        fit["batch_start"] = None
        if batch_idx >= self.warmup:
            fit["samples"] += len(batch[0])
        if last and fit["since"] is not None:
            StepTimer.measured.append(fit["samples"] / (now - fit["since"]))
            fit["since"] = None

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        fit = StepTimer.fits.pop(id(trainer.fit_loop), None)
        if fit is not None and self.steps and os.environ.get(STEP_LOG):
            with open(os.environ[STEP_LOG], "a") as log:  # one short line per write: parallel jobs do not mix
                log.write(json.dumps({"steps_s": round(fit["steps_s"], 4), "batches": fit["batches"]}) + "\n")


def sync(device: torch.device) -> None:
    # CUDA runs asynchronously: without a barrier the clock stops before the GPU does.
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def fcexp_path(steps: int, device: str, extra: tuple[str, ...] = ()) -> Callable[[], float]:
    """fcexp.train.train itself, with its default callbacks, logger and run record, cut to `steps` batches."""
    trainer = "gpu" if device == "cuda" else "cpu"
    overrides = [
        f"trainer={trainer}",
        "trainer.max_epochs=1",
        f"+trainer.limit_train_batches={steps}",
        "+trainer.limit_val_batches=1",  # validation is not what is timed; keep it short
        f"+callbacks.bench_timer._target_={TIMER_TARGET}",
        *extra,
    ]

    def run() -> float:
        with tempfile.TemporaryDirectory() as tmp:
            train(compose_config(*overrides, f"runs_dir={tmp}"), Path(tmp), overrides)
        return StepTimer.measured.pop()

    return run


class CommonRecipe(L.LightningModule):
    """What a Lightning MNIST tutorial writes: torch's layers, default Adam, self.log every step."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(
            nn.Flatten(),
            nn.Linear(784, 512),
            nn.ReLU(),
            nn.Dropout(0.2),
            nn.Linear(512, 512, bias=False),
            nn.BatchNorm1d(512),
            nn.ReLU(),
            nn.Dropout(0.2),
            nn.Linear(512, 10),
        )

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        logits = self.net(x)
        loss = F.cross_entropy(logits, y) + 1e-3 * self.net[4].weight.square().sum()
        self.log("train/loss", loss)
        self.log("train/acc", (logits.argmax(1) == y).float().mean())
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=1e-3, eps=1e-7)


def common_recipe(steps: int, device: str, workers: int, epochs: int = 1) -> Callable[[], float]:
    """torchvision's MNIST with ToTensor + Normalize per sample, a torch DataLoader, a default Trainer; `steps` a
    epoch."""
    dataset = MNIST(
        DATA_ROOT,
        train=True,
        transform=transforms.Compose([transforms.ToTensor(), transforms.Normalize((MEAN,), (STD,))]),
    )

    def run() -> float:
        loader = DataLoader(dataset, batch_size=BATCH, shuffle=True, num_workers=workers, pin_memory=device == "cuda")
        with tempfile.TemporaryDirectory() as tmp:
            trainer = L.Trainer(
                accelerator="gpu" if device == "cuda" else "cpu",
                devices=1,
                max_epochs=epochs,
                limit_train_batches=steps,
                logger=TensorBoardLogger(tmp),
                callbacks=[StepTimer()],
                default_root_dir=tmp,
            )
            trainer.fit(CommonRecipe(), loader)
        return StepTimer.measured.pop()

    return run


def training_tensors(device: str) -> tuple[torch.Tensor, torch.Tensor]:
    folder = ensure_mnist(DATA_ROOT)
    x = normalize(read_idx(folder / "train-images-idx3-ubyte")[:TRAIN_SIZE], "scale")
    y = encode(read_idx(folder / "train-labels-idx1-ubyte")[:TRAIN_SIZE], "onehot")
    return x.to(device), y.to(device)


def ms_per_step(
    model: nn.Module,
    loss_of: Callable,
    x: torch.Tensor,
    y: torch.Tensor,
    steps: int,
    after_backward: Callable[[], None] = lambda: None,
) -> float:
    """Milliseconds per training step (loss, backward, `after_backward`, the model's own optimizer) over random
    batches of x and y, timed after StepTimer.warmup steps."""
    optimizer = model.train().configure_optimizers()
    perm = torch.randperm(len(x), device=x.device)
    for i in range(steps):
        if i == StepTimer.warmup:
            sync(x.device)
            start = time.perf_counter()
        j = perm[i * BATCH : (i + 1) * BATCH]
        loss = loss_of(model, x[j], y[j])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        after_backward()
        optimizer.step()
    sync(x.device)
    return (time.perf_counter() - start) / (steps - StepTimer.warmup) * 1e3


def hand_loop(steps: int, device: str) -> Callable[[], float]:
    """The same net, loss and fused Adam as fcexp, in a bare loop over index slices of in-memory tensors, the L2
    penalty in the loss through autograd: what a user writes."""
    x, y = training_tensors(device)
    cfg = compose_config()

    def loss_of(model: nn.Module, xb: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(model(xb), yb) + model.l2_penalties().sum()

    def run() -> float:
        return BATCH * 1e3 / ms_per_step(instantiate(cfg.model).to(device), loss_of, x, y, steps)

    return run


def arithmetic_bound(steps: int, device: str, dtype: torch.dtype = torch.float32) -> Callable[[], float]:
    """One training step's matrix products alone, in `dtype`: 3 forward, 3 weight gradients, 2 input gradients."""
    acts = [torch.randn(BATCH, d, device=device, dtype=dtype) for d in WIDTHS]
    weights = [torch.randn(o, i, device=device, dtype=dtype) for i, o in pairwise(WIDTHS)]

    def step() -> None:
        for k, w in enumerate(weights):
            acts[k] @ w.t()  # forward
            acts[k + 1].t() @ acts[k]  # weight gradient
            if k:
                acts[k + 1] @ w  # input gradient (none for the images)

    def run() -> float:
        for _ in range(StepTimer.warmup):
            step()
        sync(acts[0].device)
        start = time.perf_counter()
        for _ in range(steps):
            step()
        sync(acts[0].device)
        return steps * BATCH / (time.perf_counter() - start)

    return run


def member_step(members: int, steps: int, device: str, precision: str = "32-true") -> Callable[[], float]:
    """Milliseconds per member-step of fcexp's model alone in a pack of `members` copies of the seed's net on one
    batch order, like a grid sweep's pack: a pack of one is a solo run's step. The step is fcexp's: the forward
    pass (in bf16-mixed under torch.autocast, which is what Lightning's bf16-mixed is, on the CPU as on CUDA), the
    loss without the L2 penalty, backward, the penalty's gradient added by the module itself
    (Classifier.add_l2_gradients, as its on_after_backward does), Adam."""
    x, y = training_tensors(device)
    cfg = compose_config()
    autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=precision == "bf16-mixed")

    def loss_of(model: nn.Module, xb: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
        with autocast:
            logits = model.net(xb)
        return model.losses(logits, yb).sum()

    def run() -> float:
        factory = instantiate(cfg.model, _partial_=True)
        knobs = {k: factory.keywords[k] for k in ("activation", "dropout", "batch_norm", "l2", "init", "optimizer")}
        model = factory(members=[knobs | {"label_smoothing": 0.0, "seed": s} for s in range(members)])
        model = model.to(device)
        return ms_per_step(model, loss_of, x, y, steps, model.add_l2_gradients) / members

    return run


def step_flops() -> int:
    # Each product is 2·batch·in·out FLOP; the first layer has no input gradient.
    return 2 * BATCH * (3 * sum(i * o for i, o in pairwise(WIDTHS)) - WIDTHS[0] * WIDTHS[1])


def timed_steps() -> list[str]:
    """The overrides that time a run's or sweep's training steps (StepTimer in the processes of its own), left out
    of its jobs' folder names as the launcher's are."""
    exclude = compose_config(with_hydra=True).hydra.job.config.override_dirname.exclude_keys
    return [
        f"+callbacks.bench_timer={{_target_:{SWEEP_TIMER_TARGET},steps:true}}",
        f"hydra.job.config.override_dirname.exclude_keys=[{','.join([*exclude, 'callbacks.bench_timer'])}]",
    ]


def timed(command: list[str], step_log: Path | None = None) -> float:
    """Wall time of `command`; a run or sweep of fcexp.train with timed_steps() appends its fits' training-step time
    to `step_log`."""
    env = {**os.environ, "FCEXP_DATA": DATA_ROOT}
    if step_log is not None:
        scripts = str(Path(__file__).resolve().parent)  # where its processes import StepTimer from
        env |= {
            "PYTHONPATH": os.pathsep.join(p for p in (scripts, env.get("PYTHONPATH")) if p),
            STEP_LOG: str(step_log),
        }
    start = time.perf_counter()
    proc = subprocess.run(command, capture_output=True, text=True, env=env)
    if proc.returncode:
        raise RuntimeError(f"{' '.join(command)} failed:\n{proc.stderr[-3000:]}")
    return time.perf_counter() - start


def step_costs(runs: Path, step_log: Path) -> dict[str, float]:
    """The runs' wall time (their records' wall_time_s, a packed member's its share of its pack's), their
    training-step time (StepTimer's, a pack's shared likewise), the share outside the steps (time outside them
    over the time in them: validation, test, checkpoints, figures, set-up, the loop between batches), and the
    runs' mean test accuracy."""
    records = [json.loads(p.read_text()) for p in runs.rglob("metrics.json")]
    wall = sum(r["wall_time_s"] for r in records)
    steps = sum(json.loads(line)["steps_s"] for line in step_log.read_text().splitlines())
    return {
        "runs": len(records),
        "run_wall_s": round(wall, 2),
        "train_steps_s": round(steps, 4),  # a quick run's steps take a fraction of a second: its share needs the digits
        "outside_share": round((wall - steps) / steps, 3),
        "mean_test_acc": round(statistics.fmean(r["metrics"]["test/acc"] for r in records), 4),
    }


def whole_run(overrides: list[str]) -> dict[str, float]:
    """Wall time and peak RSS of `python -m fcexp.train` in a fresh process, imports and test included; the run's
    own wall time, its training-step time and the share outside the steps."""
    with tempfile.TemporaryDirectory() as tmp:
        command = [sys.executable, "-m", "fcexp.train", f"runs_dir={tmp}/runs", *overrides, *timed_steps()]
        wall = timed(command, Path(tmp, "steps.jsonl"))
        costs = step_costs(Path(tmp, "runs"), Path(tmp, "steps.jsonl"))
    # Run before any DataLoader worker is forked, so the children's peak is this process's alone.
    peak_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return {
        "wall_s": round(wall, 2),
        "peak_rss_mb": round(peak_mb),
        "test_acc": costs["mean_test_acc"],
        "run_wall_s": costs["run_wall_s"],
        "train_steps_s": costs["train_steps_s"],
        "outside_share": costs["outside_share"],
        "overrides": overrides,
    }


# The sweeps of --grid and --grid16: overrides, jobs, default epochs. grid16 is a grid of small steps' worth: relu and
# tanh x dropout 0, 0.2 x batch norm x L2 0, 1e-3.
GRID16 = ["activation=relu,tanh", "model.dropout=0,0.2", "model.batch_norm=false,true", "model.l2=0,0.001"]
SWEEPS = {"grid": (["+sweep=grid"], 48, 4), "grid16": (GRID16, 16, 1)}
SWEEP_WAYS = {
    "sequential": [],  # the basic launcher: one job after another in one process
    "parallel": ["+launcher=parallel"],
    "packed": ["+launcher=packed"],
    "packed_bf16": ["+launcher=packed", "trainer.precision=bf16-mixed"],
}


def sweep_costs(what: list[str], jobs: int, epochs: int, common: bool) -> dict[str, float]:
    """One sweep (`what`: its overrides, `jobs` jobs) run four ways: one job after another in one process,
    joblib's 2 workers, packed in fp32 and packed in bf16; each way's wall time, mean test accuracy, and its runs'
    wall and training-step time (step_costs). With `common`, also as many separate processes of the common recipe,
    each paying its own imports."""
    sweep = [sys.executable, "-m", "fcexp.train", "-m", *what, f"trainer.max_epochs={epochs}"]
    quiet = ["callbacks.progress.refresh_rate=0", "trainer.enable_model_summary=false"]
    costs: dict[str, float] = {"jobs": jobs, "epochs": epochs}
    with tempfile.TemporaryDirectory() as tmp:
        for name, extra in SWEEP_WAYS.items():
            runs, log = Path(tmp, name), Path(tmp, f"{name}-steps.jsonl")
            costs[f"{name}_s"] = round(timed([*sweep, f"runs_dir={runs}", *quiet, *extra, *timed_steps()], log), 1)
            costs |= {f"{name}_{k}": v for k, v in step_costs(runs, log).items() if k != "runs"}
            print(
                f"sweep {name}: {costs[f'{name}_s']} s, mean test accuracy {costs[f'{name}_mean_test_acc']}, "
                f"runs' wall {costs[f'{name}_run_wall_s']} s of which training steps {costs[f'{name}_train_steps_s']}"
                f" s (outside share {costs[f'{name}_outside_share']})",
                flush=True,
            )
    if common:
        process = [sys.executable, __file__, f"--common-epochs={epochs}"]
        costs["common_recipe_processes_s"] = round(sum(timed(process) for _ in range(jobs)), 1)
    # Speeds, as every ratio of the bench: A/B is A's speed over B's (>1: A is faster), here B's time over A's.
    # Issue 19's targets: packed/sequential >= 3 and packed/parallel >= 2 for the grid, packed/sequential >= 2.5
    # for grid16.
    for name, base in (
        ("parallel", "sequential"),
        ("packed", "sequential"),
        ("packed", "parallel"),
        ("packed_bf16", "sequential"),
        ("packed_bf16", "parallel"),
    ):
        costs[f"{name}/{base}"] = round(costs[f"{base}_s"] / costs[f"{name}_s"], 2)
    if "common_recipe_processes_s" in costs:  # fcexp's sweep beside the same jobs as separate processes
        processes = costs["common_recipe_processes_s"]
        costs["sequential/common_recipe_processes"] = round(processes / costs["sequential_s"], 2)
    return costs


def configurations(sweep_dir: Path) -> list[dict[str, str]]:
    """A compared sweep's configurations, best first (its configs.csv)."""
    with open(sweep_dir / "configs.csv", newline="") as f:
        return list(csv.DictReader(f))


# Issue 21's ways of training the grid: every run to its end, the race by its evidence, and successive halving that
# keeps a third at each rung by rank (Hyperband's usual rate), the race without evidence.
RACES = {
    "packed": ["+launcher=packed"],
    "race": ["+launcher=race"],
    "halving": ["+launcher=race", "hydra.launcher.race.rule=halving", "hydra.launcher.race.keep=0.33"],
}


def race_costs(limit: int | None, epochs: int) -> dict[str, Any]:
    """Issue 21's targets: `+sweep=grid seed=0,1,2` (144 runs) packed and raced (RACES), side by side: each one's wall
    time and run-epochs trained, each race's speed over the packed sweep's, how many runs it stopped at which rung,
    and whether its best configuration is the full sweep's best or one the full sweep cannot tell from it. Then an
    A/A race, 16 configurations that differ only in their batch order (data.seed) over the same 3 seeds: the share
    it stops, against its level."""
    quiet = ["callbacks.progress.refresh_rate=0", "trainer.enable_model_summary=false", f"trainer.max_epochs={epochs}"]
    data = [f"data.limit_train={limit}"] if limit else []
    grid = [sys.executable, "-m", "fcexp.train", "-m", "+sweep=grid", "seed=0,1,2", *data, *quiet]
    costs: dict[str, Any] = {"runs": 144, "epochs": epochs, "limit_train": limit}
    knobs = ["activation", "model.dropout", "model.batch_norm", "model.l2"]
    with tempfile.TemporaryDirectory() as tmp:
        for way, overrides in RACES.items():
            folder = Path(tmp, way)
            costs[f"{way}_s"] = round(timed([*grid, *overrides, f"hydra.sweep.dir={folder}"]), 1)
            records = [json.loads(p.read_text()) for p in folder.glob("*/metrics.json")]
            costs[f"{way}_run_epochs"] = sum(len(r["history"]) for r in records)
            print(f"race bench: {way} {costs[f'{way}_s']} s", flush=True)
            if way == "packed":
                full = configurations(folder)
                # What any rule that keeps the ties costs at least: every configuration the full sweep cannot tell
                # from its best trained to the end, every other one stopped at the race's first rung.
                tied = [c for c in full if c["verdict"] in ("best", "tied with best")]
                ties = sum(int(c["n"]) for c in tied)
                costs["tied_configurations"] = len(tied)
                costs["ties_floor_run_epochs"] = ties * epochs + (costs["runs"] - ties) * Race().rungs[0]
                continue
            costs[f"{way}_stopped_at"] = {
                str(rung): sum(r.get("stopped", {}).get("rung") == rung for r in records) for rung in range(1, epochs)
            }
            winner = {k: configurations(folder)[0][k] for k in knobs}
            there = next(c for c in full if {k: c[k] for k in knobs} == winner)
            costs[f"{way}_best"] = winner | {"rank_in_full_sweep": there["rank"], "verdict": there["verdict"]}
            costs[f"{way}/packed"] = round(costs["packed_s"] / costs[f"{way}_s"], 2)  # issue 21's target: >= 2.5
            costs[f"{way}/packed_run_epochs"] = round(costs["packed_run_epochs"] / costs[f"{way}_run_epochs"], 2)
        # A/A: one configuration sixteen times, each with its own batch order, paired by seed as the grid is.
        same = [sys.executable, "-m", "fcexp.train", "-m", "+launcher=race", "data.seed=range(100,116)", "seed=0,1,2"]
        folder = Path(tmp, "aa")
        costs["aa_s"] = round(timed([*same, *data, *quiet, f"hydra.sweep.dir={folder}"]), 1)
        records = [json.loads(p.read_text()) for p in folder.glob("*/metrics.json")]
        stopped = {r["hparams"]["data.seed"] for r in records if r["status"] == "stopped"}
        costs["aa_configurations"], costs["aa_stopped"] = 16, len(stopped)
    return costs


def machine() -> str:
    gpu = f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ", no GPU"
    return f"{cpu_model()} ({os.cpu_count()} cores{gpu}), torch {torch.__version__}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a few steps of each method: checks the bench, not speed")
    parser.add_argument("--reps", type=int, default=None, help="repetitions of every method (default 3, quick 1)")
    parser.add_argument("--steps", type=int, default=None, help="timed training steps per repetition (default 300)")
    parser.add_argument(
        "--json",
        type=Path,
        help="also write the results to this file; --quick writes beside it, to <name>-quick.json, and leaves the "
        "full bench's figures alone",
    )
    parser.add_argument(
        "--sweep",
        type=int,
        default=0,
        metavar="N",
        help="also time a sweep of N seeds of the seed's net: sequential, joblib, packed (fp32, bf16) and N separate "
        "common-recipe processes (N=16 at 1 epoch: ~10 min here)",
    )
    parser.add_argument(
        "--grid",
        action="store_true",
        help="also time the 48-job +sweep=grid the same ways but the common recipe (4 epochs: ~45 min here)",
    )
    parser.add_argument(
        "--grid16",
        action="store_true",
        help="also time the 16-job grid (relu,tanh x dropout 0,0.2 x batch norm x L2 0,1e-3) the same ways as --grid "
        "(1 epoch: ~4 min here, estimated from --sweep 16)",
    )
    parser.add_argument(
        "--sweep-epochs", type=int, default=None, help="epochs per sweep job (default 1, --grid 4; --grid16 1)"
    )
    parser.add_argument(
        "--race",
        action="store_true",
        help="also time +sweep=grid seed=0,1,2 (144 runs, 4 epochs) packed and raced, and an A/A race (~1 hour here "
        "on the full training set; --race-limit shrinks it)",
    )
    parser.add_argument("--race-limit", type=int, default=None, help="data.limit_train of the --race sweeps")
    parser.add_argument("--members", type=int, default=None, help="pack size of the member-step figure (default 16)")
    parser.add_argument("--common-epochs", type=int, default=0, help=argparse.SUPPRESS)  # one process of --sweep
    args = parser.parse_args()
    if args.common_epochs:
        device = "cuda" if torch.cuda.is_available() else "cpu"
        common_recipe(math.ceil(50_000 / BATCH), device, 0, args.common_epochs)()  # fcexp's epochs
        return
    reps = args.reps or (1 if args.quick else 3)
    steps = args.steps or (8 if args.quick else 300)
    StepTimer.warmup = 2 if args.quick else 10
    device = "cuda" if torch.cuda.is_available() else "cpu"
    load_at_start = round(os.getloadavg()[0], 2)
    quiet_lightning()  # the warnings and hints a run filters
    for name in ("lightning.pytorch", "lightning.fabric"):  # Lightning sets its own levels at import
        logging.getLogger(name).setLevel(logging.ERROR)
    # What the common recipe does on purpose: a DataLoader with 0 workers, pinned memory where there is no GPU.
    warnings.filterwarnings("ignore", message=".*(does not have many workers|pin_memory).*")

    # The whole default run first, in a fresh process, while this one has forked no DataLoader workers.
    run_overrides = ["data.limit_train=1280", "trainer.max_epochs=1"] if args.quick else []
    process = whole_run(run_overrides)
    print(
        f"{fcexp_command(*run_overrides)}: {process['wall_s']:.1f} s wall, "
        f"peak RSS {process['peak_rss_mb']} MB, test accuracy {process['test_acc']:.4f}; the run's own "
        f"{process['run_wall_s']} s, of which training steps {process['train_steps_s']} s (outside share "
        f"{process['outside_share']})",
        flush=True,
    )

    total = steps + StepTimer.warmup
    methods = {
        "fcexp": fcexp_path(total, device),
        "common recipe, 0 workers": common_recipe(total, device, 0),
        "common recipe, 2 workers": common_recipe(total, device, 2),
        "hand-written loop": hand_loop(total, device),
        "arithmetic bound": arithmetic_bound(steps, device),
        "arithmetic bound, bf16": arithmetic_bound(steps, device, torch.bfloat16),
    }
    methods["fcexp, bf16 autocast"] = fcexp_path(total, device, ("trainer.precision=bf16-mixed",))
    if device == "cuda":
        methods["fcexp, torch.compile"] = fcexp_path(total, device, ("model.compile=true",))
    samples: dict[str, list[float]] = {name: [] for name in methods}
    for rep in range(reps):
        for name, run in methods.items():
            # Progress bars and Lightning's notices would bury the table; errors still raise.
            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                samples[name].append(run())
            print(f"rep {rep + 1}/{reps} {name:28s} {samples[name][-1]:9,.0f} samples/s", flush=True)

    # The step of one member of a pack beside a solo run's step, in fp32 and bf16, taking turns likewise.
    members = args.members or (2 if args.quick else 16)
    packs = {
        f"{size} x {precision}": (size, precision) for precision in ("32-true", "bf16-mixed") for size in (1, members)
    }
    step_ms: dict[str, list[float]] = {name: [] for name in packs}
    for rep in range(reps):
        for name, (size, precision) in packs.items():
            step_ms[name].append(member_step(size, min(total, 8 if args.quick else 70), device, precision)())
            print(f"rep {rep + 1}/{reps} member-step, pack of {name:18s} {step_ms[name][-1]:6.2f} ms", flush=True)
    member_ms = {name: statistics.median(v) for name, v in step_ms.items()}

    median = {name: statistics.median(v) for name, v in samples.items()}
    bound_ms = {
        p: BATCH * 1e3 / median[name] for p, name in (("fp32", "arithmetic bound"), ("bf16", "arithmetic bound, bf16"))
    }
    packed_ms = {"fp32": member_ms[f"{members} x 32-true"], "bf16": member_ms[f"{members} x bf16-mixed"]}
    common = max(median["common recipe, 0 workers"], median["common recipe, 2 workers"])
    result = {
        "date": date.today().isoformat(),
        "machine": machine(),
        "cpu": cpu_model(),
        "device": device,
        "threads": torch.get_num_threads(),
        # Other processes on the machine: the ratios survive them, the absolute figures do not.
        "load_average_at_start": load_at_start,
        "load_average_at_end": round(os.getloadavg()[0], 2),
        "reps": reps,
        "steps": steps,
        "batch_size": BATCH,
        "samples_per_s": {name: round(v) for name, v in median.items()},
        "all_reps": {name: [round(s) for s in v] for name, v in samples.items()},
        "ratios": {
            "fcexp/common": round(median["fcexp"] / common, 2),
            "fcexp/hand-written": round(median["fcexp"] / median["hand-written loop"], 2),
            "fcexp/arithmetic": round(median["fcexp"] / median["arithmetic bound"], 2),
            # A member-step of the pack beside a solo fp32 step (>1: a member's step is cheaper).
            **{f"member step/solo step, {p}": round(member_ms["1 x 32-true"] / ms, 2) for p, ms in packed_ms.items()},
            # The fraction of the same-precision bound a member-step reaches: targets 0.5 (fp32), 0.35 (bf16).
            **{f"member step/bound, {p}": round(bound_ms[p] / ms, 2) for p, ms in packed_ms.items()},
        },
        "member_step_ms": {name: round(v, 3) for name, v in member_ms.items()},
        "arithmetic_gflops": round(step_flops() / bound_ms["fp32"] / 1e6, 1),
        "arithmetic_gflops_bf16": round(step_flops() / bound_ms["bf16"] / 1e6, 1),
        "process": process,
        "bench_peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
    }
    if args.sweep:
        result["sweep"] = sweep_costs([f"seed=range(0,{args.sweep})"], args.sweep, args.sweep_epochs or 1, common=True)
    for name, (what, jobs, epochs) in SWEEPS.items():
        if getattr(args, name):
            result[name] = sweep_costs(what, jobs, args.sweep_epochs or epochs, common=False)
    if args.race:
        result["race"] = race_costs(args.race_limit, args.sweep_epochs or 4)

    print(
        f"\n{result['machine']}, {result['date']}, median of {reps} x {steps} steps, batch {BATCH}, "
        f"load average {load_at_start} at start, {result['load_average_at_end']} at end"
    )
    print(f"{'method':30s} {'samples/s':>10s}  speed ÷ fcexp's (>1: faster than fcexp)")
    for name, value in median.items():
        print(f"{name:30s} {value:10,.0f}  {value / median['fcexp']:.2f}")
    print(
        "Every ratio A/B below is A's speed over B's, i.e. B's time over A's (>1: A is faster); member step/bound is "
        "the\nfraction of its precision's arithmetic bound a member-step of the pack reaches (bound time over "
        "member-step time).\nOutside share: a run's time outside its training steps over its time in them."
    )
    for name, value in result["ratios"].items():
        print(f"{name}: {value}")
    print(
        f"member-step ms: {result['member_step_ms']}; arithmetic bound GFLOP/s: {result['arithmetic_gflops']} "
        f"(fp32), {result['arithmetic_gflops_bf16']} (bf16)"
    )
    for sweep in ("sweep", "grid", "grid16", "race"):
        for name, value in result.get(sweep, {}).items():
            print(f"{sweep} {name}: {value}")
    if args.json:
        # `make bench ARGS=--quick` passes the full bench's file: a smoke test must not replace its figures.
        path = args.json.with_name(f"{args.json.stem}-quick{args.json.suffix}") if args.quick else args.json
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=2))
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
