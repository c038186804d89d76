"""`python -m fcexp.train [overrides]`: compose → validate → instantiate → fit → test → record → return the metric."""

from __future__ import annotations

import contextlib
import logging
import math
import os
import shlex
import shutil
import signal
import sys
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import torch
from hydra import compose, initialize_config_module
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from hydra.utils import instantiate
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.callbacks import Checkpoint, ModelSummary
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from omegaconf import DictConfig, OmegaConf, open_dict
from torch.utils.tensorboard.summary import hparams as hparams_summaries

import fcexp.conf  # noqa: F401  registers the configs' resolvers, also in a sweep's worker processes
from fcexp.compare import load_sweep
from fcexp.data import DataError
from fcexp.module import MEMBER_KNOBS, Classifier
from fcexp.pack import Member, PackedData, PackRuns, member_bytes, merged_checkpoint, pack_key, pack_sizes
from fcexp.race import Race, decide
from fcexp.record import (
    CHECKPOINTS,
    INTERRUPTED,
    RECORD,
    AtomicCheckpointIO,
    RecordError,
    RunRecord,
    StepBoundaryCtrlC,
    checkpoint_step,
    fcexp_command,
    flat_hparams,
    mark,
    override_key,
    provenance,
    read_checkpoint,
    requeued,
    resume_checkpoint,
    shell_program,
    slurm_job,
    take_paths_as_typed,
    typed_args,
)
from fcexp.schema import validated
from fcexp.stats import accuracy_interval

log = logging.getLogger("fcexp")

# What a user can fix by changing a value: reported as one line, not a traceback.
USER_ERRORS = (ValueError, DataError, MisconfigurationException)


def _no_tips(record: logging.LogRecord) -> bool:
    # The last: fcexp gives the plain summary for log files (train_pack), of which Lightning would say so.
    skip = ("💡 Tip", "SLURM auto-requeueing enabled", "Trainer already configured with model summary")
    return not record.getMessage().startswith(skip)


def quiet_lightning() -> None:
    """Silence what Lightning prints at every fit that no user can act on: `train` (every run) and `fcexp.evaluate`
    call this first."""
    # Lightning 2.6 under torch >= 2.10 warns about its own use of a deprecated torch API.
    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated")
    # Short runs (data.limit_train) have fewer batches than the logging interval; the epoch metrics still log.
    warnings.filterwarnings("ignore", message=r"The number of training batches .* is smaller than the logging")
    # A resumed run's checkpoint folder holds its earlier checkpoints by design.
    warnings.filterwarnings("ignore", message=r"Checkpoint directory .* exists and is not empty")
    # Lightning cannot tell that fcexp's loader resumes mid-epoch (MNISTDataModule.train_dataloader); it does.
    warnings.filterwarnings("ignore", message=r"You're resuming from a checkpoint that ended before the epoch ended")
    # Where SLURM is installed (a login node), Lightning suggests srun at every run, also for one meant to run there.
    warnings.filterwarnings("ignore", message=r"The `srun` command is available on your system but is not used")
    # Lightning advertises a cloud logger at every fit, and under SLURM says at every fit and test, on every rank,
    # that it handles SIGUSR1 (fcexp handles SLURM's SIGTERM: RunRecord, plan).
    logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(_no_tips)
    logging.getLogger("lightning.pytorch.trainer.connectors.signal_connector").addFilter(_no_tips)


class PlainSweepLogs(Callback):
    """A sweep's own log lines fit for where they go: off a terminal, Optuna's without its colour codes (its handler
    colours whatever the stream), through Hydra's logging like every other line."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        if "optuna" in str(config.hydra.sweeper.get("_target_")) and not sys.stderr.isatty():
            import optuna  # the sweeper imported it already

            optuna.logging.disable_default_handler()
            optuna.logging.enable_propagation()


def user_error(err: InstantiationException) -> Exception:
    """What Hydra's wrapping hides: the constructor's own error, or one line for a target or argument it refused."""
    cause = err.__cause__
    if isinstance(cause, (*USER_ERRORS, FloatingPointError)):
        return cause
    link = cause
    while link is not None:
        if isinstance(link, SyntaxError):
            return cause  # fcexp's own code is broken: that is a traceback, not a value to change
        link = link.__cause__ or link.__context__
    lines = [line.strip() for line in str(cause or err).splitlines() if "HYDRA_FULL_ERROR" not in line]
    return ValueError(" ".join(line for line in lines if line))


@dataclass
class Job:
    """A run to train: its config, folder and overrides, and whether it continues from its newest checkpoint."""

    cfg: DictConfig
    run_dir: Path
    overrides: list[str]
    resume: bool = False
    race: bool = False  # a race continues it past a rung or stops it there (fcexp.race): not the user's resume
    typed: bool = False  # cfg is fcexp.schema.validated's already (a packed sweep's plan): not checked again


def train(cfg: DictConfig, run_dir: Path, overrides: list[str], resume: bool = False) -> dict:
    """Train, test and record one run in `run_dir`; returns its metrics.json content.

    With `resume`, training continues from the run's newest checkpoint (its step, epoch, optimizer and random
    state) in the same folder and TensorBoard run; without a checkpoint it starts again from step 0.
    """
    (result,) = train_pack([Job(cfg, run_dir, overrides, resume)])
    if isinstance(result, BaseException):
        raise result
    return result


def gpu_of_job(job_num: int, gpus: int) -> int:
    """The GPU job `job_num` of a parallel sweep trains on: jobs take the machine's `gpus` GPUs in turn."""
    return job_num % gpus


