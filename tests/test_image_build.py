"""The image ``docker build .`` makes, built and started without a Docker engine.

The test machines run no Docker daemon and reach no container registry (the
base image cannot be pulled), so this module builds what Docker would build,
with the rules of tests/dockerbuild.py:

- the build context: the repository through ``.dockerignore``; every ``COPY``
  source must be in it (a source the rules leave out fails the build, and
  the failure names it), and what ``COPY`` lays out in WORKDIR must hold the
  packages pyproject installs and every first-party module ``cli.py`` reaches;
- the ``RUN`` line, step by step, from that layout: a fresh venv made by this
  interpreter stands for the base image's Python, ``pip install .`` runs with
  it in the WORKDIR stand-in, then ``rm -rf build *.egg-info``.  The
  ``useradd``, ``mkdir /data`` and ``chown`` steps are skipped: they need
  root and would change this machine; the node gets a temporary
  ``P2PEX_DATA_DIR`` instead of ``/data`` and runs as the current user;
- the image's ``CMD`` with the image's ``ENV`` (``P2PEX_HOST``,
  ``P2PEX_PORT`` and ``P2PEX_DATA_DIR`` pointed at 127.0.0.1, a free port
  and a temporary directory), from the venv, in the WORKDIR stand-in, until
  the ``HEALTHCHECK`` command passes within the bound the Dockerfile states;
  then SIGTERM by pid, as ``docker stop`` does, and exit status 0;
- the compose traders' command (``cli.py trade --with-node``) from the same
  image, and the installed project imported from outside WORKDIR.

Not covered: the base image itself (its Debian and its Python: this
interpreter's version is used), file ownership and the non-root ``USER``
(in their place, the processes get the user's HOME, WORKDIR, and must write
nothing under WORKDIR, which belongs to root in the image), Docker's layer
cache.  Where a Docker engine answers, ``.ci/run`` builds the real image as
well.

``pip install .`` needs the package index (or pip's cache): when it cannot
reach it, the build tests skip with the reason, except under ``CI=true``,
where they fail.  The venv and the install take about 15 s.
"""

from __future__ import annotations

import ast
import contextlib
import glob
import importlib.metadata
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import tomllib
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import pytest

from tests.dockerbuild import (
    BuildContext,
    BuildError,
    Dockerfile,
    Step,
    image_path,
    layout_image,
    run_steps,
)
from tests.nodes import free_port

# TestImage builds the image once for the class (a class-scoped fixture): one test worker runs it all.
pytestmark = pytest.mark.xdist_group("test_image_build")

ROOT = Path(__file__).resolve().parent.parent
ENTRY = "cli"  # the module every command of the image runs: python cli.py ...
VENV_TIMEOUT_S = 120.0
PIP_TIMEOUT_S = 300.0
INDEX_PROBE_TIMEOUT_S = 15.0
STOP_GRACE_S = 10.0  # docker stop's default before SIGKILL
TRADE_SECONDS = "1.5"  # appended to the traders' command, so trading ends on its own
TRADE_TIMEOUT_S = 60.0
SYSTEM_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# what pip prints when it cannot reach its index
NETWORK_TROUBLE = (
    "NewConnectionError", "ConnectTimeoutError", "Failed to establish a new connection",
    "Temporary failure in name resolution", "Name or service not known", "Network is unreachable",
    "No route to host", "ProxyError", "connection broken by", "Read timed out",
)


def unavailable(reason: str) -> NoReturn:
    """Skip, with the reason; under CI=true fail instead: CI must build the image."""
    if os.environ.get("CI") == "true":
        pytest.fail(f"{reason} (CI=true: the image must be built here, not skipped)")
    pytest.skip(reason)


# ---- what cli.py reaches ----------------------------------------------------------


def module_file(root: Path, name: str) -> Path | None:
    base = root.joinpath(*name.split("."))
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


def first_party_modules(root: Path, entry: str = ENTRY) -> set[str]:
    """Every module under ``root`` that ``entry`` imports, directly or not, at the
    top or inside a function (whatever may run in the image), with its packages."""
    seen: set[str] = set()
    todo = [entry]
    while todo:
        name = todo.pop()
        path = module_file(root, name)
        if name in seen or path is None:
            continue  # the standard library or a dependency
        seen.add(name)
        parts = name.split(".")
        todo.extend(".".join(parts[:i]) for i in range(1, len(parts)))
        package = name if path.name == "__init__.py" else ".".join(parts[:-1])
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                todo.extend(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    anchor = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1])
                    base = ".".join(p for p in (anchor, node.module or "") if p)
                else:
                    base = node.module or ""
                todo.append(base)
                todo.extend(f"{base}.{alias.name}" for alias in node.names)  # submodules, where they are
    return seen


