"""`/etc/qgafreeze.yaml` → validated, frozen dataclasses (``model``).

This is the only module that sees raw YAML; it checks the file as a whole and its settings, and
leaves each app to ``appconfig`` and each value to ``fields``.  Validation collects every problem
with its place (``apps.shop.depends_on[0]: unknown app 'mariadbx'``) and raises one ConfigError,
so an administrator fixes a file in one pass.  Unknown keys are errors: a typo such as ``timout``
must not silently fall back to a default during a production backup.  Parsing asks the host
nothing; ``load_file`` adds what the host must hold for the file to be obeyed (``trust``).
"""

from __future__ import annotations

import os
import stat
from typing import Any

import yaml

from . import fields, schema
from .appconfig import legacy_app, parse_app
from .errors import ConfigError
from .fields import ACCOUNT_NAME, Problems
from .model import CONFIG_VERSION, App, Config, Settings
from .protocol import OPS
from .trust import check_file_permissions, host_problems, walk


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate keys: YAML keeps the last one silently."""


def _construct_mapping(loader: _StrictLoader, node: yaml.MappingNode) -> dict[Any, Any]:
    seen: dict[Any, int] = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node)  # type: ignore[no-untyped-call]
        try:
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None,
                    None,
                    f"duplicate key {key!r} (first on line {seen[key] + 1})",
                    key_node.start_mark,
                )
            seen[key] = key_node.start_mark.line
        except TypeError:  # unhashable key; the validator reports it
            pass
    loader.flatten_mapping(node)
    return dict(loader.construct_pairs(node))  # type: ignore[no-untyped-call]


_StrictLoader.add_constructor(
    yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG,
    _construct_mapping,
)


def _parse_settings(problems: Problems, raw: Any) -> Settings:
    if raw is None:
        raw = {}
    elif not isinstance(raw, dict):
        problems.add("settings", f"expected a mapping, got {fields.kind(raw)}")
        raw = {}
    fields.check_keys(problems, "settings", raw, schema.SETTINGS)
    # What the administrator wrote, or else the schema's default, checked the same way: the
    # defaults are written once, in the schema, as an administrator would write them.
    given = {key.name: raw.get(key.name, key.value) for key in schema.SETTINGS.keys}

    def seconds(name: str, zero_ok: bool = False) -> float:
        fallback = fields.parse_duration(schema.SETTINGS.key(name).value)
        return fields.duration(problems, f"settings.{name}", given[name], fallback, zero_ok=zero_ok)

    def absolute(name: str, expected: str, null_ok: bool = True, file: bool = False) -> str | None:
        value = given[name]
        if value is None or (value is False and null_ok):
            return None
        if isinstance(value, str) and value.startswith("/") and not (file and value.endswith("/")):
            return value if fields.no_nul(problems, f"settings.{name}", value) else None
        problems.add(f"settings.{name}", f"expected {expected}, got {fields.kind(value)}")
        return None

    def boolean(name: str) -> bool:
        value = given[name]
        if isinstance(value, bool):
            return value
        problems.add(f"settings.{name}", f"expected true or false, got {fields.kind(value)}")
        return bool(schema.SETTINGS.key(name).value)

    legacy_hooks = absolute("legacy_hooks", "an absolute directory", null_ok=False)
    allowed_group = given["allowed_group"]
    # Whether the group exists is the host's business (trust.host_problems), not parsing's.
    if allowed_group is not None and not (
        isinstance(allowed_group, str) and ACCOUNT_NAME.match(allowed_group)
    ):
        problems.add(
            "settings.allowed_group", f"expected a group name, got {fields.kind(allowed_group)}"
        )
        allowed_group = None
    return Settings(
        freeze_timeout=seconds("freeze_timeout"),
        thaw_timeout=seconds("thaw_timeout"),
        max_frozen=seconds("max_frozen", zero_ok=True),
        watchdog_thaws_filesystems=boolean("watchdog_thaws_filesystems"),
        hook_log=absolute("hook_log", "an absolute path or null"),
        agent_state_file=absolute("agent_state_file", "an absolute file path or null", file=True),
        legacy_hooks=legacy_hooks and (legacy_hooks.rstrip("/") or "/"),
        legacy_hook_timeout=seconds("legacy_hook_timeout"),
        allowed_group=allowed_group,
        allowed_group_ops=_ops(problems, "settings.allowed_group_ops", given["allowed_group_ops"]),
    )


def _ops(problems: Problems, path: str, value: Any) -> tuple[str, ...]:
    """A list of request ops, each once (``[]``: the group may not even ping)."""
    if not isinstance(value, list):
        problems.add(path, f"expected a list of {', '.join(OPS)}, got {fields.kind(value)}")
        return ()
    ops: list[str] = []
    for index, op in enumerate(value):
        if op not in OPS:
            problems.add(
                f"{path}[{index}]", f"expected one of {', '.join(OPS)}, got {fields.kind(op)}"
            )
        elif op in ops:
            problems.add(f"{path}[{index}]", f"{op!r} is listed twice")
        else:
            ops.append(op)
    return tuple(ops)


def find_cycle(graph: dict[str, tuple[str, ...]]) -> list[str] | None:
    """A dependency cycle as ``[a, b, a]``, or None.  Deterministic: follows file order."""
    white, grey, black = 0, 1, 2
    colour = dict.fromkeys(graph, white)
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        colour[node] = grey
        stack.append(node)
        for nxt in graph.get(node, ()):
            if nxt not in colour:
                continue
            if colour[nxt] == grey:
                return [*stack[stack.index(nxt) :], nxt]
            if colour[nxt] == white:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        colour[node] = black
        return None

    for node in graph:
        if colour[node] == white:
            found = visit(node)
            if found:
                return found
    return None


def parse_config(data: Any, source: str = "<config>") -> Config:
    """Validate a parsed YAML document.  Raises ConfigError listing every problem."""
    problems = Problems()
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(source, [f"expected a mapping at the top level, got {fields.kind(data)}"])
    fields.check_keys(problems, "", data, schema.TOP)
    version = data.get("version", CONFIG_VERSION)
    if version != CONFIG_VERSION or isinstance(version, bool):
        problems.add("version", f"unsupported version {version!r} (this qgafreeze reads 1)")
    settings = _parse_settings(problems, data.get("settings"))

    raw_apps = data.get("apps")
    apps: list[App] = []
    if raw_apps is None:
        raw_apps = {}
    if not isinstance(raw_apps, dict):
        problems.add("apps", f"expected a mapping of app names, got {fields.kind(raw_apps)}")
        raw_apps = {}
    for name, raw in raw_apps.items():
        app = parse_app(problems, name, raw)
        if app is not None:
            apps.append(app)
    if settings.legacy_hooks:
        # The old hook directory is one more app: other apps may depend on it by this name.
        apps.append(legacy_app(settings.legacy_hooks, settings.freeze_timeout))

    for app in apps:
        # Valid, but the phase's deadline would end the app's part first: say so, not silently.
        for phase, limit in (("freeze", settings.freeze_timeout), ("thaw", settings.thaw_timeout)):
            if app.name in raw_apps and app.timeout > limit:
                problems.warn(
                    f"apps.{app.name}.timeout",
                    f"{fields.format_duration(app.timeout)} is longer than settings.{phase}_timeout"
                    f" ({fields.format_duration(limit)}): the {phase} gives up on this app first",
                )

    names = {app.name for app in apps}
    for app in apps:
        if app.name not in raw_apps:
            continue
        # Index into the raw list so the path names the item as the administrator wrote it.
        raw_deps = raw_apps[app.name].get("depends_on")
        for index, dep in enumerate(raw_deps if isinstance(raw_deps, list) else []):
            if not isinstance(dep, str):
                continue
            where = f"apps.{app.name}.depends_on[{index}]"
            if dep.strip() == app.name:
                problems.add(where, "an app cannot depend on itself")
            elif dep.strip() not in names and dep.strip() not in raw_apps:
                problems.add(where, f"unknown app {dep.strip()!r}")

    owners: dict[str, str] = {}
    for app in apps:
        for unit in app.units:
            if unit in owners:
                problems.add(
                    f"apps.{app.name}.units",
                    f"{unit!r} is already quiesced by app {owners[unit]!r}",
                )
            else:
                owners[unit] = app.name

    graph = {
        app.name: tuple(d for d in app.depends_on if d in names and d != app.name) for app in apps
    }
    cycle = find_cycle(graph)
    if cycle:
        problems.add("apps", "dependency cycle: " + " -> ".join(cycle))

    if problems.items:
        raise ConfigError(source, problems.items)
    return Config(
        source=source, settings=settings, apps=tuple(apps), warnings=tuple(problems.warnings)
    )


def parse_text(text: str, source: str = "<config>") -> Config:
    try:
        data = yaml.load(text, Loader=_StrictLoader)
    except yaml.YAMLError as exc:
        raise ConfigError(source, [_yaml_problem(exc)]) from None
    return parse_config(data, source)


def _yaml_problem(exc: yaml.YAMLError) -> str:
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None) or str(exc)
    if mark is not None:
        return f"line {mark.line + 1}, column {mark.column + 1}: {problem}"
    return f"not valid YAML: {problem}"


def load_file(path: str) -> Config:
    """Read, permission-check and validate a config file.  Raises ConfigError."""
    try:
        with open(path, "rb") as handle:
            st = os.fstat(handle.fileno())
            if not stat.S_ISREG(st.st_mode):
                raise ConfigError(path, ["not a regular file"])
            # Anyone who could replace it, through a directory above it or a symlink on the way,
            # could write it as well.
            refusal = check_file_permissions(path, st) or walk(path, os.getcwd())[1]
            if refusal:
                raise ConfigError(path, [f"refused: {refusal}"])
            raw = handle.read(1024 * 1024 + 1)
    except OSError as exc:
        raise ConfigError(path, [f"cannot be read: {exc.strerror or exc}"]) from None
    if len(raw) > 1024 * 1024:
        raise ConfigError(path, ["larger than 1 MiB; this is not a qgafreeze config"])
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(path, [f"not UTF-8 text (byte {exc.start})"]) from None
    config = parse_text(text, path)
    refusals = host_problems(config)
    if refusals:
        raise ConfigError(path, refusals)
    return config
