"""The documents made from the schema: the README's settings table and qgafreeze.yaml(5).

Regenerate them after a change to the schema, from the top of the source tree::

    python3 -m qgafreeze.schemadoc write

(``markdown`` and ``man`` print them instead; ``check`` says whether the files are current.)
Tests hold the committed files to what this module makes.
"""

from __future__ import annotations

import sys
from pathlib import Path

from . import paths
from .errors import EXIT_USAGE
from .schema import SECTIONS, SETTINGS, Key

README_BEGIN = "<!-- schema:settings begin -->\n"
README_END = "<!-- schema:settings end -->"
MAN_PAGE = "docs/qgafreeze.yaml.5"


def markdown_settings() -> str:
    """The README's table of settings."""
    lines = ["| setting | type | default | what it does |", "| --- | --- | --- | --- |"]
    for key in SETTINGS.keys:
        lines.append(f"| `{key.name}` | {key.type} | `{key.default}` | {key.description} |")
    return "\n".join(lines) + "\n"


def _roff(text: str) -> str:
    text = text.replace("\\", "\\e").replace("-", "\\-")
    return "\\&" + text if text.startswith((".", "'")) else text


def _man_key(key: Key) -> list[str]:
    facts = [key.type]
    if key.choices:
        choices = ", ".join(f"\\fB{_roff(c)}\\fR" for c in key.choices)
        facts.append(("one of " if len(key.choices) > 1 else "only ") + choices)
    if key.default is not None:
        facts.append(f"default \\fB{_roff(key.default)}\\fR")
    return [".TP", f".B {key.name}", f"({'; '.join(facts)})", _roff(key.description)]


_MAN_DESCRIPTION = """\
.BR qgafreeze (8)
quiesces the applications this file declares whenever qemu\\-ga freezes the guest's filesystems
for a backup, and resumes them at the thaw.
The daemon reads the file when it starts and on
.BR "systemctl reload qgafreeze" ;
.B qgafreeze check
validates it and prints the plan.
.PP
The file is YAML.
Unknown keys are errors, and every error is reported at once with its place, such as
.BR "apps.shop.depends_on[0]: unknown app 'mariadbx'" .
The daemon runs what the file says as root, so the file is refused when anyone but root can
write it, or any program or hook script it runs, or a directory above them; a
.B settings.allowed_group
that does not exist is refused too.
Commands and sessions run without a shell (unless a step says
.BR shell ),
with a clean environment, as root unless
.B user
says otherwise.
"""

_MAN_DURATIONS = (
    "A duration is a number of seconds (\\fB45\\fR, \\fB1.5\\fR) or a number with a unit:"
    " \\fBms\\fR, \\fBs\\fR, \\fBm\\fR or \\fBh\\fR"
    " (\\fB500ms\\fR, \\fB30s\\fR, \\fB2m\\fR, \\fB1h\\fR)."
)


MAN_EXAMPLE = """\
version: 1
settings:
  freeze_timeout: 60s
apps:
  mariadb:
    preset: mariadb
  shop:
    units: [shop-web.service, shop-worker.service]
    depends_on: [mariadb]     # stopped before mariadb, started after it
  cache:
    freeze:
      - {signal: USR1, units: [cache.service], whom: main}
    thaw:
      - {exec: [/usr/local/bin/cache-ctl, resume], user: cache}
"""


def man_page() -> str:
    """qgafreeze.yaml(5), in troff."""
    lines = [
        '.\\" Generated from src/qgafreeze/schema.py: edit it there, then run',
        '.\\" python3 -m qgafreeze.schemadoc write (tests/unit/test_schema.py compares the two).',
        '.TH QGAFREEZE.YAML 5 "" "qgafreeze" "File Formats"',
        ".nh",
        ".SH NAME",
        "qgafreeze.yaml \\- the applications qgafreeze quiesces around QEMU guest\\-agent freezes",
        ".SH SYNOPSIS",
        f".I {_roff(paths.CONFIG)}",
        ".SH DESCRIPTION",
        _MAN_DESCRIPTION.rstrip("\n"),
    ]
    for section in SECTIONS:
        lines += [f'.SH "{section.title}"', _roff(section.intro)]
        for key in section.keys:
            lines += _man_key(key)
        for old in section.removed:
            lines += [".PP", f"\\fB{old.name}\\fR was removed: {_roff(old.instead)}."]
    lines += [".SH DURATIONS", _MAN_DURATIONS, ".SH EXAMPLE", ".RS", ".nf"]
    lines += [_roff(line) for line in MAN_EXAMPLE.splitlines()]
    lines += [".fi", ".RE", ".SH FILES", ".TP"]
    lines += [f".I {_roff(paths.CONFIG)}", "The configuration.", ".TP"]
    lines += [".I /usr/share/doc/qgafreeze/qgafreeze.yaml.example"]
    lines += ["The example, every key with a comment."]
    lines += ['.SH "SEE ALSO"', ".BR qgafreeze (8),", ".BR qemu\\-ga (8)"]
    return "\n".join(lines) + "\n"


def documents(root: Path) -> dict[Path, str]:
    """Each generated file of the source tree at ``root``, with the text the schema makes of it."""
    readme = (root / "README.md").read_text()
    begin = readme.index(README_BEGIN) + len(README_BEGIN)
    end = readme.index(README_END, begin)
    readme = readme[:begin] + markdown_settings() + readme[end:]
    return {root / MAN_PAGE: man_page(), root / "README.md": readme}


def _stale(made: dict[Path, str]) -> list[Path]:
    return [path for path, text in made.items() if not path.exists() or path.read_text() != text]


def stale_documents(root: Path) -> list[Path]:
    """The generated files that differ from what the schema makes."""
    return _stale(documents(root))


def write_documents(root: Path) -> list[Path]:
    """Regenerate the man page and the README's table of settings; return the files changed."""
    made = documents(root)
    stale = _stale(made)
    for path in stale:
        path.write_text(made[path])
    return stale


def main(argv: list[str]) -> int:
    command = argv[0] if argv else ""
    root = Path(argv[1] if len(argv) == 2 else ".")
    if command not in ("markdown", "man", "write", "check") or len(argv) > 2:
        usage = "usage: python3 -m qgafreeze.schemadoc markdown|man|write|check [TREE]"
        print(usage, file=sys.stderr)
        return EXIT_USAGE
    if command in ("markdown", "man"):
        print(markdown_settings() if command == "markdown" else man_page(), end="")
        return 0
    stale = write_documents(root) if command == "write" else stale_documents(root)
    for path in stale:
        print(f"wrote {path}" if command == "write" else f"{path}: run {__name__} write")
    return 1 if stale and command == "check" else 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
