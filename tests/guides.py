"""The guides' code blocks, extracted from the Markdown, and a small runner that executes them as a reader would.

A block may be preceded, on the line right before its opening fence, by an HTML comment that GitHub does not
render::

    <!-- guide: OLD => NEW ; OLD2 => NEW2 -->

Each ``OLD => NEW`` is a plain-text substitution applied to the block before it runs; ``{name}`` in NEW is
filled from the test's context when the command runs (fixtures such as ``{s3}`` or ``{port}``, and values
captured from earlier output such as ``{run_id}``). Substitutions only fill placeholders, scale sizes down
and keep a server command from blocking the test. ``file=NAME`` makes the block the content of NAME in the working directory
(e.g. a spec that later commands read). Items are separated by `` ; `` or by newlines (the comment may span
several lines).
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from typer.testing import CliRunner

REPO_ROOT = Path(__file__).resolve().parents[1]
GUIDES = ("README.md", "actors/README.md", "sweeps/README.md", "cluster/README.md", "serve_apps/README.md",
          "benchmarks/README.md", "raytwin/fmu/README.md", "examples/dcmotor/README.md",
          "client/README.md")
_FENCE = re.compile(r"^(?P<indent> *)(?P<fence>```+|~~~+)\s*(?P<lang>[\w+-]*)\s*$")
_DIRECTIVE = re.compile(r"<!--\s*guide:(?P<body>.*?)-->", re.S)


@dataclass(frozen=True)
class Block:
    """One fenced code block of a guide."""

    guide: str  # path relative to the repository root
    line: int  # 1-based line of the opening fence
    lang: str
    text: str
    substitutions: tuple[tuple[str, str], ...] = ()
    file: str | None = None  # `file=NAME`: the block is the content of NAME in the working directory

    @property
    def id(self) -> str:
        return f"{self.guide}:{self.line}"

    @property
    def first_line(self) -> str:
        """The first non-blank line: how the listing of blocks that do not run names a block."""
        return next((line.strip() for line in self.text.splitlines() if line.strip()), "")

    def prepared(self) -> str:
        """The block's text with its substitutions applied; ``{name}`` placeholders are left for `fill`."""
        text = self.text
        for old, new in self.substitutions:
            if old not in text:
                raise AssertionError(f"{self.id}: substitution {old!r} matches nothing in the block")
            text = text.replace(old, new.replace("{", _OPEN).replace("}", _CLOSE))
        return text


_OPEN, _CLOSE = "\x00<", ">\x00"  # placeholders of substitutions, kept apart from the code's own braces


def fill(text: str, context: Mapping[str, object]) -> str:
    """`text` with each substituted ``{name}`` replaced by ``context[name]`` (known when the command runs)."""

    def value(match: re.Match[str]) -> str:
        name = match.group(1)
        if name not in context:
            raise AssertionError(f"placeholder {{{name}}} has no value yet (known: {sorted(context)})")
        return str(context[name])

    return re.sub(re.escape(_OPEN) + r"(\w+)" + re.escape(_CLOSE), value, text)


def _directive(lines: list[str], fence_index: int) -> tuple[tuple[tuple[str, str], ...], str | None]:
    """Substitutions and file name of the `<!-- guide: ... -->` comment ending on the line before the fence."""
    end = fence_index - 1
    if end < 0 or not lines[end].rstrip().endswith("-->"):
        return (), None
    start = end
    while start > 0 and "<!--" not in lines[start]:
        start -= 1
    match = _DIRECTIVE.search("\n".join(lines[start:end + 1]))
    if match is None:
        return (), None
    items = [item.strip() for chunk in match.group("body").split("\n") for item in chunk.split(" ; ")]
    pairs, file = [], None
    for item in filter(None, items):
        old, sep, new = item.partition(" => ")
        if sep:
            pairs.append((old.strip(), new.strip()))
        elif item.startswith("file="):
            file = item.removeprefix("file=")
        else:
            raise ValueError(f"guide directive item {item!r} is neither `OLD => NEW` nor `file=NAME`")
    return tuple(pairs), file


