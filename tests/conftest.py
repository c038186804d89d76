"""Shared fixtures: real MNIST (built once per machine) and the real entry points, in process or as commands."""

from __future__ import annotations

import contextlib
import importlib
import io
import os
import shlex
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from slurm_cluster import SlurmCluster, missing_programs

from fcexp.data import ensure_mnist

DATA_ROOT = os.environ.get("FCEXP_DATA", str(Path("~/.cache/fcexp").expanduser()))
# A few hundred real steps: 100 batches of 128 per epoch.
# torch's threads in a new process: what a run in this one starts with, as a command would.
THREADS = torch.get_num_threads()
QUICK = ["data.limit_train=12800", "trainer.max_epochs=3", "callbacks.progress.refresh_rate=0"]


@pytest.fixture(scope="session")
def mnist_root() -> str:
    ensure_mnist(DATA_ROOT)
    return DATA_ROOT


def train_in_process(*args: str, cwd: Path) -> str:
    """`python -m fcexp.train <args>` run from `cwd` in the test's own process (its imports paid once): what it
    printed. A refusal or failure (SystemExit) fails the test."""
    from hydra.core.global_hydra import GlobalHydra

    from fcexp.train import main

    with pytest.MonkeyPatch.context() as patch, contextlib.redirect_stdout(io.StringIO()) as out:
        patch.chdir(cwd)
        patch.setattr(sys, "argv", ["fcexp.train", *args])
        GlobalHydra.instance().clear()
        main()
    return out.getvalue()


def run_cli(module: str, *args: str, cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run `python -m <module> <args>` as a user would, from `cwd`."""
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        env={**os.environ, "FCEXP_DATA": DATA_ROOT, **(env or {})},
        timeout=600,
    )


def _ctrl_c_reaches_python() -> None:
    # A suite started as a background job (`make test > log &`) runs with SIGINT ignored, and a Python started
    # with it ignored never raises KeyboardInterrupt: the Ctrl-C tests' child gets the default back.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def start_cli(module: str, *args: str, cwd: Path, env: dict | None = None, output=subprocess.PIPE) -> subprocess.Popen:
    """`python -m <module> <args>` started in the background from `cwd`, to be stopped or killed midway; what it
    prints goes to pipes, or to the file `output` (stdout and stderr together)."""
    return subprocess.Popen(
        [sys.executable, "-m", module, *args],
        cwd=cwd,
        stdout=output,
        stderr=subprocess.PIPE if output is subprocess.PIPE else subprocess.STDOUT,
        text=True,
        env={**os.environ, "FCEXP_DATA": DATA_ROOT, **(env or {})},
        preexec_fn=_ctrl_c_reaches_python,
    )


def run_here(command: str, cwd: Path) -> subprocess.CompletedProcess:
    """A printed `python -m fcexp.<entry> ...` command, split as the user's shell splits it (shlex: POSIX quoting)
    and run from `cwd` in the test's own process, its imports paid once: what it printed and its exit status, as
    `run_printed` gives them. Its program must be this environment's python, as the shell would find it."""
    words = shlex.split(command)
    program, flag, module, *args = words
    assert flag == "-m" and module in ("fcexp.train", "fcexp.evaluate"), command
    found = os.path.join(cwd, program) if os.sep in program else shutil.which(program) or program
    here = os.path.dirname(os.path.abspath(sys.executable))
    assert os.path.dirname(os.path.abspath(found)) == here, f"{program} is not this environment's python"
    from hydra.core.global_hydra import GlobalHydra

    entry = importlib.import_module(module).cli
    torch.set_num_threads(THREADS)  # as a new process starts, whatever an earlier run in this one set
    out, err, code = io.StringIO(), io.StringIO(), 0
    with pytest.MonkeyPatch.context() as patch, contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        patch.chdir(cwd)
        patch.setattr(sys, "argv", [module, *args])
        GlobalHydra.instance().clear()
        try:
            entry()
        except SystemExit as exit_:
            code = exit_.code if isinstance(exit_.code, int) else 1
    return subprocess.CompletedProcess(words, code, out.getvalue(), err.getvalue())


def run_in_process(module: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    """`python -m <module> <args>` run as `run_here` runs a printed command."""
    return run_here(shlex.join([sys.executable, "-m", module, *args]), cwd)


def printed(output: str, label: str) -> str:
    """The command fcexp printed after `<label>: ` (e.g. "view it"), as the user would copy it."""
    (line,) = [line for line in output.splitlines() if f"{label}: " in line]
    return line.split(f"{label}: ", 1)[1]


def run_printed(command: str, cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run a printed command in a shell, from `cwd`, with the test's own PATH (no venv activated under `make test`)."""
    return subprocess.run(
        command,
        shell=True,
        cwd=cwd,
        capture_output=True,
        text=True,
        env={**os.environ, "FCEXP_DATA": DATA_ROOT, **(env or {})},
    )


@pytest.fixture(scope="session")
def slurm(tmp_path_factory) -> SlurmCluster:
    """A one-node SLURM cluster (munge, slurmctld, slurmd) for the session, stopped when it ends. Where it cannot
    start, its tests are skipped with the reason, except under FCEXP_REQUIRE_SLURM=1 (CI), where they fail."""
    give_up = pytest.fail if os.environ.get("FCEXP_REQUIRE_SLURM") == "1" else pytest.skip
    missing = missing_programs()
    if missing:
        give_up(f"no SLURM to test against: {', '.join(missing)} missing (apt-get install slurm-wlm munge)")
    if os.geteuid() != 0:
        give_up("no SLURM to test against: starting munge and slurmd as the tests do needs root")
    cluster = SlurmCluster(tmp_path_factory.mktemp("slurm"))
    try:
        cluster.start()
    except RuntimeError as err:
        cluster.stop()
        give_up(f"the test cluster did not start: {err}")
    yield cluster
    cluster.stop()
