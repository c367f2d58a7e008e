"""What ``docker build .`` does with this repository, read without a Docker engine.

Owns three things, all pure except for reading and copying files:

- ``.dockerignore`` with Docker's rules (moby/patternmatcher, as BuildKit's
  context transfer applies them): one pattern a line, ``#`` at the start of a
  line is a comment, surrounding whitespace is trimmed, a pattern is cleaned
  like Go's ``filepath.Clean`` (so ``dir/`` is ``dir``) and a leading ``/`` is
  dropped; ``*`` and ``?`` never cross ``/``, ``**`` crosses any number of
  directories, ``[...]`` is a class; a path is excluded when it, or one of its
  parent directories, matches; lines apply in order and a later line
  overrides an earlier one; ``!`` re-includes.  A directory that is excluded
  is skipped with everything in it unless a ``!`` pattern could match
  something under it (``DockerIgnore.may_include_under``, BuildKit's rule).
- the build context: the files and directories of the repository that the
  rules let through (``BuildContext``).
- the Dockerfile, as far as this project uses it: ``FROM``, ``WORKDIR``,
  ``ENV``, ``COPY`` (several sources, ``--chown``/``--chmod``/``--link``),
  ``RUN``, ``USER``, ``EXPOSE``, ``HEALTHCHECK [options] CMD``, ``CMD``,
  ``LABEL``; anything else (``ENTRYPOINT``, ``ADD``, ``ARG``, a second
  ``FROM``, variable substitution, ...) raises ``Unsupported``, so a change to
  the Dockerfile that this reader would get wrong fails loudly instead.

``layout_image`` carries out the ``COPY`` instructions into a directory
standing for the image's ``/``; ``run_steps`` says, step by step, what a
``RUN`` line's ``&&`` chain does and which steps a rehearsal without root
can carry out.  tests/test_image_build.py builds and runs the image with them.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

DOCKERIGNORE = ".dockerignore"
DOCKERFILE = "Dockerfile"


class BuildError(Exception):
    """What ``docker build`` would stop on."""


class Unsupported(BuildError):
    """A Dockerfile or .dockerignore feature this reader does not model."""


# ---- paths and patterns, as Go has them --------------------------------------------


def go_clean(path: str) -> str:
    """Go's ``path.Clean``: no empty, ``.`` or inner ``..`` segments, no trailing slash."""
    if not path:
        return "."
    rooted = path.startswith("/")
    out: list[str] = []
    for part in path.split("/"):
        if part in ("", "."):
            continue
        if part == "..":
            if out and out[-1] != "..":
                out.pop()
            elif not rooted:
                out.append("..")
            continue
        out.append(part)
    cleaned = "/".join(out)
    if rooted:
        return "/" + cleaned
    return cleaned or "."


def go_dir(path: str) -> str:
    """Go's ``path.Dir``: everything but the last element, cleaned (``.`` for a bare name)."""
    head, sep, _ = path.rpartition("/")
    return go_clean(head if sep and head else ("/" if sep else ""))


_REGEX_ESCAPE = frozenset(".+()|{}$")  # regex syntax that means nothing in a Go file pattern
_GLOB_CHARS = "*[]?^\\"  # BuildKit: a pattern with one of these is more than a path prefix


def _translate(pattern: str, *, double_star: bool) -> tuple[str, str]:
    """(kind, regex) of a pattern, the way moby/patternmatcher compiles it: kind is
    ``exact``, ``prefix`` (``dir/**``), ``suffix`` (``**/name``) or ``regexp``.
    Without ``double_star`` (COPY sources, Go's ``filepath.Match``) ``**`` is two ``*``."""
    regex = "^"
    kind = "exact"
    pos, n, first = 0, len(pattern), True
    while pos < n:
        ch = pattern[pos]
        pos += 1
        if ch == "*" and double_star and pos < n and pattern[pos] == "*":
            pos += 1
            if pos < n and pattern[pos] == "/":
                pos += 1  # "**/" is "**"
            if pos == n:  # trailing "**" accepts everything below
                if kind == "exact":
                    kind = "prefix"
                else:
                    regex += ".*"
                    kind = "regexp"
            else:
                regex += "(.*/)?"  # any number of directories, even none
                kind = "regexp"
            if first:
                kind = "suffix"
        elif ch == "*":
            regex += "[^/]*"
            kind = "regexp"
        elif ch == "?":
            regex += "[^/]"
            kind = "regexp"
        elif ch in _REGEX_ESCAPE:
            regex += "\\" + ch
        elif ch == "\\":
            if pos < n:
                regex += "\\" + pattern[pos]
                pos += 1
                kind = "regexp"
            else:
                regex += "\\\\"
        elif ch in "[]":
            regex += ch
            kind = "regexp"
        else:
            regex += ch
        first = False
    return kind, regex + r"\Z"


