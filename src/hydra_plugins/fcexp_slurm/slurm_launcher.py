"""Hydra's submitit SLURM launcher, made to say what SLURM says. Hydra finds launchers only in the hydra_plugins
namespace package, so this file is here; what it asks SLURM lives in fcexp.slurm.

Submission and each job are submitit's (an array job; the job runs Hydra's job set-up and fcexp's task). What
differs is around them:
- a request that no node of the partition can meet is refused before submission, in one line;
- the wait reads `squeue`, not `sacct` (off where accounting is off, which submitit then warns about at every poll),
  and reports job states and why jobs pend about every `report_every_s`;
- a job that SLURM ends without a result (scancel, its time limit, a node failure) is recorded in its run folder
  and scores NaN, and the sweep goes on to compare the others.
"""

import logging
import math
import shlex
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, JobStatus, filter_overrides
from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf, SlurmQueueConf
from hydra_plugins.hydra_submitit_launcher.submitit_launcher import BaseSubmititLauncher
from omegaconf import DictConfig, OmegaConf, open_dict

log = logging.getLogger("fcexp")


@dataclass
class SlurmLauncherConf(SlurmQueueConf):
    _target_: str = "hydra_plugins.fcexp_slurm.slurm_launcher.SlurmLauncher"
    # null: <sweep folder>/.submitit/%j. Not an interpolation of hydra.sweep.dir as submitit's default is: Hydra
    # resolves that while it composes each job's config, which claimed a new sweep folder under runs/ every time.
    submitit_folder: Optional[str] = None  # noqa: UP045  Hydra loads this module outside sys.modules
    report_every_s: float = 60.0  # how often the wait says what the sweep's jobs are doing
    poll_s: float = 2.0  # how often it looks


ConfigStore.instance().store(group="hydra/launcher", name="fcexp_slurm", node=SlurmLauncherConf)


