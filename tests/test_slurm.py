"""`+launcher=slurm` and DDP under srun, against the real one-node SLURM the `slurm` fixture starts: sweeps, a
diverging job, scancel, preemption (scontrol requeue), pending reasons, refused requests."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import DATA_ROOT, printed, run_cli, run_printed, start_cli
from omegaconf import OmegaConf

from fcexp.slurm import check_request, describe, queue_states
from fcexp.train import compose_config

pytestmark = pytest.mark.slow

# One CPU and a little memory a job: two jobs train at once on a 2-core machine.
SLURM = [
    "+launcher=slurm",
    "hydra.launcher.cpus_per_task=1",
    "hydra.launcher.mem_gb=2",
    "callbacks.progress.refresh_rate=0",
]


def sweep(slurm, tmp_path: Path, sweep_dir: Path, *overrides: str) -> subprocess.CompletedProcess:
    return run_cli("fcexp.train", "-m", *SLURM, *overrides, f"hydra.sweep.dir={sweep_dir}", cwd=tmp_path, env=slurm.env)


def start_sweep(slurm, tmp_path: Path, sweep_dir: Path, *overrides: str) -> tuple[subprocess.Popen, Path]:
    log = tmp_path / "launcher.log"
    proc = start_cli(
        "fcexp.train", "-m", *SLURM, *overrides, f"hydra.sweep.dir={sweep_dir}",
        cwd=tmp_path, env=slurm.env, output=log.open("w"),
    )  # fmt: skip
    return proc, log


def wait_until(condition, what: str, timeout: float = 120, proc: subprocess.Popen | None = None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = condition()
        if found:
            return found
        assert proc is None or proc.poll() is None, f"the launcher ended before {what}"
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def submitted_id(log: Path) -> str | None:
    found = re.search(r"as SLURM (?:array|job) (\d+)", log.read_text())
    return found.group(1) if found else None


def record(run_dir: Path) -> dict | None:
    try:
        return json.loads((run_dir / "metrics.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def epochs_done(run_dir: Path) -> int:
    return len((record(run_dir) or {}).get("history", []))


def files(run_dir: Path) -> set[str]:
    """A run folder's files, TensorBoard's event files by kind (their names carry host and time)."""
    return {re.sub(r"events\.out\.tfevents\..*", "events", str(p.relative_to(run_dir))) for p in run_dir.rglob("*")}


def test_a_request_no_node_can_meet_is_refused_before_submission(slurm, tmp_path, monkeypatch):
    cpus = slurm.cpus + 1
    before = slurm.run("squeue", "-h", "--states=all").stdout
    done = sweep(slurm, tmp_path, tmp_path / "sweep", "activation=relu,tanh", f"hydra.launcher.cpus_per_task={cpus}")
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        f"error: no node in partition debug has {cpus} CPUs (hydra.launcher.cpus_per_task={cpus} x tasks_per_node=1; "
        f"its largest has {slurm.cpus}); lower hydra.launcher.cpus_per_task"
    ]
    assert slurm.run("squeue", "-h", "--states=all").stdout == before  # nothing was submitted
    assert not (tmp_path / "sweep").exists()  # nor anything left of it
    # The other checks, asked of the same sinfo in process.
    monkeypatch.setenv("SLURM_CONF", slurm.env["SLURM_CONF"])
    fits = {"partition": None, "cpus_per_task": 1, "tasks_per_node": 1, "mem_gb": 1, "gpus_per_node": 0, "nodes": 1}
    assert check_request(fits) == "debug"
    refused = {
        "partition": "hydra.launcher.partition=gpu: no such partition; this cluster has: debug, down",
        "mem_gb": f"no node in partition debug has {(slurm.memory_mb // 1024 + 1) * 1024} MB of memory "
        f"(hydra.launcher.mem_gb={slurm.memory_mb // 1024 + 1}; its largest has {slurm.memory_mb}); lower "
        "hydra.launcher.mem_gb",
        "gpus_per_node": "no node in partition debug has 1 GPUs (hydra.launcher.gpus_per_node=1; its largest has 0); "
        "lower hydra.launcher.gpus_per_node, or choose a GPU partition",
        "nodes": "hydra.launcher.nodes=2, but partition debug has 1 node(s) that fit the request; lower "
        "hydra.launcher.nodes",
    }
    bad = {"partition": "gpu", "mem_gb": slurm.memory_mb // 1024 + 1, "gpus_per_node": 1, "nodes": 2}
    for key, message in refused.items():
        with pytest.raises(ValueError) as err:
            check_request(fits | {key: bad[key]})
        assert str(err.value) == message
    # The GPU presets ask this CPU-only cluster for GPUs: refused before anything is submitted.
    for preset, gpus in (("slurm_gpu", 1), ("slurm_ddp", 2)):
        cfg = compose_config(f"+launcher={preset}", f"hydra.launcher.tasks_per_node={gpus}", with_hydra=True)
        params = OmegaConf.to_container(cfg.hydra.launcher, resolve=True) | {"cpus_per_task": 1, "mem_gb": 1}
        with pytest.raises(ValueError, match=f"no node in partition debug has {gpus} GPUs"):
            check_request(params)


def test_a_pending_job_says_why_it_waits(slurm, tmp_path, monkeypatch):
    """What the launcher reports while it waits, from a real squeue (the launcher's wait loop reports in the sweep
    test below): a job in a partition that is down."""
    monkeypatch.setenv("SLURM_CONF", slurm.env["SLURM_CONF"])
    submitted = slurm.run(
        "sbatch", "--parsable", "-p", "down", "-c", "1", "--mem=100", "-o", "/dev/null", "--wrap", "true"
    )
    job = submitted.stdout.strip()
    try:
        states = wait_until(lambda: (found := queue_states([job])) and found[job][1] != "None" and found, "a reason")
    finally:
        slurm.run("scancel", job)
    assert describe(states, "down") == (
        "1 pending (PartitionDown): partition down is down; ask its admins or choose another hydra.launcher.partition"
    )
    assert describe({"7_0": ("RUNNING", "None"), "7_1": ("PENDING", "Resources"), "7_2": ("PENDING", "Odd")}, "p") == (
        "1 running, 1 pending (Resources): waiting for free CPUs, memory or GPUs, "
        "1 pending (Odd): see: scontrol show job 7_2"
    )


def test_a_slurm_sweep_is_a_local_sweep_and_a_diverging_job_fails_alone(slurm, tmp_path, mnist_root):
    overrides = ("optimizer=sgd", "optimizer.lr=0.05,10000", "data.limit_train=3840", "trainer.max_epochs=2")
    done = sweep(slurm, tmp_path, tmp_path / "slurm", *overrides, "hydra.launcher.report_every_s=1")
    assert done.returncode == 1, done.stderr[-3000:]  # one job failed
    output = done.stdout + done.stderr
    assert re.search(r"SLURM: \d running", output)  # the wait reports what the jobs do
    assert "sacct" not in output
    assert not (tmp_path / "runs").exists()  # no stray sweep folder: every job went to the sweep's own
    # The same jobs on this machine, one thread each as SLURM granted, with the basic launcher.
    local = run_cli(
        "fcexp.train", "-m", *overrides, "threads=1", "callbacks.progress.refresh_rate=0",
        f"hydra.sweep.dir={tmp_path / 'local'}", cwd=tmp_path,
    )  # fmt: skip
    assert local.returncode == 1, local.stderr[-3000:]
    jobs = sorted(p.name for p in (tmp_path / "local").iterdir() if p.is_dir())
    assert sorted(p.name for p in (tmp_path / "slurm").iterdir() if p.is_dir() and p.name != ".submitit") == jobs
    for job in jobs:
        on_slurm, here = record(tmp_path / "slurm" / job), record(tmp_path / "local" / job)
        assert files(tmp_path / "slurm" / job) == files(tmp_path / "local" / job), job
        # Exactly: the same solo runs at the same shapes and thread count on the same CPU.
        assert on_slurm["status"] == here["status"] and on_slurm["metrics"] == here["metrics"], job
        assert on_slurm["provenance"]["slurm_job"] is not None and here["provenance"]["slurm_job"] is None
    diverged = record(tmp_path / "slurm" / next(j for j in jobs if "lr=10000" in j))
    assert diverged["status"] == "failed" and "loss is nan" in diverged["error"]
    completed = [record(tmp_path / "slurm" / j) for j in jobs if "lr=10000" not in j]
    assert all(r["status"] == "completed" and r["metrics"]["test/acc"] > 0.85 for r in completed)
    # The sweep compared itself, with the failure named.
    assert "2 jobs in" in done.stdout and "1 completed, 1 failed" in done.stdout
    assert {"compare.md", "compare.csv"} <= {p.name for p in (tmp_path / "slurm").iterdir()}


# What a stopped run ends with, as its uninterrupted twin does (the best val accuracy may differ when the stop fell
# in a validation, which is then not run again).
ENDS = ("test/acc", "test/loss", "val/acc", "val/loss")


@pytest.fixture(scope="module")
def stopped_sweep(slurm, tmp_path_factory, mnist_root) -> dict:
    """A sweep of four jobs on SLURM, seeds 3 and 4 twice each (with and without the model summary, which changes
    nothing else). In the first wave, job #0 (seed 3) is requeued, as preemption does, and job #1 (seed 4) cancelled,
    both in their second epoch; the second wave trains their twins uninterrupted."""
    tmp = tmp_path_factory.mktemp("stopped")
    sweep_dir = tmp / "sweep"
    overrides = ("trainer.enable_model_summary=true,false", "seed=3,4", "data.limit_train=7680", "trainer.max_epochs=4")
    proc, log = start_sweep(slurm, tmp, sweep_dir, *overrides)
    name = "data.limit_train=7680,seed={},trainer.enable_model_summary={},trainer.max_epochs=4"
    requeued, cancelled = sweep_dir / name.format(3, True), sweep_dir / name.format(4, True)
    wait_until(lambda: epochs_done(requeued) >= 1 and epochs_done(cancelled) >= 1, "the first epochs", proc=proc)
    array = submitted_id(log)
    assert slurm.run("scontrol", "requeue", f"{array}_0").returncode == 0
    slurm.run("scancel", f"{array}_1")
    stopped = wait_until(lambda: (r := record(requeued)) and r["status"] == "interrupted" and r, "the SIGTERM", 60)
    # SLURM holds a requeued job about 2 minutes; the test lets it start at once.
    job = f"{array}_0"
    wait_until(lambda: slurm.run("squeue", "-h", "-j", job, "-o", "%T").stdout.strip() == "PENDING", "the requeue")
    assert slurm.run("scontrol", "update", f"jobid={job}", "StartTime=now").returncode == 0
    assert proc.wait(timeout=300) == 0, log.read_text()[-3000:]
    return {
        "tmp": tmp, "array": array, "output": log.read_text(), "stopped": stopped, "requeued": requeued,
        "cancelled": cancelled, "twins": {3: sweep_dir / name.format(3, False), 4: sweep_dir / name.format(4, False)},
    }  # fmt: skip


def test_a_requeued_job_continues_from_its_checkpoint_to_the_uninterrupted_result(stopped_sweep):
    run_dir, job = stopped_sweep["requeued"], f"{stopped_sweep['array']}_0"
    result = record(run_dir)
    assert stopped_sweep["stopped"]["provenance"]["slurm_job"] == job == result["resumes"][-1]["slurm_job"]
    assert result["status"] == "completed" and len(result["resumes"]) == 1
    from_step = result["resumes"][-1]["from_step"]
    steps_per_epoch = 7680 // 128
    assert steps_per_epoch <= from_step < 4 * steps_per_epoch  # where the SIGTERM stopped it, not step 0
    assert "SLURM restarted job" in (run_dir / "train.log").read_text()
    # Its twin ran uninterrupted: the same numbers. Every epoch is recorded at the twin's step with the twin's
    # values, but for one stopped in its validation, which Lightning does not validate again (README).
    twin = record(stopped_sweep["twins"][3])
    assert not twin["resumes"] and twin["status"] == "completed"
    assert {k: result["metrics"][k] for k in ENDS} == {k: twin["metrics"][k] for k in ENDS}
    assert [h["epoch"] for h in twin["history"]] == [0, 1, 2, 3] and len(result["history"]) >= 3
    assert all(h == twin["history"][h["epoch"]] for h in result["history"])


def test_a_cancelled_job_is_marked_and_the_rerun_runs_only_it(slurm, stopped_sweep):
    tanh, array, text = stopped_sweep["cancelled"], stopped_sweep["array"], stopped_sweep["output"]
    cancelled = record(tanh)
    assert cancelled["status"] == "cancelled"
    assert cancelled["error"].startswith(f"SLURM ended job {array}_1 CANCELLED before it finished")
    assert (tanh / "checkpoints" / "interrupted.ckpt").is_file()  # SIGTERM kept the step it reached
    assert "4 jobs in" in text and "3 completed, 1 cancelled" in text
    others = [stopped_sweep["requeued"], *stopped_sweep["twins"].values()]
    finished = [(d / "metrics.json").read_bytes() for d in others]

    rerun = run_printed(printed(text, "finish the sweep with"), cwd=stopped_sweep["tmp"], env=slurm.env)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    again = rerun.stdout + rerun.stderr
    assert "submitted 1 job " in again and again.count("finished before (skip_finished=true)") == 3
    assert [(d / "metrics.json").read_bytes() for d in others] == finished
    resumed = record(tanh)
    assert resumed["status"] == "completed" and resumed["resumes"][-1]["from_step"] > 0  # it did not start over
    twin = record(stopped_sweep["twins"][4])
    assert {k: resumed["metrics"][k] for k in ENDS} == {k: twin["metrics"][k] for k in ENDS}  # as if never cancelled


def test_ddp_under_srun_is_one_run(slurm, tmp_path, mnist_root):
    done = subprocess.run(
        ["srun", "--ntasks-per-node=2", "--cpus-per-task=1", "--mem=4G", sys.executable, "-m", "fcexp.train",
         "trainer=ddp_cpu", "data.limit_train=2560", "trainer.max_epochs=1", "callbacks.progress.refresh_rate=0"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
        env=slurm.env | {"PATH": "/usr/bin:/bin", "FCEXP_DATA": DATA_ROOT, "HOME": str(Path.home())},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    output = done.stdout + done.stderr
    (run_dir,) = (tmp_path / "runs").iterdir()  # both ranks in one folder
    assert re.fullmatch(r"slurm-\d+\.0", run_dir.name)
    assert output.count("test accuracy") == 1 and output.count("run folder:") == 1 and output.count("view it:") == 1
    result = record(run_dir)
    assert result["status"] == "completed" and result["history"][-1]["step"] == 2560 // 2 // 128
    single = run_cli("fcexp.evaluate", f"ckpt_path={run_dir / 'checkpoints' / 'last.ckpt'}", cwd=tmp_path)
    assert f"test accuracy {result['metrics']['test/acc']:.4f}" in single.stdout