def spread_over_gpus(cfg: DictConfig) -> None:
    """`+launcher=parallel` (joblib) on a machine with GPUs: a one-device job trains on GPU `gpu_of_job` (each
    worker would take cuda:0). Other trainers (cpu, ddp, devices set) keep theirs."""
    if not HydraConfig.initialized() or "joblib" not in str(HydraConfig.get().launcher.get("_target_")):
        return
    trainer = cfg.trainer
    if trainer.accelerator not in ("auto", "gpu", "cuda") or trainer.get("strategy", "auto") != "auto":
        return
    if trainer.devices in (1, "1") and torch.cuda.device_count() > 0:
        with open_dict(trainer):
            trainer.devices = [gpu_of_job(HydraConfig.get().job.num, torch.cuda.device_count())]


def _members_model(cfgs: list[DictConfig]) -> Classifier:
    """One net from its config, or a pack with each member's own knobs, optimizer and seed."""
    factory = instantiate(cfgs[0].model, _partial_=True)
    if len(cfgs) == 1:
        # Its seed draws its initial weights exactly as a member's own seed does, and seeds its dropout masks.
        return factory(seed=cfgs[0].seed)
    members = []
    for cfg in cfgs:
        knobs = instantiate(cfg.model, _partial_=True).keywords
        members.append({k: knobs[k] for k in (*MEMBER_KNOBS[:-1], "optimizer")} | {"seed": cfg.seed})
    return factory(members=members)


