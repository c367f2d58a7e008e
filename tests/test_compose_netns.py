"""docker-compose.yml, rehearsed without Docker in Linux network namespaces.

There is no container engine on the test machines, so this test plays the
compose file the way Docker would, with the parts that matter to the network:

- one network namespace per service (``p2pex-<tag>-<service>``), each with
  its loopback up and an ``eth0`` veth into one bridge in the root namespace,
  on a random private /24 (10.231.X.0/24);
- ``/etc/netns/<ns>/hosts`` naming every started service, so service names
  resolve inside each namespace as on a compose network, once the service
  runs (``ip netns exec`` mounts it over /etc/hosts);
- each service's command (compose ``command``, else the Dockerfile ``CMD``)
  with the Dockerfile ``ENV`` plus the compose ``environment``, run from the
  repo root (the image's WORKDIR /app) with ``python`` = this interpreter,
  and each volume target (``/data``) mapped to a fresh temporary directory;
- start in ``depends_on`` order, each dependency awaited through its own
  compose healthcheck command run inside its namespace;
- ``docker stop``: SIGTERM to the service's main process only.

It does not build the image: the services run from the checkout with this
interpreter, so what ``.dockerignore``, ``COPY`` and ``pip install .`` put in
the image is not covered here; tests/test_image_build.py builds it.

A second run starts the services in reverse order, waiting for nothing.
Each run then checks what the file promises: both traders' orders reach all six
nodes and trade, peers know each other only by service name, all state hashes
are equal once the traders stop, and every service exits 0 on SIGTERM with no
process left behind.  The rehearsal appends ``--seconds`` to the trader
commands so trading stops on its own while the trader nodes keep serving.

Needs root and iproute2 (``ip netns``); skipped with the reason otherwise.
Everything it creates (processes by process group, namespaces, veths, the
bridge, /etc/netns entries) is removed in teardown, also on failure.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shlex
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.interop.npm import npm_ready
from tests.nodes import free_port

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"
GRAPE_BUILD = "grenache"  # the grape image's build context (profile grenache)
INTEROP = ROOT / "tests" / "interop"
PYTHON = sys.executable

SEEDS = ("dht1", "dht2")
EXCHANGES = ("exchange1", "exchange2")
TRADERS = ("trader1", "trader2")
NODES = SEEDS + EXCHANGES + TRADERS

TRADE_SECONDS = 12.0  # appended to the trader commands
HEALTH_TIMEOUT_S = 30.0  # per service, on top of the compose retries bound
SPREAD_TIMEOUT_S = 45.0  # orders of both traders everywhere, fills, full mesh
TRADE_END_TIMEOUT_S = TRADE_SECONDS + 30.0
QUIESCE_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 20.0
ANY_ORDER_STAGGER_S = 1.0
HTTP_TIMEOUT_S = 2.0

T = TypeVar("T")


# ---- reading the compose file and the Dockerfile -----------------------------------


def load_compose(*, profiles: bool = False) -> dict[str, Any]:
    """The compose file; services under a profile only with ``profiles`` (a plain
    ``docker compose up`` starts none of them)."""
    yaml = pytest.importorskip("yaml", reason="PyYAML reads docker-compose.yml: pip install pyyaml")
    data = yaml.safe_load(COMPOSE.read_text())
    assert isinstance(data, dict) and isinstance(data.get("services"), dict)
    if not profiles:
        data["services"] = {k: v for k, v in data["services"].items() if not v.get("profiles")}
    return data


def dockerfile_lines(path: Path = DOCKERFILE) -> list[str]:
    """Instructions of a Dockerfile, continuation lines joined, comments dropped."""
    out: list[str] = []
    buf = ""
    for line in path.read_text().splitlines():
        if not buf and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.rstrip().endswith("\\"):
            buf += line.rstrip()[:-1] + " "
            continue
        out.append(buf + line.strip())
        buf = ""
    return out


def dockerfile_env() -> dict[str, str]:
    env: dict[str, str] = {}
    for line in dockerfile_lines():
        if line.upper().startswith("ENV "):
            for word in shlex.split(line[4:]):
                key, sep, value = word.partition("=")
                assert sep, f"use the ENV KEY=VALUE form in the Dockerfile: {line}"
                env[key] = value
    return env


def dockerfile_instruction(name: str, path: Path = DOCKERFILE) -> str:
    found = [line for line in dockerfile_lines(path) if line.upper().startswith(name + " ")]
    assert found, f"{path} has no {name}"
    return found[-1][len(name) + 1:].strip()


def exec_form(text: str) -> list[str]:
    value = json.loads(text)
    assert isinstance(value, list) and all(isinstance(v, str) for v in value), text
    return value


def seconds_of(value: Any, default: float) -> float:
    """A compose duration ("2s", "500ms", "1m30s") in seconds."""
    if value is None:
        return default
    total = 0.0
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|us|s|m|h)", str(value))
    assert parts, f"bad duration {value!r}"
    for number, unit in parts:
        total += float(number) * {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}[unit]
    return total


def depends_on(svc: dict[str, Any]) -> dict[str, str]:
    deps = svc.get("depends_on") or {}
    if isinstance(deps, list):
        return dict.fromkeys(deps, "service_started")
    return {name: (cond or {}).get("condition", "service_started") for name, cond in deps.items()}


def start_waves(services: dict[str, Any]) -> list[list[str]]:
    """Services in depends_on order: each wave depends only on earlier waves."""
    left = {name: set(depends_on(svc)) for name, svc in services.items()}
    waves: list[list[str]] = []
    done: set[str] = set()
    while left:
        wave = sorted(name for name, deps in left.items() if deps <= done)
        assert wave, f"depends_on has a cycle or an unknown service among {sorted(left)}"
        waves.append(wave)
        done.update(wave)
        for name in wave:
            del left[name]
    return waves


def volume_targets(svc: dict[str, Any]) -> list[tuple[str, str]]:
    out = []
    for spec in svc.get("volumes") or []:
        source, _, target = str(spec).partition(":")
        out.append((source, target.split(":")[0]))
    return out


# ---- the static contract -------------------------------------------------------------------


class TestComposeFile:
    def test_services_and_roles(self) -> None:
        services = load_compose()["services"]
        assert set(services) == set(NODES)
        for name in SEEDS:
            assert services[name]["environment"].get("P2PEX_SEED") == "1", name
        for name in EXCHANGES + TRADERS:
            assert services[name]["environment"].get("P2PEX_SEED") in (None, "", "0"), name

    def test_optional_prometheus_scrapes_every_node(self) -> None:
        yaml = pytest.importorskip("yaml")
        prom = load_compose(profiles=True)["services"]["prometheus"]
        assert prom["profiles"] == ["monitoring"]
        (mount,) = prom["volumes"]
        source = mount.split(":")[0]
        config = yaml.safe_load((ROOT / source).read_text())
        (job,) = config["scrape_configs"]
        assert job["metrics_path"] == "/metrics"
        targets = {t for sc in job["static_configs"] for t in sc["targets"]}
        assert targets == {f"{name}:7001" for name in NODES}

    def test_every_node_advertises_its_name_and_bootstraps_by_name(self) -> None:
        base = dockerfile_env()
        for name, svc in load_compose()["services"].items():
            env = {**base, **svc["environment"]}
            assert env["P2PEX_ADVERTISE"] == name, "peers must dial the service name"
            assert env["P2PEX_HOST"] == "0.0.0.0"
            assert env["P2PEX_BOOTSTRAP"] == "dht1:7001,dht2:7001"
            assert env["P2PEX_PORT"] == "7001"

    def test_volumes_healthchecks_and_start_order(self) -> None:
        compose = load_compose()
        services = compose["services"]
        declared = set(compose.get("volumes") or {})
        for name, svc in services.items():
            vols = volume_targets(svc)
            assert vols and all(src in declared for src, _ in vols), f"{name}: named volume for its data"
            assert {**dockerfile_env(), **svc["environment"]}["P2PEX_DATA_DIR"] in {t for _, t in vols}
            test = svc["healthcheck"]["test"]
            assert test[0] in ("CMD", "CMD-SHELL") and "/healthz" in " ".join(test), name
        assert depends_on(services["dht2"]) == {"dht1": "service_healthy"}
        for name in EXCHANGES:
            assert depends_on(services[name]) == {"dht1": "service_healthy", "dht2": "service_healthy"}
        for name in TRADERS:
            assert depends_on(services[name]) == {e: "service_healthy" for e in EXCHANGES}
        assert start_waves(services) == [["dht1"], ["dht2"], list(EXCHANGES), list(TRADERS)]

    def test_exchanges_publish_their_http_port(self) -> None:
        services = load_compose()["services"]
        published = {}
        for name in EXCHANGES:
            spec = services[name]["ports"][0]
            host, _, container = str(spec).rpartition(":")
            assert container == services[name]["environment"]["P2PEX_PORT"], "publish the node's HTTP port"
            published[name] = int(host)
        assert len(set(published.values())) == len(EXCHANGES)

    def test_traders_are_nodes_that_trade(self) -> None:
        for name in TRADERS:
            cmd = load_compose()["services"][name]["command"]
            assert cmd[:4] == ["python", "cli.py", "trade", "--with-node"], cmd
            assert "--node" in cmd and cmd[cmd.index("--node") + 1] == "http://127.0.0.1:7001"

    def test_dockerfile(self) -> None:
        assert dockerfile_instruction("FROM") == "python:3.11-slim"
        user = dockerfile_instruction("USER")
        assert user not in ("root", "0"), "run as a non-root user"
        assert dockerfile_instruction("WORKDIR") == "/app"
        assert exec_form(dockerfile_instruction("CMD")) == ["python", "cli.py", "node"]
        health = dockerfile_instruction("HEALTHCHECK")
        assert "urllib" in health and "/healthz" in health and "curl" not in health
        env = dockerfile_env()
        assert env["P2PEX_HOST"] == "0.0.0.0" and env["P2PEX_DATA_DIR"] == "/data"
        assert any("pip install ." in line for line in dockerfile_lines() if line.startswith("RUN"))


def option(argv: list[str], name: str) -> str:
    return argv[argv.index(name) + 1]


class TestGrenacheProfile:
    """`docker compose --profile grenache up`: a grape in each exchange's namespace."""

    def grapes(self) -> dict[str, dict[str, Any]]:
        services = load_compose(profiles=True)["services"]
        return {name: spec for name, spec in services.items() if spec.get("build") == GRAPE_BUILD}

    def test_a_grape_per_exchange_in_its_namespace_announced_on_by_it(self) -> None:
        services = load_compose(profiles=True)["services"]
        grapes = self.grapes()
        assert {spec["network_mode"] for spec in grapes.values()} == {f"service:{e}" for e in EXCHANGES}
        for name, spec in grapes.items():
            assert spec["profiles"] == ["grenache"], name
            exchange = spec["network_mode"].removeprefix("service:")
            api = option(spec["command"], "--aph")
            assert services[exchange]["environment"]["P2PEX_GRAPES"] == f"http://127.0.0.1:{api}"
            assert f"{api}:{api}" in services[exchange]["ports"], "the exchange publishes its grape's API"
            assert "--b" not in spec["command"], "a grape bound to one address records that one for its node"
            (other,) = set(grapes) - {name}
            other_exchange = grapes[other]["network_mode"].removeprefix("service:")
            assert option(spec["command"], "--bn") == f"{other_exchange}:{option(grapes[other]['command'], '--dp')}"
            assert depends_on(spec)[exchange] == "service_healthy"

    def test_the_grape_image_pins_what_the_interop_test_runs(self) -> None:
        entry = exec_form(dockerfile_instruction("ENTRYPOINT", ROOT / GRAPE_BUILD / "Dockerfile"))
        assert entry == ["node", "node_modules/grenache-grape/bin/grape.js"]
        image = json.loads((ROOT / GRAPE_BUILD / "package-lock.json").read_text())["packages"]
        interop = json.loads((INTEROP / "package-lock.json").read_text())["packages"]
        assert image["node_modules/grenache-grape"]["version"] == "1.0.0"
        differ = {k: (v.get("version"), interop.get(k, {}).get("version"))
                  for k, v in image.items() if k and v.get("version") != interop.get(k, {}).get("version")}
        assert not differ, f"the grape image and tests/interop pin different versions: {differ}"


