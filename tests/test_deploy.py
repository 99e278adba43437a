"""deploy/ and docker-compose.yml, checked by the tools that read them: promtool,
docker-compose (1.29 or the v2 plugin) and systemd-analyze, plus what they cannot see:
the pieces must agree with each other (service names, ports, paths)."""

import configparser
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
COMPOSE_FILE = ROOT / "docker-compose.yml"
DATA_MESSAGE = "set DATA to your dataset directory"
METRICS_PORT = 9464
START_FLAGS = ("--foreground", "--data", "--run-dir", "--device", "--metrics-addr")


def compose_command() -> list[str]:
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    if shutil.which("docker") and subprocess.run(["docker", "compose", "version"],
                                                 capture_output=True).returncode == 0:
        return ["docker", "compose"]
    pytest.skip("neither docker-compose nor the docker compose plugin is installed "
                "(make testdeps installs docker-compose)")


def run_compose(*args, data: str | None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items()
           if k not in ("DATA", "BIND_ADDR") and not k.startswith("COMPOSE_")}
    if data is not None:
        env["DATA"] = data
    return subprocess.run([*compose_command(), "-f", str(COMPOSE_FILE), *args], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("dataset")


@pytest.fixture(scope="module")
def compose(data_dir):
    """The compose file as docker-compose resolves it (variables filled in)."""
    proc = run_compose("config", data=str(data_dir))
    assert proc.returncode == 0, proc.stderr
    return yaml.safe_load(proc.stdout)


def dockerfile_instructions() -> list[tuple[str, str]]:
    text = (DEPLOY / "Dockerfile").read_text()
    text = re.sub(r"\\\n", " ", text)  # line continuations
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            op, _, arg = line.partition(" ")
            out.append((op.upper(), arg.strip()))
    return out


def unit_settings() -> dict[str, list[str]]:
    settings: dict[str, list[str]] = {}
    text = re.sub(r"\\\n", " ", (DEPLOY / "alexnetd.service").read_text())
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith(("#", ";", "[")):
            key, _, value = line.partition("=")
            settings.setdefault(key.strip(), []).append(value.strip())
    return settings


# ---------------------------------------------------------------- Prometheus

def test_prometheus_config_passes_promtool():
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed (make testdeps installs prometheus)")
    proc = subprocess.run([promtool, "check", "config", str(DEPLOY / "prometheus.yml")],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_prometheus_scrapes_the_compose_service(compose):
    config = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())
    (job,) = [j for j in config["scrape_configs"] if j["job_name"] == "alexnetd"]
    targets = [t for sc in job["static_configs"] for t in sc["targets"]]
    assert targets == [f"alexnetd:{METRICS_PORT}"]
    assert "alexnetd" in compose["services"]
    # The datasource tells Grafana the scrape interval, from which $__rate_interval follows.
    ds = yaml.safe_load((DEPLOY / "grafana/provisioning/datasources/prometheus.yml").read_text())
    (prom,) = ds["datasources"]
    assert prom["jsonData"]["timeInterval"] == job["scrape_interval"]
    assert prom["url"] == "http://prometheus:9090" and "prometheus" in compose["services"]


# ---------------------------------------------------------------- docker-compose

def test_compose_file_is_valid(data_dir):
    proc = run_compose("config", "-q", data=str(data_dir))
    assert proc.returncode == 0, proc.stderr


def test_compose_without_data_says_to_set_it():
    proc = run_compose("config", "-q", data=None)
    assert proc.returncode != 0
    assert DATA_MESSAGE in proc.stderr


def test_compose_reserves_a_gpu(compose):
    devices = compose["services"]["alexnetd"]["deploy"]["resources"]["reservations"]["devices"]
    assert any(d.get("driver") == "nvidia" and "gpu" in d["capabilities"] for d in devices)


def _host_ips(ports) -> list[str]:
    ips = []
    for p in ports:
        if isinstance(p, dict):  # long syntax (docker compose v2)
            ips.append(p.get("host_ip", "0.0.0.0"))
        else:  # "IP:HOST:CONTAINER[/proto]"
            parts = str(p).split(":")
            ips.append(parts[0] if len(parts) == 3 else "0.0.0.0")
    return ips


def test_compose_publishes_ports_on_the_loopback_only(compose):
    published = {name: _host_ips(svc.get("ports", [])) for name, svc in compose["services"].items()}
    assert published["prometheus"] and published["grafana"]
    for name, ips in published.items():
        assert set(ips) <= {"127.0.0.1"}, f"{name} publishes on {ips}"


def _mounts(service) -> list[tuple[str, str, bool]]:
    out = []
    for v in service.get("volumes", []):
        if isinstance(v, dict):
            out.append((v["source"], v["target"], bool(v.get("read_only"))))
        else:
            src, dst, *mode = v.split(":")
            out.append((src, dst, mode == ["ro"]))
    return out


def test_compose_mounts_the_data_read_only_and_sizes_the_ring(compose, data_dir):
    svc = compose["services"]["alexnetd"]
    assert (str(data_dir), "/data", True) in _mounts(svc)
    assert any(dst == "/run/alexnetd" and src in compose["volumes"] for src, dst, _ in _mounts(svc))
    size = str(svc["shm_size"]).lower()
    m = re.fullmatch(r"(\d+)\s*([kmg]?)b?", size)
    assert m, size
    scale = {"": 1, "k": 2**10, "m": 2**20, "g": 2**30}[m.group(2)]
    assert int(m.group(1)) * scale >= 2**30, f"shm_size {size}: the ring needs more than 1 GiB"


def test_compose_provisions_grafana_from_deploy(compose):
    mounts = {dst: Path(src).resolve() for src, dst, _ in _mounts(compose["services"]["grafana"])
              if src.startswith("/")}
    assert mounts["/etc/grafana/provisioning"] == DEPLOY / "grafana" / "provisioning"
    providers = yaml.safe_load(
        (DEPLOY / "grafana/provisioning/dashboards/alexnetd.yml").read_text())["providers"]
    (path,) = [p["options"]["path"] for p in providers]
    assert mounts[path] == DEPLOY / "grafana" / "dashboards"
    assert (mounts[path] / "alexnetd.json").is_file()
    env = compose["services"]["grafana"]["environment"]
    assert env["GF_AUTH_ANONYMOUS_ENABLED"] == "true"
    assert env["GF_AUTH_ANONYMOUS_ORG_ROLE"] == "Viewer"


# ---------------------------------------------------------------- the image

def test_dockerfile_runs_the_daemon_as_a_user_on_cuda():
    ins = dockerfile_instructions()
    ops = [op for op, _ in ins]
    args = {op: arg for op, arg in ins}  # the last of each
    base = [arg for op, arg in ins if op == "ARG" and arg.startswith("CUDA_IMAGE=")]
    assert base and base[0].startswith("CUDA_IMAGE=nvidia/cuda:") and "runtime" in base[0]
    assert args["FROM"] == "${CUDA_IMAGE}"
    assert json.loads(args["ENTRYPOINT"]) == ["alexnetd", "start", "--foreground"]
    cmd = json.loads(args["CMD"])
    pairs = dict(zip(cmd[::2], cmd[1::2]))
    assert pairs == {"--data": "/data", "--run-dir": "/run/alexnetd", "--device": "cuda",
                     "--metrics-addr": f"0.0.0.0:{METRICS_PORT}"}
    user = args["USER"].split(":")[0]
    assert user not in ("root", "0")
    assert ops.index("USER") < ops.index("ENTRYPOINT")
    run = " ".join(arg for op, arg in ins if op == "RUN")
    assert "'.[dali]'" in run and "libturbojpeg0" in run


def test_dockerfile_copies_every_package_folder():
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    folders = {line.split("=")[1].strip() for line in
               cfg["options"]["package_dir"].strip().splitlines()}
    copied = {shlex.split(arg)[0].rstrip("/") for op, arg in dockerfile_instructions()
              if op == "COPY" and not arg.startswith("--")}
    assert folders <= copied, f"not copied into the image: {sorted(folders - copied)}"


def test_start_flags_used_by_the_deploy_files_exist():
    from click.testing import CliRunner

    from alexnetd.service.cli import main

    result = CliRunner().invoke(main, ["start", "--help"])
    assert result.exit_code == 0, result.output
    for flag in START_FLAGS:
        assert flag in result.output, f"`alexnetd start` has no {flag}"


# ---------------------------------------------------------------- systemd

def test_systemd_unit_verifies(tmp_path):
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed")
    # verify wants ExecStart to exist: point it at this checkout's console script.
    script = Path(sys.executable).with_name("alexnetd")
    assert script.is_file(), f"{script}: install the package (make install)"
    unit = tmp_path / "alexnetd.service"
    unit.write_text((DEPLOY / "alexnetd.service").read_text()
                    .replace("/opt/alexnetd/bin/alexnetd", str(script)))
    proc = subprocess.run([analyze, "verify", str(unit)], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0 and not proc.stderr.strip(), proc.stderr


def test_systemd_unit_stops_gracefully_and_keeps_the_gpu_and_ring():
    s = unit_settings()
    exec_start = shlex.split(s["ExecStart"][0])
    assert exec_start[1:3] == ["start", "--foreground"]
    assert {f for f in exec_start if f.startswith("--")} == set(START_FLAGS)
    assert s["Restart"] == ["on-failure"]
    assert s["KillSignal"] == ["SIGTERM"]
    assert int(s["TimeoutStopSec"][0]) >= 120  # longer than a checkpoint write
    assert s["User"][0] not in ("root", "0")
    # These would hide /dev/nvidia* or break CUDA's JIT.
    assert s.get("PrivateDevices", ["no"]) == ["no"]
    assert s.get("MemoryDenyWriteExecute", ["no"]) == ["no"]
    assert s.get("DevicePolicy", ["auto"]) == ["auto"]
    # A private /dev/shm or an inaccessible /dev would take the ring away.
    for key in ("InaccessiblePaths", "TemporaryFileSystem"):
        assert not any("/dev" in v for v in s.get(key, [])), key