def pyproject() -> dict[str, Any]:
    with open(ROOT / "pyproject.toml", "rb") as f:
        return tomllib.load(f)


def lay_out(dockerfile: Dockerfile, context: BuildContext, tmp: Path) -> Path:
    """The context in ``tmp/context``, COPY's result in ``tmp/image`` (returned, standing
    for the image's ``/``); a clear failure where ``docker build`` would stop."""
    try:
        layout_image(dockerfile, context, context.materialize(tmp / "context"), tmp / "image")
        return tmp / "image"
    except BuildError as exc:
        error = str(exc)
    pytest.fail(f"docker build would fail: {error}")


# ---- the static part: context, COPY, pyproject --------------------------------------


class TestBuildContext:
    def test_every_copy_source_is_in_the_build_context(self) -> None:
        context = BuildContext.scan(ROOT)
        missing = []
        for copy in Dockerfile.read(ROOT).copies:
            for source in copy.sources:
                try:
                    context.resolve(source, instruction=f"{copy.text} (Dockerfile line {copy.line})")
                except BuildError as exc:
                    missing.append(str(exc))
        assert not missing, "docker build would fail:\n" + "\n".join(missing)

    def test_the_context_leaves_out_caches_and_local_state(self) -> None:
        context = BuildContext.scan(ROOT)
        bad = [p for p in context.files
               if "__pycache__" in p.split("/") or p.endswith(".pyc")
               or p.split("/")[0] in (".git", ".venv", "data", "logs", "build") or ".egg-info" in p]
        assert not bad, f"the build context holds {bad[:10]}"

    def test_pyproject_installs_every_package_cli_reaches(self) -> None:
        setuptools = pyproject()["tool"]["setuptools"]
        reached = first_party_modules(ROOT)
        packages = {m for m in reached if module_file(ROOT, m) == ROOT.joinpath(*m.split("."), "__init__.py")}
        modules = {m for m in reached if "." not in m and m not in packages}
        assert packages <= set(setuptools["packages"]), (
            f"pyproject's [tool.setuptools] packages lacks {sorted(packages - set(setuptools['packages']))}")
        assert modules <= set(setuptools.get("py-modules", [])), (
            f"pyproject's [tool.setuptools] py-modules lacks {sorted(modules - set(setuptools['py-modules']))}")
        assert {"cli", "client", "crdt", "matching", "net", "net.trader"} <= reached  # the reader works

    def test_copy_puts_every_module_cli_reaches_and_the_web_page_in_workdir(self, tmp_path: Path) -> None:
        dockerfile = Dockerfile.read(ROOT)
        context = BuildContext.scan(ROOT)
        lay_out(dockerfile, context, tmp_path)
        app = image_path(tmp_path / "image", dockerfile.workdir)
        missing = sorted(m for m in first_party_modules(ROOT) if module_file(app, m) is None)
        assert not missing, f"WORKDIR {dockerfile.workdir} lacks {missing}"
        for package, patterns in pyproject()["tool"]["setuptools"]["package-data"].items():
            for pattern in patterns:
                assert glob.glob(pattern, root_dir=app / package), f"no {package}/{pattern} in WORKDIR"

    def test_base_image_python_is_one_the_project_supports(self) -> None:
        from packaging.specifiers import SpecifierSet

        found = re.fullmatch(r"python:(\d+\.\d+)(?:[.-].*)?", Dockerfile.read(ROOT).base)
        assert found, "the image builds on an official python:X.Y image"
        assert found.group(1) in SpecifierSet(pyproject()["project"]["requires-python"])

    def test_the_data_dir_the_env_names_is_the_one_run_prepares_for_the_user(self) -> None:
        dockerfile = Dockerfile.read(ROOT)
        skipped = [step for run in dockerfile.runs for step in run_steps(run) if step.action == "skip"]
        chowned = [step.argv for step in skipped if step.argv[0] == "chown"]
        assert chowned, "RUN hands a data directory to the image's user"
        owner, target = chowned[-1][-2:]
        assert target == dockerfile.env["P2PEX_DATA_DIR"]
        assert owner.split(":")[0] == dockerfile.user != "root"


