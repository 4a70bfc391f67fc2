"""`ray up cluster/local.yaml`, for real, with this machine as the on-prem head: Ray's cluster
launcher connects over SSH, ships the checkout and the auth token, runs the config's setup and
start commands; `ray exec` starts a rayk deployment there; drivers here generate through it and
read its stats; `ray down` takes it away.

Why this cannot touch any other Ray process on the machine (every engineer and CI job runs as
root, and `ray down` runs `ray stop`, which signals every Ray process its user may signal):

- The "remote" node is an sshd this module starts on 127.0.0.1, on a free port, accepting only a
  key made for this run, inside a PID namespace of its own with its own /proc
  (`unshare --pid --fork --mount-proc`). Every command the launcher runs on the node descends from
  that sshd. `ray stop` finds its targets by listing /proc, which there shows the namespace only,
  and a pid it signals is a pid of the namespace. The fixture checks both facts before `ray up`,
  and the last test proves it: a process outside whose command line `ray stop` matches survives
  `ray down`.
- sshd gives the sessions their own HOME (`SetEnv`), so `~/rayk`, `~/.ray/auth_token` and the
  launcher's `~/ray_bootstrap_*` files land in this module's directory, not in root's home.
- The head binds to 127.0.0.1, on free ports, with its own `--temp-dir` (so its address file is
  not the machine's default one). TMPDIR, here and on the node, puts the launcher's config cache
  and the local provider's state files in this module's directory too.
- Teardown: `ray down`, then SIGKILL to `unshare`, which kills the namespace's first process; the
  kernel then kills whatever else is left in the namespace.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
LOCAL_CONFIG = REPO / "cluster" / "local.yaml"
# The two prompts share their first three 16-token blocks, so the second is served from the cache.
SHARED_PREFIX = " ".join(["The quick brown fox jumps over the lazy dog."] * 6)
NEEDED_TOOLS = ("sshd", "ssh", "ssh-keygen", "rsync", "nc", "unshare")


@dataclass
class SshNode:
    """The test's stand-in for an on-prem machine: an sshd on ``127.0.0.1:port``."""

    directory: Path  # everything of this run: keys, sshd_config, the node's HOME, Ray's temp dir
    port: int
    client_key: Path
    home: Path
    unshare: subprocess.Popen

    @property
    def tmpdir(self) -> Path:
        return self.directory / "tmp"

    def ssh(self, command: str, timeout: float = 30) -> subprocess.CompletedProcess:
        return subprocess.run(
            ["ssh", "-i", str(self.client_key), "-o", "IdentitiesOnly=yes", "-o", "BatchMode=yes",
             "-o", "StrictHostKeyChecking=no", "-o", f"UserKnownHostsFile={os.devnull}",
             "-o", f"ProxyCommand=nc %h {self.port}", "root@127.0.0.1", command],
            capture_output=True, text=True, timeout=timeout,
        )