def train_pack(
    jobs: list[Job], until: int | None = None, stop: list[dict[str, Any]] | None = None
) -> list[dict | BaseException]:
    """Train, test and record runs that share a model shape and data settings as one pack (fcexp.pack): each ends
    with its metrics.json content, or, when it failed while the others went on, its error.

    For a race (fcexp.race): `until`, train only to that epoch (their checkpoints then hold it), untested, their
    records still running; `stop`, test the runs as their checkpoints hold them and record them stopped with this
    evidence (one entry a run)."""
    quiet_lightning()
    origin = provenance()  # one git and version read for the pack
    members = [
        Member(i, job.run_dir, RunRecord(job.run_dir, job.overrides, job.resume, job.cfg, len(jobs), origin, job.race))
        for i, job in enumerate(jobs)
    ]
    trainer = None

    def failed(i: int, error: BaseException) -> None:
        member = members[i]
        member.error = error
        member.record.fail(error, model.member_metrics[i])
        if member.logger is not None:
            member.logger.finalize("failed")

    try:
        cfgs = [job.cfg if job.typed else validated(job.cfg) for job in jobs]
        for member, cfg, job in zip(members, cfgs, jobs, strict=True):
            member.record.describe(flat_hparams(cfg, job.overrides))
        first = cfgs[0]
        if first.threads:
            torch.set_num_threads(first.threads)
        L.seed_everything(first.seed, workers=True, verbose=False)
        for member, cfg in zip(members, cfgs, strict=True):
            member.datamodule = instantiate(cfg.data)
        datamodule = PackedData([m.datamodule for m in members])
        model = _members_model(cfgs)
        model.on_member_failed = failed
        resumed = [resume_checkpoint(job.run_dir)[0] if job.resume else None for job in jobs]
        for member, job, ckpt in zip(members, jobs, resumed, strict=True):
            # The run folder is the TensorBoard run. A resumed run first drops the events the stopped one logged
            # after its checkpoint (TensorBoard's purge_step), so no step shows twice. Events reach the disk every
            # 2 s (not torch's 120): TensorBoard shows a run as it trains, and a killed run loses at most those.
            purge_step = (checkpoint_step(ckpt) if ckpt else 0) if job.resume else None
            member.logger = TensorBoardLogger(
                save_dir=job.run_dir, name="", version="", default_hp_metric=False, purge_step=purge_step, flush_secs=2
            )
        model.runs = members
        # The members share their callbacks' settings (fcexp.pack.pack_key): one of each for the pack, each computing
        # for every member and writing to each member's run.
        callbacks = [instantiate(c) for name, c in first.callbacks.items() if c is not None and name != "progress"]
        if any(ckpt is None for ckpt in resumed) and any(ckpt is not None for ckpt in resumed):
            raise ValueError("a pack resumes all its members from checkpoints or none")
        if first.trainer.accelerator == "cpu" or not torch.cuda.is_available():
            # Lightning sets this at import so that CUDA stays uninitialized across forks (ddp_fork, dataloader
            # workers); then every optimizer step probes NVML again, a dlopen of ~0.3 ms. A run that never uses
            # CUDA does not need it; one that may keeps it.
            os.environ.pop("PYTORCH_NVML_BASED_CUDA_CHECK", None)
        if first.trainer.accelerator in ("gpu", "cuda") and not torch.cuda.is_available():
            raise ValueError(
                f"trainer.accelerator={first.trainer.accelerator} needs CUDA, which this machine lacks; "
                "use trainer=auto or trainer=cpu"
            )
        spread_over_gpus(first)
        progress = [instantiate(first.callbacks.progress)] if first.callbacks.get("progress") else []
        # Lightning's default summary is rich's table, cut to 80 columns: for a terminal, not a log file.
        # A race's later legs (`job.race`) train the nets its first leg described.
        described = first.trainer.enable_model_summary and not any(job.race for job in jobs)
        summary = [ModelSummary()] if described and not sys.stdout.isatty() else []
        checkpoint_io = AtomicCheckpointIO()
        for bar in progress:  # a race's leg to a rung still counts the run's own epochs
            bar.line.total = first.trainer.max_epochs
        trainer = instantiate(
            first.trainer,
            **({"max_epochs": until} if until is not None else {}),
            enable_model_summary=described,
            logger=False,
            # Each member's checkpoints come from fcexp.pack.Checkpoints; without one, Lightning would add its own.
            enable_checkpointing=any(isinstance(c, Checkpoint) for c in callbacks),
            callbacks=[*progress, *summary, StepBoundaryCtrlC(), PackRuns(members), *callbacks],
            plugins=[checkpoint_io],
            default_root_dir=jobs[0].run_dir,
        )
        if os.environ.get("SUBMITIT_EXECUTOR") == "slurm":
            # submitit's warning that the job nears its time limit (SIGUSR2, on every rank) stops the run as SIGTERM
            # does: Lightning stops every rank at the same step, and the run keeps interrupted.ckpt. submitit's own
            # handler raised mid-step on rank 0 only, which left a DDP job waiting for its other ranks.
            signal.signal(signal.SIGUSR2, lambda *_: os.kill(os.getpid(), signal.SIGTERM))
        ckpt_path = None
        if resumed[0] is not None:
            # The pack's checkpoint is its members' merged; Lightning reads it from memory, by the first one's path.
            ckpt_path = str(resumed[0])
            checkpoint_io.in_memory[ckpt_path] = merged_checkpoint([read_checkpoint(p) for p in resumed], model)
        if stop is not None:  # the nets as the rung left them, tested, their numbers logged at the rung's step
            model.checkpoint_step = checkpoint_io.in_memory[ckpt_path]["global_step"]
            trainer.test(model, datamodule=datamodule, ckpt_path=ckpt_path, verbose=False, weights_only=True)
        else:
            trainer.fit(model, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
        if until is None and stop is None and any(m.error is None for m in members):
            # The seed evaluates the model as training left it, not the best checkpoint.
            trainer.test(model, datamodule=datamodule, verbose=False)
    except BaseException as err:
        if isinstance(err, InstantiationException):
            err = user_error(err)
        for member in members:
            if member.error is None:
                metrics = model.member_metrics[member.index] if trainer is not None else {}
                member.record.fail(err, metrics)
        if any(m.record.record["status"] == "interrupted" for m in members):
            raise KeyboardInterrupt from None  # Lightning turns Ctrl-C into exit(1); still an interrupt, as SIGTERM
        raise err from None
    results: list[dict | BaseException] = []
    for member in members:
        if member.error is not None:
            results.append(member.error)
            continue
        metrics = model.member_metrics[member.index]
        if until is not None:  # on to the next rung: its TensorBoard run continues then
            results.append(member.record.record)
            member.logger.finalize("success")
            continue
        if stop is not None:  # its training's numbers are those of the rung's epoch, in its record
            history = member.record.record["history"]
            trained = {k: v for k, v in history[-1].items() if k not in ("epoch", "step")}
            best = max(h["val/acc"] for h in history)
            metrics = trained | {"val/acc_best": best} | metrics
            results.append(member.record.stop(metrics, stop[member.index]))
        else:
            results.append(member.record.finish(metrics))
        # A completed run went past the state a Ctrl-C once kept: a later resume must not go back to it.
        (member.run_dir / CHECKPOINTS / INTERRUPTED).unlink(missing_ok=True)
        if trainer.is_global_zero:
            final = {
                "hp_metric": metrics["val/acc_best"],
                "final/val_acc": metrics["val/acc"],
                "final/test_acc": metrics["test/acc"],
                "final/test_loss": metrics["test/loss"],
            }
            final = {k: float(v) for k, v in final.items()}
            member.logger.hparams.update(member.record.record["hparams"])  # its hparams.yaml
            member.logger.log_metrics(final, step=0)
            # The run's hparams (session start and end) but no HParams experiment of its own: TensorBoard shows the
            # first experiment it finds, under its default loader a random run's, and a sweep writes its own with
            # the swept knobs first (fcexp.compare.write_hparams_experiment). torch's SummaryWriter has no public
            # call that writes a ready summary: _get_file_writer is the one add_hparams itself uses.
            _, start, end = hparams_summaries(member.record.record["hparams"], final)
            writer = member.logger.experiment._get_file_writer()
            writer.add_summary(start)
            writer.add_summary(end)
            member.logger.finalize("success")
    return results


def compose_config(*overrides: str, with_hydra: bool = False) -> DictConfig:
    """The config `python -m fcexp.train <overrides>` would run, composed outside the command (scripts, tests);
    `with_hydra` keeps Hydra's own part (hydra.launcher, …) as a multirun would compose it."""
    with initialize_config_module("fcexp.conf", version_base="1.3"):
        return compose("train", overrides=list(overrides), return_hydra_config=with_hydra)


def resumed_config(previous: dict, extra: list[str]) -> tuple[DictConfig, list[str]]:
    """The config a run was started with (recomposed from its recorded overrides), plus any new overrides."""
    overrides = previous["overrides"] + [o for o in extra if not o.startswith("resume=")]
    return compose(config_name="train", overrides=overrides), overrides


def finish_sweep_command(sweep_dir: Path) -> str:
    """The command that reruns this sweep into its folder, skipping the jobs that completed."""
    keep = [a for a in typed_args() if not a.startswith(("hydra.sweep.dir=", "skip_finished="))]
    return fcexp_command(*keep, f"hydra.sweep.dir={sweep_dir}", "skip_finished=true")


def _remove_if_refused(run_dir: Path) -> bool:
    """Remove a new run's folder when it holds only what was written before its values were refused."""
    written_first = {".hydra", RECORD, "train.log", "hparams.yaml"}
    if not run_dir.is_dir() or any(p.name not in written_first for p in run_dir.iterdir()):
        return False
    shutil.rmtree(run_dir)
    with contextlib.suppress(OSError):  # the runs folder it made for it, when it holds nothing else
        run_dir.parent.rmdir()
    root = logging.getLogger()
    for handler in [h for h in root.handlers if isinstance(h, logging.FileHandler)]:
        if Path(handler.baseFilename).is_relative_to(run_dir.absolute()):  # its train.log: gone with the folder
            root.removeHandler(handler)
            handler.close()
    return True


def replicas(cfg: DictConfig, run_dir: Path, overrides: list[str]) -> list[tuple[DictConfig, Path, list[str]]]:
    """The runs of one configuration: itself, or with `replicates` > 1 one run per seed seed, seed+1, … in
    `<run_dir>/seed=<s>`."""
    if cfg.resume or not isinstance(cfg.replicates, int) or cfg.replicates <= 1:
        return [(cfg, run_dir, overrides)]
    keep = [o for o in overrides if override_key(o) not in ("seed", "replicates")]
    return [
        (
            OmegaConf.merge(cfg, {"seed": seed, "replicates": 1}),
            run_dir / f"seed={seed}",
            [*keep, f"seed={seed}", "replicates=1"],
        )
        for seed in range(cfg.seed, cfg.seed + cfg.replicates)
    ]


def mean_best(bests: list[float]) -> float:
    """What a sweeper ranks a replicated configuration by: the mean of its runs' best val accuracies (NaN if one
    failed), said with its interval."""
    best = sum(bests) / len(bests)
    if len(bests) > 1 and rank_zero_only.rank == 0 and not math.isnan(best):
        log.info("mean best val accuracy over %d seeds: %s", len(bests), accuracy_interval(bests))
    return best


def replicate(cfg: DictConfig, run_dir: Path, overrides: list[str], sweep_dir: Path | None) -> float:
    """`cfg.replicates` runs of one configuration on consecutive seeds (`replicas`), one after another: the mean of
    their best validation accuracies, the score a sweeper ranks the configuration by."""
    try:
        validated(cfg)
    except ValueError:
        return run(cfg, run_dir, overrides, sweep_dir)  # refused there, once, as any run is
    runs = replicas(cfg, run_dir, overrides)
    return mean_best([run(*r, sweep_dir) for r in runs])


def plan_job(cfg: DictConfig, sweep_dir: Path) -> list[Job | float]:
    """A packed sweep's job (`+launcher=packed`), planned but not trained: one entry per replicate, a Job to train
    or the score of one that needs no training (finished before, or refused: NaN, recorded in its folder)."""
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    overrides = list(HydraConfig.get().overrides.task)
    plans: list[Job | float] = []
    for one, folder, args in replicas(cfg, run_dir, overrides):
        try:
            job = plan(one, folder, args, sweep_dir)
            if isinstance(job, Job):
                job = replace(job, cfg=validated(job.cfg), typed=True)
                check_packable(job.cfg)
                try:  # its net alone, so that a value the constructor refuses fails this job and no pack
                    instantiate(job.cfg.model)
                except InstantiationException as err:
                    raise user_error(err) from None
            plans.append(job)
        except Exception as err:
            new = not (folder / RECORD).is_file()
            if new:  # a new job refused: recorded as failed, as other launchers do
                mark(one, folder, args, "failed", f"{type(err).__name__}: {err}")
            plans.append(failed(err, folder, None, sweep_dir, started=new))
    return plans


def check_packable(cfg: DictConfig) -> None:
    """Refuse what would couple the members of a pack: several devices, and what acts on all of a step's gradients
    at once (clipping by their joint norm, fp16's loss scaling, which skips every member's step for one's overflow)."""
    trainer = cfg.trainer
    if trainer.get("strategy", "auto") != "auto" or trainer.get("devices", 1) not in (1, "1"):
        raise ValueError(
            f"+launcher=packed trains on one device; trainer.devices={trainer.get('devices')} and "
            f"trainer.strategy={trainer.get('strategy')} need the basic launcher"
        )
    if trainer.get("gradient_clip_val"):
        raise ValueError(
            "+launcher=packed does not clip gradients per member; drop trainer.gradient_clip_val or use the basic "
            "launcher"
        )
    if str(trainer.get("precision")).startswith("16"):
        raise ValueError(
            f"+launcher=packed does not scale fp16 losses per member; trainer.precision={trainer.precision} needs the "
            "basic launcher, or use trainer.precision=bf16-mixed"
        )


@contextlib.contextmanager
def member_logs(run_dirs: list[Path]):
    """While a pack trains, what it logs goes to each member's train.log (and the console, as before)."""
    root = logging.getLogger()
    before = [h for h in root.handlers if isinstance(h, logging.FileHandler)]
    formatter = before[0].formatter if before else None
    for d in run_dirs:
        d.mkdir(parents=True, exist_ok=True)  # a replicate's folder is made when it starts
    added = [logging.FileHandler(d / "train.log") for d in run_dirs]
    for handler in before:
        root.removeHandler(handler)
    for handler in added:
        handler.setFormatter(formatter)
        root.addHandler(handler)
    try:
        yield
    finally:
        for handler in added:
            root.removeHandler(handler)
            handler.close()
        for handler in before:
            root.addHandler(handler)


def train_packs(
    plans: list[list[Job | float]], sweep_dir: Path, max_members: int, budget: float, race: Race | None = None
) -> list[float]:
    """Train a packed sweep's planned runs: those that can share a model (fcexp.pack.pack_key) and, when resumed,
    their step train together, at most `max_members` and `budget` bytes a pack. Each job's score, as `replicate`.
    With a `race`, the runs train rung by rung (fcexp.race): after each, the configurations shown worse stop, and
    the others go on in packs re-formed without them."""
    scores: list[list[float | None]] = [[None if isinstance(r, Job) else r for r in runs] for runs in plans]
    entries = [(j, k, job) for j, runs in enumerate(plans) for k, job in enumerate(runs) if isinstance(job, Job)]
    longest = max((job.cfg.trainer.max_epochs for _, _, job in entries), default=0)
    legs = [r for r in race.rungs if r < longest] if race else []
    for rung in legs:
        log.info("race: training %d runs to epoch %d", len(entries), rung)
        # Runs that stop short of this rung end here as any run does; the others are left at the rung.
        short = [e for e in entries if e[2].cfg.trainer.max_epochs <= rung]
        entries = [e for e in entries if e[2].cfg.trainer.max_epochs > rung]
        _train_groups(short, scores, sweep_dir, max_members, budget)
        _train_groups(entries, scores, sweep_dir, max_members, budget, until=rung)
        entries = [(j, k, job) for j, k, job in entries if scores[j][k] is None]  # those that failed are out
        # Runs a rerun skipped as stopped before are among the decided again; only those still racing stop here.
        stops = decide(load_sweep(sweep_dir), rung, race)
        losing = [e for e in entries if e[2].run_dir in stops]
        entries = [e for e in entries if e[2].run_dir not in stops]
        log.info("race: %d of %d runs stopped at epoch %d", len(losing), len(losing) + len(entries), rung)
        # From here on each run continues from its checkpoint at the rung.
        cut = [(j, k, replace(job, resume=True, race=True)) for j, k, job in losing]
        _train_groups(cut, scores, sweep_dir, max_members, budget, stop=stops)
        entries = [(j, k, replace(job, resume=True, race=True)) for j, k, job in entries]
    _train_groups(entries, scores, sweep_dir, max_members, budget)
    return [mean_best(s) for s in scores]


def _train_groups(
    entries: list[tuple[int, int, Job]],
    scores: list[list[float | None]],
    sweep_dir: Path,
    max_members: int,
    budget: float,
    until: int | None = None,
    stop: dict[Path, dict[str, Any]] | None = None,
) -> None:
    """Train `entries` (job j's replicate k) in packs; each run that ended, failed or stopped gets its score in
    `scores`, a run trained only `until` a rung none (train_pack's `until` and `stop`)."""
    groups: dict[str, list[tuple[int, int, Job]]] = {}
    for j, k, job in entries:
        ckpt = resume_checkpoint(job.run_dir)[0] if job.resume else None
        key = pack_key(job.cfg) + f"step={checkpoint_step(ckpt) if ckpt else None}"
        if job.cfg.activation.name == "prelu":
            key += str(job.run_dir)  # learned activations train alone
        groups.setdefault(key, []).append((j, k, job))
    for group in groups.values():
        limit = min(max_members, max(1, int(budget // member_bytes(group[0][2].cfg))))
        start = 0
        for size in pack_sizes(len(group), limit):
            pack, start = group[start : start + size], start + size
            jobs = [job for _, _, job in pack]
            evidence = [stop[job.run_dir] for job in jobs] if stop is not None else None
            # What the pack logs goes to every member's train.log, what each member ends with to its own.
            with member_logs([job.run_dir for job in jobs]):
                what = "testing the stopped" if stop is not None else "training a pack of"
                log.info("%s %d: %s", what, len(jobs), ", ".join(job.run_dir.name for job in jobs))
                results = _train_pack_or_each(jobs, sweep_dir, until, evidence)
            for (j, k, job), result in zip(pack, results, strict=True):
                with member_logs([job.run_dir]):
                    if isinstance(result, BaseException):
                        scores[j][k] = failed(result, job.run_dir, None, sweep_dir)
                    elif stop is not None:
                        log.info("%s", result["stopped"]["reason"])
                        scores[j][k] = report(result, job.run_dir, sweep_dir)
                    elif until is None:
                        scores[j][k] = report(result, job.run_dir, sweep_dir)


def _train_pack_or_each(
    jobs: list[Job], sweep_dir: Path, until: int | None = None, stop: list[dict[str, Any]] | None = None
) -> list[dict | BaseException]:
    try:
        if not any(job.race for job in jobs):
            return train_pack(jobs, until, stop)
        # A race's later legs: its own lines say what they do, not Lightning's devices and checkpoint restores.
        lightning = logging.getLogger("lightning.pytorch.utilities.rank_zero")
        level = lightning.level
        lightning.setLevel(logging.WARNING)
        try:
            return train_pack(jobs, until, stop)
        finally:
            lightning.setLevel(level)
    except KeyboardInterrupt:
        interrupted([job.run_dir for job in jobs], sweep_dir)
    except USER_ERRORS as err:
        if len(jobs) == 1:
            return [err]
        # A value one member's constructor refused: the others train without it.
        log.warning("the pack refused a value (%s); training its %d runs one by one", err, len(jobs))
        return [
            result
            for i, job in enumerate(jobs)
            for result in _train_pack_or_each([job], sweep_dir, until, stop and stop[i : i + 1])
        ]
    except Exception as err:
        return [err] * len(jobs)


def plan(cfg: DictConfig, run_dir: Path, overrides: list[str], sweep_dir: Path | None) -> Job | float:
    """What a run in `run_dir` is to do: start, resume (`resume=`, a sweep job's rerun, SLURM restarting its job),
    or, for a sweep job that completed before and `skip_finished`, nothing: then its best val accuracy. A completed
    run is never redone."""
    previous = RunRecord.load(run_dir)
    if previous is not None and requeued(previous):
        if previous["status"] == "completed":  # requeued after the run ended, before its job did
            return previous["metrics"]["val/acc_best"]
        log.info("SLURM restarted job %s (requeued or preempted): continuing %s", slurm_job(), run_dir)
        tell(check_resume(cfg, run_dir, previous))
        return Job(cfg, run_dir, overrides, resume=True)
    if cfg.resume:  # conf/__init__.py checked that it is a run folder
        cfg, overrides = resumed_config(previous, overrides)
        notes = check_resume(cfg, run_dir, previous)  # a net it cannot continue first: no epochs would fix that
        done = len(previous["history"])
        if previous["status"] == "completed" and cfg.trainer.max_epochs <= done:
            raise ValueError(
                f"{run_dir} completed its {done} epochs; to train it further, add trainer.max_epochs=<more than {done}>"
            )
        tell(notes)
        return Job(cfg, run_dir, overrides, resume=True)
    # A run a race stopped has ended too: a rerun of the race skips it; `resume=` trains it on to its last epoch.
    if previous is not None and previous["status"] in ("completed", "stopped") and rank_zero_only.rank == 0:
        if cfg.skip_finished:
            log.info("skipping %s: finished before (skip_finished=true)", run_dir.name)
            return previous["metrics"]["val/acc_best"]
        resume = shlex.quote(f"resume={run_dir}")  # pasted into a shell as printed, whatever the path holds
        fix = "rerun the sweep with skip_finished=true" if sweep_dir else f"continue it with {resume}"
        raise ValueError(f"{run_dir} holds a {previous['status']} run; {fix}, or start in a new folder")
    # A sweep rerun (skip_finished) continues its stopped jobs from their checkpoints.
    resume = previous is not None and bool(cfg.skip_finished)
    if resume:
        tell(check_resume(cfg, run_dir, previous))
    return Job(cfg, run_dir, overrides, resume=resume)


# What sets the shapes of a net's tensors: a resume that changes one cannot load its checkpoint.
SHAPE_KNOBS = ("model.hidden", "model.batch_norm", "activation.num_parameters")


def tell(notes: list[str]) -> None:
    for note in notes:
        (log.warning if note.startswith("skipped") else log.info)(note)


def check_resume(cfg: DictConfig, run_dir: Path, previous: dict) -> list[str]:
    """Refuse a resume that cannot continue: no checkpoint that loads, none kept, or a net of another shape than
    the one its checkpoint holds. Nothing is written: what to tell the user (the checkpoint it continues from, the
    newer ones it skipped) is returned, for once every check has passed."""
    path, skipped = resume_checkpoint(run_dir)
    if path is None:
        if skipped:
            raise ValueError(
                f"no checkpoint of {run_dir} loads: {'; '.join(skipped)}; delete them to train the run again from "
                "step 0, or start a new run"
            )
        kept = cfg.callbacks.get("checkpoint")
        if kept is None or (kept.get("best") is None and kept.get("last") is None):
            raise ValueError(f"{run_dir} kept no checkpoints (its callbacks have none): nothing to resume from")
        return [f"{run_dir} stopped before its first checkpoint: training it again from step 0"]
    state = read_checkpoint(path)["state_dict"]
    try:
        net = instantiate(cfg.model).state_dict()
    except InstantiationException as err:
        raise user_error(err) from None
    if {k: v.shape for k, v in net.items()} != {k: v.shape for k, v in state.items()}:
        now = flat_hparams(cfg)
        changed = [k for k in SHAPE_KNOBS if k in now and now[k] != previous["hparams"].get(k, now[k])]
        if not changed:
            raise ValueError(f"{path} does not fit the net this config builds; start a new run")
        new = ", ".join(f"{k}={now[k]}" for k in changed)
        old = ", ".join(f"{k}={previous['hparams'][k]}" for k in changed)
        raise ValueError(
            f"{new} changes the net {run_dir} trained ({old}); a resume continues the same net: drop "
            f"{'that override' if len(changed) == 1 else 'those overrides'}, or start a new run"
        )
    notes = [f"skipped {reason}" for reason in skipped]
    return [*notes, f"continuing {run_dir} from {path.relative_to(run_dir)} (step {checkpoint_step(path)})"]


def interrupted(run_dirs: list[Path], sweep_dir: Path | None) -> None:
    """Ctrl-C or SIGTERM: every run keeps what its resume needs; say how to continue, and leave with the interrupt's
    status."""
    if rank_zero_only.rank == 0:
        if len(run_dirs) == 1:
            print(
                f"interrupted; continue this run with: {fcexp_command(f'resume={run_dirs[0]}')}",
                file=sys.stderr,
            )
        else:
            print(f"interrupted; each of the pack's {len(run_dirs)} runs kept its checkpoint", file=sys.stderr)
        if slurm_job():
            print(
                f"SLURM stopped job {slurm_job()}: requeued, it continues from this checkpoint by itself; cancelled, "
                "the sweep's finish command continues it",
                file=sys.stderr,
            )
        elif sweep_dir:
            print(f"finish the sweep with: {finish_sweep_command(sweep_dir)}", file=sys.stderr)
    sys.exit(130)


def failed(err: Exception, run_dir: Path, previous: dict | None, sweep_dir: Path | None, started: bool = True) -> float:
    """A run that failed: in a sweep (`sweep_dir`) it is recorded and returned as NaN so that the other jobs go on;
    otherwise one line for the user (a value to change, or a divergence) and an exit status. One refused before it
    `started` (a completed job rerun without skip_finished, a resume that cannot continue) leaves its train.log as
    it was: the line goes to the console only."""
    if sweep_dir:
        # One bad job must not end a sweep: it is recorded as failed and the others go on.
        if started:
            log.error("job %s failed: %s", run_dir.name, err)
        elif rank_zero_only.rank == 0:
            print(f"error: job {run_dir.name} refused: {err}", file=sys.stderr)
        return math.nan
    # A new run refused is removed; a folder with a record of its own, even a damaged one, never.
    new = previous is None and not isinstance(err, RecordError)
    refused = isinstance(err, USER_ERRORS) and new and _remove_if_refused(run_dir)
    if os.environ.get("HYDRA_FULL_ERROR") == "1" or not isinstance(err, (*USER_ERRORS, FloatingPointError)):
        raise err
    if rank_zero_only.rank == 0:
        # Its own line, even after a progress bar that did not end one.
        print(f"\nerror: {err}" if sys.stderr.isatty() else f"error: {err}", file=sys.stderr)
        if new and not refused:  # what this run recorded before it failed
            print(f"run folder: {run_dir}", file=sys.stderr)
    sys.exit(2 if isinstance(err, USER_ERRORS) else 1)


def report(result: dict, run_dir: Path, sweep_dir: Path | None) -> float:
    """Tell the user how a run ended and where it is; its best val accuracy."""
    # Under DDP every rank runs this; only rank 0 speaks.
    say = log.info if rank_zero_only.rank == 0 else log.debug
    best = result["metrics"]["val/acc_best"]
    say("test accuracy %.4f, best val accuracy %.4f", result["metrics"]["test/acc"], best)
    say("run folder: %s", run_dir)
    if not sweep_dir:
        say("view it: %s --logdir %s", shell_program("tensorboard"), shlex.quote(str(run_dir)))
    return best


def run(cfg: DictConfig, run_dir: Path, overrides: list[str], sweep_dir: Path | None) -> float:
    """One run in `run_dir` (a new one, a resume, or a sweep job's rerun), reported to the user; in a sweep
    (`sweep_dir`), a failure is recorded and returned as NaN so that the other jobs go on."""
    previous = None
    try:
        previous = RunRecord.load(run_dir)
        job = plan(cfg, run_dir, overrides, sweep_dir)
    except Exception as err:
        return failed(err, run_dir, previous, sweep_dir, started=False)
    if not isinstance(job, Job):
        return job
    try:
        result = train(job.cfg, run_dir, job.overrides, resume=job.resume)
    except KeyboardInterrupt:
        interrupted([run_dir], sweep_dir)
    except Exception as err:
        return failed(err, run_dir, previous, sweep_dir)
    return report(result, run_dir, sweep_dir)


@hydra.main(version_base="1.3", config_path="pkg://fcexp.conf", config_name="train")
def main(cfg: DictConfig) -> float:
    hydra_cfg = HydraConfig.get()
    run_dir = Path(hydra_cfg.runtime.output_dir)
    sweep_dir = Path(hydra_cfg.sweep.dir).absolute() if hydra_cfg.mode == RunMode.MULTIRUN else None
    overrides = list(hydra_cfg.overrides.task)
    if not cfg.resume and isinstance(cfg.replicates, int) and cfg.replicates > 1:
        return replicate(cfg, run_dir, overrides, sweep_dir)
    return run(cfg, run_dir, overrides, sweep_dir)


def cli() -> None:
    """`python -m fcexp.train`: main, with each path on the command line taken as the shell gave it."""
    take_paths_as_typed()
    main()


if __name__ == "__main__":
    cli()