# ---- the rehearsal -------------------------------------------------------------------------


def run(*argv: str, check: bool = True, timeout: float = 15.0) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
    if check and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc


def quiet(*argv: str) -> None:
    """A teardown step: best effort, never raises."""
    with contextlib.suppress(Exception):
        run(*argv, check=False)


def netns_unavailable() -> str | None:
    """Why network namespaces cannot be used here, or None."""
    if not sys.platform.startswith("linux"):
        return "network namespaces are Linux only"
    if os.geteuid() != 0:
        return "creating network namespaces needs root"
    if shutil.which("ip") is None:
        return "iproute2 (`ip`) is not installed"
    probe = f"p2pex-probe-{secrets.token_hex(3)}"
    link = f"p2p{secrets.token_hex(3)}"
    try:
        run("ip", "netns", "add", probe)
    except (RuntimeError, OSError, subprocess.TimeoutExpired) as exc:
        return f"`ip netns add` is not permitted here: {exc}"
    try:
        run("ip", "netns", "exec", probe, "true")
        run("ip", "link", "add", link, "type", "bridge")
        return None
    except (RuntimeError, OSError, subprocess.TimeoutExpired) as exc:
        return f"network namespaces are not usable here: {exc}"
    finally:
        quiet("ip", "link", "del", link)
        quiet("ip", "netns", "del", probe)


