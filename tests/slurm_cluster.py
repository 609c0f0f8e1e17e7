"""A real one-node SLURM cluster on this machine, for the SLURM test tier (tests/test_slurm.py).

Debian's slurm-wlm + munge (installed with apt-get when missing), no accounting database, no cgroups:

    with SlurmCluster(scratch) as cluster:
        subprocess.run(["sbatch", ...], env=cluster.env)

- One cluster at a time per machine: a file lock (``LOCK``) is held from installation to teardown, so
  parallel pytest workers or sessions queue instead of fighting over munged and the node.
- slurmctld and slurmd listen on free ports chosen at start-up, so a stale daemon from an aborted
  run cannot capture this cluster's jobs; all state, spool, pid and log files live in the scratch
  folder, and the daemons are stopped by their pid files (never by process name).
- munged: reused when one answers already; otherwise started as the munge user and stopped again
  at teardown (by its pid file).
- Job steps: the slurm executor's job step plugin (snakemake-executor-plugin-slurm-jobstep 0.6.1)
  strips every ``SLURM_*`` variable, ``SLURM_CONF`` included, before it calls ``srun`` inside a job,
  so clients inside jobs find the configuration through the fallback path ``/run/slurm/conf/slurm.conf``
  (libslurm's lookup after ``SLURM_CONF`` and ``/etc/slurm/slurm.conf``): ``/run/slurm/conf`` is made a
  link to the scratch folder while the cluster runs. A machine with its own ``/etc/slurm/slurm.conf``
  (a real cluster) is not used.
- Status without accounting: ``MinJobAge=3600`` keeps finished jobs visible to ``squeue`` (and to the
  test's ``scontrol show job``) for an hour; the Snakemake slurm executor needs at least 3 x
  ``--slurm-init-seconds-before-status-checks`` with ``--slurm-status-command squeue``.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

LOCK = Path("/tmp/mrflesion-slurm-cluster.lock")
MUNGE_DIR = Path("/run/munge")
MUNGE_PID = MUNGE_DIR / "munged.pid"
SYSTEM_CONF = Path("/etc/slurm/slurm.conf")
FALLBACK_CONF_DIR = Path("/run/slurm/conf")
PACKAGES = ("slurm-wlm", "munge")
# Memory is bookkeeping only here (no cgroups): the node advertises at least this much so that the
# profile's requests (which grow per retry) can be scheduled on small CI runners too. Likewise the node
# advertises at least MIN_NODE_CPUS CPUs, so that short jobs (mostly start-up and I/O) overlap.
MIN_NODE_MEMORY_MB = 16000
MIN_NODE_CPUS = 4


class SlurmUnavailable(RuntimeError):
    """SLURM cannot be installed or started on this machine (no apt-get, not root)."""


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _memory_mb() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) // 1024
    return 4000


def _pid_alive(pid_file: Path) -> int | None:
    try:
        pid = int(pid_file.read_text().split()[0])
        os.kill(pid, 0)
    except (OSError, ValueError, IndexError):
        return None
    return pid


def _stop_pid_file(pid_file: Path, timeout: float = 15.0) -> None:
    pid = _pid_alive(pid_file)
    if pid is None:
        return
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except OSError:
            return
        time.sleep(0.2)
    try:
        os.kill(pid, signal.SIGKILL)
    except OSError:
        pass


def ensure_installed(timeout: float = 900) -> None:
    """Install slurm-wlm and munge with apt-get when slurmctld is missing."""
    if all(shutil.which(tool) for tool in ("slurmctld", "slurmd", "sbatch", "squeue", "munged")) or all(
        Path(p).exists() for p in ("/usr/sbin/slurmctld", "/usr/sbin/slurmd", "/usr/sbin/munged")
    ):
        return
    if shutil.which("apt-get") is None:
        raise SlurmUnavailable("slurm-wlm is not installed and apt-get is not available")
    if os.geteuid() != 0:
        raise SlurmUnavailable("slurm-wlm is not installed and installing it needs root")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", *PACKAGES]):
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")


class SlurmCluster:
    """Start/stop a one-node cluster whose configuration and state live under ``root``."""

    def __init__(self, root: Path, cpus: int | None = None, memory_mb: int | None = None, gpus: int = 1,
                 lock_timeout: float = 1800) -> None:
        self.root = Path(root)
        self.gpus = gpus
        self.cpus = cpus or max(os.cpu_count() or 1, MIN_NODE_CPUS)
        self.memory_mb = memory_mb or max(_memory_mb(), MIN_NODE_MEMORY_MB)
        self.lock_timeout = lock_timeout
        self.conf = self.root / "slurm.conf"
        self.ctld_pid = self.root / "run" / "slurmctld.pid"
        self.slurmd_pid = self.root / "run" / "slurmd.pid"
        self.ctld_log = self.root / "log" / "slurmctld.log"
        self.slurmd_log = self.root / "log" / "slurmd.log"
        self._lock_fd: int | None = None
        self._started_munged = False
        self._linked_conf = False

    # environment for clients (sbatch, squeue, snakemake) talking to this cluster
    @property
    def env(self) -> dict[str, str]:
        return {**os.environ, "SLURM_CONF": str(self.conf)}

    def __enter__(self) -> SlurmCluster:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    # ------------------------------------------------------------------ set-up
    def _lock(self) -> None:
        self._lock_fd = os.open(LOCK, os.O_CREAT | os.O_RDWR, 0o666)
        deadline = time.monotonic() + self.lock_timeout
        while True:
            try:
                fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return
            except BlockingIOError:
                if time.monotonic() > deadline:
                    os.close(self._lock_fd)
                    self._lock_fd = None
                    raise TimeoutError(f"another SLURM test cluster holds {LOCK}") from None
                time.sleep(1)

    def _unlock(self) -> None:
        if self._lock_fd is not None:
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
            os.close(self._lock_fd)
            self._lock_fd = None

    def write_conf(self) -> None:
        for sub in ("state", "spool", "run", "log"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        r = self.root
        # GPUs: a device-less generic resource, so that jobs requesting `--gpus` get scheduled (and the
        # request path is exercised); the job itself sees no GPU and falls back to the CPU.
        gres_conf = f"NodeName=localhost Name=gpu File=/dev/null Count={self.gpus}\n" if self.gpus else ""
        (r / "gres.conf").write_text(gres_conf)
        gres = ["GresTypes=gpu"] if self.gpus else []
        node_gres = f" Gres=gpu:{self.gpus}" if self.gpus else ""
        self.conf.write_text(
            "\n".join([
                "# One-node test cluster written by tests/slurm_cluster.py",
                "ClusterName=mrflesiontest",
                "SlurmctldHost=localhost",
                f"SlurmctldPort={_free_port()}",
                f"SlurmdPort={_free_port()}",
                "SlurmUser=root",
                "SlurmdUser=root",
                "AuthType=auth/munge",
                # a requeued job waits for the credential lifetime before it starts again (default 120 s)
                "AuthInfo=cred_expire=30",
                f"StateSaveLocation={r / 'state'}",
                f"SlurmdSpoolDir={r / 'spool'}",
                f"SlurmctldPidFile={self.ctld_pid}",
                f"SlurmdPidFile={self.slurmd_pid}",
                f"SlurmctldLogFile={self.ctld_log}",
                f"SlurmdLogFile={self.slurmd_log}",
                "SlurmctldDebug=info",
                "SlurmdDebug=info",
                "SelectType=select/cons_tres",
                "SelectTypeParameters=CR_Core_Memory",
                "ProctrackType=proctrack/linuxproc",
                "TaskPlugin=task/none",
                "JobAcctGatherType=jobacct_gather/none",
                "AccountingStorageType=accounting_storage/none",
                "SchedulerType=sched/backfill",
                "MpiDefault=none",
                "ReturnToService=2",
                # finished jobs stay visible to squeue/scontrol for an hour (>= 3 x the status-check delay)
                "MinJobAge=3600",
                # the node's memory is bookkeeping (see MIN_NODE_MEMORY_MB): trust the configured values
                "SlurmdParameters=config_overrides",
                *gres,
                f"NodeName=localhost NodeAddr=127.0.0.1 CPUs={self.cpus} RealMemory={self.memory_mb}{node_gres}"
                " State=UNKNOWN",
                "PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP",
                "",
            ])
        )

    def _link_conf(self) -> None:
        """Make /run/slurm/conf/slurm.conf this cluster's configuration (see the module docstring)."""
        if SYSTEM_CONF.exists():
            raise SlurmUnavailable(f"{SYSTEM_CONF} exists: this machine has its own SLURM configuration")
        if FALLBACK_CONF_DIR.is_symlink():
            FALLBACK_CONF_DIR.unlink()  # left by an aborted test cluster (a slurmd makes a directory)
        if FALLBACK_CONF_DIR.exists():
            raise SlurmUnavailable(f"{FALLBACK_CONF_DIR} exists (a configless slurmd?)")
        FALLBACK_CONF_DIR.parent.mkdir(parents=True, exist_ok=True)
        FALLBACK_CONF_DIR.symlink_to(self.root, target_is_directory=True)
        self._linked_conf = True

    def _unlink_conf(self) -> None:
        if self._linked_conf and FALLBACK_CONF_DIR.is_symlink() and Path(os.readlink(FALLBACK_CONF_DIR)) == self.root:
            FALLBACK_CONF_DIR.unlink()
        self._linked_conf = False

    def _munge_ok(self) -> bool:
        try:
            enc = subprocess.run(["munge", "-n"], capture_output=True, timeout=10)
            if enc.returncode != 0:
                return False
            dec = subprocess.run(["unmunge"], input=enc.stdout, capture_output=True, timeout=10)
            return dec.returncode == 0
        except (OSError, subprocess.TimeoutExpired):
            return False

    def _start_munged(self) -> None:
        if self._munge_ok():
            return
        subprocess.run(["install", "-d", "-o", "munge", "-g", "munge", "-m", "0755", str(MUNGE_DIR)], check=True)
        subprocess.run(["runuser", "-u", "munge", "--", "/usr/sbin/munged", "--force"], check=True, timeout=30)
        self._started_munged = True
        self._wait(self._munge_ok, 20, "munged does not answer")

    def _wait(self, predicate, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate():
                return
            time.sleep(0.5)
        raise RuntimeError(f"{what} after {timeout:.0f} s\n{self.logs()}")

    def state(self) -> str:
        proc = subprocess.run(["sinfo", "-h", "-o", "%T"], env=self.env, capture_output=True, text=True, timeout=20)
        return proc.stdout.strip() if proc.returncode == 0 else ""

    def start(self) -> None:
        self._lock()
        try:
            ensure_installed()
            self.write_conf()
            self._link_conf()
            self._start_munged()
            subprocess.run(["/usr/sbin/slurmctld", "-f", str(self.conf)], env=self.env, check=True, timeout=60)
            self._wait(lambda: _pid_alive(self.ctld_pid) is not None, 20, "slurmctld did not start")
            subprocess.run(["/usr/sbin/slurmd", "-f", str(self.conf), "-N", "localhost"], env=self.env,
                           check=True, timeout=60)
            self._wait(lambda: self.state() == "idle", 60, "the node did not become idle")
        except BaseException:
            self.stop()
            raise

    # ---------------------------------------------------------------- teardown
    def cancel_all(self, timeout: float = 30) -> None:
        """Cancel every job of this cluster and wait until none runs (slurmstepd outlives slurmd)."""
        if _pid_alive(self.ctld_pid) is None:
            return

        def job_ids() -> list[str]:
            proc = subprocess.run(["squeue", "-h", "-o", "%i"], env=self.env, capture_output=True, text=True,
                                  timeout=20)
            return proc.stdout.split() if proc.returncode == 0 else []

        try:
            ids = job_ids()
            if ids:
                subprocess.run(["scancel", *ids], env=self.env, capture_output=True, timeout=20)
                deadline = time.monotonic() + timeout
                while job_ids() and time.monotonic() < deadline:
                    time.sleep(1)
        except (OSError, subprocess.TimeoutExpired):
            pass

    def stop(self) -> None:
        try:
            self.cancel_all()
            _stop_pid_file(self.slurmd_pid)
            _stop_pid_file(self.ctld_pid)
            self._unlink_conf()
            if self._started_munged:
                _stop_pid_file(MUNGE_PID)
                self._started_munged = False
        finally:
            self._unlock()

    def logs(self, tail: int = 3000) -> str:
        out = []
        for log in (self.ctld_log, self.slurmd_log):
            if log.exists():
                out.append(f"--- {log.name}\n{log.read_text(errors='replace')[-tail:]}")
        return "\n".join(out)
