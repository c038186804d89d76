"""Hydra's launcher for packed sweeps. Hydra finds launchers only in the hydra_plugins namespace package, so this
file is here; what it does lives in fcexp (train.train_pack, pack.pack_key).

Each job is set up as Hydra's other launchers set it up (its folder, .hydra configs), then the jobs that can share
a model shape train together, as many per pack as `max_members` and the memory estimate allow.
"""

import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from hydra.core.utils import JobReturn, JobStatus, run_job, setup_globals
from hydra.plugins.launcher import Launcher
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, open_dict

log = logging.getLogger("fcexp")


@dataclass
class RaceConf:
    """A race's rule (fcexp.race.Race): decide after these epochs, stop below this adjusted p, keep this share by
    rank without replicates (or with them, rule=halving)."""

    rungs: list[int] = field(default_factory=lambda: [1, 2])
    level: float = 0.05
    keep: float = 0.5
    rule: str = "test"  # or halving; checked by fcexp.race.Race, in one line


@dataclass
class PackedLauncherConf:
    _target_: str = "hydra_plugins.fcexp_packed.packed_launcher.PackedLauncher"
    max_members: int = 32  # members per pack at most
    # Hydra loads this module outside sys.modules: no postponed annotations, so Optional rather than `| None`.
    memory_gb: Optional[float] = None  # noqa: UP045  what packs may take; null: half the device's free memory
    race: Optional[RaceConf] = None  # noqa: UP045  null: every run trains to its end


ConfigStore.instance().store(group="hydra/launcher", name="fcexp_packed", node=PackedLauncherConf)


def free_memory() -> int:
    """Bytes free on the device fcexp trains on: the GPU's when there is one, else the machine's available RAM."""
    if torch.cuda.is_available():
        return torch.cuda.mem_get_info()[0]
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


class ComposedOnce:
    """Hydra's `load_sweep_config`, each job composed once. Hydra's basic sweeper composes every job of a batch to
    check it (Sweeper.validate_batch_is_legal) and throws the configs away, and the launcher then composed each
    again: about half a second a job on a 2-core CPU. The check's configs are kept here, and the launch takes each
    (`take`) instead of composing it anew; a job nothing checked is composed then."""

    def __init__(self, compose: Any):
        self.compose = compose
        self.checked: dict[tuple[int, tuple[str, ...]], DictConfig] = {}

    def __call__(self, master_config: DictConfig, sweep_overrides: list[str]) -> DictConfig:
        config = self.compose(master_config, sweep_overrides)
        self.checked[(id(master_config), tuple(sweep_overrides))] = config
        return config

    def take(self, master_config: DictConfig, sweep_overrides: list[str]) -> DictConfig:
        config = self.checked.pop((id(master_config), tuple(sweep_overrides)), None)
        return self.compose(master_config, sweep_overrides) if config is None else config


class PackedLauncher(Launcher):
    def __init__(self, max_members: int = 32, memory_gb: float | None = None, race: Any = None) -> None:
        from fcexp.race import Race

        if not isinstance(max_members, int) or max_members < 1:
            raise ValueError(f"hydra.launcher.max_members must be a positive integer, got {max_members!r}")
        if memory_gb is not None and not memory_gb > 0:
            raise ValueError(f"hydra.launcher.memory_gb must be > 0 or null, got {memory_gb!r}")
        self.max_members, self.memory_gb = max_members, memory_gb
        self.race = None if race is None else Race.of(race)
        self.config: DictConfig | None = None
        self.task_function: TaskFunction | None = None
        self.hydra_context: HydraContext | None = None
        self.compose: ComposedOnce | None = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.config, self.task_function, self.hydra_context = config, task_function, hydra_context
        loader = hydra_context.config_loader
        if not isinstance(loader.load_sweep_config, ComposedOnce):
            loader.load_sweep_config = ComposedOnce(loader.load_sweep_config)
        self.compose = loader.load_sweep_config

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        from fcexp.train import plan_job, train_packs

        setup_globals()
        assert self.config is not None and self.hydra_context is not None and self.compose is not None
        sweep_dir = Path(self.config.hydra.sweep.dir).absolute()
        log.info("packing %d jobs into %s", len(job_overrides), sweep_dir)
        returns: list[JobReturn] = []
        plans: list[Any] = []
        for idx, overrides in enumerate(job_overrides, start=initial_job_idx):
            sweep_config = self.compose.take(self.config, list(overrides))
            with open_dict(sweep_config):
                sweep_config.hydra.job.id = f"{sweep_config.hydra.job.name}_{idx}"
                sweep_config.hydra.job.num = idx
            HydraConfig.instance().set_config(sweep_config)
            # Hydra's own job set-up (folder, .hydra configs, logging); the job's "task" is only its plan.
            ret = run_job(
                hydra_context=self.hydra_context,
                task_function=lambda cfg: plan_job(cfg, sweep_dir),
                config=sweep_config,
                job_dir_key="hydra.sweep.dir",
                job_subdir_key="hydra.sweep.subdir",
            )
            returns.append(ret)
            # plan_job records a job it cannot plan; should it fail itself, the job counts as failed. The value
            # itself: JobReturn.return_value would raise the job's error, which this launcher handles per job.
            plans.append(ret._return_value if ret.status == JobStatus.COMPLETED else [math.nan])
        budget = self.memory_gb * 2**30 if self.memory_gb else free_memory() / 2
        scores = train_packs(plans, sweep_dir, self.max_members, budget, self.race)
        for ret, score in zip(returns, scores, strict=True):
            ret.status = JobStatus.COMPLETED
            ret.return_value = score if score is not None else math.nan
        return returns
