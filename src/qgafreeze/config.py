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

from . import fields
from .appconfig import parse_app
from .errors import ConfigError
from .fields import ACCOUNT_NAME, Problems
from .model import CONFIG_VERSION, LEGACY_APP, App, Config, Settings
from .trust import check_file_permissions, host_problems


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
    defaults = Settings()
    if raw is None:
        return defaults
    if not isinstance(raw, dict):
        problems.add("settings", f"expected a mapping, got {fields.kind(raw)}")
        return defaults
    fields.check_keys(
        problems,
        "settings",
        raw,
        (
            "freeze_timeout",
            "thaw_timeout",
            "max_frozen",
            "hook_log",
            "socket",
            "agent_state_file",
            "legacy_hooks",
            "legacy_hook_timeout",
            "allowed_group",
        ),
    )
    allowed_group = None
    if raw.get("allowed_group") is not None:
        value = raw["allowed_group"]
        # Whether the group exists is the host's business (trust.host_problems), not parsing's.
        if isinstance(value, str) and ACCOUNT_NAME.match(value):
            allowed_group = value
        else:
            problems.add(
                "settings.allowed_group", f"expected a group name, got {fields.kind(value)}"
            )
    legacy_hooks = None
    if raw.get("legacy_hooks") is not None:
        value = raw["legacy_hooks"]
        if isinstance(value, str) and value.startswith("/"):
            legacy_hooks = value.rstrip("/") or "/"
        else:
            problems.add(
                "settings.legacy_hooks", f"expected an absolute directory, got {fields.kind(value)}"
            )
    hook_log: str | None = defaults.hook_log
    if "hook_log" in raw:
        value = raw["hook_log"]
        if value is None or value is False:
            hook_log = None
        elif isinstance(value, str) and value.startswith("/"):
            hook_log = value
        else:
            problems.add(
                "settings.hook_log", f"expected an absolute path or null, got {fields.kind(value)}"
            )
    agent_state_file = defaults.agent_state_file
    if "agent_state_file" in raw:
        value = raw["agent_state_file"]
        if value is None or value is False:
            agent_state_file = None
        elif isinstance(value, str) and value.startswith("/") and not value.endswith("/"):
            agent_state_file = value
        else:
            problems.add(
                "settings.agent_state_file",
                f"expected an absolute file path or null, got {fields.kind(value)}",
            )
    socket = defaults.socket
    if "socket" in raw:
        value = raw["socket"]
        if not isinstance(value, str) or not value.startswith("/"):
            problems.add("settings.socket", f"expected an absolute path, got {fields.kind(value)}")
        elif len(value.encode()) >= 108:
            problems.add("settings.socket", "a unix socket path must be shorter than 108 bytes")
        else:
            socket = value
    return Settings(
        freeze_timeout=fields.duration(
            problems, "settings.freeze_timeout", raw.get("freeze_timeout"), defaults.freeze_timeout
        ),
        thaw_timeout=fields.duration(
            problems, "settings.thaw_timeout", raw.get("thaw_timeout"), defaults.thaw_timeout
        ),
        max_frozen=fields.duration(
            problems,
            "settings.max_frozen",
            raw.get("max_frozen"),
            defaults.max_frozen,
            zero_ok=True,
        ),
        hook_log=hook_log,
        socket=socket,
        agent_state_file=agent_state_file,
        legacy_hooks=legacy_hooks,
        allowed_group=allowed_group,
        legacy_hook_timeout=fields.duration(
            problems,
            "settings.legacy_hook_timeout",
            raw.get("legacy_hook_timeout"),
            defaults.legacy_hook_timeout,
        ),
    )


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
    fields.check_keys(problems, "", data, ("version", "settings", "apps"))
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
        apps.append(
            App(
                name=LEGACY_APP,
                legacy_hooks=settings.legacy_hooks,
                timeout=settings.freeze_timeout,
            )
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
    return Config(source=source, settings=settings, apps=tuple(apps))


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
            refusal = check_file_permissions(path, st)
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
