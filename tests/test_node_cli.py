"""CLI error handling: every failure of a client command is one clear line on
stderr and exit status 1, never a traceback.  Most cases call ``cli.main`` in
process; a few run ``python cli.py`` to check what a user actually sees, and a
few talk to one real node process.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

import cli
from tests.nodes import NodeProc, free_port, logs_on_failure, run_cli

# The tests of this module share its node processes (module-scoped fixtures): one test worker runs them all.
pytestmark = pytest.mark.xdist_group("test_node_cli")

CLIENT_COMMANDS = [
    ["status"], ["peers"], ["book"], ["fills"], ["show", "ab" * 32],
    ["order", "buy", "10@100"], ["order", "sell", "5", "--market"], ["cancel", "ab" * 32],
]


def one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got:\n{err}"
    assert lines[0].startswith("error: ") and "Traceback" not in err, err
    return lines[0]


@pytest.fixture
def dead_url() -> str:
    """A URL on 127.0.0.1 where nothing listens."""
    return f"http://127.0.0.1:{free_port()}"


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    """A data dir with a cookie but no node behind it."""
    d = tmp_path / "node"
    d.mkdir()
    (d / ".cookie").write_text("0" * 64)
    return d


class TestUnreachableNode:
    @pytest.mark.parametrize("command", CLIENT_COMMANDS, ids=lambda c: " ".join(c[:2]))
    def test_one_line_and_exit_1(self, command: list[str], dead_url: str, data_dir: Path,
                                 capsys: pytest.CaptureFixture[str]) -> None:
        rc = cli.main([*command, "--node", dead_url, "--data-dir", str(data_dir)])
        out, err = capsys.readouterr()
        assert rc == 1 and out == ""
        line = one_error_line(err)
        assert "python cli.py node" in line and dead_url in line, line

    def test_as_a_user_sees_it(self, dead_url: str, data_dir: Path) -> None:
        for json_flag in ([], ["--json"]):
            done = run_cli("order", "buy", "10@100", "--node", dead_url, "--data-dir", str(data_dir), *json_flag)
            assert done.returncode == 1 and done.stdout == ""
            assert "python cli.py node" in one_error_line(done.stderr)

    def test_default_url_from_the_endpoint_file(self, dead_url: str, data_dir: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
        (data_dir / "endpoint").write_text(dead_url + "\n")
        assert cli.main(["status", "--data-dir", str(data_dir)]) == 1
        line = one_error_line(capsys.readouterr().err)
        assert dead_url in line and "python cli.py node" in line

    def test_node_without_scheme(self, dead_url: str, capsys: pytest.CaptureFixture[str]) -> None:
        """Regression: ``--node 127.0.0.1:PORT`` failed with "unknown url type";
        a bare host:port now means http://host:port."""
        bare = dead_url.removeprefix("http://")
        assert cli.main(["status", "--node", bare]) == 1
        line = one_error_line(capsys.readouterr().err)
        assert "unknown url type" not in line and dead_url in line and "python cli.py node" in line

    def test_bad_url(self, capsys: pytest.CaptureFixture[str]) -> None:
        """Regression: an unparsable URL raised a traceback."""
        assert cli.main(["status", "--node", "http://[::1"]) == 1
        assert "bad node URL" in one_error_line(capsys.readouterr().err)


