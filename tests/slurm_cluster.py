"""A one-node SLURM cluster for the tests: munge, slurmctld and slurmd, sized to this machine, with their config,
state and logs in one folder. Clients reach it through SLURM_CONF."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

DAEMONS = ("munged", "slurmctld", "slurmd", "sbatch", "squeue", "sinfo", "scontrol", "scancel", "srun")


def missing_programs() -> list[str]:
    return [p for p in DAEMONS if shutil.which(p) is None and not Path("/usr/sbin", p).exists()]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _program(name: str) -> str:
    return shutil.which(name) or str(Path("/usr/sbin", name))


class SlurmCluster:
    """Start with `start()`, stop with `stop()`; `env` is what a client process needs."""

    def __init__(self, root: Path, partition: str = "debug"):
        self.root = Path(root)
        self.partition = partition
        self.node = socket.gethostname().split(".")[0]
        self.cpus = os.cpu_count() or 1
        meminfo = Path("/proc/meminfo").read_text().splitlines()
        mem_kb = int(next(line for line in meminfo if line.startswith("MemTotal")).split()[1])
        self.memory_mb = int(mem_kb / 1024 * 0.8)  # what jobs may ask for; the rest stays with the tests
        self.conf = self.root / "slurm.conf"
        self.munge_socket = self.root / "munge" / "munge.socket"
        self.env = {"SLURM_CONF": str(self.conf)}  # what a client process needs besides its own environment
        self._pid_files: list[Path] = []

    def _write_files(self) -> None:
        for d in ("munge", "state", "spool", "log"):
            (self.root / d).mkdir(parents=True, exist_ok=True)
        key = self.root / "munge" / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        shutil.chown(key, "munge", "munge")
        shutil.chown(self.root / "munge", "munge", "munge")
        r = self.root
        self.conf.write_text(
            f"""ClusterName=fcexp-tests
SlurmctldHost={self.node}
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket={self.munge_socket}
CryptoType=crypto/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
ReturnToService=2
KillWait=5
MinJobAge=600
StateSaveLocation={r}/state
SlurmdSpoolDir={r}/spool
SlurmctldPidFile={r}/slurmctld.pid
SlurmdPidFile={r}/slurmd.pid
SlurmctldLogFile={r}/log/slurmctld.log
SlurmdLogFile={r}/log/slurmd.log
NodeName={self.node} CPUs={self.cpus} RealMemory={self.memory_mb} State=UNKNOWN
PartitionName={self.partition} Nodes={self.node} Default=YES MaxTime=INFINITE State=UP
PartitionName=down Nodes={self.node} MaxTime=INFINITE State=DOWN
"""
        )

    def start(self, timeout: float = 60) -> None:
        self._write_files()
        m = self.root / "munge"
        self._run(
            "munged",
            m / "munged.pid",
            "--force",
            f"--socket={self.munge_socket}",
            f"--key-file={m / 'munge.key'}",
            f"--pid-file={m / 'munged.pid'}",
            f"--log-file={m / 'munged.log'}",
            f"--seed-file={m / 'munged.seed'}",
        )
        self._run("slurmctld", self.root / "slurmctld.pid", "-f", str(self.conf))
        self._run("slurmd", self.root / "slurmd.pid", "-f", str(self.conf))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            state = self.run("sinfo", "-h", "-p", self.partition, "-o", "%t").stdout.strip()
            if state == "idle":
                return
            time.sleep(0.5)
        raise RuntimeError(f"the test cluster's node did not come up (state {state!r}); logs in {self.root / 'log'}")

    def run(self, *command: str) -> subprocess.CompletedProcess:
        """A SLURM command (sinfo, squeue, scontrol, scancel) against this cluster."""
        return subprocess.run(
            [_program(command[0]), *command[1:]], env=os.environ | self.env, capture_output=True, text=True, check=False
        )

    def _run(self, daemon: str, pid_file: Path, *args: str) -> None:
        done = self.run(daemon, *args)
        if done.returncode != 0:
            raise RuntimeError(f"{daemon} did not start: {(done.stderr or done.stdout).strip()}")
        self._pid_files.append(pid_file)

    def stop(self) -> None:
        """Cancel every job, then stop the daemons this cluster started."""
        self.run("scancel", "--full", "--user=root")
        pids = []
        for pid_file in self._pid_files:
            for _ in range(100):  # a daemon writes its pid file a moment after it forks
                if pid_file.is_file() and pid_file.read_text().strip():
                    pids.append(int(pid_file.read_text()))
                    break
                time.sleep(0.05)
        for pid in pids:
            subprocess.run(["kill", str(pid)], check=False)
        for pid in pids:
            for _ in range(100):
                if not Path(f"/proc/{pid}").exists():
                    break
                time.sleep(0.1)
        self._pid_files.clear()