@dataclass(frozen=True, slots=True)
class Pattern:
    """One cleaned ``.dockerignore`` pattern; ``exclusion`` for a ``!`` line."""

    text: str
    exclusion: bool
    kind: str
    regex: re.Pattern[str] | None

    @classmethod
    def compile(cls, text: str, *, exclusion: bool) -> Pattern:
        kind, source = _translate(text, double_star=True)
        regex = None
        if kind == "regexp":
            try:
                regex = re.compile(source)
            except re.error as exc:
                raise BuildError(f".dockerignore: bad pattern {text!r}: {exc}") from None
        return cls(text=text, exclusion=exclusion, kind=kind, regex=regex)

    def matches(self, path: str) -> bool:
        if self.kind == "exact":
            return path == self.text
        if self.kind == "prefix":
            return path.startswith(self.text[:-2])
        if self.kind == "suffix":
            suffix = self.text[2:]
            return path.endswith(suffix) or (suffix.startswith("/") and path == suffix[1:])
        assert self.regex is not None
        return self.regex.match(path) is not None

    @property
    def without_trailing_glob(self) -> str:
        return self.text.removesuffix("/**").removesuffix("/*")


@dataclass(frozen=True, slots=True)
class DockerIgnore:
    """The rules of a ``.dockerignore`` file, in order."""

    patterns: tuple[Pattern, ...]

    @classmethod
    def parse(cls, text: str) -> DockerIgnore:
        patterns: list[Pattern] = []
        for number, raw in enumerate(text.split("\n")):
            line = raw.removesuffix("\r")
            if number == 0:
                line = line.removeprefix("\ufeff")
            if line.startswith("#"):  # only at the very start of a line
                continue
            line = line.strip()
            if not line:
                continue
            exclusion = line.startswith("!")
            if exclusion:
                line = line[1:].strip()
                if not line:
                    raise BuildError('.dockerignore: illegal exclusion pattern: "!"')
            line = go_clean(line)
            if len(line) > 1 and line.startswith("/"):
                line = line[1:]
            patterns.append(Pattern.compile(line, exclusion=exclusion))
        return cls(tuple(patterns))

    @classmethod
    def read(cls, context: Path) -> DockerIgnore:
        path = context / DOCKERIGNORE
        return cls.parse(path.read_text()) if path.exists() else cls(())

    def excluded(self, path: str) -> bool:
        """Whether ``path`` (relative to the context root) stays out of the context:
        patternmatcher's ``MatchesOrParentMatches``."""
        path = go_clean(path)
        if path == ".":
            return False  # the context root itself is never excluded
        parent = go_dir(path)
        parents = parent.split("/")
        matched = False
        for pattern in self.patterns:
            if pattern.exclusion != matched:
                continue  # an exclude cannot change an excluded path, a "!" an included one
            hit = pattern.matches(path)
            if not hit and parent != ".":
                hit = any(pattern.matches("/".join(parents[: i + 1])) for i in range(len(parents)))
            if hit:
                matched = not pattern.exclusion
        return matched

    def may_include_under(self, directory: str) -> bool:
        """Whether an excluded directory must still be walked because a ``!`` pattern
        could re-include something in it (BuildKit walks it when a ``!`` pattern has
        wildcards, else when one starts with ``directory/``)."""
        exceptions = [p for p in self.patterns if p.exclusion]
        if any(any(c in p.without_trailing_glob for c in _GLOB_CHARS) for p in exceptions):
            return True
        prefix = go_clean(directory) + "/"
        return any((p.without_trailing_glob + "/").startswith(prefix) for p in exceptions)