class TestOtherClientErrors:
    def test_no_cookie(self, tmp_path: Path, dead_url: str, capsys: pytest.CaptureFixture[str]) -> None:
        assert cli.main(["order", "buy", "1@1", "--node", dead_url, "--data-dir", str(tmp_path)]) == 1
        line = one_error_line(capsys.readouterr().err)
        assert ".cookie" in line and "--token" in line

    @pytest.mark.parametrize(("argv", "needle"), [
        (["order", "buy", "10@1.5"], "QTY@PRICE"),
        (["order", "buy", "3@"], "QTY@PRICE"),
        (["order", "buy", "10"], "needs a price"),
        (["order", "buy", "10@100", "--market"], "no price"),
    ])
    def test_bad_amount(self, argv: list[str], needle: str, dead_url: str, data_dir: Path,
                        capsys: pytest.CaptureFixture[str]) -> None:
        assert cli.main([*argv, "--node", dead_url, "--data-dir", str(data_dir)]) == 1
        assert needle in one_error_line(capsys.readouterr().err)

    def test_not_a_p2pex_node(self, capsys: pytest.CaptureFixture[str]) -> None:
        """Regression: a server answering 200 with something other than JSON gave a traceback."""

        class Html(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                body = b"<html>hello</html>"
                self.send_response(200)
                self.send_header("Content-Type", "text/html")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        server = ThreadingHTTPServer(("127.0.0.1", 0), Html)
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        try:
            url = f"http://127.0.0.1:{server.server_address[1]}"
            assert cli.main(["status", "--node", url]) == 1
            assert "did not answer with JSON" in one_error_line(capsys.readouterr().err)
        finally:
            server.shutdown()
            server.server_close()
            thread.join(5)


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeProc]:
    n = NodeProc(name="solo", port=free_port(), data_dir=tmp_path_factory.mktemp("cli") / "solo")
    try:
        yield n.start()
    finally:
        n.stop()


class TestErrorsFromANode:
    def test_http_errors_become_one_line(self, node: NodeProc, request: pytest.FixtureRequest) -> None:
        with logs_on_failure(request, [node]):
            d = str(node.data_dir)
            done = run_cli("cancel", "ab" * 32, "--node", node.url, "--data-dir", d)
            assert done.returncode == 1
            assert "unknown_order" in one_error_line(done.stderr) and "HTTP 404" in done.stderr
            done = run_cli("show", "xyz", "--node", node.url)
            assert done.returncode == 1 and "HTTP 400" in one_error_line(done.stderr)
            done = run_cli("order", "buy", "1@1", "--node", node.url, "--token", "wrong")
            assert done.returncode == 1 and "HTTP 401" in one_error_line(done.stderr)
            done = run_cli("order", "buy", f"{1 << 41}@1", "--node", node.url, "--data-dir", d)
            assert done.returncode == 1 and "bad_qty" in one_error_line(done.stderr)
            # the data dir alone finds the node (endpoint file) and its token (cookie)
            done = run_cli("order", "buy", "1@1", "--data-dir", d, "--json")
            assert done.returncode == 0, done.stderr

    def test_frozen_node_times_out_with_one_line(self, node: NodeProc, request: pytest.FixtureRequest) -> None:
        with logs_on_failure(request, [node]):
            node.freeze()
            try:
                done = run_cli("status", "--node", node.url, "--timeout", "1")
            finally:
                node.thaw()
            assert done.returncode == 1
            line = one_error_line(done.stderr)
            assert node.url in line and "timed out" in line
            assert node.status()["ready"]


class TestStraightAfterSetup:
    def test_interpreter_without_dependencies_gets_one_line(self, tmp_path: Path) -> None:
        """Regression: ``python cli.py node`` outside the virtualenv printed an
        ImportError traceback.  ``-S`` leaves site-packages (aiohttp...) out."""
        out = subprocess.run([sys.executable, "-S", str(cli.__file__), "node", "--data-dir", str(tmp_path / "d")],
                             capture_output=True, text=True, timeout=60, check=False)
        assert out.returncode == 1
        line = one_error_line(out.stderr)
        assert "make install" in line and "dependencies" in line, line

    def test_version(self, capsys: pytest.CaptureFixture[str]) -> None:
        with pytest.raises(SystemExit) as exc:
            cli.main(["--version"])
        assert exc.value.code == 0
        assert capsys.readouterr().out.startswith("p2pex 0.")


class TestEventLoop:
    """``--event-loop``: the node runs on uvloop where it is installed (``auto``),
    or on the loop asked for."""

    @staticmethod
    def _loop_module(choice: str) -> str:
        seen: list[str] = []

        async def main() -> None:
            seen.append(type(asyncio.get_running_loop()).__module__)

        cli.run_loop(main(), choice)
        return seen[0]

    def test_asyncio_runs_on_asyncio_s_own_loop(self) -> None:
        assert self._loop_module("asyncio").startswith("asyncio")

    def test_auto_and_uvloop_run_on_uvloop_where_it_is_installed(self) -> None:
        pytest.importorskip("uvloop")
        assert self._loop_module("auto").startswith("uvloop")
        assert self._loop_module("uvloop").startswith("uvloop")