def free_subnet() -> str:
    """A 10.231.X prefix no interface or route here uses."""
    used = run("ip", "-4", "-o", "addr").stdout + run("ip", "-4", "route").stdout
    for _ in range(50):
        prefix = f"10.231.{secrets.randbelow(254) + 1}"
        if prefix + "." not in used:
            return prefix
    raise RuntimeError("no free 10.231.X.0/24 subnet")


@dataclass(slots=True, kw_only=True)
class Service:
    name: str
    index: int
    argv: list[str]
    env: dict[str, str]
    health: list[str]
    health_interval: float
    health_timeout: float
    health_retries: int
    start_period: float
    depends: dict[str, str]
    ns: str = ""
    ip: str = ""
    log_path: Path = Path()
    proc: subprocess.Popen[bytes] | None = None
    healthy: bool = False
    stopped_status: int | None = None
    cwd: Path = ROOT
    shares: str = ""  # network_mode "service:NAME": runs in NAME's namespace

    @property
    def url(self) -> str:
        return f"http://{self.ip}:{self.env.get('P2PEX_PORT', '7001')}"


def translate(value: str, mounts: dict[str, Path]) -> str:
    """A path inside a volume target, as the host directory standing in for it."""
    for target, host in mounts.items():
        if value == target or value.startswith(target + "/"):
            return str(host) + value[len(target):]
    return value