# ---- the build context ----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class BuildContext:
    """What ``docker build`` sends: paths relative to ``root``, slash-separated.
    ``files`` holds regular files and symlinks, ``dirs`` every directory sent
    (one that is not excluded, or the parent of something sent)."""

    root: Path
    files: tuple[str, ...]
    dirs: tuple[str, ...]

    @classmethod
    def scan(cls, root: Path, ignore: DockerIgnore | None = None) -> BuildContext:
        rules = DockerIgnore.read(root) if ignore is None else ignore
        files: list[str] = []
        dirs: set[str] = set()
        for here, dirnames, filenames in os.walk(root):
            base = Path(here).relative_to(root).as_posix()
            walk: list[str] = []
            for name in sorted(dirnames):
                rel = name if base == "." else f"{base}/{name}"
                if os.path.islink(os.path.join(here, name)):
                    filenames.append(name)  # a symlink is sent as a link, never followed
                    continue
                if not rules.excluded(rel):
                    dirs.add(rel)
                    walk.append(name)
                elif rules.may_include_under(rel):
                    walk.append(name)
            dirnames[:] = walk
            for name in sorted(filenames):
                rel = name if base == "." else f"{base}/{name}"
                if not rules.excluded(rel):
                    files.append(rel)
        for rel in files + sorted(dirs):
            parent = go_dir(rel)
            while parent != ".":
                dirs.add(parent)
                parent = go_dir(parent)
        return cls(root=root, files=tuple(sorted(files)), dirs=tuple(sorted(dirs)))

    def has(self, path: str) -> bool:
        return path in self.files or path in self.dirs

    def resolve(self, source: str, *, instruction: str = "COPY") -> tuple[str, ...]:
        """The context paths a ``COPY`` source names (wildcards as Go's ``filepath.Match``);
        ``BuildError`` naming the source when there are none."""
        rel = go_clean(source.lstrip("/") or ".")
        if rel == ".." or rel.startswith("../"):
            raise BuildError(f"{instruction}: {source!r} is outside the build context")
        if rel == ".":
            return (".",)
        kind, regex = _translate(rel, double_star=False)
        if kind == "exact":
            found: tuple[str, ...] = (rel,) if self.has(rel) else ()
        else:
            pattern = re.compile(regex)
            found = tuple(p for p in (*self.dirs, *self.files) if pattern.match(p))
        if found:
            return found
        if kind != "exact":
            why = "nothing in it matches"
        elif (self.root / rel).exists():
            why = f"{DOCKERIGNORE} leaves it out"
        else:
            why = "there is no such file"
        raise BuildError(f'{instruction}: "{rel}" is not in the build context: {why}')

    def materialize(self, dest: Path) -> Path:
        """Copy the context to ``dest`` (a new directory)."""
        dest.mkdir(parents=True)
        for rel in self.dirs:
            (dest / rel).mkdir(parents=True, exist_ok=True)
        for rel in self.files:
            shutil.copy2(self.root / rel, dest / rel, follow_symlinks=False)
        return dest


# ---- the Dockerfile -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Copy:
    """``COPY`` after WORKDIR applied: ``dest`` is absolute."""

    sources: tuple[str, ...]
    dest: str
    into_dir: bool  # several sources or a trailing slash: each source goes into dest
    text: str  # the instruction as written, for messages
    line: int


@dataclass(frozen=True, slots=True)
class Run:
    """``RUN`` with the WORKDIR and ENV in effect where it stands."""

    command: str | tuple[str, ...]  # shell form, or exec form
    workdir: str
    env: Mapping[str, str]
    line: int


@dataclass(frozen=True, slots=True)
class Healthcheck:
    command: tuple[str, ...]  # CMD in exec form; the shell form becomes /bin/sh -c
    interval_s: float = 30.0
    timeout_s: float = 30.0
    start_period_s: float = 0.0
    retries: int = 3


@dataclass(frozen=True, slots=True)
class Dockerfile:
    base: str
    workdir: str
    env: Mapping[str, str]  # the image's ENV, as containers get it
    copies: tuple[Copy, ...]
    runs: tuple[Run, ...]
    user: str | None
    expose: tuple[str, ...]
    healthcheck: Healthcheck | None
    cmd: tuple[str, ...]

    @classmethod
    def read(cls, context: Path) -> Dockerfile:
        return parse_dockerfile((context / DOCKERFILE).read_text())


def instructions(text: str) -> list[tuple[int, str, str]]:
    """(line number, KEYWORD, arguments) per instruction: comment lines dropped (also
    inside a continuation), lines ending in a backslash joined with the next one."""
    out: list[tuple[int, str, str]] = []
    parts: list[str] = []
    start = 0
    for number, raw in enumerate(text.splitlines(), 1):
        stripped = raw.strip()
        if not out and not parts:  # parser directives come before the first instruction
            directive = re.fullmatch(r"#\s*escape\s*=\s*(\S+)", stripped)
            if directive and directive.group(1) != "\\":
                raise Unsupported(f"Dockerfile line {number}: escape character {directive.group(1)!r}")
        if stripped.startswith("#") or not stripped:
            continue
        if not parts:
            start = number
        if stripped.endswith("\\"):
            parts.append(stripped[:-1].strip())
            continue
        parts.append(stripped)
        joined = " ".join(p for p in parts if p)
        parts = []
        keyword, _, args = joined.partition(" ")
        out.append((start, keyword.upper(), args.strip()))
    if parts:
        raise BuildError("Dockerfile: the last instruction ends in a line continuation")
    return out


