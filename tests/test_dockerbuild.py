"""The reader of .dockerignore and the Dockerfile (tests/dockerbuild.py) on its own:
Docker's matching rules on tricky cases, the build context a tree yields, and the
Dockerfile instructions this project uses.  Pure and fast; the image itself is
built in tests/test_image_build.py."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.dockerbuild import (
    BuildContext,
    BuildError,
    DockerIgnore,
    Healthcheck,
    Run,
    Unsupported,
    go_clean,
    layout_image,
    parse_dockerfile,
    run_steps,
)


def excluded(rules: str, *paths: str) -> dict[str, bool]:
    ignore = DockerIgnore.parse(rules)
    return {path: ignore.excluded(path) for path in paths}


class TestGoClean:
    @pytest.mark.parametrize(("raw", "clean"), [
        ("", "."), ("./", "."), ("a/", "a"), ("./a/../b/", "b"), ("//a//b", "/a/b"), ("../a", "../a"),
        ("/../a", "/a"), ("a/b/..", "a"),
    ])
    def test_like_go(self, raw: str, clean: str) -> None:
        assert go_clean(raw) == clean


class TestDockerIgnore:
    def test_star_then_re_included_dir_with_trailing_slash(self) -> None:
        rules = "*\n!crdt/\n"
        assert excluded(rules, "crdt", "crdt/entry.py", "crdt/sub/deep.py", "cli.py", "client/aio.py", "client") == {
            "crdt": False, "crdt/entry.py": False, "crdt/sub/deep.py": False,
            "cli.py": True, "client/aio.py": True, "client": True,
        }

    def test_star_does_not_cross_a_slash(self) -> None:
        assert excluded("*.pyc", "a.pyc", "crdt/a.pyc") == {"a.pyc": True, "crdt/a.pyc": False}
        assert excluded("crdt/*.py", "crdt/a.py", "crdt/sub/a.py") == {"crdt/a.py": True, "crdt/sub/a.py": False}

    def test_double_star_matches_at_any_depth(self) -> None:
        rules = "**/__pycache__\n**/*.pyc\n"
        got = excluded(rules, "__pycache__", "crdt/__pycache__", "crdt/__pycache__/entry.cpython-311.pyc",
                       "net/web/__pycache__/x", "crdt/__pycache__x", "crdt/x.pyc", "x.pyc", "crdt/x.py")
        assert got == {
            "__pycache__": True, "crdt/__pycache__": True, "crdt/__pycache__/entry.cpython-311.pyc": True,
            "net/web/__pycache__/x": True, "crdt/__pycache__x": False, "crdt/x.pyc": True, "x.pyc": True,
            "crdt/x.py": False,
        }

    def test_later_lines_override_earlier_ones(self) -> None:
        # the .dockerignore shape: re-include a package, then drop its caches again
        drop_last = "*\n!crdt/\n**/__pycache__\n"
        assert excluded(drop_last, "crdt/__pycache__/a.pyc", "crdt/a.py") == {
            "crdt/__pycache__/a.pyc": True, "crdt/a.py": False}
        # the other order: the later "!" re-includes the whole directory, caches and all
        keep_last = "*\n**/__pycache__\n!crdt/\n"
        assert excluded(keep_last, "crdt/__pycache__/a.pyc", "crdt/a.py") == {
            "crdt/__pycache__/a.pyc": False, "crdt/a.py": False}
        # a "!" before the exclusion it should override does nothing
        assert excluded("!crdt\n*\n", "crdt/a.py") == {"crdt/a.py": True}

    def test_trailing_and_leading_slash_are_cleaned(self) -> None:
        for rules in ("data/", "/data", "/data/", "./data"):
            assert excluded(rules, "data", "data/node/key", "database.py", "net/data/x") == {
                "data": True, "data/node/key": True, "database.py": False, "net/data/x": False}, rules

    def test_a_file_re_included_inside_an_excluded_directory(self) -> None:
        rules = "logs\n!logs/keep.txt\n"
        assert excluded(rules, "logs/keep.txt", "logs/other.txt", "logs") == {
            "logs/keep.txt": False, "logs/other.txt": True, "logs": True}
        ignore = DockerIgnore.parse(rules)
        assert ignore.may_include_under("logs") and not ignore.may_include_under("data")
        assert not DockerIgnore.parse("logs\n").may_include_under("logs")
        assert DockerIgnore.parse("logs\n!**/keep.txt\n").may_include_under("data")  # a wildcard: walk everything

    def test_trailing_double_star_excludes_the_content_not_the_directory(self) -> None:
        assert excluded("docs/**", "docs", "docs/a.md", "docs/x/y.md") == {
            "docs": False, "docs/a.md": True, "docs/x/y.md": True}

    def test_comments_whitespace_and_bad_lines(self) -> None:
        rules = "\ufeff# a comment\n  \n  data  \n #not a comment\n"
        ignore = DockerIgnore.parse(rules)
        assert [p.text for p in ignore.patterns] == ["data", "#not a comment"]
        with pytest.raises(BuildError, match="illegal exclusion"):
            DockerIgnore.parse("*\n!\n")
        with pytest.raises(BuildError, match="bad pattern"):
            DockerIgnore.parse("a[\n")

    def test_classes_and_question_mark(self) -> None:
        assert excluded("file?.[ch]", "file1.c", "file1.h", "file12.c", "file/.c") == {
            "file1.c": True, "file1.h": True, "file12.c": False, "file/.c": False}

    def test_the_context_root_is_never_excluded(self) -> None:
        assert excluded("*\n**\n", ".", "") == {".": False, "": False}


class TestBuildContext:
    def tree(self, root: Path, *paths: str) -> Path:
        for rel in paths:
            path = root / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(rel)
        return root

    def test_scan_follows_the_rules(self, tmp_path: Path) -> None:
        root = self.tree(tmp_path / "repo", "cli.py", "crdt/a.py", "crdt/__pycache__/a.pyc", "client/aio.py",
                         ".venv/lib/x.py", "logs/keep.txt", "logs/n1.log", "README.md")
        (root / "empty").mkdir()
        (root / ".dockerignore").write_text("*\n!cli.py\n!crdt/\n!logs/keep.txt\n**/__pycache__\n")
        ctx = BuildContext.scan(root)
        assert ctx.files == ("cli.py", "crdt/a.py", "logs/keep.txt")
        assert ctx.dirs == ("crdt", "logs")  # logs: the parent of a file sent; empty: excluded by "*"

    def test_a_missing_source_is_named_with_the_reason(self, tmp_path: Path) -> None:
        root = self.tree(tmp_path / "repo", "cli.py", "client/aio.py")
        ctx = BuildContext.scan(root, DockerIgnore.parse("*\n!cli.py\n"))
        assert ctx.resolve("cli.py") == ("cli.py",)
        with pytest.raises(BuildError, match=r'"client" is not in the build context: \.dockerignore leaves it out'):
            ctx.resolve("client")
        with pytest.raises(BuildError, match='"nowhere" is not in the build context: there is no such file'):
            ctx.resolve("nowhere")
        with pytest.raises(BuildError, match="outside the build context"):
            ctx.resolve("../etc")
        assert ctx.resolve("c*.py") == ("cli.py",)

    def test_layout_follows_copy(self, tmp_path: Path) -> None:
        root = self.tree(tmp_path / "repo", "a.txt", "b.txt", "pkg/m.py", "pkg/sub/n.py")
        ctx = BuildContext.scan(root, DockerIgnore(()))
        source = ctx.materialize(tmp_path / "ctx")
        df = parse_dockerfile(
            "FROM scratch\nWORKDIR /app\nCOPY a.txt b.txt ./\nCOPY pkg ./lib\nCOPY a.txt /etc/c.txt\n")
        layout_image(df, ctx, source, tmp_path / "image")
        got = sorted(p.relative_to(tmp_path / "image").as_posix() for p in (tmp_path / "image").rglob("*")
                     if p.is_file())
        assert got == ["app/a.txt", "app/b.txt", "app/lib/m.py", "app/lib/sub/n.py", "etc/c.txt"]


SAMPLE = """\
# syntax=docker/dockerfile:1
FROM python:3.11-slim AS base

