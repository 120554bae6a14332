"""cluster/: the launcher configs against Ray's own schema, the KubeRay manifest's shape, and
cluster/local.sh bringing up a real head + worker raylet on loopback, with token auth, and
tearing down only what it started."""

from __future__ import annotations

import copy
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import jsonschema
import pytest
import yaml

from conftest import cluster_env

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "cluster"
LOCAL_SH = CLUSTER / "local.sh"


# ------------------------------------------------------------------ launcher configs


def _ray_schema() -> dict:
    import ray.autoscaler

    return json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())


def _load(name: str) -> dict:
    return yaml.safe_load((CLUSTER / name).read_text())


def _validate(raw: dict) -> None:
    """Both checks `ray up` does: the JSON schema on the file as written, then Ray's
    validate_config on the config merged with the provider's defaults."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    jsonschema.validate(raw, _ray_schema())
    validate_config(prepare_config(copy.deepcopy(raw)))


@pytest.mark.parametrize("name", ["aws.yaml", "gcp.yaml"])
def test_launcher_config_validates_against_ray_schema(name):
    raw = _load(name)
    _validate(raw)

    types = raw["available_node_types"]
    head = types[raw["head_node_type"]]
    # the head takes no trials
    assert head["resources"]["CPU"] == 0 and head["resources"].get("GPU", 0) == 0
    # kdsearch pins its latency measurer to the node holding this (search/latency.py)
    assert head["resources"].get("kdsearch_latency") == 1
    workers = {k: v for k, v in types.items() if k != raw["head_node_type"]}
    gpu = {k: v for k, v in workers.items() if v["resources"].get("GPU", 0) >= 1}
    assert gpu, "no GPU worker node type"
    for spec in gpu.values():
        # autoscaled from zero, within the global cap
        assert spec["min_workers"] == 0 < spec["max_workers"] <= raw["max_workers"]
        assert spec["resources"].get("kdsearch_worker") == 1
        node = spec["node_config"]
        if raw["provider"]["type"] == "aws":
            assert node["InstanceMarketOptions"]["MarketType"] == "spot"
        else:
            assert node["scheduling"]["preemptible"] is True
            assert node["scheduling"]["onHostMaintenance"] == "TERMINATE"  # required with GPUs
            assert node["guestAccelerators"][0]["acceleratorCount"] >= 1

    # the code and the auth token reach every node; kdsearch is installed with the pins
    assert raw["file_mounts"]["~/kdsearch"] == "."
    assert "~/.ray/auth_token" in raw["file_mounts"]
    assert any("-e ~/kdsearch" in c and "constraints.txt" in c for c in raw["setup_commands"])
    head_start = " ".join(raw["head_start_ray_commands"])
    worker_start = " ".join(raw["worker_start_ray_commands"])
    assert "RAY_AUTH_MODE=token" in head_start and "RAY_AUTH_MODE=token" in worker_start
    assert "--num-cpus=0" in head_start and "--autoscaling-config" in head_start


def _mutations(raw: dict):
    gpu_type = next(k for k in raw["available_node_types"] if k != raw["head_node_type"])

    def typo(c):
        c["max_wokers"] = c.pop("max_workers")

    def fractional_gpu(c):
        c["available_node_types"][gpu_type]["resources"]["GPU"] = 0.5

    def no_node_config(c):
        del c["available_node_types"][gpu_type]["node_config"]

    def bad_head_type(c):
        c["head_node_type"] = "nope"

    def min_over_global_max(c):
        c["available_node_types"][gpu_type]["min_workers"] = c["max_workers"] + 1

    return [typo, fractional_gpu, no_node_config, bad_head_type, min_over_global_max]


@pytest.mark.parametrize("name", ["aws.yaml", "gcp.yaml"])
def test_broken_launcher_config_fails_validation(name):
    raw = _load(name)
    for mutate in _mutations(raw):
        broken = copy.deepcopy(raw)
        mutate(broken)
        with pytest.raises((jsonschema.ValidationError, ValueError)):
            _validate(broken)


def test_kuberay_raycluster_structure():
    doc = _load("kuberay.yaml")
    assert doc["apiVersion"] == "ray.io/v1"
    assert doc["kind"] == "RayCluster"
    spec = doc["spec"]
    assert spec["enableInTreeAutoscaling"] is True
    assert spec["rayVersion"] == "2.60.0"

    def token_env(container_env):
        env = {e["name"]: e for e in container_env}
        assert env["RAY_AUTH_MODE"]["value"] == "token"
        assert env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"]["name"]

    token_env(spec["autoscalerOptions"]["env"])

    head = spec["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0"
    assert head["rayStartParams"]["num-gpus"] == "0"
    assert json.loads(json.loads(head["rayStartParams"]["resources"]))["kdsearch_latency"] == 1
    (head_c,) = head["template"]["spec"]["containers"]
    assert "nvidia.com/gpu" not in head_c["resources"].get("limits", {})
    token_env(head_c["env"])

    groups = spec["workerGroupSpecs"]
    assert len(groups) >= 1
    gpu_groups = [
        g
        for g in groups
        if any(
            c["resources"]["limits"].get("nvidia.com/gpu") == 1 for c in g["template"]["spec"]["containers"]
        )
    ]
    assert gpu_groups, "no worker group with nvidia.com/gpu: 1 limits"
    for g in gpu_groups:
        assert 0 <= g["minReplicas"] <= g["replicas"] <= g["maxReplicas"]
        assert g["maxReplicas"] > 0
        assert json.loads(json.loads(g["rayStartParams"]["resources"])) == {"kdsearch_worker": 1}
        for c in g["template"]["spec"]["containers"]:
            token_env(c["env"])


# ------------------------------------------------------------------ cluster/local.sh

needs_local_cluster = pytest.mark.skipif(
    not sys.platform.startswith("linux") or not all(shutil.which(t) for t in ("bash", "setsid", "flock", "ps")),
    reason="cluster/local.sh needs Linux (loopback 127.0.0.x) with bash, setsid, flock, ps",
)




def _sh(env, *args, check=True, timeout=180) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        ["bash", str(LOCAL_SH), *args], env=env, capture_output=True, text=True, timeout=timeout
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"local.sh {' '.join(args)} -> {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie is dead for our purposes
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _session_pids(sid: int) -> list[int]:
    """Live (non-zombie) members of session ``sid``."""
    out = subprocess.run(["ps", "-e", "-o", "pid=,sid=,stat="], capture_output=True, text=True, check=True).stdout
    rows = (line.split() for line in out.splitlines())
    return [int(p) for p, s, st in rows if int(s) == sid and not st.startswith("Z")]


def _client_env(state: Path, token_path: str | None = None, token: str | None = None) -> dict:
    env = cluster_env(state)
    env["HOME"] = str(state)  # so no ~/.ray/auth_token of the user's can stand in
    if token_path or token:
        env["RAY_AUTH_MODE"] = "token"
    if token_path:
        env["RAY_AUTH_TOKEN_PATH"] = token_path
    if token:
        env["RAY_AUTH_TOKEN"] = token
    return env


# Runs in a child interpreter so this pytest process never holds a Ray connection (other tests
# start their own local Ray) and its auth settings cannot leak into them.
CLIENT = textwrap.dedent(
    """
    import json, sys, ray
    ray.init(address=sys.argv[1], log_to_driver=False)
    nodes = [n for n in ray.nodes() if n["Alive"]]

    @ray.remote(num_cpus=1, resources={"kdsearch_worker": 1})
    def on_worker():
        return ray.get_runtime_context().get_node_id(), ray.util.get_node_ip_address()

    @ray.remote(num_cpus=1, resources={"kdsearch_head": 1})
    def on_head():
        return ray.get_runtime_context().get_node_id(), ray.util.get_node_ip_address()

    out = {
        "nodes": [
            {"id": n["NodeID"], "ip": n["NodeManagerAddress"], "resources": n["Resources"]}
            for n in nodes
        ],
        "worker_task": ray.get(on_worker.remote(), timeout=60),
        "head_task": ray.get(on_head.remote(), timeout=60),
        "total_cpus": ray.cluster_resources().get("CPU"),
    }
    ray.shutdown()
    print("RESULT " + json.dumps(out))
    """
)


@needs_local_cluster
def test_local_sh_without_cluster(tmp_path):
    env = cluster_env(tmp_path / "state")
    assert "kill-worker" in _sh(env, "help").stdout
    assert _sh(env, "status", check=False).returncode == 3
    assert _sh(env, "up", "--workers", "x", check=False).returncode != 0
    assert _sh(env, "frobnicate", check=False).returncode == 2
    _sh(env, "down")  # nothing recorded: a no-op, not an error


@needs_local_cluster
def test_local_cluster_lifecycle(tmp_path):
    state = tmp_path / "state"
    env = cluster_env(state)
    # A process that `ray stop` (or `pkill -f default_worker.py`) would kill but this script did
    # not start: `down` must leave it alone.
    decoy = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(600)", "default_worker.py", "ray::IDLE"],
        start_new_session=True,
    )
    try:
        up = _sh(env, "up", "--workers", "1")
        address = (state / "address").read_text().strip()
        assert address.startswith("127.0.0.") and address in up.stdout
        token_path = str(state / "auth_token")
        assert f"export RAY_AUTH_TOKEN_PATH={token_path}" in up.stdout
        assert "export RAY_AUTH_MODE=token" in up.stdout
        assert (state / "auth_token").stat().st_mode & 0o077 == 0
        assert len((state / "auth_token").read_text().strip()) == 64

        pids = {
            name: (int((state / f"nodes/{name}.pid").read_text()), int((state / f"nodes/{name}.raylet.pid").read_text()))
            for name in ("head", "worker-0")
        }
        for leader, raylet in pids.values():
            assert _alive(leader) and _alive(raylet)
            assert raylet in _session_pids(leader)  # the node's processes share the leader's session

        # the token is enforced: none, or a wrong one, is refused; the right one works
        ray_cli = env.get("KDSEARCH_RAY", "ray")
        for bad in (_client_env(state), _client_env(state, token="0" * 64)):
            st = subprocess.run(
                [ray_cli, "status", "--address", address], env=bad, capture_output=True, text=True, timeout=60
            )
            assert st.returncode != 0, st.stdout
            assert "auth" in (st.stdout + st.stderr).lower()
        status = _sh(env, "status")
        assert "kdsearch_worker" in status.stdout and status.stdout.count("running") == 2

        # a driver connects with the exported settings and pins tasks via the custom resources
        client = subprocess.run(
            [sys.executable, "-c", CLIENT, address],
            env=_client_env(state, token_path=token_path),
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert client.returncode == 0, client.stdout + client.stderr
        result = json.loads(client.stdout.split("RESULT ", 1)[1])
        nodes = {n["ip"]: n for n in result["nodes"]}
        assert len(nodes) == 2
        head = next(n for n in nodes.values() if n["resources"].get("kdsearch_head") == 1)
        worker = next(n for n in nodes.values() if n["resources"].get("kdsearch_worker") == 1)
        assert head["ip"] == address.split(":")[0] and worker["ip"] != head["ip"]
        assert head["resources"]["CPU"] == 1 and worker["resources"]["CPU"] == 1
        assert head["resources"].get("kdsearch_latency") == 1 and "kdsearch_latency" not in worker["resources"]
        assert worker["resources"].get("kdsearch_worker_0") == 1
        assert result["total_cpus"] == 2  # two 1-CPU trials can run at once
        assert result["worker_task"] == [worker["id"], worker["ip"]]
        assert result["head_task"] == [head["id"], head["ip"]]

        # a preempted worker: SIGKILL takes its raylet and the rest of its node; the head lives on
        killed = _sh(env, "kill-worker", "0")
        assert str(pids["worker-0"][1]) in killed.stdout.split()
        assert not _alive(pids["worker-0"][1])
        assert _session_pids(pids["worker-0"][0]) == []
        assert _alive(pids["head"][0]) and _alive(pids["head"][1])
        deadline = time.time() + 30
        while True:  # the GCS notices through its health checks
            st = _sh(env, "status", check=False)
            if st.returncode == 1 and "DEAD" in st.stdout:
                break
            assert time.time() < deadline, st.stdout
            time.sleep(1)

        # ...and it comes back
        _sh(env, "start-worker", "0")
        new_leader = int((state / "nodes/worker-0.pid").read_text())
        assert new_leader != pids["worker-0"][0] and _alive(new_leader)
        pids["worker-0"] = (new_leader, int((state / "nodes/worker-0.raylet.pid").read_text()))
        assert _sh(env, "status").returncode == 0

        started = sorted(p for leader, _ in pids.values() for p in _session_pids(leader))
        assert started
        temp_dir = next(
            line.split("=", 1)[1] for line in (state / "cluster.env").read_text().splitlines() if line.startswith("TEMP_DIR=")
        )
        assert Path(temp_dir).is_dir()
    finally:
        down = _sh(env, "down", check=False)
        try:
            assert _alive(decoy.pid), "local.sh down killed a process it did not start"
        finally:
            decoy.send_signal(signal.SIGTERM)
            decoy.wait(timeout=10)
    assert down.returncode == 0, down.stderr
    # every process of every node is gone (checked by session: a bare PID may be reused)
    assert [p for leader, _ in pids.values() for p in _session_pids(leader)] == []
    assert not any(_alive(leader) for leader, _ in pids.values())
    assert not Path(temp_dir).exists()
    assert _sh(env, "status", check=False).returncode == 3
