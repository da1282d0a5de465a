"""Quiesce helpers: small programs a preset's session runs to quiesce one kind of database.

``python3 -m qgafreeze.quiesce NAME [ARGS...]`` (installed as ``paths.QUIESCE``) runs
``qgafreeze.quiesce.NAME.main(ARGS)``.  A helper talks to its database through the database's own
command-line client, as a child process, with the standard library only; it does every import
before it prints its ready line and touches no disk after that, because it is held open while the
filesystems are frozen.  Lines it prints as ``qgafreeze-report KEY JSON`` tell the daemon what the
snapshot holds (the cycle report's ``details``).
"""

from __future__ import annotations

import importlib
import pkgutil
import re
import sys
from collections.abc import Sequence
from typing import Optional

# EX_USAGE of sysexits.h: a wrong helper name is the caller's mistake, not a database's failure.
EXIT_USAGE = 64
_NAME = re.compile(r"^[a-z][a-z0-9_]*$")


def helpers() -> list[str]:
    """The helpers this installation has, by module name."""
    return sorted(
        info.name
        for info in pkgutil.iter_modules(__path__)
        if not info.name.startswith("_") and not info.ispkg
    )


def usage() -> str:
    return f"usage: quiesce NAME [ARGS...]  (NAME: {', '.join(helpers()) or 'none installed'})"


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(usage(), file=sys.stdout if args else sys.stderr)
        return 0 if args else EXIT_USAGE
    name, rest = args[0], args[1:]
    # Checked against the installed modules before importing: the name must never reach
    # import_module as a dotted path or a module outside this package.
    if not _NAME.match(name) or name not in helpers():
        print(f"quiesce: unknown helper {name!r}; {usage()}", file=sys.stderr)
        return EXIT_USAGE
    module = importlib.import_module(f"{__name__}.{name}")
    return int(module.main(rest))