class SlurmLauncher(BaseSubmititLauncher):
    _EXECUTOR = "slurm"

    def __init__(self, report_every_s: float = 60.0, poll_s: float = 2.0, **params: Any) -> None:
        super().__init__(**params)
        self.report_every_s, self.poll_s = report_every_s, poll_s

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        import submitit

        from fcexp.compare import remove_if_unstarted
        from fcexp.conf import refuse
        from fcexp.record import shell_program
        from fcexp.slurm import check_request

        assert self.config is not None
        params = dict(self.params)
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        try:
            partition = check_request(params)
        except ValueError as err:
            remove_if_unstarted(sweep_dir)  # nothing ran
            refuse(str(err))
        sweep_dir.mkdir(parents=True, exist_ok=True)
        executor = submitit.AutoExecutor(
            cluster="slurm",
            folder=params.pop("submitit_folder") or sweep_dir / ".submitit" / "%j",
            slurm_max_num_timeout=params.pop("max_num_timeout"),
        )
        shared = set(OmegaConf.structured(BaseQueueConf).keys())
        executor.update_parameters(**{k if k in shared else f"slurm_{k}": v for k, v in params.items()})
        numbered, skipped = [], {}
        for idx, overrides in enumerate(job_overrides, start=initial_job_idx):
            finished = self._finished(idx, list(overrides))
            if finished is not None:  # a rerun with skip_finished: no SLURM job for what completed
                skipped[idx] = finished
                continue
            numbered.append((idx, overrides))
            log.info("#%d: %s", idx, " ".join(filter_overrides(overrides)))
        if not numbered:
            return list(skipped.values())
        state = Singleton.get_state()
        jobs = executor.map_array(
            self,
            [list(o) for _, o in numbered],
            ["hydra.sweep.dir"] * len(numbered),
            [idx for idx, _ in numbered],
            [f"job_id_for_{idx}" for idx, _ in numbered],
            [state] * len(numbered),
        )
        first = jobs[0].job_id.split("_")[0]  # submitit submits one job as a job, more as an array
        log.info(
            "submitted %s to partition %s as SLURM %s %s; waiting for %s (Ctrl-C stops the wait, not the jobs: "
            "scancel %s does)",
            f"{len(jobs)} jobs" if len(jobs) > 1 else "1 job",
            partition,
            "array" if len(jobs) > 1 else "job",
            first,
            "them" if len(jobs) > 1 else "it",
            first,
        )
        try:
            ended = self._wait(jobs, partition)
        except KeyboardInterrupt:
            # Ctrl-C stops only the waiting: one line on what goes on, not a traceback.
            print(
                f"stopped waiting; the jobs go on in SLURM (scancel {first} cancels them); compare them when they end "
                f"with: {shell_program('python')} -m fcexp.compare {shlex.quote(str(sweep_dir.absolute()))}",
                file=sys.stderr,
            )
            sys.exit(130)
        results = skipped | {
            idx: self._result(job, idx, list(o), ended.get(job.job_id))
            for job, (idx, o) in zip(jobs, numbered, strict=True)
        }
        return [results[idx] for idx in sorted(results)]

    def _wait(self, jobs: list, partition: str) -> dict[str, str]:
        """Wait until every job has a result or has left the queue; the SLURM state of those that left without one."""
        from fcexp.slurm import DONE, describe, queue_states

        arrays = sorted({job.job_id.split("_")[0] for job in jobs})
        waiting = {job.job_id: job for job in jobs}
        ended: dict[str, str] = {}
        seen: set[str] = set()
        last_report = time.monotonic()
        while waiting:
            states = queue_states(arrays)
            if states is None:  # no answer this time: nothing is concluded from it
                time.sleep(self.poll_s)
                continue
            seen |= states.keys()
            for job_id, job in list(waiting.items()):
                state = states.get(job_id, ("", ""))[0]
                if self._result_pickle(job).exists():
                    del waiting[job_id]
                elif state in DONE or (job_id in seen and job_id not in states):
                    # A job that ended well may have its result still on the way through a shared file system.
                    grace_s = 30.0 if state in ("COMPLETED", "") else 0.0
                    if not self._appears(self._result_pickle(job), grace_s):
                        ended[job_id] = state or "ENDED"
                    del waiting[job_id]
            if waiting and time.monotonic() - last_report >= self.report_every_s:
                left = {j: states[j] for j in waiting if j in states}
                log.info("SLURM: %s", describe(left, partition) if left else f"{len(waiting)} not in the queue yet")
                last_report = time.monotonic()
            if waiting:
                time.sleep(self.poll_s)
        return ended

    @staticmethod
    def _result_pickle(job: Any) -> Path:
        """Where the job's first task leaves its result (a DDP job has one task per rank; rank 0's is the run's)."""
        from submitit.core.utils import JobPaths

        return JobPaths(job.paths.folder, job.job_id, task_id=0).result_pickle

    @staticmethod
    def _appears(path: Path, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        while not path.exists():
            if time.monotonic() >= deadline:
                return False
            time.sleep(1)
        return True

    def _result(self, job: Any, idx: int, overrides: list[str], ended: str | None) -> JobReturn:
        """The job's own JobReturn, or, for one SLURM ended without a result, one scoring NaN after its run folder
        records why."""
        if ended is None:
            try:
                return job.results()[0]
            except Exception as err:  # submitit's own failure around the job (it could not start Python, say)
                return self._failed(idx, overrides, "failed", f"SLURM job {job.job_id}: {err}".splitlines()[0])
        # Cancelled, or stopped with a checkpoint to continue from (its time limit), the comparison ends with the
        # command that finishes the sweep.
        status = "cancelled" if ended == "CANCELLED" else "stopped"
        return self._failed(
            idx,
            overrides,
            status,
            f"SLURM ended job {job.job_id} {ended} before it finished; its log: {job.paths.stderr}",
        )

    def _job(self, idx: int, overrides: list[str]) -> tuple[DictConfig, Path]:
        """A job's config, as its own process composes it, and its run folder."""
        assert self.config is not None and self.hydra_context is not None
        sweep_config = self.hydra_context.config_loader.load_sweep_config(self.config, overrides)
        with open_dict(sweep_config):
            sweep_config.hydra.job.num = idx
        HydraConfig.instance().set_config(sweep_config)  # the folder's name reads it
        run_dir = Path(str(sweep_config.hydra.sweep.dir)) / str(sweep_config.hydra.sweep.subdir)
        HydraConfig.instance().set_config(self.config)
        return sweep_config, run_dir

    def _returned(self, sweep_config: DictConfig, run_dir: Path, score: float) -> JobReturn:
        task_config = OmegaConf.masked_copy(sweep_config, [k for k in sweep_config if k != "hydra"])
        ret = JobReturn(
            overrides=list(sweep_config.hydra.overrides.task), cfg=task_config, hydra_cfg=sweep_config,
            working_dir=str(run_dir),
        )  # fmt: skip
        ret.status, ret.return_value = JobStatus.COMPLETED, score
        return ret

    def _finished(self, idx: int, overrides: list[str]) -> JobReturn | None:
        """A job that needs no SLURM job, as fcexp.train.plan decides it would: one that completed before, with
        skip_finished its score, without it refused (a completed run is never redone)."""
        from fcexp.train import Job, plan

        sweep_config, run_dir = self._job(idx, overrides)
        task_config = OmegaConf.masked_copy(sweep_config, [k for k in sweep_config if k != "hydra"])
        try:
            planned = plan(task_config, run_dir, filter_overrides(overrides), run_dir.parent)
        except ValueError as err:
            log.error("job %s failed: %s", run_dir.name, err)
            return self._returned(sweep_config, run_dir, math.nan)
        return None if isinstance(planned, Job) else self._returned(sweep_config, run_dir, planned)

    def _failed(self, idx: int, overrides: list[str], status: str, error: str) -> JobReturn:
        """A job that returned no result: its run is marked `status`; "stopped" becomes "interrupted" when the run
        kept a checkpoint at the step it reached (SIGTERM, the time limit's signal), else "failed"."""
        from fcexp.record import RunRecord, mark

        sweep_config, run_dir = self._job(idx, overrides)
        if status == "stopped":
            previous = RunRecord.load(run_dir)
            status = "interrupted" if previous is not None and previous["status"] == "interrupted" else "failed"
            if status == "interrupted":  # why it stopped, in its own words, first
                error = f"{previous['error']}; {error}"
        ret = self._returned(sweep_config, run_dir, math.nan)
        mark(ret.cfg, run_dir, filter_overrides(overrides), status, error)
        log.error("job %s %s: %s", run_dir.name, status, error)
        return ret