def _free_ports(count: int) -> list[int]:
    """Ports free on 127.0.0.1 now, all different (held open together while they are chosen)."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def _missing_tools() -> list[str]:
    return [tool for tool in NEEDED_TOOLS if shutil.which(tool, path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin") is None]


def _run(args, *, timeout: float, env=None, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    if check:
        assert result.returncode == 0, f"{args[:4]} exited {result.returncode}:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


def _start_sshd(directory: Path) -> SshNode:
    home = directory / "home"
    home.mkdir()
    (directory / "tmp").mkdir()
    for name in ("host_key", "client_key"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(directory / name)], check=True)
    shutil.copy(directory / "client_key.pub", directory / "authorized_keys")
    (port,) = _free_ports(1)
    # StrictModes would refuse an authorized_keys file below /tmp (world-writable); the file is
    # this run's own, in a directory only root can read.
    (directory / "sshd_config").write_text(
        f"ListenAddress 127.0.0.1\nPort {port}\nHostKey {directory / 'host_key'}\nPidFile none\n"
        f"PermitRootLogin prohibit-password\nAllowUsers root\nPubkeyAuthentication yes\n"
        f"PasswordAuthentication no\nKbdInteractiveAuthentication no\nUsePAM no\n"
        f"AuthorizedKeysFile {directory / 'authorized_keys'}\nStrictModes no\nSetEnv HOME={home}\n"
    )
    Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # sshd's privilege separation directory
    sshd = shutil.which("sshd", path="/usr/sbin:/sbin:" + os.environ.get("PATH", ""))
    log = open(directory / "sshd.log", "w")
    unshare = subprocess.Popen(
        ["unshare", "--pid", "--fork", "--kill-child", "--mount-proc", sshd, "-D", "-e", "-f", str(directory / "sshd_config")],
        stdout=log, stderr=subprocess.STDOUT,
    )
    node = SshNode(directory, port, directory / "client_key", home, unshare)
    deadline = time.monotonic() + 20
    while node.ssh("true", timeout=10).returncode != 0:
        if unshare.poll() is not None or time.monotonic() > deadline:
            _stop_sshd(node)
            pytest.skip(f"could not start sshd in a PID namespace of its own: {(directory / 'sshd.log').read_text()[-500:]}")
        time.sleep(0.2)
    return node


def _stop_sshd(node: SshNode) -> None:
    if node.unshare.poll() is None:
        node.unshare.kill()  # unshare ignores SIGTERM; --kill-child takes the namespace down with it
    node.unshare.wait(timeout=30)


@pytest.fixture(scope="module")
def node():
    if os.geteuid() != 0:
        pytest.skip("needs root: sshd, a PID namespace and root's SSH login")
    missing = _missing_tools()
    if missing:
        pytest.skip(f"missing {', '.join(missing)} (apt-get install openssh-server rsync netcat-openbsd util-linux)")
    # A short path: Ray's unix sockets live under its temp dir, and socket paths are capped at 107 bytes.
    directory = Path(tempfile.mkdtemp(prefix="rkup-", dir="/tmp"))
    try:
        node = _start_sshd(directory)
        try:
            inside = node.ssh("readlink /proc/self/ns/pid; cat /proc/1/comm").stdout.split()
            assert inside[0] != os.readlink("/proc/self/ns/pid"), "the node's sessions share this PID namespace"
            assert inside[1] == "sshd", f"the node's /proc is not its own namespace's (pid 1 is {inside[1]})"
            yield node
        finally:
            _stop_sshd(node)
    finally:
        shutil.rmtree(directory, ignore_errors=True)


@dataclass
class RayUpCluster:
    config_path: Path
    cluster_name: str
    gcs_port: int
    dashboard_port: int
    token_path: Path
    node: SshNode
    down: bool = False

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.gcs_port}"

    def launcher_env(self) -> dict:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_AUTH_TOKEN", "RAY_ADDRESS"))}
        env.update(RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", TMPDIR=str(self.node.tmpdir))
        return env

    def driver_env(self) -> dict:
        env = self.launcher_env()
        env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(self.token_path))
        return env

    def ray_down(self) -> subprocess.CompletedProcess:
        self.down = True
        return _run(["ray", "down", "-y", str(self.config_path)], timeout=120, env=self.launcher_env())


def _loopback_config(node: SshNode, token_path: Path, cluster_name: str, ports: dict) -> dict:
    """cluster/local.yaml pointed at the test's node. Changed, and why:

    - provider and auth: this machine as the head (no workers: a second node would need a second
      address, and this machine may use 127.0.0.1 only), reached through ``nc`` because Ray's
      schema has no SSH port field.
    - the token file mount: this run's token, not the one in root's home.
    - the ``pip install`` setup lines: this machine's environment already has everything, and
      reinstalling torch over SSH takes minutes. In their place, the node's login shell finds this
      Python, and imports rayk from the ``~/rayk`` copy the file mount shipped (``pip install -e``
      would repoint the machine's shared editable install), with TMPDIR in this run's directory.
      Every other shipped line runs as is.
    - ``ray start --head``: bound to 127.0.0.1, on free ports, with its own temp dir, a small
      object store; the shipped flags all stay.
    """
    config = yaml.safe_load(LOCAL_CONFIG.read_text())
    config["cluster_name"] = cluster_name
    config["provider"].update(head_ip="127.0.0.1", worker_ips=[])
    config["auth"] = {"ssh_user": "root", "ssh_private_key": str(node.client_key), "ssh_proxy_command": f"nc %h {node.port}"}
    config["file_mounts"]["~/.ray/auth_token"] = str(token_path)

    stand_in = [
        f"echo 'export PATH={Path(sys.executable).parent}:$PATH' >> ~/.bashrc",
        "echo 'export PYTHONPATH=$HOME/rayk RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 RAY_USAGE_STATS_ENABLED=0' >> ~/.bashrc",
        f"echo 'export TMPDIR={node.tmpdir}' >> ~/.bashrc",
    ]
    installs = [c for c in config["setup_commands"] if c.startswith("pip install")]
    assert installs, "cluster/local.yaml installs nothing: the test would replace nothing"
    first = config["setup_commands"].index(installs[0])
    kept = [c for c in config["setup_commands"] if c not in installs]
    config["setup_commands"] = kept[:first] + stand_in + kept[first:]

    loopback = (
        f" --node-ip-address=127.0.0.1 --temp-dir={node.directory / 'ray'}"
        f" --dashboard-port={ports['dashboard']} --ray-client-server-port={ports['client']}"
        f" --dashboard-agent-listen-port={ports['agent']} --min-worker-port=0 --max-worker-port=0"
        f" --object-store-memory={300 * 1024 * 1024} --disable-usage-stats"
    )
    starts = config["head_start_ray_commands"]
    (head,) = [i for i, c in enumerate(starts) if "ray start --head" in c]
    assert "--port=6379" in starts[head]
    starts[head] = starts[head].replace("--port=6379", f"--port={ports['gcs']}") + loopback
    return config


@pytest.fixture(scope="module")
def ray_up_cluster(node):
    token_home = node.directory / "driver-home"
    token_home.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH_TOKEN")}
    # The user's first step in cluster/README.md, with HOME pointed at this run's directory.
    _run(["ray", "get-auth-token", "--generate"], timeout=60, env={**env, "HOME": str(token_home)})
    token_path = token_home / ".ray" / "auth_token"
    gcs, dashboard, client, agent = _free_ports(4)
    cluster_name = f"rayk-test-{uuid.uuid4().hex[:8]}"
    config = _loopback_config(node, token_path, cluster_name, {"gcs": gcs, "dashboard": dashboard, "client": client, "agent": agent})
    config_path = node.directory / "cluster.yaml"
    config_path.write_text(yaml.safe_dump(config))
    cluster = RayUpCluster(config_path, cluster_name, gcs, dashboard, token_path, node)
    try:
        started = time.monotonic()
        _run(["ray", "up", "-y", "--no-config-cache", str(config_path)], timeout=240, env=cluster.launcher_env())
        print(f"ray up took {time.monotonic() - started:.1f} s")
        yield cluster
    finally:
        try:
            if not cluster.down:
                cluster.ray_down()
        finally:
            # The directory of the launcher's SSH control sockets for this cluster (it lives on
            # for a few seconds after the last command, then leaves the directory empty).
            user, name = (hashlib.sha256(s.encode()).hexdigest()[:10] for s in ("root", cluster_name))
            shutil.rmtree(f"/tmp/ray_ssh_{user}/{name}", ignore_errors=True)


def _dashboard_status(port: int, token: str | None) -> int:
    request = urllib.request.Request(f"http://127.0.0.1:{port}/api/version")
    if token is not None:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code


def test_ray_up_ships_the_checkout_and_the_token(ray_up_cluster):
    home = ray_up_cluster.node.home
    assert (home / "rayk" / "pyproject.toml").read_text() == (REPO / "pyproject.toml").read_text()
    assert (home / "rayk" / "rayk" / "client.py").is_file()
    assert not (home / "rayk" / ".git").exists()  # rsync_exclude
    assert (home / ".ray" / "auth_token").read_text() == ray_up_cluster.token_path.read_text()
    assert "export RAY_AUTH_MODE=token" in (home / ".bashrc").read_text().splitlines()


def test_the_head_demands_the_token_and_declares_its_gpu_node_resource(ray_up_cluster):
    token = ray_up_cluster.token_path.read_text().strip()
    assert _dashboard_status(ray_up_cluster.dashboard_port, None) == 401
    assert _dashboard_status(ray_up_cluster.dashboard_port, "not-the-token") == 403
    assert _dashboard_status(ray_up_cluster.dashboard_port, token) == 200
    status = _run(["ray", "status", "--address", ray_up_cluster.address], timeout=60, env=ray_up_cluster.driver_env())
    assert "rayk_gpu_node" in status.stdout


def test_a_rayk_deployment_started_with_ray_exec_serves_drivers(ray_up_cluster, tiny_llama_dir):
    cluster = ray_up_cluster
    start = (
        f"python -m rayk start --address {cluster.address} --workers 2 --device cpu"
        f" --model {tiny_llama_dir} --block-size 16"
    )
    _run(["ray", "exec", "--no-config-cache", str(cluster.config_path), start], timeout=240, env=cluster.launcher_env())

    rayk = [sys.executable, "-m", "rayk"]
    env = cluster.driver_env()
    outputs = []
    for question in (" Who caches blocks?", " What is a paged KV cache?"):
        generated = _run(
            rayk + ["generate", "--address", cluster.address, "--prompt", SHARED_PREFIX + question,
                    "--max-tokens", "4", "--temperature", "0", "--raw", "--json"],
            timeout=120, env=env,
        )
        outputs.append(json.loads(generated.stdout.strip().splitlines()[-1]))
    assert outputs[0]["cached_tokens"] == 0
    assert outputs[1]["cached_tokens"] >= 48  # the shared prefix, computed once in the cluster

    stats = json.loads(_run(rayk + ["stats", "--address", cluster.address, "--json"], timeout=120, env=env).stdout)
    assert sorted(stats["workers"]) == ["worker-0", "worker-1"]
    assert stats["directory"]["blocks"] > 0


def test_ray_down_stops_the_head_and_nothing_outside_its_namespace(ray_up_cluster):
    # A process outside the node's namespace whose command line `ray stop` matches (it signals
    # every process with "default_worker.py" among its arguments that it can see).
    bystander = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)", "default_worker.py"])
    try:
        ray_up_cluster.ray_down()
        assert bystander.poll() is None, "ray down signalled a process outside the node"
        with socket.socket() as probe:
            assert probe.connect_ex(("127.0.0.1", ray_up_cluster.gcs_port)) != 0, "the head's GCS still listens"
    finally:
        bystander.kill()
        bystander.wait()
