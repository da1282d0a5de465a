"""What the host must hold for a config to be obeyed: the permission policy and the named group.

The daemon runs what the config says as root, so the file, everything it makes root run, and every
directory on the way must be root's alone, as sshd and sudo require of theirs.  A path is judged
as it will be run (from the working directory, through the PATH in force, each symlink's own
directory and its target's, a ``#!`` interpreter, an interpreter's script, the commands of shell
text); what the check cannot follow is refused rather than guessed.  Parsing never looks at the
host: ``config.load_file`` runs these checks, the actions again just before each run and at each
legacy scan (a file can change after the load).  A few ``lstat`` calls: fit for the control path.
"""

from __future__ import annotations

import grp
import os
import re
import stat
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from . import paths
from .commands import workdir
from .model import Config, Session, Step, join_path
from .shelltext import simple_commands, substitutions

_MAX_LINKS = 40  # the kernel's limit before ELOOP
_MAX_DEPTH = 4  # nested #! interpreters (the kernel's limit), shell text inside shell text


def check_file_permissions(path: str, st: os.stat_result) -> str | None:
    """Why the file must be refused, or None.

    The daemon runs what the file says as root, so anyone who can change it is root.  Like sshd
    and sudo, refuse a file that anyone but root (or the reader itself) can write.
    """
    mode = stat.S_IMODE(st.st_mode)
    if st.st_uid not in (0, os.geteuid()):
        return f"owned by uid {st.st_uid}, not root"
    if mode & stat.S_IWOTH:
        return f"writable by everyone (mode {mode:04o}); run: chmod o-w {path}"
    if mode & stat.S_IWGRP and st.st_gid != 0:
        return f"writable by group id {st.st_gid} (mode {mode:04o}); run: chmod g-w {path}"
    return None


def walk(path: str, cwd: str = "/") -> tuple[str | None, str | None]:
    """Where ``path`` leads, resolved from ``cwd`` as the kernel does, and why someone but root
    could change what it leads to: a directory passed through, a symlink followed (so its own
    directory is checked as well as its target's), the file itself.

    A directory passed through may be sticky and root's (``/tmp``): an entry there is its owner's,
    and the next step checks that owner.  A missing path is (None, None): running it fails with a
    clear message, and only root can create it where it would be.
    """
    parts = os.path.join(cwd, path).split("/")[::-1]
    here, here_st = "/", os.lstat("/")
    links = 0
    while parts:
        name = parts.pop()
        if name in ("", "."):
            continue
        if name == "..":
            here = os.path.dirname(here)
            here_st = os.lstat(here)
            continue
        reason = check_file_permissions(here, here_st)
        if reason and not (here_st.st_mode & stat.S_ISVTX and here_st.st_uid == 0):
            return None, f"{here} is {reason}"
        entry = f"{here}/{name}" if here != "/" else f"/{name}"
        try:
            entry_st = os.lstat(entry)
        except OSError:
            return None, None
        if not stat.S_ISLNK(entry_st.st_mode):
            here, here_st = entry, entry_st
            continue
        if entry_st.st_uid not in (0, os.geteuid()):
            return None, f"{entry} is a symlink owned by uid {entry_st.st_uid}, not root"
        links += 1
        if links > _MAX_LINKS:
            return None, None
        target = os.readlink(entry)
        if target.startswith("/"):
            here, here_st = "/", os.lstat("/")
        parts.extend(target.split("/")[::-1])
    reason = check_file_permissions(here, here_st)
    return here, reason and f"{here} is {reason}"


# Environment variables that name where a program loads code from, with their entry separators.
_LOADED_FROM = {"PATH": ":", "LD_LIBRARY_PATH": ":;", "LD_PRELOAD": ": ", "LD_AUDIT": ":"}
_LOADED_FROM.update(dict.fromkeys(["PYTHONPATH", "PYTHONHOME", "PERL5LIB", "PERLLIB"], ":"))
_LOADED_FROM.update(dict.fromkeys(["BASH_ENV", "ENV", "PYTHONSTARTUP"], ""))


