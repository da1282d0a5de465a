"""The schema is the one list of keys: the validator, the model and the documents agree with it."""

from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from qgafreeze import schema, schemadoc
from qgafreeze.config import load_file, parse_config, parse_text
from qgafreeze.errors import ConfigError
from qgafreeze.fields import parse_duration
from qgafreeze.model import App, Session, Settings, Step

# Where each section's keys sit in a document, and mappings around which a key may be read (a
# step's keys are read in an exec step or a signal step).
PLACES: dict[str, tuple[str, list[dict[str, Any]]]] = {
    "TOP LEVEL": ("", [{}]),
    "SETTINGS": ("settings", [{}]),
    "APPS": ("apps.a", [{"units": ["a"]}]),
    "SESSION": ("apps.a.session", [{"argv": ["/bin/cat"], "ready": "x"}]),
    "PRESET OPTIONS": ("apps.a.options", [{}]),
    "STEPS": (
        "apps.a.freeze[0]",
        [{}, {"exec": ["/bin/true"]}, {"signal": "USR1", "units": ["a"]}],
    ),
}
SECTION_KEYS = [(section, key) for section in schema.SECTIONS for key in section.keys]


def document(section: schema.Section, mapping: dict[str, Any]) -> dict[str, Any]:
    """A config document with ``mapping`` where ``section``'s keys go."""
    if section is schema.TOP:
        return mapping
    if section is schema.SETTINGS:
        return {"settings": mapping}
    app: dict[str, Any]
    if section is schema.APP:
        app = mapping
    elif section is schema.SESSION:
        app = {"session": mapping}
    elif section is schema.PRESET_OPTIONS:
        app = {"preset": "mariadb", "options": mapping}
    else:
        app = {"freeze": [mapping]}
    return {"apps": {"a": app}}


def problems(data: dict[str, Any]) -> list[str]:
    try:
        parse_config(data)
    except ConfigError as exc:
        return exc.problems
    return []


def where(section: schema.Section, key: str) -> str:
    place = PLACES[section.title][0]
    return f"{place}.{key}" if place else key


def test_every_section_of_the_schema_has_a_place_in_these_tests():
    assert [section.title for section in schema.SECTIONS] == list(PLACES)


@pytest.mark.parametrize(("section", "key"), SECTION_KEYS, ids=lambda x: getattr(x, "name", ""))
def test_the_validator_accepts_every_key_of_the_schema(section, key):
    for base in PLACES[section.title][1]:
        found = problems(document(section, {**base, key.name: None}))
        assert not [p for p in found if "unknown key" in p], found


@pytest.mark.parametrize(("section", "key"), SECTION_KEYS, ids=lambda x: getattr(x, "name", ""))
def test_the_validator_reads_every_key_of_the_schema(section, key):
    # A value no key accepts: a key the validator let through without reading would raise
    # nothing at its own place.
    path = where(section, key.name)
    found = [
        problem
        for base in PLACES[section.title][1]
        for problem in problems(document(section, {**base, key.name: [[]]}))
    ]
    assert any(p.startswith((f"{path}:", f"{path}[", f"{path}.")) for p in found), found


@pytest.mark.parametrize("section", schema.SECTIONS, ids=lambda s: s.title)
def test_a_key_the_schema_lacks_is_refused_naming_the_schemas_keys(section):
    base = PLACES[section.title][1][-1]
    found = problems(document(section, {**base, "not_in_schema": 1}))
    assert (
        f"{where(section, 'not_in_schema')}: unknown key (allowed: {', '.join(section.names)})"
        in found
    )


def test_settings_are_the_schemas_settings_with_its_defaults():
    assert [f.name for f in dataclasses.fields(Settings)] == list(schema.SETTINGS.names)
    settings = parse_config({}).settings
    for key in schema.SETTINGS.keys:
        value = getattr(settings, key.name)
        if key.type == "duration":
            assert value == parse_duration(key.value), key.name
        elif isinstance(key.value, list):
            assert value == tuple(key.value), key.name
        else:
            assert value == key.value, key.name


def test_an_app_with_nothing_but_units_has_the_schemas_defaults():
    app = parse_config({"apps": {"a": {"units": ["a"]}}}).app("a")
    assert app.timeout == parse_duration(schema.APP.key("timeout").value)
    assert app.on_failure == schema.APP.key("on_failure").value
    assert app.mode == schema.APP.key("mode").value
    assert list(app.depends_on) == schema.APP.key("depends_on").value