# ---- the build --------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Image:
    """The built image: ``root`` stands for its ``/``, ``app`` for WORKDIR, ``venv``
    for the base image's Python with the project installed."""

    dockerfile: Dockerfile
    root: Path
    app: Path
    venv: Path
    home: Path
    layout: tuple[str, ...]  # WORKDIR's content as COPY left it
    skipped: tuple[Step, ...]
    build_s: float

    @property
    def python(self) -> Path:
        return self.venv / "bin" / "python"

    def env(self, *, port: int, data_dir: Path) -> dict[str, str]:
        """A container's environment: the image's ENV (and no variable of the caller),
        with the address, port and data dir overridden."""
        return {
            "PATH": f"{self.venv / 'bin'}{os.pathsep}{SYSTEM_PATH}", "HOME": str(self.home), "LANG": "C.UTF-8",
            **self.dockerfile.env,
            "P2PEX_HOST": "127.0.0.1", "P2PEX_PORT": str(port), "P2PEX_DATA_DIR": str(data_dir),
        }


def tree(path: Path) -> tuple[str, ...]:
    return tuple(sorted(p.relative_to(path).as_posix() for p in path.rglob("*")))


def run_checked(argv: list[str], *, what: str, cwd: Path, env: dict[str, str], timeout: float) -> None:
    try:
        proc = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        unavailable(f"{what} took over {timeout:.0f} s")
    if proc.returncode == 0:
        return
    output = proc.stdout + proc.stderr
    if "ensurepip" in output:
        unavailable(f"{what}: this Python cannot make a venv with pip (install python3-venv)")
    if any(marker in output for marker in NETWORK_TROUBLE):
        unavailable(f"{what} cannot reach the package index: {output.strip().splitlines()[-1]}")
    pytest.fail(f"{what} failed with status {proc.returncode}:\n{output[-4000:]}")


def index_unreachable(python: Path, env: dict[str, str]) -> str | None:
    """Why pip's package index cannot be reached from here, or None when it answers
    (any HTTP status counts as an answer)."""
    listed = subprocess.run([str(python), "-m", "pip", "config", "list"], env=env, capture_output=True, text=True,
                            timeout=60, check=False).stdout
    urls = dict(re.findall(r"^(:env:|install|global)\.index-url='([^']*)'", listed, re.MULTILINE))
    url = next((urls[k] for k in (":env:", "install", "global") if k in urls), "https://pypi.org/simple")
    try:
        with urllib.request.urlopen(url.rstrip("/") + "/setuptools/", timeout=INDEX_PROBE_TIMEOUT_S):
            return None
    except urllib.error.HTTPError:
        return None
    except (OSError, ValueError) as exc:
        return f"pip install . needs the package index {url}, which does not answer here: {exc}"


def build_env(venv: Path, run_env: dict[str, str]) -> dict[str, str]:
    """The environment of a RUN step: the caller's (its proxies, package index and
    certificates are what reach the network here), then the Dockerfile's ENV in
    effect at that RUN, with the venv first on PATH."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("P2PEX_")}
    # the image keeps no pip cache (PIP_NO_CACHE_DIR) to stay small; the rehearsal uses it to stay fast
    env.update({k: v for k, v in run_env.items() if k != "PIP_NO_CACHE_DIR"})
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', SYSTEM_PATH)}"
    env["VIRTUAL_ENV"] = str(venv)
    return env


def make_venv(venv: Path, tmp: Path) -> list[str]:
    """A fresh venv (no system site-packages) made by this interpreter; returns how to
    run pip for it.  With pip 22.3 or later this interpreter's pip serves the venv
    (``pip --python``), which spares the venv a pip of its own (ensurepip takes
    seconds); else the venv gets its own."""
    with contextlib.suppress(importlib.metadata.PackageNotFoundError, ValueError):
        if tuple(int(x) for x in importlib.metadata.version("pip").split(".")[:2]) >= (22, 3):
            run_checked([sys.executable, "-m", "venv", "--without-pip", str(venv)], what="python -m venv",
                        cwd=tmp, env=dict(os.environ), timeout=VENV_TIMEOUT_S)
            return [sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python")]
    run_checked([sys.executable, "-m", "venv", str(venv)], what="python -m venv", cwd=tmp, env=dict(os.environ),
                timeout=VENV_TIMEOUT_S)
    return [str(venv / "bin" / "python"), "-m", "pip"]


def home_dir(root: Path, skipped: list[Step]) -> Path | None:
    """The image user's home as its useradd step sets it (Docker gives USER that HOME)."""
    for step in skipped:
        if step.argv[0] == "useradd":
            for flag in ("--home-dir", "-d"):
                if flag in step.argv[:-1]:
                    return image_path(root, step.argv[step.argv.index(flag) + 1])
    return None


