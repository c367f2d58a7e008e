"""The pure core (crdt/, matching/) must not reach for I/O, clocks or randomness."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FORBIDDEN = {
    "asyncio", "aiohttp", "kademlia", "socket", "sqlite3", "time", "random", "net",
    "tenacity", "os", "io", "pathlib", "subprocess", "threading", "datetime", "secrets",
    "selectors", "urllib", "http", "shutil", "tempfile",
}
PURE_FILES = sorted(p for pkg in ("crdt", "matching") for p in (ROOT / pkg).glob("*.py"))


def imported_roots(path: Path) -> set[str]:
    roots: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            roots.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            roots.add(node.module.split(".")[0])
        elif isinstance(node, ast.Call) and getattr(node.func, "id", None) == "__import__":
            roots.add("__import__")
    return roots


class TestPurity:
    def test_there_are_files_to_check(self) -> None:
        assert len(PURE_FILES) >= 6

    @pytest.mark.parametrize("path", PURE_FILES, ids=lambda p: f"{p.parent.name}/{p.name}")
    def test_no_io_clock_or_randomness(self, path: Path) -> None:
        bad = imported_roots(path) & (FORBIDDEN | {"__import__"})
        assert not bad, f"{path.name} imports {sorted(bad)}"

    def test_checker_catches_a_forbidden_import(self, tmp_path: Path) -> None:
        sample = tmp_path / "sample.py"
        sample.write_text("import os.path\nfrom time import monotonic\nfrom . import x\n")
        assert imported_roots(sample) & FORBIDDEN == {"os", "time"}


#: Every Python file of the project outside tests/ (the venv and caches left out).
OUTSIDE_TESTS = sorted(p for p in ROOT.rglob("*.py")
                       if not {"tests", ".venv", "build", "data", "logs"} & set(p.relative_to(ROOT).parts))


class TestOnlyTestsImportTests:
    """A helper shared by tests and code lives in the package that owns it
    (``matching.reference``, ``net.localnet``), never in tests/."""

    def test_there_are_files_to_check(self) -> None:
        assert any(p.parent.name == "benchmarks" for p in OUTSIDE_TESTS)
        assert any(p.parent.name == "sim" for p in OUTSIDE_TESTS)

    @pytest.mark.parametrize("path", OUTSIDE_TESTS, ids=lambda p: str(p.relative_to(ROOT)))
    def test_no_import_of_tests(self, path: Path) -> None:
        assert "tests" not in imported_roots(path), f"{path.relative_to(ROOT)} imports tests"

    def test_the_check_sees_an_import_of_tests(self, tmp_path: Path) -> None:
        bad = tmp_path / "bench.py"
        bad.write_text("from tests.nodes import NodeProc\n")
        assert "tests" in imported_roots(bad)