def exec_form(args: str) -> tuple[str, ...] | None:
    """The JSON array form of CMD, RUN, COPY or HEALTHCHECK CMD, or None for the shell form."""
    if not args.startswith("["):
        return None
    try:
        value = json.loads(args)
    except ValueError:
        return None  # Docker reads a malformed array as the shell form
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        return None
    return tuple(value)


def duration_s(text: str) -> float:
    """A Go duration ("5s", "1m30s", "500ms") in seconds."""
    units = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
    parts = re.findall(r"(\d+(?:\.\d*)?)(ns|us|µs|ms|s|m|h)", text)
    if not parts or "".join(n + u for n, u in parts) != text:
        raise BuildError(f"Dockerfile: bad duration {text!r}")
    return sum(float(n) * units[u] for n, u in parts)


def _flags(args: str, allowed: set[str], where: str) -> tuple[dict[str, str], str]:
    """Leading ``--name=value`` flags and the rest."""
    flags: dict[str, str] = {}
    while args.startswith("--"):
        word, _, args = args.partition(" ")
        name, _, value = word[2:].partition("=")
        if name not in allowed:
            raise Unsupported(f"{where}: flag --{name}")
        flags[name] = value
        args = args.strip()
    return flags, args


def parse_dockerfile(text: str) -> Dockerfile:
    base: str | None = None
    workdir = "/"
    env: dict[str, str] = {}
    copies: list[Copy] = []
    runs: list[Run] = []
    user: str | None = None
    expose: list[str] = []
    healthcheck: Healthcheck | None = None
    cmd: tuple[str, ...] = ()
    for number, keyword, args in instructions(text):
        where = f"Dockerfile line {number} ({keyword})"
        if "$" in args and keyword in ("FROM", "WORKDIR", "ENV", "COPY", "USER", "EXPOSE", "LABEL"):
            raise Unsupported(f"{where}: variable substitution")
        if keyword != "FROM" and base is None:
            raise BuildError(f"{where}: the first instruction must be FROM")
        if keyword == "FROM":
            if base is not None:
                raise Unsupported(f"{where}: a second stage")
            _, args = _flags(args, {"platform"}, where)
            base = args.split()[0]
        elif keyword == "WORKDIR":
            workdir = str(PurePosixPath(workdir) / args)
            workdir = go_clean(workdir)
        elif keyword == "ENV":
            words = shlex.split(args)
            if words and "=" not in words[0]:  # legacy form: ENV KEY the rest
                key, _, value = args.partition(" ")
                env[key] = value.strip()
            else:
                for word in words:
                    key, sep, value = word.partition("=")
                    if not sep:
                        raise BuildError(f"{where}: {word!r} is not KEY=VALUE")
                    env[key] = value
        elif keyword == "COPY":
            _, args = _flags(args, {"chown", "chmod", "link"}, where)
            operands = exec_form(args) or tuple(args.split())
            if len(operands) < 2:
                raise BuildError(f"{where}: needs a source and a destination")
            sources, dest = operands[:-1], operands[-1]
            into_dir = dest.endswith("/") or dest in (".", "..")
            if len(sources) > 1 and not dest.endswith("/"):
                raise BuildError(f"{where}: with several sources the destination must end with /")
            copies.append(Copy(sources=sources, dest=go_clean(str(PurePosixPath(workdir) / dest)),
                               into_dir=into_dir, text=f"COPY {args}", line=number))
        elif keyword == "RUN":
            _flags(args, set(), where)
            runs.append(Run(command=exec_form(args) or args, workdir=workdir, env=dict(env), line=number))
        elif keyword == "USER":
            user = args
        elif keyword == "EXPOSE":
            expose.extend(args.split())
        elif keyword == "HEALTHCHECK":
            if args.upper() == "NONE":
                healthcheck = None
                continue
            flags, args = _flags(args, {"interval", "timeout", "start-period", "start-interval", "retries"}, where)
            word, _, rest = args.partition(" ")
            if word.upper() != "CMD":
                raise BuildError(f"{where}: expected CMD")
            rest = rest.strip()
            command = exec_form(rest) or ("/bin/sh", "-c", rest)
            healthcheck = Healthcheck(
                command=command,
                interval_s=duration_s(flags.get("interval", "30s")),
                timeout_s=duration_s(flags.get("timeout", "30s")),
                start_period_s=duration_s(flags.get("start-period", "0s")),
                retries=int(flags.get("retries", "3")))
        elif keyword == "CMD":
            cmd = exec_form(args) or ("/bin/sh", "-c", args)
        elif keyword == "LABEL":
            continue  # metadata only
        else:
            raise Unsupported(f"{where}: teach tests/dockerbuild.py what {keyword} does before using it")
    if base is None:
        raise BuildError("Dockerfile: no FROM")
    return Dockerfile(base=base, workdir=workdir, env=env, copies=tuple(copies), runs=tuple(runs), user=user,
                      expose=tuple(expose), healthcheck=healthcheck, cmd=cmd)