@dataclass(frozen=True)
class _Interpreter:
    """How a known interpreter finds, among its arguments, the program it runs."""

    names: str  # a regular expression the program's name matches in full
    values: str  # short options whose value is the next argument when not attached to them
    long_values: tuple[str, ...]
    code: str  # short options that give the program as text (or a module name), not a file
    shell: bool = False  # sh -c: the text is the first operand, and is shell text
    python: bool = False  # code and scripts import from their directory first


_INTERPRETERS = (
    _Interpreter(r"(ba|da|z|k|mk|a)?sh|ksh93", "oO", ("--rcfile", "--init-file"), "cs", shell=True),
    _Interpreter(r"(python|pypy)[0-9.]*", "WX", ("--check-hash-based-pycs",), "cm", python=True),
    _Interpreter(r"perl[0-9.]*", "", (), "eE"),
)
# Shell text: words before a command that are not it, and commands that run no program.
_PREFIXES = frozenset(
    "! { } if then else elif fi do done while until time esac exec command builtin".split()
)
_NOT_A_COMMAND = frozenset({"for", "case", "select", "function", "[", "[[", ":"})
_ASSIGNMENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*=")
_EXPANDS = set("$`*?[~")


def _operand(argv: Sequence[str], spec: _Interpreter) -> tuple[int | None, str]:
    """Which argument holds the program an interpreter runs, and what it is: ``script``,
    ``shell`` text, ``code`` (text or a module name), or ``stdin`` (nothing to check)."""
    mode, index = "script", 1
    while index < len(argv):
        word = argv[index]
        if word == "--" or len(word) < 2 or word[0] not in ("-+" if spec.shell else "-"):
            index += 1 if word == "--" else 0
            break
        if word.startswith("--"):
            index += 2 if word in spec.long_values else 1
            continue
        for position, letter in enumerate(word[1:], 2):
            if letter in spec.code and spec.shell:
                mode = "shell" if letter == "c" else "stdin"
            elif letter in spec.code:  # python -c CODE, -m MODULE; perl -e CODE
                return (index if position < len(word) else index + 1), "code"
            elif letter in spec.values:
                index += 1 if position == len(word) else 0  # the value is the next argument
                break
        index += 1
    if index >= len(argv) or mode == "stdin" or argv[index] == "-":
        return None, "stdin"
    return index, mode


