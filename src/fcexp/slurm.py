"""What a `+launcher=slurm` sweep asks SLURM: whether a node of the partition can ever run a job as requested
(`sinfo`, before anything is submitted), and, while the sweep waits, what its jobs are doing and why they pend
(`squeue`, which works also where accounting, and so `sacct`, is off)."""

from __future__ import annotations

import re
import subprocess
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass

# squeue's reason codes a sweep meets most, in words a user can act on; others are shown as SLURM names them.
REASONS = {
    "Resources": "waiting for free CPUs, memory or GPUs",
    "Priority": "jobs ahead of it in the queue",
    "BeginTime": "not to start before its begin time (SLURM holds a requeued job about 2 minutes)",
    "JobArrayTaskLimit": "the sweep's limit of jobs at once (hydra.launcher.array_parallelism)",
    "PartitionDown": "partition {partition} is down; ask its admins or choose another hydra.launcher.partition",
    "PartitionInactive": "partition {partition} is inactive; ask its admins or choose another hydra.launcher.partition",
    "PartitionConfig": "the request exceeds a limit of partition {partition} (CPUs, memory, GPUs or time per job); "
    "lower hydra.launcher.cpus_per_task, mem_gb, gpus_per_node or timeout_min",
    "PartitionTimeLimit": "hydra.launcher.timeout_min exceeds partition {partition}'s time limit; lower it",
    "ReqNodeNotAvail": "the nodes it needs are down, drained or reserved",
    "Nodes required for job are DOWN, DRAINED or reserved for jobs in higher priority partitions": "the nodes it "
    "needs are down, drained or reserved (sinfo -R says why)",
    "Dependency": "waiting for another job",
    "JobHeldUser": "held (scontrol release <job> lets it go)",
    "JobHeldAdmin": "held by an admin",
}
# States of a job that has ended.
DONE = {"COMPLETED", "CANCELLED", "FAILED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE",
        "PREEMPTED"}  # fmt: skip


def _query(*command: str) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(command, capture_output=True, text=True, check=False, timeout=60)
    except FileNotFoundError:
        raise ValueError(
            f"+launcher=slurm needs SLURM's commands, and {command[0]} is not on PATH: run the sweep where sbatch "
            "works (a cluster's login node)"
        ) from None


@dataclass
class Node:
    name: str
    cpus: int
    memory_mb: int
    gpus: int


def _gpus(gres: str) -> int:
    """GPUs in sinfo's GRES column: `gpu:4`, `gpu:a100:4(S:0-1)`, `(null)`."""
    return sum(int(n) for n in re.findall(r"gpu(?::[^:,(]+)?:(\d+)", gres))


def partition_nodes(partition: str | None) -> tuple[str, list[Node]]:
    """The partition a job goes to (the cluster's default when `partition` is None) and its nodes."""
    done = _query("sinfo", "-h", "-N", "-o", "%P|%N|%c|%m|%G")
    if done.returncode != 0:
        raise ValueError(f"sinfo failed, so fcexp cannot check the request: {done.stderr.strip()}")
    nodes: dict[str, list[Node]] = {}
    default = None
    for line in done.stdout.splitlines():
        part, name, cpus, memory, gres = line.split("|")
        if part.endswith("*"):
            part = default = part[:-1]
        nodes.setdefault(part, []).append(Node(name, int(cpus), int(memory), _gpus(gres)))
    chosen = partition or default
    if chosen not in nodes:
        have = ", ".join(sorted(nodes)) or "none"
        if partition is None:
            raise ValueError(f"this cluster has no default partition; set hydra.launcher.partition to one of: {have}")
        raise ValueError(f"hydra.launcher.partition={partition}: no such partition; this cluster has: {have}")
    return chosen, nodes[chosen]


def check_request(params: Mapping) -> str:
    """Refuse, in one line, a request (the launcher's `params`) that no node of its partition can ever meet; SLURM
    would leave it pending for good. Returns the partition."""
    partition, nodes = partition_nodes(params.get("partition"))
    tasks = params.get("tasks_per_node") or 1
    cpus = (params.get("cpus_per_task") or 1) * tasks
    memory_mb = params["mem_gb"] * 1024 if params.get("mem_gb") else 0
    gpus = params.get("gpus_per_node") or 0
    wanted = params.get("nodes") or 1
    need = (
        ("CPUs", cpus, lambda n: n.cpus, f"hydra.launcher.cpus_per_task={params.get('cpus_per_task')} x "
         f"tasks_per_node={tasks}", "lower hydra.launcher.cpus_per_task"),
        ("MB of memory", memory_mb, lambda n: n.memory_mb, f"hydra.launcher.mem_gb={params.get('mem_gb')}",
         "lower hydra.launcher.mem_gb"),
        ("GPUs", gpus, lambda n: n.gpus, f"hydra.launcher.gpus_per_node={gpus}",
         "lower hydra.launcher.gpus_per_node, or choose a GPU partition"),
    )  # fmt: skip
    for what, amount, has, asked, fix in need:
        most = max(has(n) for n in nodes)
        if amount > most:
            raise ValueError(
                f"no node in partition {partition} has {amount} {what} ({asked}; its largest has {most}); {fix}"
            )
    fitting = [n for n in nodes if all(has(n) >= amount for _, amount, has, _, _ in need)]
    if len(fitting) < wanted:
        raise ValueError(
            f"hydra.launcher.nodes={wanted}, but partition {partition} has {len(fitting)} node(s) that fit the "
            "request; lower hydra.launcher.nodes"
        )
    return partition


def queue_states(job_ids: list[str]) -> dict[str, tuple[str, str]] | None:
    """Each job (`<id>`) or array task (`<id>_<task>`) of these SLURM jobs and arrays that the controller still
    knows: its state and, when pending, the reason. None when squeue could not answer (a busy controller)."""
    done = _query("squeue", "-h", "-r", "--states=all", "-j", ",".join(job_ids), "-o", "%i|%T|%r")
    if done.returncode != 0:
        # Every job ended long enough ago for the controller to forget it, or the controller did not answer.
        return {} if "Invalid job id" in done.stderr else None
    states = {}
    for line in done.stdout.splitlines():
        job, state, reason = line.split("|", 2)
        states[job] = (state, reason)
    return states


def describe(states: Mapping[str, tuple[str, str]], partition: str) -> str:
    """One line for a sweep's jobs: `2 pending (PartitionDown): partition … is down; …, 1 running`."""
    keys = {
        job: f"pending ({reason})" if state == "PENDING" and reason not in ("None", "") else state.lower()
        for job, (state, reason) in states.items()
    }
    parts = []
    for key, n in Counter(keys.values()).most_common():
        reason = key[len("pending (") : -1] if key.startswith("pending (") else None
        example = next(job for job, k in keys.items() if k == key)
        why = REASONS.get(reason, f"see: scontrol show job {example}") if reason else None
        parts.append(f"{n} {key}" + (f": {why.format(partition=partition)}" if why else ""))
    return ", ".join(parts)
