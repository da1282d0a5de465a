"""One entry under ``apps:``, checked into a model.App: its preset, units, session and steps."""

from __future__ import annotations

import re
from typing import Any

from . import fields, schema
from .fields import Problems
from .model import (
    LEGACY_APP,
    MODES,
    ON_FAILURE_CHOICES,
    SIGNALS,
    WHOM,
    App,
    Session,
    Step,
    join_path,
)
from .presets import OPTIONS, PRESETS, apply_preset

_APP_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


def _default(section: schema.Section, key: str) -> Any:
    return section.key(key).value


def _apply_preset(problems: Problems, path: str, raw: dict[str, Any]) -> dict[str, Any]:
    name = raw.get("preset")
    if name is None:
        if raw.get("options") is not None:
            problems.add(f"{path}.options", "applies to a preset's quiesce helper; add a preset")
        return raw
    if not isinstance(name, str) or name not in PRESETS:  # a list would not even hash
        problems.add(
            f"{path}.preset", f"unknown preset {fields.kind(name)} (known: {', '.join(PRESETS)})"
        )
        return raw
    return apply_preset(name, raw, _helper_args(problems, f"{path}.options", name, raw))


def _helper_args(problems: Problems, path: str, preset: str, raw: dict[str, Any]) -> list[str]:
    """The preset's options (schema.PRESET_OPTIONS), checked, as its helper's arguments: each
    one the helper takes, written or not, so that the plan shows every value in force."""
    given = raw.get("options")
    if given is None:
        given = {}
    elif not isinstance(given, dict):
        problems.add(path, f"expected a mapping, got {fields.kind(given)}")
        given = {}
    fields.check_keys(problems, path, given, schema.PRESET_OPTIONS)
    takes = OPTIONS.get(preset, ())
    args = []
    for key in schema.PRESET_OPTIONS.keys:
        value = given.get(key.name)
        if key.name not in takes:
            if key.name in given:
                problems.add(f"{path}.{key.name}", f"preset {preset} does not take this option")
            continue
        flag = "--" + key.name.replace("_", "-")
        if isinstance(key.value, bool):
            if value is not None and not isinstance(value, bool):
                problems.add(
                    f"{path}.{key.name}", f"expected true or false, got {fields.kind(value)}"
                )
            elif value if value is not None else key.value:
                args.append(flag)
        else:
            default = fields.parse_duration(key.value)
            seconds = fields.duration(problems, f"{path}.{key.name}", value, default)
            args.append(f"{flag}={seconds:g}")
    return args


def _session(problems: Problems, path: str, raw: Any) -> Session | None:
    if not isinstance(raw, dict):
        problems.add(path, f"expected a mapping, got {fields.kind(raw)}")
        return None
    fields.check_keys(problems, path, raw, schema.SESSION)
    texts = {}
    for key in ("open", "close"):
        value = raw.get(key, _default(schema.SESSION, key))
        if not isinstance(value, str):
            problems.add(f"{path}.{key}", f"expected text, got {fields.kind(value)}")
            value = ""
        texts[key] = value if not value or value.endswith("\n") else value + "\n"
    ready = raw.get("ready")
    if not isinstance(ready, str) or not ready:
        problems.add(f"{path}.ready", "expected a regular expression the output shows when ready")
        ready = ""
    else:
        try:
            re.compile(ready)
        except re.error as exc:
            problems.add(f"{path}.ready", f"not a valid regular expression: {exc}")
    return Session(
        argv=fields.argv(problems, f"{path}.argv", raw.get("argv")),
        open=texts["open"],
        ready=ready,
        close=texts["close"],
        user=fields.user(problems, f"{path}.user", raw.get("user")),
        env=fields.env(problems, f"{path}.env", raw.get("env")),
        cwd=fields.cwd(problems, f"{path}.cwd", raw.get("cwd")),
    )


def _step(problems: Problems, path: str, raw: Any) -> Step | None:
    if not isinstance(raw, dict):
        problems.add(
            path, f"expected a mapping such as {{exec: [program, arg]}}, got {fields.kind(raw)}"
        )
        return None
    fields.check_keys(problems, path, raw, schema.STEP)
    kinds = [k for k in ("exec", "shell", "signal") if k in raw]
    if len(kinds) != 1:
        problems.add(path, "needs exactly one of exec (argv list), shell (command text), signal")
        return None
    kind = kinds[0]
    timeout = None
    if raw.get("timeout") is not None:
        timeout = fields.duration(problems, f"{path}.timeout", raw.get("timeout"), 0.0)
    if kind == "signal":
        name = raw["signal"]
        number = 0
        if isinstance(name, str) and name.upper().removeprefix("SIG") in SIGNALS:
            name = name.upper().removeprefix("SIG")
            number = SIGNALS[name]
        elif isinstance(name, int) and not isinstance(name, bool) and 0 < name < 65:
            number, name = name, str(name)
        else:
            problems.add(
                f"{path}.signal", f"expected a signal such as USR1, got {fields.kind(name)}"
            )
            name = ""
        whom = raw.get("whom", _default(schema.STEP, "whom"))
        if whom not in WHOM:
            problems.add(
                f"{path}.whom", f"expected one of {', '.join(WHOM)}, got {fields.kind(whom)}"
            )
        units = fields.units(problems, f"{path}.units", raw.get("units"))
        if not units:
            problems.add(f"{path}.units", "a signal needs the units whose processes get it")
        for key in ("user", "env", "cwd"):
            if key in raw:
                problems.add(f"{path}.{key}", "applies to exec and shell steps, not to signals")
        return Step(
            kind="signal", signal=number, signal_name=f"SIG{name}", units=units, whom=str(whom)
        )
    if "units" in raw or "whom" in raw:
        problems.add(path, "units and whom apply to signal steps only")
    if kind == "shell":
        text = raw["shell"]
        if not isinstance(text, str) or not text.strip():
            problems.add(f"{path}.shell", f"expected a command line, got {fields.kind(text)}")
            text = ""
        elif not fields.no_nul(problems, f"{path}.shell", text):
            text = ""
        argv: tuple[str, ...] = ("/bin/sh", "-c", text)
    else:
        argv = fields.argv(problems, f"{path}.exec", raw["exec"])
    return Step(
        kind=kind,
        argv=argv,
        user=fields.user(problems, f"{path}.user", raw.get("user")),
        env=fields.env(problems, f"{path}.env", raw.get("env")),
        cwd=fields.cwd(problems, f"{path}.cwd", raw.get("cwd")),
        timeout=timeout,
    )


