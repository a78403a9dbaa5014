"""A real SLURM cluster on this machine for the launcher tests (Debian's slurm-wlm 22.05).

`LocalCluster(root).start()` installs the packages when they are missing (apt-get), then starts,
as background daemons with their own state and log directories under `root`:
  munged (as the munge user), MariaDB + slurmdbd (accounting: submitit reads job states from
  sacct), slurmctld on this host, and one slurmd per node, each in a network, hostname and mount
  namespace of its own (veth pairs on a bridge with addresses of our own, /etc/hosts bound over
  so node names resolve to those addresses), so a job's ranks on two nodes talk over a network.
It waits until every node is idle. `stop()` cancels the jobs and stops exactly the processes it
started (by PID), then removes the namespaces and links. Client commands need `cluster.env`
(SLURM_CONF).

`unavailable()` says why this platform cannot run it (not root, no apt-get, no namespaces), so a
test is skipped only for such a reason.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time

PACKAGES = ["slurmctld", "slurmd", "slurm-client", "slurmdbd", "munge", "mariadb-server"]
BINARIES = ["slurmctld", "slurmd", "slurmdbd", "munged", "mariadbd", "sbatch", "sacctmgr"]
BRIDGE, SUBNET = "flmbr0", "10.213.7"
CLUSTER = "flamingo"


def _run(cmd: list[str], check: bool = True, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, check=check, capture_output=True, text=True, **kw)


def unavailable() -> str | None:
    """Why a SLURM cluster cannot run here, or None."""
    if os.geteuid() != 0:
        return "the local SLURM cluster needs root (daemons, network namespaces)"
    if not all(shutil.which(b) for b in BINARIES) and not shutil.which("apt-get"):
        return "slurm-wlm is not installed and there is no apt-get to install it"
    if not shutil.which("ip") or not shutil.which("unshare") or not shutil.which("nsenter"):
        return "iproute2/util-linux (ip, unshare, nsenter) are missing"
    return None


def install_packages() -> None:
    """apt-get install the daemons when missing, without letting the packages start services."""
    if all(shutil.which(b) for b in BINARIES):
        return
    policy = "/usr/sbin/policy-rc.d"
    existed = os.path.exists(policy)
    if not existed:
        with open(policy, "w") as f:
            f.write("#!/bin/sh\nexit 101\n")
        os.chmod(policy, 0o755)
    try:
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        _run(["apt-get", "update", "-qq"], env=env)
        _run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", *PACKAGES], env=env)
    finally:
        if not existed:
            os.remove(policy)


def _wait(predicate, timeout: float, what: str, log_files: tuple[str, ...] = ()) -> None:
    end = time.time() + timeout
    while time.time() < end:
        if predicate():
            return
        time.sleep(0.3)
    tails = []
    for path in log_files:
        if os.path.isfile(path):
            with open(path, errors="replace") as f:
                tails.append(f"--- {path}\n" + "".join(f.readlines()[-20:]))
    raise RuntimeError(f"local SLURM cluster: timed out waiting for {what}\n" + "\n".join(tails))


def _port_open(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket() as s:
        s.settimeout(0.3)
        return s.connect_ex((host, port)) == 0


def _meminfo_mb() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) // 1024
    raise RuntimeError("no MemTotal in /proc/meminfo")


class LocalCluster:
    def __init__(self, root: str, nodes: int = 2, base_port: int = 26800):
        self.root = os.path.abspath(root)
        self.nodes = [f"fnode{i + 1}" for i in range(nodes)]
        self.addrs = {n: f"{SUBNET}.{11 + i}" for i, n in enumerate(self.nodes)}
        self.host = socket.gethostname()
        self.host_addr = f"{SUBNET}.1"
        self.ports = {"ctld": base_port, "slurmd": base_port + 1, "dbd": base_port + 2, "mysql": base_port + 3}
        self.procs: list[tuple[str, subprocess.Popen]] = []
        self.netns: list[str] = []
        self.links: list[str] = []
        self.conf = os.path.join(self.root, "etc", "slurm.conf")
        self.env = {**os.environ, "SLURM_CONF": self.conf}
        self.cpus = os.cpu_count() or 1

    # ------------------------------------------------------------ helpers
    def path(self, *parts: str) -> str:
        return os.path.join(self.root, *parts)

    def log(self, name: str) -> str:
        return self.path("log", f"{name}.log")

    def _spawn(self, name: str, cmd: list[str], **kw) -> subprocess.Popen:
        out = open(self.log(name + ".out"), "ab")
        p = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                             start_new_session=True, **kw)
        self.procs.append((name, p))
        return p

    def slurm(self, *cmd: str, check: bool = True) -> subprocess.CompletedProcess:
        """Run a SLURM client command against this cluster."""
        return _run(list(cmd), check=check, env=self.env, timeout=60)

    # ------------------------------------------------------------ start
    def start(self) -> "LocalCluster":
        install_packages()
        for d in ("etc", "log", "state", "spool", "run", "mysql", "hosts"):
            os.makedirs(self.path(d), exist_ok=True)
        try:
            self._network()
            self._munge()
            self._mariadb()
            self._write_configs()
            self._slurmdbd()
            self._slurmctld()
            self._slurmds()
            _wait(self._all_idle, 60, "the nodes to become idle",
                  (self.log("slurmctld"), *[self.log(f"slurmd-{n}") for n in self.nodes]))
        except BaseException:
            self.stop()
            raise
        return self

    def _network(self) -> None:
        """A bridge with our address on the host, and per node a network namespace with one end
        of a veth pair (the other end on the bridge). No route leaves the subnet."""
        _run(["ip", "link", "del", BRIDGE], check=False)
        _run(["ip", "link", "add", BRIDGE, "type", "bridge"])
        self.links.append(BRIDGE)
        _run(["ip", "addr", "add", f"{self.host_addr}/24", "dev", BRIDGE])
        _run(["ip", "link", "set", BRIDGE, "up"])
        for i, node in enumerate(self.nodes):
            ns, host_end, node_end = f"flm-{node}", f"flmv{i}h", f"flmv{i}n"
            _run(["ip", "netns", "del", ns], check=False)
            _run(["ip", "netns", "add", ns])
            self.netns.append(ns)
            _run(["ip", "link", "del", host_end], check=False)
            _run(["ip", "link", "add", host_end, "type", "veth", "peer", "name", node_end])
            self.links.append(host_end)
            _run(["ip", "link", "set", host_end, "master", BRIDGE])
            _run(["ip", "link", "set", host_end, "up"])
            _run(["ip", "link", "set", node_end, "netns", ns])
            _run(["ip", "-n", ns, "addr", "add", f"{self.addrs[node]}/24", "dev", node_end])
            _run(["ip", "-n", ns, "link", "set", node_end, "up"])
            _run(["ip", "-n", ns, "link", "set", "lo", "up"])
            with open(self.path("hosts", node), "w") as f:
                f.write(f"127.0.0.1 localhost\n{self.host_addr} {self.host}\n")
                f.writelines(f"{a} {n}\n" for n, a in self.addrs.items())

    def _munge(self) -> None:
        if _run(["munge", "-n"], check=False).returncode == 0:
            return  # a munged is already serving this machine
        os.makedirs("/run/munge", exist_ok=True)
        shutil.chown("/run/munge", "munge", "munge")
        if not os.path.isfile("/etc/munge/munge.key"):
            _run(["mungekey", "--create"])
            shutil.chown("/etc/munge/munge.key", "munge", "munge")
        # munged runs as the munge user, which cannot reach our (root-only) directories
        self._spawn("munged", ["runuser", "-u", "munge", "--", "munged", "--foreground",
                               "--log-file=/run/munge/munged-flamingo.log",
                               "--pid-file=/run/munge/munged-flamingo.pid"])
        _wait(lambda: _run(["munge", "-n"], check=False).returncode == 0, 20, "munged",
              (self.log("munged.out"), "/run/munge/munged-flamingo.log"))

    def _mariadb(self) -> None:
        datadir = self.path("mysql")
        if not os.path.isdir(os.path.join(datadir, "mysql")):
            _run(["mariadb-install-db", f"--datadir={datadir}", "--user=root", "--auth-root-authentication-method=normal",
                  "--skip-test-db"])
        sock = self.path("run", "mysql.sock")
        self._spawn("mariadb", ["mariadbd", "--no-defaults", f"--datadir={datadir}", "--user=root",
                                f"--socket={sock}", "--bind-address=127.0.0.1", f"--port={self.ports['mysql']}",
                                f"--pid-file={self.path('run', 'mariadb.pid')}", f"--log-error={self.log('mariadb')}",
                                "--skip-log-bin", "--innodb-buffer-pool-size=64M"])
        _wait(lambda: _port_open(self.ports["mysql"]), 60, "MariaDB", (self.log("mariadb"),))
        sql = ("CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY 'slurm';"
               "CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY 'slurm';"
               "GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost';"
               "GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1'; FLUSH PRIVILEGES;")
        _run(["mariadb", "--no-defaults", f"--socket={sock}", "-uroot", "-e", sql])

    def _write_configs(self) -> None:
        mem = max(512, int(_meminfo_mb() * 0.8) // len(self.nodes))
        node_lines = [f"NodeName={n} NodeAddr={a} NodeHostname={n} CPUs={self.cpus} RealMemory={mem} State=UNKNOWN"
                      for n, a in self.addrs.items()]
        conf = f"""ClusterName={CLUSTER}