def build_image(tmp: Path) -> Image:
    started = time.monotonic()
    dockerfile = Dockerfile.read(ROOT)
    context = BuildContext.scan(ROOT)
    root = lay_out(dockerfile, context, tmp)
    app = image_path(root, dockerfile.workdir)
    layout = tree(app)
    steps = [(run, run_steps(run)) for run in dockerfile.runs]  # refuses a step it cannot vouch for, first
    venv = tmp / "python"  # outside WORKDIR, as the base image's /usr/local is
    if any(step.action == "pip-install" for _, chain in steps for step in chain):
        trouble = index_unreachable(Path(sys.executable), build_env(venv, {}))
        if trouble:
            unavailable(trouble)
    pip = make_venv(venv, tmp)
    skipped: list[Step] = []
    for run, chain in steps:
        cwd = image_path(root, run.workdir)
        env = build_env(venv, dict(run.env))
        for step in chain:
            if step.action == "pip-install":
                args = step.argv[step.argv.index("install") + 1:]
                run_checked([*pip, "install", "-q", *args],
                            what=" ".join(step.argv), cwd=cwd, env=env, timeout=PIP_TIMEOUT_S)
            elif step.action == "remove":
                # the shell's globbing, inside WORKDIR only (run_steps refuses anything else)
                words = [w for arg in step.argv[1:] for w in (sorted(glob.glob(arg, root_dir=cwd)) or [arg])]
                run_checked(["rm", *words], what=" ".join(step.argv), cwd=cwd, env=env, timeout=30)
            else:
                skipped.append(step)
    home = home_dir(root, skipped) or tmp / "home"
    home.mkdir(parents=True, exist_ok=True)
    return Image(dockerfile=dockerfile, root=root, app=app, venv=venv, home=home, layout=layout,
                 skipped=tuple(skipped), build_s=time.monotonic() - started)


@pytest.fixture(scope="class")
def image(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Image]:
    tmp = tmp_path_factory.mktemp("image-build")
    try:
        built = build_image(tmp)
        print(f"image built in {built.build_s:.1f} s (context, layout, venv, pip install .); skipped RUN steps: "
              + "; ".join(f"{' '.join(s.argv)}: {s.why}" for s in built.skipped))
        yield built
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # the venv is large: do not leave it to pytest's retention


# ---- running it --------------------------------------------------------------------