@pytest.mark.parametrize(
    ("model", "section"), [(App, schema.APP), (Session, schema.SESSION), (Step, schema.STEP)]
)
def test_a_default_the_model_writes_itself_is_the_schemas(model, section):
    for field in dataclasses.fields(model):
        if field.name in section.names and field.default is not dataclasses.MISSING:
            key = section.key(field.name)
            if key.default is not None:
                value = tuple(key.value) if isinstance(key.value, list) else key.value
                assert field.default == value, f"{model.__name__}.{field.name}"


@pytest.mark.parametrize(("section", "key"), SECTION_KEYS, ids=lambda x: getattr(x, "name", ""))
def test_every_key_is_described_and_every_default_is_one_of_its_choices(section, key):
    assert key.type and key.description.endswith(".")
    assert "\n" not in key.description
    if key.choices and key.default is not None:
        assert key.default in key.choices


# -- the documents -----------------------------------------------------------------------------

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "config" / "qgafreeze.yaml"


def keys_used(data: dict[str, Any]) -> dict[str, set[str]]:
    """The keys a config document writes, by schema section."""
    apps = list((data.get("apps") or {}).values())
    sessions = [app["session"] for app in apps if "session" in app]
    steps = [step for app in apps for step in app.get("freeze", []) + app.get("thaw", [])]
    return {
        "TOP LEVEL": set(data),
        "SETTINGS": set(data.get("settings") or {}),
        "APPS": {key for app in apps for key in app},
        "SESSION": {key for session in sessions for key in session},
        "PRESET OPTIONS": {key for app in apps for key in app.get("options") or {}},
        "STEPS": {key for step in steps for key in step},
    }


def test_the_example_config_writes_every_key_of_the_schema():
    used = keys_used(yaml.safe_load(EXAMPLE.read_text()))
    for section in schema.SECTIONS:
        missing = set(section.names) - used[section.title]
        assert not missing, f"config/qgafreeze.yaml lacks {section.title} keys {sorted(missing)}"


def test_the_example_config_shows_every_setting_with_the_schemas_default():
    settings = yaml.safe_load(EXAMPLE.read_text())["settings"]
    assert list(settings) == list(schema.SETTINGS.names)
    for key in schema.SETTINGS.keys:
        assert settings[key.name] == key.value, key.name
    assert load_file(str(EXAMPLE)).settings == parse_config({}).settings


def test_the_readme_table_of_settings_is_the_one_the_schema_makes():
    readme = (REPO / "README.md").read_text()
    table = readme.split(schemadoc.README_BEGIN, 1)[1].split(schemadoc.README_END, 1)[0]
    assert table == schemadoc.markdown_settings(), "run: python3 -m qgafreeze.schemadoc write"


def test_the_readme_names_every_key_of_the_schema():
    readme = (REPO / "README.md").read_text()
    for section in schema.SECTIONS:
        for name in section.names:
            assert re.search(rf"\b{name}\b", readme), f"README.md never names {name}"


def test_the_readme_example_is_a_valid_config():
    readme = (REPO / "README.md").read_text()
    declare = readme.split("## Declare your applications", 1)[1]
    assert parse_text(declare.split("```yaml\n", 1)[1].split("```", 1)[0]).apps


def test_the_man_page_is_the_one_the_schema_makes():
    page = (REPO / schemadoc.MAN_PAGE).read_text()
    assert page == schemadoc.man_page(), "run: python3 -m qgafreeze.schemadoc write"
    for section in schema.SECTIONS:
        described = page.split(f'.SH "{section.title}"\n', 1)[1].split(".SH ", 1)[0]
        for name in section.names:
            assert f".TP\n.B {name}\n" in described, f"{section.title}: {name}"


def test_the_man_pages_example_is_a_valid_config():
    assert parse_text(schemadoc.MAN_EXAMPLE).apps


def test_write_brings_stale_documents_back_to_the_schema(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / schemadoc.MAN_PAGE).write_text("stale\n")
    readme = (REPO / "README.md").read_text()
    begin = readme.index(schemadoc.README_BEGIN) + len(schemadoc.README_BEGIN)
    (tmp_path / "README.md").write_text(readme[:begin] + "| stale |\n" + readme[begin:])
    check = [sys.executable, "-m", "qgafreeze.schemadoc", "check", str(tmp_path)]
    env = {"PYTHONPATH": str(REPO / "src"), "PATH": os.environ.get("PATH", "/usr/bin:/bin")}
    assert subprocess.run(check, env=env, capture_output=True).returncode == 1
    write = [sys.executable, "-m", "qgafreeze.schemadoc", "write", str(tmp_path)]
    assert subprocess.run(write, env=env, capture_output=True).returncode == 0
    assert schemadoc.stale_documents(tmp_path) == []
    assert (tmp_path / "README.md").read_text() == readme


def test_the_committed_documents_are_current():
    assert schemadoc.stale_documents(REPO) == []