def image_path(image_root: Path, path: str) -> Path:
    """Where an absolute image path lives under ``image_root``, which stands for ``/``."""
    return image_root / go_clean(path).lstrip("/")


def layout_image(dockerfile: Dockerfile, context: BuildContext, source: Path, image_root: Path) -> None:
    """Carry out every COPY: from ``source`` (the materialized ``context``) into
    ``image_root``.  A directory source copies its content; a file goes into
    ``dest`` when ``dest`` is a directory, else becomes ``dest``."""
    for copy in dockerfile.copies:
        where = f"{copy.text} (Dockerfile line {copy.line})"
        dest = image_path(image_root, copy.dest)
        for pattern in copy.sources:
            matched = context.resolve(pattern, instruction=where)
            for rel in matched:
                src = source / rel
                if src.is_dir() and not src.is_symlink():
                    shutil.copytree(src, dest, symlinks=True, dirs_exist_ok=True)
                    continue
                target = dest / src.name if copy.into_dir or len(matched) > 1 or dest.is_dir() else dest
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(src, target, follow_symlinks=False)


# ---- RUN, step by step ----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Step:
    """One command of a RUN line's ``&&`` chain and what a rehearsal does with it:
    ``pip-install`` (run with the rehearsal's interpreter), ``remove`` (``rm`` of
    paths inside WORKDIR: run) or ``skip`` (``why`` says why)."""

    argv: tuple[str, ...]
    action: str
    why: str = ""


SYSTEM_ACCOUNT_COMMANDS = frozenset({"useradd", "groupadd", "adduser", "addgroup"})
SKIP_ACCOUNT = ("creates the image's system user: needs root and would change this machine; "
                "the rehearsal runs as the current user")
SKIP_OUTSIDE = ("prepares a path outside WORKDIR for the image's user: needs root; the rehearsal "
                "points the ENV that names it at a temporary directory")


def _operands(argv: tuple[str, ...]) -> list[str]:
    words = [w for w in argv[1:] if not w.startswith("-")]
    return words[1:] if argv[0] in ("chown", "chmod") else words  # owner or mode first


def run_steps(run: Run) -> tuple[Step, ...]:
    """The steps of a shell-form RUN (``a && b && c``); ``Unsupported`` for anything
    this rehearsal cannot vouch for (pipes, ``;``, ``||``, unknown commands)."""
    if not isinstance(run.command, str):
        raise Unsupported(f"Dockerfile line {run.line}: RUN in exec form")
    lexer = shlex.shlex(run.command, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    chains: list[list[str]] = [[]]
    for token in lexer:
        if token == "&&":
            chains.append([])
        elif token and all(c in "();<>|&" for c in token):
            raise Unsupported(f"Dockerfile line {run.line}: RUN with {token!r}: only && chains are rehearsed")
        else:
            chains[-1].append(token)
    steps: list[Step] = []
    workdir = run.workdir.rstrip("/") + "/"
    for words in chains:
        argv = tuple(words)
        if not argv:
            raise BuildError(f"Dockerfile line {run.line}: empty command in RUN")
        name = argv[0]
        if (name in ("pip", "pip3") and argv[1:2] == ("install",)) or (
                name in ("python", "python3") and argv[1:4] == ("-m", "pip", "install")):
            steps.append(Step(argv, "pip-install"))
        elif name == "rm" and all(not p.startswith("/") and ".." not in p.split("/") for p in _operands(argv)):
            steps.append(Step(argv, "remove"))
        elif name in SYSTEM_ACCOUNT_COMMANDS:
            steps.append(Step(argv, "skip", SKIP_ACCOUNT))
        elif name in ("mkdir", "chown", "chmod") and _operands(argv) and all(
                p.startswith("/") and not (go_clean(p) + "/").startswith(workdir) for p in _operands(argv)):
            steps.append(Step(argv, "skip", SKIP_OUTSIDE))
        else:
            raise Unsupported(f"Dockerfile line {run.line}: RUN step {shlex.join(argv)!r}: "
                              "teach tests/dockerbuild.py what it does")
    return tuple(steps)