def python_argv(argv: list[str]) -> list[str]:
    return [PYTHON, *argv[1:]] if argv and argv[0] in ("python", "python3") else argv


class Lab:
    """The services of the compose file, each in its own network namespace."""

    def __init__(self, tmp: Path, *, profile: str | None = None, only: tuple[str, ...] = ()) -> None:
        """Every service a plain ``up`` starts, plus those of ``profile``; with
        ``only``, just those services."""
        self.tmp = tmp
        self.tag = secrets.token_hex(3)
        self.compose = load_compose(profiles=profile is not None)
        self.compose["services"] = {
            name: spec for name, spec in self.compose["services"].items()
            if (not spec.get("profiles") or profile in spec["profiles"]) and (not only or name in only)}
        self.waves = start_waves(self.compose["services"])
        self.services: dict[str, Service] = {}
        self.bridge = f"p2b{self.tag}"
        self.veths: list[str] = []
        self.namespaces: list[str] = []
        self.netns_dirs: list[Path] = []
        self.created_etc_netns = False
        self.prefix = ""
        self.started: list[Service] = []
        base_env = dockerfile_env()
        default_cmd = exec_form(dockerfile_instruction("CMD"))
        for index, (name, spec) in enumerate(self.compose["services"].items()):
            data = tmp / name
            mounts = {target: data / source for source, target in volume_targets(spec)}
            for host in mounts.values():
                host.mkdir(parents=True, exist_ok=True)
            env = {
                "PATH": f"{Path(PYTHON).parent}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                "HOME": str(data), "LANG": "C.UTF-8",
                **base_env,
                **{str(k): str(v) for k, v in (spec.get("environment") or {}).items()},
            }
            env = {k: translate(v, mounts) for k, v in env.items()}
            command = spec.get("command") or default_cmd
            assert isinstance(command, list), f"{name}: keep command in exec form (a list)"
            argv = [translate(str(a), mounts) for a in command]
            cwd = ROOT
            if spec.get("build") == GRAPE_BUILD:
                # the grape image's ENTRYPOINT, from tests/interop's node_modules (the same
                # pinned packages: TestGrapeImage checks both lock files agree)
                entry = exec_form(dockerfile_instruction("ENTRYPOINT", ROOT / GRAPE_BUILD / "Dockerfile"))
                argv, cwd = [*entry, *argv], INTEROP
            if name in TRADERS:
                argv += ["--seconds", str(TRADE_SECONDS)]
            hc = spec.get("healthcheck") or {}
            test = list(hc.get("test") or [])
            if test and test[0] == "CMD":
                health = python_argv(test[1:])
            elif test and test[0] == "CMD-SHELL":
                health = ["sh", "-c", test[1]]
            else:
                raise AssertionError(f"{name}: healthcheck test must be CMD or CMD-SHELL")
            self.services[name] = Service(
                name=name, index=index, argv=python_argv(argv), env=env, health=health,
                health_interval=seconds_of(hc.get("interval"), 30.0),
                health_timeout=seconds_of(hc.get("timeout"), 30.0),
                health_retries=int(hc.get("retries", 3)),
                start_period=seconds_of(hc.get("start_period"), 0.0),
                depends=depends_on(spec), log_path=tmp / f"{name}.log", cwd=cwd,
                shares=str(spec.get("network_mode", "")).removeprefix("service:"),
            )

    # -- network ----------------------------------------------------------------------

    def build_network(self) -> None:
        self.prefix = free_subnet()
        run("ip", "link", "add", self.bridge, "type", "bridge")
        self.veths.append(self.bridge)
        run("ip", "addr", "add", f"{self.prefix}.1/24", "dev", self.bridge)
        run("ip", "link", "set", self.bridge, "up")
        for svc in self.services.values():
            svc.ip = f"{self.prefix}.{10 + svc.index}"
        etc_netns = Path("/etc/netns")
        if not etc_netns.exists():
            etc_netns.mkdir()
            self.created_etc_netns = True
        for svc in self.services.values():
            if svc.shares:
                continue
            svc.ns = f"p2pex-{self.tag}-{svc.name}"
            run("ip", "netns", "add", svc.ns)
            self.namespaces.append(svc.ns)
            host_end, ns_end = f"p2v{self.tag}{svc.index}", f"p2c{self.tag}{svc.index}"
            run("ip", "link", "add", host_end, "type", "veth", "peer", "name", ns_end)
            self.veths.insert(0, host_end)
            run("ip", "link", "set", ns_end, "netns", svc.ns)
            run("ip", "link", "set", host_end, "master", self.bridge)
            run("ip", "link", "set", host_end, "up")
            run("ip", "-n", svc.ns, "link", "set", "lo", "up")
            run("ip", "-n", svc.ns, "link", "set", ns_end, "name", "eth0")
            run("ip", "-n", svc.ns, "addr", "add", f"{svc.ip}/24", "dev", "eth0")
            run("ip", "-n", svc.ns, "link", "set", "eth0", "up")
            conf = etc_netns / svc.ns
            conf.mkdir()
            self.netns_dirs.append(conf)
        for svc in self.services.values():
            if svc.shares:
                host = self.services[svc.shares]
                svc.ns, svc.ip = host.ns, host.ip
        self.write_hosts()

    def write_hosts(self) -> None:
        """Name the started services in every namespace's /etc/hosts, as Docker's DNS
        does: a service's name resolves once its container runs.  Rewritten in
        place (same inode), so processes that have it bind-mounted see the change."""
        hosts = "127.0.0.1 localhost\n::1 localhost ip6-localhost ip6-loopback\n" + "".join(
            f"{s.ip} {s.name}\n" for s in self.started if not s.shares)
        for conf in self.netns_dirs:
            with open(conf / "hosts", "r+" if (conf / "hosts").exists() else "w") as f:
                f.seek(0)
                f.write(hosts)
                f.truncate()

    # -- processes ----------------------------------------------------------------------

    def start(self, svc: Service) -> None:
        self.started.append(svc)
        self.write_hosts()
        with open(svc.log_path, "wb") as log:
            svc.proc = subprocess.Popen(
                ["ip", "netns", "exec", svc.ns, *svc.argv], cwd=svc.cwd, env=svc.env,
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    def wait_healthy(self, svc: Service) -> float:
        """Run the compose healthcheck in the service's namespace until it passes."""
        start = time.monotonic()
        bound = min(HEALTH_TIMEOUT_S, svc.start_period + svc.health_interval * (svc.health_retries + 1))
        while True:
            assert svc.proc is not None
            if svc.proc.poll() is not None:
                raise AssertionError(f"{svc.name} exited with status {svc.proc.returncode} before healthy")
            try:
                probe = subprocess.run(
                    ["ip", "netns", "exec", svc.ns, *svc.health], cwd=ROOT, env=svc.env,
                    capture_output=True, timeout=svc.health_timeout, check=False)
                if probe.returncode == 0:
                    svc.healthy = True
                    return time.monotonic() - start
            except subprocess.TimeoutExpired:
                pass
            if time.monotonic() - start > bound:
                raise AssertionError(f"{svc.name} not healthy after {bound:.0f} s")
            time.sleep(min(svc.health_interval, 0.5))  # compose polls each interval; poll faster

    def up(self, *, any_order: bool = False) -> dict[str, float]:
        """Start every service in depends_on order, each once its dependencies are
        healthy; with ``any_order``, last wave first, a second apart, waiting for
        nothing (a restart policy or ``up --no-deps`` keeps no order, and a name
        resolves only once its service runs).  Seconds until each was healthy."""
        t0 = time.monotonic()
        times = {}
        if any_order:
            for wave in reversed(self.waves):
                for name in wave:
                    self.start(self.services[name])
                time.sleep(ANY_ORDER_STAGGER_S)
        for wave in self.waves:
            for name in wave:
                svc = self.services[name]
                if not any_order:
                    for dep, cond in svc.depends.items():
                        assert cond == "service_healthy" and self.services[dep].healthy, (name, dep)
                    self.start(svc)
            for name in wave:
                self.wait_healthy(self.services[name])
                times[name] = round(time.monotonic() - t0, 2)
        return times

    def docker_stop(self, svc: Service) -> int:
        """SIGTERM to the main process, as `docker stop` does; its exit status."""
        assert svc.proc is not None
        with contextlib.suppress(ProcessLookupError):
            svc.proc.send_signal(signal.SIGTERM)
        status = svc.proc.wait(timeout=STOP_TIMEOUT_S)
        svc.stopped_status = status
        return status

    def group_alive(self, svc: Service) -> bool:
        assert svc.proc is not None
        try:
            os.killpg(svc.proc.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True

    # -- teardown -------------------------------------------------------------------------

    def kill_all(self) -> None:
        """SIGTERM every process group we started, then SIGKILL what is left."""
        for sig, grace in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
            alive = [s for s in reversed(self.started) if s.proc is not None and self.group_alive(s)]
            for svc in alive:
                assert svc.proc is not None
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(svc.proc.pid, sig)
            deadline = time.monotonic() + grace
            for svc in alive:
                assert svc.proc is not None
                with contextlib.suppress(subprocess.TimeoutExpired):
                    svc.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
                while self.group_alive(svc) and time.monotonic() < deadline:
                    time.sleep(0.05)

    def close(self) -> None:
        try:
            self.kill_all()
        finally:
            for link in self.veths:  # host ends first, then the bridge
                quiet("ip", "link", "del", link)
            for ns in self.namespaces:
                quiet("ip", "netns", "del", ns)
            for conf in self.netns_dirs:
                shutil.rmtree(conf, ignore_errors=True)
            if self.created_etc_netns:
                with contextlib.suppress(OSError):
                    Path("/etc/netns").rmdir()

    # -- observing ----------------------------------------------------------------------

    def get(self, svc: Service, path: str) -> Any:
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        with opener.open(svc.url + path, timeout=HTTP_TIMEOUT_S) as resp:
            return json.loads(resp.read())

    def statuses(self, names: tuple[str, ...] = NODES) -> dict[str, dict[str, Any]]:
        out = {}
        for name in names:
            try:
                out[name] = self.get(self.services[name], "/v1/status")
            except (urllib.error.URLError, OSError, ValueError):
                continue
        return out

    def check_alive(self) -> None:
        for svc in self.started:
            assert svc.proc is not None
            if svc.stopped_status is None and svc.proc.poll() is not None:
                raise AssertionError(f"{svc.name} exited with status {svc.proc.returncode}")

    def wait_for(self, what: str, timeout: float, check: Callable[[], T | None], interval: float = 0.3) -> T:
        deadline = time.monotonic() + timeout
        while True:
            self.check_alive()
            result = check()
            if result:
                return result
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
            time.sleep(interval)

    def log_tails(self, lines: int = 25) -> str:
        out = []
        for svc in self.services.values():
            try:
                text = svc.log_path.read_text(errors="replace").splitlines()[-lines:]
            except OSError:
                text = ["(no log)"]
            out.append(f"---- {svc.name} ({svc.ns} {svc.ip}) last {lines} log lines ----")
            out.extend(text)
        return "\n".join(out)


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[Lab]:
    reason = netns_unavailable()
    if reason:
        pytest.skip(reason)
    lab = Lab(tmp_path)
    try:
        lab.build_network()
        yield lab
    finally:
        lab.close()


class TestComposeRehearsal:
    def test_compose_network_trades_converges_and_stops_cleanly(self, lab: Lab) -> None:
        self.rehearse(lab, any_order=False)

    def test_start_order_does_not_matter(self, lab: Lab) -> None:
        """Traders first, seeds last, nobody waiting: the same network still forms."""
        self.rehearse(lab, any_order=True)

    def rehearse(self, lab: Lab, *, any_order: bool) -> None:
        t0 = time.monotonic()
        try:
            self.play(lab, t0, any_order=any_order)
        except BaseException:
            print(lab.log_tails())
            raise
        print(f"rehearsal took {time.monotonic() - t0:.1f} s")

    def play(self, lab: Lab, t0: float, *, any_order: bool) -> None:
        healthy_at = lab.up(any_order=any_order)
        print(f"healthy after (s): {healthy_at}")
        def answering() -> dict[str, dict[str, Any]] | None:
            sts = lab.statuses()
            return sts if len(sts) == len(NODES) else None

        statuses = lab.wait_for("every node to answer /v1/status", 10.0, answering)
        urls = {name: f"http://{name}:7001" for name in NODES}
        for name, st in statuses.items():
            assert st["url"] == urls[name], "a node advertises its service name"
            assert st["trading"] is (name not in SEEDS)

        def spread() -> dict[str, dict[str, Any]] | None:
            sts = lab.statuses()
            if len(sts) < len(NODES):
                return None
            # the traders are participants: members carry their orders, and every node matches them
            if any(sts[t]["finality"]["tickets"]["carried"] <= 0 for t in TRADERS):
                return None
            for name, st in sts.items():
                owners = {(st["finality"]["role"], name in TRADERS)}
                assert owners <= {("participant", True), ("member", False)}, (name, owners)
                if st["counts"]["fills"] <= 0:
                    return None
                peers = {p["url"]: p["state"] for p in st["peers"]}
                # never an IP, 0.0.0.0 or a loopback: only the service names
                assert set(peers) <= set(urls.values()) - {urls[name]}, (name, peers)
                if len(peers) < len(NODES) - 1 or any(state != "up" for state in peers.values()):
                    return None
            return sts

        lab.wait_for("both traders' orders and fills on every node, full mesh by name", SPREAD_TIMEOUT_S, spread)
        print(f"orders of both traders and fills on all {len(NODES)} nodes after {time.monotonic() - t0:.1f} s")

        # what Prometheus would scrape: every node's /metrics parses
        for name in NODES:
            opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
            with opener.open(lab.services[name].url + "/metrics", timeout=HTTP_TIMEOUT_S) as resp:
                families = {f.name for f in text_string_to_metric_families(resp.read().decode())}
            assert {"p2pex_orders", "p2pex_fills", "p2pex_peers", "p2pex_http_requests"} <= families, name

        # the client, from the "host" (the root namespace), like `cli.py status --node http://localhost:7101`
        out = subprocess.run(
            [PYTHON, "cli.py", "status", "--json", "--node", lab.services["exchange1"].url],
            cwd=ROOT, capture_output=True, text=True, timeout=30, check=False,
            env={k: v for k, v in os.environ.items() if "proxy" not in k.lower()})
        assert out.returncode == 0, out.stderr
        assert json.loads(out.stdout)["name"] == "exchange1"

        def trade_reports() -> dict[str, dict[str, int]] | None:
            reports = {}
            for name in TRADERS:
                found = re.search(r"^seed=\d+ submitted=(\d+) .*errors=(\d+)", lab.services[name].log_path.read_text(),
                                  re.MULTILINE)
                if not found:
                    return None
                reports[name] = {"submitted": int(found.group(1)), "errors": int(found.group(2))}
            return reports

        reports = lab.wait_for("the traders to finish trading", TRADE_END_TIMEOUT_S, trade_reports, interval=0.5)
        for name, rep in reports.items():
            assert rep["submitted"] > 0, (name, rep)
            assert rep["errors"] <= rep["submitted"] // 10, (name, rep)
        t_quiet = time.monotonic()

        def converged() -> dict[str, dict[str, Any]] | None:
            sts = lab.statuses()
            hashes = {st["state_hash"] for st in sts.values()}
            return sts if len(sts) == len(NODES) and len(hashes) == 1 else None

        final = lab.wait_for("equal state hashes on all six nodes", QUIESCE_TIMEOUT_S, converged)
        print(f"converged {time.monotonic() - t_quiet:.1f} s after trading stopped; trader reports {reports}")
        ref = final["exchange1"]
        for name, st in final.items():
            assert st["version_vector"] == ref["version_vector"], name
            assert st["counts"]["fills"] == ref["counts"]["fills"] > 0, name
        for name in TRADERS:
            own = final[name]["counts"]["own_orders"]
            rep = reports[name]
            # every accepted order was carried for the trader (a timed-out submit may have been too)
            assert rep["submitted"] <= own <= rep["submitted"] + rep["errors"], (name, own, rep)

        # docker stop, traders first: SIGTERM to the main process; the trader stops its node
        for name in (*TRADERS, *EXCHANGES, *reversed(SEEDS)):
            svc = lab.services[name]
            status = lab.docker_stop(svc)
            assert status == 0, f"{name} exited with status {status} on SIGTERM"
            deadline = time.monotonic() + 5.0
            while lab.group_alive(svc) and time.monotonic() < deadline:
                time.sleep(0.05)
            assert not lab.group_alive(svc), f"{name} left a process behind after SIGTERM"


GRENACHE_LAB = (*SEEDS, *EXCHANGES, "grape1", "grape2")
GRENACHE_SERVICE = "exchange_service"


def grape_post(url: str, path: str, data: Any) -> Any:
    body = json.dumps({"rid": secrets.token_hex(8), "data": data}).encode()
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(urllib.request.Request(url + path, data=body, method="POST"), timeout=HTTP_TIMEOUT_S) as resp:
        return json.loads(resp.read())


class TestGrenacheProfileRehearsal:
    def test_a_grenache_client_finds_both_exchanges_through_either_grape(self, tmp_path: Path) -> None:
        """The seeds, the exchanges and the profile's grapes; from the host, the
        stock Node client looks exchange_service up through a grape and reads
        the book of both exchanges, holding an order placed through the API."""
        npm_ready()
        reason = netns_unavailable()
        if reason:
            pytest.skip(reason)
        lab = Lab(tmp_path, profile="grenache", only=GRENACHE_LAB)
        try:
            lab.build_network()
            lab.up()
            self.play(lab)
        except BaseException:
            print(lab.log_tails())
            raise
        finally:
            lab.close()

    def play(self, lab: Lab) -> None:
        exchanges = {f"{lab.services[e].ip}:{lab.services[e].env['P2PEX_PORT']}" for e in EXCHANGES}
        grapes = [f"http://{lab.services[g].ip}:{option(lab.services[g].argv, '--aph')}" for g in ("grape1", "grape2")]

        def found() -> bool:
            try:
                return all(set(grape_post(url, "/lookup", GRENACHE_SERVICE)) == exchanges for url in grapes)
            except (urllib.error.URLError, OSError, ValueError, TypeError):
                return False

        lab.wait_for(f"{GRENACHE_SERVICE} at both exchanges in a lookup on either grape", SPREAD_TIMEOUT_S, found)
        for name in EXCHANGES:
            st = lab.get(lab.services[name], "/v1/status")["grenache"]
            assert st["announces"] > 0 and not st["failing"], (name, st)

        cookie = lab.tmp / "exchange1" / "exchange1-data" / ".cookie"
        placed = subprocess.run(
            [PYTHON, "cli.py", "order", "buy", "3@9001", "--node", lab.services["exchange1"].url,
             "--token", cookie.read_text().strip(), "--json"],
            cwd=ROOT, capture_output=True, text=True, timeout=30, check=False,
            env={k: v for k, v in os.environ.items() if "proxy" not in k.lower()})
        assert placed.returncode == 0, placed.stderr

        def books() -> list[Any] | None:
            argv = ["node", str(INTEROP / "client.js"), "--grape", grapes[1], "--service", GRENACHE_SERVICE,
                    "--mode", "map", "--timeout", "5000", json.dumps({"action": "getOrderbook", "data": {}})]
            done = subprocess.run(argv, cwd=INTEROP, capture_output=True, text=True, timeout=30, check=False)
            assert done.returncode == 0, done.stderr
            reply = json.loads(done.stdout.strip().splitlines()[-1])
            if not reply["ok"]:
                return None
            holding = [r for r in reply["result"]
                       if any(level["price"] == 9001 and level["amount"] == 3 for level in r["state"]["buyOrders"])]
            return reply["result"] if len(holding) == len(EXCHANGES) else None

        replies = lab.wait_for("the order in the book of both exchanges, read through Grenache", 20.0, books,
                               interval=1.0)
        assert all(r["status"] == "success" for r in replies)


# ---- the trader service's command, outside namespaces ----------------------------------------


class TestTraderCommand:
    def test_trader_runs_its_node_trades_and_stops_both_on_sigterm(self, tmp_path: Path) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("P2PEX_") and "proxy" not in k.lower()}
        env.update(P2PEX_HOST="127.0.0.1", P2PEX_PORT=str(free_port()), P2PEX_DATA_DIR=str(tmp_path / "data"),
                   P2PEX_NAME="solo")
        log = tmp_path / "trader.log"
        with open(log, "wb") as out:
            proc = subprocess.Popen(
                [PYTHON, "cli.py", "trade", "--with-node", "--rate", "20", "--seconds", "1.5", "--seed", "7",
                 "--json"], cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True)
        try:
            deadline = time.monotonic() + 30
            while "trading done" not in log.read_text() and time.monotonic() < deadline:
                assert proc.poll() is None, log.read_text()
                time.sleep(0.1)
            assert "trading done" in log.read_text()
            assert proc.poll() is None, "the node keeps serving after --seconds"
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=STOP_TIMEOUT_S) == 0, log.read_text()
            time.sleep(0.2)
            with pytest.raises(ProcessLookupError):
                os.killpg(proc.pid, 0)  # the node child is gone too
            text = log.read_text()
            stats = json.loads(next(line for line in text.splitlines() if line.startswith("{")))
            assert stats["seed"] == 7 and stats["submitted"] > 0 and stats["errors"] == 0, stats
            assert stats["submitted"] == stats["gtc"] + stats["ioc"] + stats["market"]
            assert "node stopped (status 0)" in text
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)

    def test_trader_gives_up_after_wait_ready(self, tmp_path: Path) -> None:
        port = free_port()
        started = time.monotonic()
        out = subprocess.run(
            [PYTHON, "cli.py", "trade", "--node", f"http://127.0.0.1:{port}", "--wait-ready", "1.5",
             "--data-dir", str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=30, check=False)
        assert out.returncode == 1
        assert f"node at http://127.0.0.1:{port} not ready after 1.5 s" in out.stderr
        assert time.monotonic() - started < 15