@contextlib.contextmanager
def container(argv: list[str], *, image: Image, env: dict[str, str], log: Path) -> Iterator[subprocess.Popen[bytes]]:
    """``argv`` started as a container's main process: in WORKDIR, with ``env`` only;
    whatever is left of its process group is killed on the way out."""
    found = shutil.which(argv[0], path=env["PATH"])
    assert found and Path(found).parent == image.venv / "bin", f"{argv[0]} must be the image's Python, not {found}"
    with open(log, "wb") as out:
        proc = subprocess.Popen(argv, cwd=image.app, env=env, stdin=subprocess.DEVNULL, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
    try:
        yield proc
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


def wait_healthy(image: Image, proc: subprocess.Popen[bytes], env: dict[str, str], log: Path) -> float:
    """Run the HEALTHCHECK command until it passes.  Docker calls a container unhealthy
    once ``retries`` probes, ``interval`` apart, have failed after ``start-period``;
    this probes more often than every ``interval`` (finding a healthy node sooner)
    and gives up at that same bound."""
    hc = image.dockerfile.healthcheck
    assert hc is not None, "the Dockerfile has a HEALTHCHECK"
    bound = hc.start_period_s + hc.interval_s * hc.retries
    started = time.monotonic()
    probes, last = 0, ""
    while True:
        assert proc.poll() is None, f"exited with status {proc.returncode} before healthy:\n{log.read_text()[-3000:]}"
        probes += 1
        try:
            probe = subprocess.run(list(hc.command), cwd=image.app, env=env, capture_output=True, text=True,
                                   timeout=hc.timeout_s, check=False)
            if probe.returncode == 0:
                return time.monotonic() - started
            last = (probe.stderr.strip().splitlines() or ["(no output)"])[-1]
        except subprocess.TimeoutExpired:
            last = f"timed out after {hc.timeout_s} s"
        if time.monotonic() - started > bound:
            pytest.fail(f"not healthy within {bound:.0f} s ({probes} probes; last: {last}):\n{log.read_text()[-3000:]}")
        time.sleep(min(hc.interval_s, 0.25))


def docker_stop(proc: subprocess.Popen[bytes], log: Path, grace: float = STOP_GRACE_S) -> int:
    """SIGTERM to the main process by pid; its exit status within ``grace``."""
    os.kill(proc.pid, signal.SIGTERM)
    try:
        return proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        pytest.fail(f"still running {grace:.0f} s after SIGTERM:\n{log.read_text()[-3000:]}")


class TestImage:
    def test_run_leaves_workdir_as_copy_laid_it_out(self, image: Image) -> None:
        assert tree(image.app) == image.layout, "pip install . && rm -rf build *.egg-info leaves nothing behind"
        assert {s.argv[0] for s in image.skipped} <= {"useradd", "mkdir", "chown"}
        assert image.build_s < 120, f"the build took {image.build_s:.0f} s"

    def test_cmd_becomes_healthy_and_stops_on_sigterm(self, image: Image, tmp_path: Path) -> None:
        data = tmp_path / "data"
        data.mkdir()  # RUN's mkdir /data, for the stand-in
        env = image.env(port=free_port(), data_dir=data)
        log = tmp_path / "node.log"
        with container(list(image.dockerfile.cmd), image=image, env=env, log=log) as proc:
            healthy_s = wait_healthy(image, proc, env, log)
            status = docker_stop(proc, log)
        print(f"healthy after {healthy_s:.1f} s")
        assert status == 0, f"exit status {status} on SIGTERM:\n{log.read_text()[-3000:]}"
        assert any(data.iterdir()), "the node keeps its state in P2PEX_DATA_DIR"
        assert tree(image.app) == image.layout, "the node wrote into WORKDIR, read-only to its user"

    def test_the_traders_command_runs_from_the_image(self, image: Image, tmp_path: Path) -> None:
        yaml = pytest.importorskip("yaml", reason="PyYAML reads docker-compose.yml: pip install pyyaml")
        compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
        command = [str(a) for a in compose["services"]["trader1"]["command"]]
        assert command[:4] == ["python", "cli.py", "trade", "--with-node"], command
        data = tmp_path / "data"
        data.mkdir()
        port = free_port()
        env = image.env(port=port, data_dir=data)
        compose_port = image.dockerfile.env["P2PEX_PORT"]
        argv = [a.replace(f"127.0.0.1:{compose_port}", f"127.0.0.1:{port}") for a in command]
        argv += ["--seconds", TRADE_SECONDS]  # without a bootstrap: its node founds its own network
        log = tmp_path / "trader.log"
        with container(argv, image=image, env=env, log=log) as proc:
            deadline = time.monotonic() + TRADE_TIMEOUT_S
            while "trading done" not in log.read_text():
                assert proc.poll() is None, f"exited with status {proc.returncode}:\n{log.read_text()[-3000:]}"
                assert time.monotonic() < deadline, f"no 'trading done' after {TRADE_TIMEOUT_S:.0f} s:\n" + (
                    log.read_text()[-3000:])
                time.sleep(0.1)
            status = docker_stop(proc, log)
        text = log.read_text()
        assert status == 0, f"exit status {status} on SIGTERM:\n{text[-3000:]}"
        assert "node stopped (status 0)" in text, text[-3000:]
        found = re.search(r"^seed=\d+ submitted=(\d+) ", text, re.MULTILINE)
        assert found and int(found.group(1)) > 0, text[-3000:]
        assert tree(image.app) == image.layout, "the trader wrote into WORKDIR, read-only to its user"

    def test_the_installed_project_imports_from_outside_workdir(self, image: Image, tmp_path: Path) -> None:
        modules = sorted(first_party_modules(ROOT))
        code = ("import importlib, importlib.resources as r, sys\n"
                "for name in sys.argv[1:]: importlib.import_module(name)\n"
                "assert r.files('net').joinpath('web/index.html').is_file(), 'net/web is not installed'\n")
        # -I: neither the current directory nor PYTHON* variables on sys.path, only the install
        proc = subprocess.run([str(image.python), "-I", "-c", code, *modules], cwd=tmp_path,
                              env={"PATH": SYSTEM_PATH, "LANG": "C.UTF-8"}, capture_output=True, text=True,
                              timeout=60, check=False)
        assert proc.returncode == 0, f"pip install . does not install everything cli.py imports:\n{proc.stderr}"