SlurmctldHost={self.host}({self.host_addr})
SlurmctldPort={self.ports['ctld']}
SlurmdPort={self.ports['slurmd']}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=cred_expire=10
CredType=cred/munge
StateSaveLocation={self.path('state')}
SlurmdSpoolDir={self.path('spool')}/%n
SlurmctldPidFile={self.path('run', 'slurmctld.pid')}
SlurmdPidFile={self.path('run')}/slurmd-%n.pid
SlurmctldLogFile={self.log('slurmctld')}
SlurmdLogFile={self.path('log')}/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
AccountingStoragePort={self.ports['dbd']}
JobCompType=jobcomp/none
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=1
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
MailProg=/bin/true
KillWait=5
MinJobAge=300
ReturnToService=2
JobRequeue=1
SlurmdTimeout=30
SlurmctldTimeout=30
MpiDefault=none
{chr(10).join(node_lines)}
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
"""
        with open(self.conf, "w") as f:
            f.write(conf)
        dbd = self.path("etc", "slurmdbd.conf")
        with open(dbd, "w") as f:
            f.write(f"""DbdHost=localhost
DbdPort={self.ports['dbd']}
SlurmUser=root
AuthType=auth/munge
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort={self.ports['mysql']}
StorageUser=slurm
StoragePass=slurm
StorageLoc=slurm_acct_db
LogFile={self.log('slurmdbd')}
PidFile={self.path('run', 'slurmdbd.pid')}
""")
        os.chmod(dbd, 0o600)

    def _slurmdbd(self) -> None:
        # slurmdbd reads the slurmdbd.conf beside $SLURM_CONF
        self._spawn("slurmdbd", ["slurmdbd", "-D"], env=self.env)
        _wait(lambda: _port_open(self.ports["dbd"]), 60, "slurmdbd", (self.log("slurmdbd"),))
        # the cluster must be known to the accounting database before slurmctld registers
        out = self.slurm("sacctmgr", "-n", "-P", "list", "cluster", "format=cluster").stdout.split()
        if CLUSTER not in out:
            self.slurm("sacctmgr", "-i", "add", "cluster", CLUSTER)

    def _slurmctld(self) -> None:
        self._spawn("slurmctld", ["slurmctld", "-D", "-i", "-f", self.conf], env=self.env)
        _wait(lambda: self.slurm("scontrol", "ping", check=False).stdout.count("UP") > 0, 60, "slurmctld",
              (self.log("slurmctld"),))

    def _slurmds(self) -> None:
        for node in self.nodes:
            spool = self.path("spool", node)
            os.makedirs(spool, exist_ok=True)
            hosts = self.path("hosts", node)
            script = (f"hostname {node} && mount --bind {hosts} /etc/hosts && "
                      f"exec slurmd -D -N {node} -f {self.conf}")
            self._spawn(f"slurmd-{node}", ["nsenter", f"--net=/run/netns/flm-{node}", "unshare", "--uts", "--mount",
                                           "--propagation", "private", "sh", "-c", script], env=self.env)

    def _all_idle(self) -> bool:
        out = self.slurm("sinfo", "-h", "-N", "-o", "%N %T", check=False).stdout.split("\n")
        states = dict(line.split() for line in out if line.strip())
        return set(states) == set(self.nodes) and all(s == "idle" for s in states.values())

    # ------------------------------------------------------------ stop
    def stop(self) -> None:
        """Cancel the jobs, stop the daemons we started (by PID, newest first), remove the links
        and namespaces. Never raises."""
        if os.path.isfile(self.conf):
            _run(["scancel", "--full", "-u", "root"], check=False, env=self.env, timeout=30)
            time.sleep(0.5)
        for _, p in reversed(self.procs):
            if p.poll() is None:
                try:
                    os.killpg(p.pid, signal.SIGTERM)
                except ProcessLookupError:
                    continue
                try:
                    p.wait(15)
                except subprocess.TimeoutExpired:
                    os.killpg(p.pid, signal.SIGKILL)
                    p.wait(5)
        self.procs.clear()
        for ns in self.netns:
            # a job step left in a node's namespace must not outlive the cluster
            pids = _run(["ip", "netns", "pids", ns], check=False).stdout.split()
            for pid in pids:
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except (ProcessLookupError, ValueError):
                    pass
            _run(["ip", "netns", "del", ns], check=False)
        for link in reversed(self.links):
            _run(["ip", "link", "del", link], check=False)
        self.netns.clear()
        self.links.clear()