def extract(guide: str, root: Path = REPO_ROOT) -> list[Block]:
    """Every fenced code block of `guide` (a path relative to `root`), in document order."""
    lines = (root / guide).read_text().splitlines()
    blocks, i = [], 0
    while i < len(lines):
        opening = _FENCE.match(lines[i])
        if opening is None:
            i += 1
            continue
        fence, indent = opening.group("fence"), len(opening.group("indent"))
        j = i + 1
        while j < len(lines) and not lines[j].strip().startswith(fence):
            j += 1
        body = "\n".join(line[indent:] for line in lines[i + 1:j])
        substitutions, file = _directive(lines, i)
        blocks.append(Block(guide, i + 1, opening.group("lang").lower(), body, substitutions, file))
        i = j + 1
    return blocks


def all_blocks() -> list[Block]:
    return [block for guide in GUIDES for block in extract(guide)]


def shell_commands(text: str) -> Iterator[str]:
    """The commands of a shell block: comments dropped, backslash continuations and open quotes joined."""
    pending = ""
    for line in text.splitlines():
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        pending += line
        try:
            words = shlex.split(pending, comments=True)
        except ValueError:  # a quote still open: the command continues on the next line
            pending += "\n"
            continue
        if words:
            yield pending
        pending = ""
    assert not pending.strip(), f"unterminated command: {pending!r}"


@dataclass
class Result:
    command: str
    exit_code: int
    output: str


@dataclass
class Shell:
    """Runs a guide's shell commands like a terminal in `cwd`, with `env` as its environment.

    ``raytwin ...`` and ``./dev <raytwin command>`` run in this process through the Typer app (the session's
    Ray and S3 server are reused, and each command costs no interpreter start); ``python -m benchmarks`` runs the
    benchmark app the same way; ``NAME=value`` and ``export NAME=value`` set variables; anything else (``curl``)
    runs in ``bash``.
    """

    cwd: Path
    env: dict[str, str]
    apps: Mapping[tuple[str, ...], Callable[..., object]]

    def run(self, command: str) -> Result:
        words = shlex.split(command, comments=True)
        assignment = words[1:] if words[0] == "export" else words
        if all(re.fullmatch(r"[A-Za-z_]\w*=.*", word) for word in assignment):
            for word in assignment:
                name, _, value = word.partition("=")
                self.env[name] = self._expand(value)
            return Result(command, 0, "")
        for prefix, app in self.apps.items():
            if tuple(words[:len(prefix)]) == prefix:
                return self._invoke(command, app, words[len(prefix):])
        proc = subprocess.run(["bash", "-c", command], cwd=self.cwd, env=self.env, capture_output=True, text=True,
                              timeout=120)
        return Result(command, proc.returncode, proc.stdout + proc.stderr)

    def _expand(self, word: str) -> str:
        return re.sub(r"\$(\w+)|\$\{(\w+)\}", lambda m: self.env.get(m.group(1) or m.group(2), ""), word)

    def _invoke(self, command: str, app: Callable[..., object], args: list[str]) -> Result:
        args = [self._expand(arg) for arg in args]
        target = None
        if ">" in args:
            at = args.index(">")
            args, target = args[:at], args[at + 1]
        saved_cwd, saved_env = Path.cwd(), dict(os.environ)
        os.chdir(self.cwd)
        os.environ.clear()
        os.environ.update(self.env)
        try:
            result = CliRunner().invoke(app, args, catch_exceptions=True)
        finally:
            os.chdir(saved_cwd)
            os.environ.clear()
            os.environ.update(saved_env)
        if target is not None:
            (self.cwd / target).write_text(result.stdout)
        output = result.output
        if result.exception is not None and not isinstance(result.exception, SystemExit):
            output += f"\n{type(result.exception).__name__}: {result.exception}"
        return Result(command, result.exit_code, output)