def _steps(problems: Problems, path: str, raw: Any) -> tuple[Step, ...]:
    if raw is None:
        return ()
    if not isinstance(raw, list):
        problems.add(path, f"expected a list of steps, got {fields.kind(raw)}")
        return ()
    steps = [_step(problems, f"{path}[{i}]", item) for i, item in enumerate(raw)]
    return tuple(s for s in steps if s is not None)


def parse_app(problems: Problems, name: Any, raw: Any) -> App | None:
    path = join_path("apps", name)
    if not isinstance(name, str) or not _APP_NAME.match(name):
        problems.add(
            path,
            "an app name is letters, digits, '_', '.' or '-', starting with a letter or digit",
        )
        return None
    if name == LEGACY_APP:
        problems.add(path, f"'{LEGACY_APP}' is the app made from settings.legacy_hooks")
        return None
    if not isinstance(raw, dict):
        problems.add(path, f"expected a mapping, got {fields.kind(raw)}")
        return None
    fields.check_keys(problems, path, raw, schema.APP)
    raw = _apply_preset(problems, path, raw)

    units = fields.units(problems, f"{path}.units", raw.get("units"))
    if raw.get("units") == []:
        problems.add(f"{path}.units", "is empty")
    session = _session(problems, f"{path}.session", raw["session"]) if "session" in raw else None
    freeze = _steps(problems, f"{path}.freeze", raw.get("freeze"))
    thaw = _steps(problems, f"{path}.thaw", raw.get("thaw"))
    if not any(key in raw for key in ("units", "session", "freeze", "thaw", "preset")):
        problems.add(path, "no action: add units, session, freeze or thaw steps, or a preset")

    mode = raw.get("mode", _default(schema.APP, "mode"))
    if mode not in MODES:
        problems.add(f"{path}.mode", f"expected one of {', '.join(MODES)}, got {fields.kind(mode)}")
        mode = _default(schema.APP, "mode")
    elif "mode" in raw and not units:
        problems.add(f"{path}.mode", "applies to units; this app lists none")

    on_failure = raw.get("on_failure", _default(schema.APP, "on_failure"))
    if on_failure not in ON_FAILURE_CHOICES:
        problems.add(
            f"{path}.on_failure",
            f"expected one of {', '.join(ON_FAILURE_CHOICES)}, got {fields.kind(on_failure)}",
        )
        on_failure = _default(schema.APP, "on_failure")

    depends_on = []
    for item_path, dep in fields.string_list(problems, f"{path}.depends_on", raw.get("depends_on")):
        if dep in depends_on:
            problems.add(item_path, f"{dep!r} is listed twice")
        else:
            depends_on.append(dep)

    timeout = fields.duration(
        problems,
        f"{path}.timeout",
        raw.get("timeout"),
        fields.parse_duration(_default(schema.APP, "timeout")),
    )
    _warn_of_waits_beyond(problems, f"{path}.options", raw, timeout)
    return App(
        name=name,
        units=units,
        depends_on=tuple(depends_on),
        timeout=timeout,
        on_failure=on_failure,
        mode=mode,
        session=session,
        freeze=freeze,
        thaw=thaw,
        preset=raw.get("preset") if isinstance(raw.get("preset"), str) else None,
    )


def _warn_of_waits_beyond(
    problems: Problems, path: str, raw: dict[str, Any], timeout: float
) -> None:
    """The helper's own waits (long statements, then the lock) must end inside the app's timeout,
    or the timeout ends the helper first and the reason it would have named is lost."""
    waits = ("long_query_wait", "lock_wait_timeout")
    if not all(key in OPTIONS.get(str(raw.get("preset")), ()) for key in waits):
        return
    given = raw.get("options")
    if not isinstance(given, dict):
        given = {}
    total = 0.0
    for key in waits:
        try:
            total += fields.parse_duration(given.get(key, schema.PRESET_OPTIONS.key(key).value))
        except ValueError:
            return  # already an error at its place
    if total >= timeout:
        problems.warn(
            path,
            f"long_query_wait + lock_wait_timeout ({fields.format_duration(total)}) is not shorter"
            f" than the app's timeout ({fields.format_duration(timeout)}): the timeout ends the"
            " helper before it can say why it could not lock",
        )


def legacy_app(directory: str, timeout: float) -> App:
    """The app made from settings.legacy_hooks: other apps may depend on it by its name."""
    return App(
        name=LEGACY_APP,
        legacy_hooks=directory,
        timeout=timeout,
        on_failure=_default(schema.APP, "on_failure"),
        mode=_default(schema.APP, "mode"),
    )