ENV A=1 B="two words"
WORKDIR /app
COPY --chown=u:u one two \\
     # a comment inside a continuation
     three ./
RUN pip install . && \\

    rm -rf build *.egg-info
ENV C=3
user app
EXPOSE 7001/tcp 7001/udp
HEALTHCHECK --interval=5s --timeout=4s --start-period=1m30s --retries=5 \\
    CMD ["python", "-c", "print(1)"]
CMD ["python", "cli.py", "node"]
"""


class TestDockerfile:
    def test_the_instructions_this_project_uses(self) -> None:
        df = parse_dockerfile(SAMPLE)
        assert df.base == "python:3.11-slim" and df.workdir == "/app" and df.user == "app"
        assert df.env == {"A": "1", "B": "two words", "C": "3"}
        (copy,) = df.copies
        assert copy.sources == ("one", "two", "three") and copy.dest == "/app" and copy.into_dir
        (run,) = df.runs
        assert run.command == "pip install . && rm -rf build *.egg-info"
        assert run.env == {"A": "1", "B": "two words"} and run.workdir == "/app"  # not C: it comes later
        assert df.expose == ("7001/tcp", "7001/udp")
        assert df.healthcheck == Healthcheck(command=("python", "-c", "print(1)"), interval_s=5.0, timeout_s=4.0,
                                             start_period_s=90.0, retries=5)
        assert df.cmd == ("python", "cli.py", "node")

    def test_shell_forms(self) -> None:
        df = parse_dockerfile("FROM x\nHEALTHCHECK CMD curl -f http://localhost/\nCMD python cli.py node\n")
        assert df.cmd == ("/bin/sh", "-c", "python cli.py node")
        assert df.healthcheck == Healthcheck(command=("/bin/sh", "-c", "curl -f http://localhost/"))

    @pytest.mark.parametrize(("text", "error"), [
        ("FROM x\nENTRYPOINT [\"tini\"]\n", "ENTRYPOINT"),
        ("FROM x\nFROM y\n", "a second stage"),
        ("FROM x\nWORKDIR $HOME\n", "variable substitution"),
        ("FROM x\nCOPY --from=build /a /b\n", "--from"),
        ("# escape=`\nFROM x\n", "escape character"),
    ])
    def test_what_it_does_not_model_is_refused(self, text: str, error: str) -> None:
        with pytest.raises(Unsupported, match=error):
            parse_dockerfile(text)

    def test_several_sources_need_a_directory_destination(self) -> None:
        with pytest.raises(BuildError, match="must end with /"):
            parse_dockerfile("FROM x\nCOPY a b /app\n")


class TestRunSteps:
    def run(self, command: str) -> Run:
        return Run(command=command, workdir="/app", env={}, line=1)

    def test_the_image_steps(self) -> None:
        steps = run_steps(self.run(
            "pip install . && rm -rf build *.egg-info && useradd --system --home-dir /app p2pex "
            "&& mkdir /data && chown p2pex:p2pex /data"))
        assert [s.action for s in steps] == ["pip-install", "remove", "skip", "skip", "skip"]
        assert steps[0].argv == ("pip", "install", ".") and steps[1].argv == ("rm", "-rf", "build", "*.egg-info")
        assert all(s.why for s in steps if s.action == "skip")

    @pytest.mark.parametrize("command", [
        "pip install . ; apt-get update", "curl x | sh", "apt-get install -y gcc", "rm -rf /usr/lib",
        "mkdir /app/cache", "pip install . || true",
    ])
    def test_anything_else_is_refused(self, command: str) -> None:
        with pytest.raises(Unsupported):
            run_steps(self.run(command))
