"""What the config accepts, what it refuses, and how it says so."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from qgafreeze.config import (
    DEFAULT_HOOK_LOG,
    load_file,
    parse_config,
    parse_duration,
    parse_text,
)
from qgafreeze.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]


def problems(text: str) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        parse_text(text)
    return caught.value.problems


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("500ms", 0.5), ("30s", 30), ("2m", 120), ("1h", 3600), (45, 45), (1.5, 1.5), ("7", 7)],
)
def test_durations_accept_the_documented_forms(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["-1s", "10 minutes", "1d", "", True, [1], "nan"])
def test_durations_refuse_anything_else(text):
    with pytest.raises(ValueError):
        parse_duration(text)


def test_the_shipped_example_config_is_valid_and_uses_every_setting():
    config = load_file(str(REPO / "config" / "qgafreeze.yaml"))
    assert [app.name for app in config.apps] == ["mariadb", "shop", "metrics"]
    assert config.app("shop").depends_on == ("mariadb",)
    assert config.settings.hook_log == DEFAULT_HOOK_LOG


def test_defaults_are_safe_when_settings_are_omitted():
    config = parse_text("version: 1\napps:\n  db:\n    units: [mariadb]\n")
    assert config.settings.freeze_timeout == 60
    assert config.settings.thaw_timeout == 120
    assert config.settings.max_frozen == 900
    assert config.app("db").on_failure == "abort"
    assert config.app("db").units == ("mariadb.service",)


def test_every_error_is_reported_at_once_with_its_path():
    found = problems(
        """
version: 1
settings:
  freeze_timout: 10s
apps:
  shop:
    units: [shop-web.service]
    depends_on: [mariadbx]
    on_failure: maybe
    timeout: soon
"""
    )
    assert found == [
        "settings.freeze_timout: unknown key (allowed: freeze_timeout, thaw_timeout, max_frozen,"
        " hook_log, socket, agent_state_file, legacy_hooks, legacy_hook_timeout)",
        "apps.shop.on_failure: expected one of abort, continue, got string 'maybe'",
        "apps.shop.timeout: expected a duration such as 500ms, 30s, 2m or 1h, got 'soon'",
        "apps.shop.depends_on[0]: unknown app 'mariadbx'",
    ]


def test_unknown_app_key_is_an_error_not_ignored():
    assert problems("apps:\n  db:\n    units: [a]\n    timout: 3s\n") == [
        "apps.db.timout: unknown key (allowed: preset, units, mode, session, freeze, thaw,"
        " depends_on, timeout, on_failure)"
    ]


def test_dependency_cycle_is_named():
    found = problems(
        "apps:\n"
        "  shop: {units: [a], depends_on: [cache]}\n"
        "  cache: {units: [b], depends_on: [shop]}\n"
    )
    assert found == ["apps: dependency cycle: shop -> cache -> shop"]


def test_self_dependency_is_named():
    assert problems("apps:\n  a: {units: [a], depends_on: [a]}\n") == [
        "apps.a.depends_on[0]: an app cannot depend on itself"
    ]


@pytest.mark.parametrize(
    "unit",
    [
        "dbus.service",
        "systemd-journald.service",
        "qemu-guest-agent.service",
        "qgafreeze.socket",
        "systemd-logind",
    ],
)
def test_units_the_freeze_needs_cannot_be_stopped(unit):
    (found,) = problems(f"apps:\n  x:\n    units: [{unit}]\n")
    assert "needed by the freeze itself" in found


@pytest.mark.parametrize("unit", ["-.mount", "multi-user.target", "system.slice"])
def test_only_service_socket_timer_and_path_units_can_be_quiesced(unit):
    (found,) = problems(f"apps:\n  x:\n    units: ['{unit}']\n")
    assert "only .service, .socket, .timer, .path units" in found


def test_a_unit_in_two_apps_is_refused():
    found = problems("apps:\n  a: {units: [db]}\n  b: {units: [db.service]}\n")
    assert found == ["apps.b.units: 'db.service' is already quiesced by app 'a'"]


def test_duplicate_yaml_keys_are_refused():
    (found,) = problems("apps:\n  a: {units: [x]}\n  a: {units: [y]}\n")
    assert "duplicate key 'a'" in found


def test_yaml_syntax_error_names_line_and_column():
    (found,) = problems("apps:\n  a: [unclosed\n")
    assert found.startswith("line ")


def test_unsupported_version_is_refused():
    assert problems("version: 2\n") == ["version: unsupported version 2 (this qgafreeze reads 1)"]


def test_an_app_needs_an_action():
    assert problems("apps:\n  a: {}\n") == [
        "apps.a: no action: add units, session, freeze or thaw steps, or a preset"
    ]


def test_top_level_must_be_a_mapping():
    assert problems("- a\n- b\n") == ["expected a mapping at the top level, got a list"]


def test_empty_file_is_a_valid_config_with_no_apps():
    assert parse_text("").apps == ()


def test_hook_log_can_be_turned_off():
    assert parse_config({"settings": {"hook_log": None}}).settings.hook_log is None


def test_config_writable_by_others_is_refused(tmp_path):
    path = tmp_path / "qgafreeze.yaml"
    path.write_text("version: 1\n")
    os.chmod(path, 0o666)
    with pytest.raises(ConfigError) as caught:
        load_file(str(path))
    assert "writable by everyone" in str(caught.value)


def test_missing_config_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError) as caught:
        load_file(str(tmp_path / "absent.yaml"))
    assert "cannot be read: No such file or directory" in str(caught.value)