def _interpreter_line(real: str) -> str | None:
    """The ``#!`` line of a file as the kernel reads it, without the ``#!``."""
    try:
        fd = os.open(real, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            head = os.read(fd, 256) if stat.S_ISREG(os.fstat(fd).st_mode) else b""
        finally:
            os.close(fd)
    except OSError:
        return None
    if not head.startswith(b"#!"):
        return None
    return head[2:].split(b"\n", 1)[0].decode("utf-8", "replace").strip()


def _is_program(path: str) -> bool:
    try:
        st = os.stat(path)
    except OSError:
        return False
    return stat.S_ISREG(st.st_mode) and bool(st.st_mode & 0o111)


class _Checker:
    """The refusals for one command, judged as it will run: its PATH and working directory."""

    def __init__(
        self,
        where: str,
        env: Sequence[tuple[str, str]] = (),
        cwd: str | None = None,
        user: str | None = None,
    ) -> None:
        self.where = where
        self.problems: list[str] = []
        self.cwd = cwd or _home(user)
        self.search = dict(env).get("PATH", paths.SAFE_PATH)
        self._dirs: dict[str, str | None] = {}
        for name, value in env:
            separators = _LOADED_FROM.get(name)
            entries = re.split(f"[{separators}]", value) if separators else [value]
            for entry in entries if separators is not None else []:
                why = walk(entry)[1] if entry.startswith("/") else f"{entry!r} is not absolute"
                self._dirs[entry] = why  # PATH lookups below need not walk it again
                if why:
                    self.refuse(f"env.{name}", why)

    def refuse(self, key: str, why: str) -> None:
        self.problems.append(f"{self.where}{'.' if key else ''}{key}: refused: {why}")

    def _find(self, name: str) -> tuple[str | None, str | None]:
        """Where a bare name is found in the PATH in force; or why a directory searched up to
        there could be given a program of that name by someone but root."""
        for directory in self.search.split(":"):
            if directory not in self._dirs:
                self._dirs[directory] = walk(directory)[1]
            if self._dirs[directory]:
                return None, self._dirs[directory]
            if _is_program(os.path.join(directory, name)):
                return os.path.join(directory, name), None
        return None, None

    def _resolve(self, word: str, search: bool) -> tuple[str | None, str | None]:
        real, why = walk(word, self.cwd) if "/" in word or not search else (None, None)
        if real is None and why is None and "/" not in word:
            found, why = self._find(word)
            real, why = walk(found) if found and not why else (None, why)
        return real, why

    def program(self, key: str, word: str, depth: int = 0, via: str = "") -> str | None:
        """Check a program to be run, and its ``#!`` interpreter; where it really is, or None."""
        real, why = self._resolve(word, search=True)
        if why:
            self.refuse(key, via + why)
        line = _interpreter_line(real) if real and not why and depth < _MAX_DEPTH else None
        if line:
            interpreter, _, argument = line.replace("\t", " ").partition(" ")
            via = f"{via}{real} starts with #!{line}: "
            self.program(key, interpreter, depth + 1, via)
            if os.path.basename(interpreter) == "env":  # #!/usr/bin/env [-S] NAME
                words = [w for w in argument.split() if w[0] != "-" and "=" not in w]
                if words:
                    self.program(key, words[0], depth + 1, via)
        return None if why else real

    def argv(
        self, argv: Sequence[str], key: Callable[[int], str], depth: int = 0, text: bool = False
    ) -> None:
        """A command's program, the script or shell text a known interpreter is given, and each
        argument that is a path to an executable file (what a wrapper would run); ``text``: a
        command of shell text, whose working directory a ``cd`` may have moved."""
        real = self.program(key(0), argv[0], depth)
        names = (os.path.basename(argv[0]), os.path.basename(real or ""))
        spec = next((s for s in _INTERPRETERS for n in names if re.fullmatch(s.names, n)), None)
        index, mode = _operand(argv, spec) if spec else (None, "")
        python = spec is not None and spec.python
        isolated = any(w[:1] == "-" and w[:2] != "--" and "I" in w for w in argv[1 : index or 1])
        if index is not None and mode == "shell":
            self.shell(key(index), argv[index], depth + 1)
        elif index is not None and mode == "script":
            self.script(key(index), argv[index], python, text)
        elif mode == "code" and python and not isolated:
            why = walk(self.cwd)[1]
            if why:
                self.refuse(key(index or 0), f"python imports from its working directory: {why}")
        for position, word in enumerate(argv[1:], 1):
            sets = _sets_loader([word], "the arguments") if position != index else None
            if sets:  # env NAME=value, sudo NAME=value
                self.refuse(key(position), sets)
            elif position != index and "/" in word and _is_program(os.path.join(self.cwd, word)):
                self.program(key(position), word, depth)

    def script(self, key: str, word: str, python: bool, text: bool = False) -> None:
        """A script given to an interpreter: from the working directory, else through the PATH
        (as bash and ``.`` look); in shell text, only from /."""
        if _EXPANDS & set(word) or (text and not word.startswith("/")):
            self.refuse(key, _cannot_follow(word))
            return
        real, why = self._resolve(word, search=False)
        if not why and real and python:
            why = walk(os.path.dirname(real))[1]  # first on the import path
            why = why and f"python imports from the script's directory: {why}"
        if why:
            self.refuse(key, why)

    def shell(self, key: str, text: str, depth: int = 0) -> None:
        """Shell text: each simple command is checked as an ``exec`` step's argv would be."""
        if depth > _MAX_DEPTH:
            self.refuse(key, "shell text nested too deep to follow")
            return
        try:
            commands = simple_commands(text)
        except ValueError as exc:
            self.refuse(key, f"the shell text cannot be read as sh would ({exc})")
            return
        for words in commands:
            for inner in [inner for word in words for inner in substitutions(word)]:
                self.shell(key, inner, depth + 1)
            sets = _sets_loader(words, "the shell text") if words[0] != ":" else None
            if sets:  # a prefix, export, env; not ':' (a here-document's body)
                self.refuse(key, sets)
                return
            while words and (words[0] in _PREFIXES or _ASSIGNMENT.match(words[0])):
                words = words[1:]
            if not words or words[0] in _NOT_A_COMMAND:
                continue
            command = words[0]
            if command in ("eval", "trap"):
                self.shell(key, " ".join(words[1:2] if command == "trap" else words[1:]), depth + 1)
            elif command in (".", "source") and len(words) > 1:
                self.script(key, words[1], False, text=True)
            elif _EXPANDS & set(command) or ("/" in command and not command.startswith("/")):
                self.refuse(key, _cannot_follow(command))
            else:
                self.argv(words, lambda _: key, depth, text=True)


def _sets_loader(words: Sequence[str], where: str) -> str | None:
    """Why words that set a variable of ``_LOADED_FROM`` (``NAME=value``) are refused."""
    names = [w.partition("=")[0] for w in words if _ASSIGNMENT.match(w)]
    name = next((name for name in names if name in _LOADED_FROM), None)
    return name and f"{name} is set in {where}, where the check cannot follow it; set it with env:"


def _cannot_follow(word: str) -> str:
    if _EXPANDS & set(word):
        return f"{word!r} is expanded by a shell, which the check cannot follow; write the path out"
    return f"{word!r} is a relative path, which the shell text may change (cd); write it from /"


def _home(user: str | None) -> str:
    """The working directory of a command without ``cwd`` (as ``commands.spawn`` picks it)."""
    return workdir(user, None)


def step_problems(where: str, step: Step) -> list[str]:
    """Why a step (``where``: ``apps.db.freeze[0]``) must not run: what it would run that someone
    but root could change, or that the check cannot follow."""
    if step.kind == "signal" or not step.argv:
        return []
    checker = _Checker(where, step.env, step.cwd, step.user)
    if step.kind == "shell":
        checker.program("shell", step.argv[0])
        checker.shell("shell", step.argv[2])
    else:
        checker.argv(step.argv, lambda index: f"exec[{index}]")
    return checker.problems


def session_problems(where: str, session: Session) -> list[str]:
    """Why a held session (``where``: ``apps.db.session``) must not start."""
    checker = _Checker(where, session.env, session.cwd, session.user)
    if session.argv:
        checker.argv(session.argv, lambda index: f"argv[{index}]")
    return checker.problems


def legacy_problems(directory: str, scripts: Sequence[str]) -> list[str]:
    """Why the legacy hook directory, or a script in it, must not run: checked at the load and at
    each scan, since scripts come and go."""
    checker = _Checker("settings.legacy_hooks")
    why = walk(directory)[1]
    if why:
        checker.refuse("", why)
    for script in scripts:
        checker.program("", script)
    return checker.problems


def insecure_programs(config: Config) -> list[str]:
    """What the daemon would run as root that someone else could change, or that the check
    cannot follow.  As sshd and sudo do: the config is root's only if what it runs is too."""
    problems: list[str] = []
    for app in config.apps:
        base = join_path("apps", app.name)
        if app.session is not None:
            problems.extend(session_problems(f"{base}.session", app.session))
        for phase, steps in (("freeze", app.freeze), ("thaw", app.thaw)):
            for index, step in enumerate(steps):
                problems.extend(step_problems(f"{base}.{phase}[{index}]", step))
    legacy = config.settings.legacy_hooks
    if legacy:
        try:
            names = sorted(os.listdir(legacy))
        except OSError:
            names = []
        problems.extend(legacy_problems(legacy, [os.path.join(legacy, n) for n in names]))
    return problems


def resolve_group(name: str | None) -> int | None:
    """The gid of ``settings.allowed_group`` on this host; None when unset or unknown."""
    if name is None:
        return None
    try:
        return grp.getgrnam(name).gr_gid
    except KeyError:
        return None


def host_problems(config: Config) -> list[str]:
    """Everything about the host that makes this config unsafe or impossible to obey."""
    problems = insecure_programs(config)
    group = config.settings.allowed_group
    if group is not None and resolve_group(group) is None:
        problems.append(f"settings.allowed_group: no such group {group!r}")
    return problems
