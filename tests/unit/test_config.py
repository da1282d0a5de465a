"""What the config accepts, what it refuses, and how it says so."""

from __future__ import annotations

from pathlib import Path

import pytest

from qgafreeze import paths
from qgafreeze.config import load_file, parse_config, parse_text
from qgafreeze.errors import ConfigError
from qgafreeze.fields import parse_duration
from qgafreeze.protocol import OPS
from qgafreeze.trust import resolve_group

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
    assert [app.name for app in config.apps] == ["mariadb", "shop", "metrics", "cache"]
    assert config.app("mariadb").session is not None
    assert config.app("metrics").mode == "freeze"
    assert [s.kind for s in config.app("cache").freeze] == ["signal", "exec"]
    assert config.app("shop").depends_on == ("mariadb",)
    assert config.settings.hook_log == paths.HOOK_LOG


def test_defaults_are_safe_when_settings_are_omitted():
    config = parse_text("version: 1\napps:\n  db:\n    units: [mariadb]\n")
    assert config.settings.freeze_timeout == 20
    assert config.settings.thaw_timeout == 15
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
    # settings.socket left the list (issue 10): it could not work as written.
    assert found == [
        "settings.freeze_timout: unknown key (allowed: freeze_timeout, thaw_timeout, max_frozen,"
        " watchdog_thaws_filesystems, hook_log, agent_state_file, legacy_hooks,"
        " legacy_hook_timeout, allowed_group, allowed_group_ops)",
        "apps.shop.on_failure: expected one of abort, continue, got string 'maybe'",
        "apps.shop.timeout: expected a duration such as 500ms, 30s, 2m or 1h, got 'soon'",
        "apps.shop.depends_on[0]: unknown app 'mariadbx'",
    ]


def test_the_removed_socket_setting_is_refused_saying_where_the_path_is_set():
    # The shim and the CLI always use the standard path (or $QGAFREEZE_SOCKET) and the socket
    # unit owns ListenStream=: a daemon told another path here was one nobody could reach.
    assert problems("settings:\n  socket: /run/other.sock\n") == [
        "settings.socket: this key was removed: the socket path is qgafreeze.socket's"
        " ListenStream= (or $QGAFREEZE_SOCKET for a daemon started by hand); delete this line"
    ]


def test_the_socket_line_every_earlier_install_wrote_is_ignored_with_a_warning():
    # make install copied the example's settings, socket included, into /etc/qgafreeze.yaml and
    # keeps that file on upgrade: refusing it would stop every backup after an upgrade.
    config = parse_text("version: 1\nsettings:\n  socket: /run/qgafreeze/qgafreeze.sock\n")
    assert config.warnings == (
        "settings.socket: ignored, this key was removed: the socket path is qgafreeze.socket's"
        " ListenStream= (or $QGAFREEZE_SOCKET for a daemon started by hand); delete this line",
    )


def test_an_app_timeout_longer_than_its_phase_is_valid_but_warned_about():
    config = parse_text(
        "settings:\n  freeze_timeout: 20s\n  thaw_timeout: 1m\n"
        "apps:\n  db:\n    units: [a]\n    timeout: 30s\n"
    )
    assert config.warnings == (
        "apps.db.timeout: 30s is longer than settings.freeze_timeout (20s): the freeze gives up"
        " on this app first",
    )


def test_the_default_app_timeout_fits_both_default_phases():
    assert parse_text("apps:\n  db:\n    units: [a]\n").warnings == ()
    assert parse_text((REPO / "config" / "qgafreeze.yaml").read_text()).warnings == ()


def test_unknown_app_key_is_an_error_not_ignored():
    assert problems("apps:\n  db:\n    units: [a]\n    timout: 3s\n") == [
        "apps.db.timout: unknown key (allowed: preset, units, mode, session, options, freeze,"
        " thaw, depends_on, timeout, on_failure)"
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


def test_missing_config_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError) as caught:
        load_file(str(tmp_path / "absent.yaml"))
    assert "cannot be read: No such file or directory" in str(caught.value)


def test_a_preset_is_overridden_key_by_key_even_inside_the_session():
    config = parse_text(
        "apps:\n  db:\n    preset: mariadb\n    timeout: 5s\n"
        "    session: {env: {MYSQL_HOME: /etc/qgafreeze}, ready: '^go$'}\n"
    )
    session = config.app("db").session
    assert session is not None
    assert session.env == (("MYSQL_HOME", "/etc/qgafreeze"),)
    assert session.ready == "^go$"
    assert session.argv[:2] == (paths.QUIESCE, "mariadb")  # kept from the preset
    assert config.app("db").timeout == 5


@pytest.mark.parametrize("preset", ["mariadb", "mysql", "postgresql", "mongodb", "redis"])
def test_every_preset_is_a_valid_app_on_its_own(preset):
    app = parse_text(f"apps:\n  x: {{preset: {preset}}}\n").app("x")
    assert app.preset == preset
    assert app.session is not None or app.freeze


def test_unknown_preset_is_named():
    (found,) = problems("apps:\n  x: {preset: oracle}\n")
    assert found.startswith("apps.x.preset: unknown preset string 'oracle' (known: mariadb")


def test_a_preset_that_is_not_a_name_is_an_error_not_a_traceback():
    assert problems("apps:\n  x: {preset: [mariadb], units: [a]}\n") == [
        "apps.x.preset: unknown preset a list (known: mariadb, mysql, postgresql, mongodb, redis)"
    ]


def test_steps_are_checked_one_by_one_with_their_paths():
    found = problems(
        "apps:\n  x:\n    freeze:\n"
        "      - {exec: [a], shell: b}\n"
        "      - {exec: []}\n"
        "      - {signal: KILLALL, units: [a]}\n"
        "      - {signal: USR1}\n"
        "      - {shell: 'x', env: {1BAD: y}}\n"
    )
    assert found == [
        "apps.x.freeze[0]: needs exactly one of exec (argv list), shell (command text), signal",
        "apps.x.freeze[1].exec: expected a non-empty list: [program, arg, ...], got a list",
        "apps.x.freeze[2].signal: expected a signal such as USR1, got string 'KILLALL'",
        "apps.x.freeze[3].units: a signal needs the units whose processes get it",
        "apps.x.freeze[4].env.1BAD: not a valid environment variable name",
    ]


def test_signal_names_with_or_without_sig_prefix():
    app = parse_text("apps:\n  x:\n    freeze: [{signal: sigusr2, units: [a]}]\n").app("x")
    assert (app.freeze[0].signal, app.freeze[0].signal_name) == (12, "SIGUSR2")


def test_mode_needs_units():
    assert problems("apps:\n  x: {mode: freeze, freeze: [{exec: [a]}]}\n") == [
        "apps.x.mode: applies to units; this app lists none"
    ]


def test_legacy_hooks_become_an_app_others_may_depend_on():
    config = parse_text(
        "settings: {legacy_hooks: /etc/qemu/fsfreeze-hook.d/}\n"
        "apps:\n  db: {units: [db], depends_on: [legacy-hooks]}\n"
    )
    assert config.app("legacy-hooks").legacy_hooks == "/etc/qemu/fsfreeze-hook.d"
    assert config.app("db").depends_on == ("legacy-hooks",)


def write_config(tmp_path: Path, text: str) -> str:
    path = tmp_path / "qgafreeze.yaml"
    path.write_text(text)
    path.chmod(0o600)
    return str(path)


# Was asserted of parse_text: parsing no longer looks the group up on the host (issue 10); the
# loaded file is still refused, as before, when the group does not exist.
def test_allowed_group_must_exist_when_the_file_is_loaded(tmp_path):
    with pytest.raises(ConfigError) as caught:
        load_file(write_config(tmp_path, "settings: {allowed_group: no-such-group-qgft}\n"))
    assert caught.value.problems == ["settings.allowed_group: no such group 'no-such-group-qgft'"]
    loaded = load_file(write_config(tmp_path, "settings: {allowed_group: root}\n"))
    assert resolve_group(loaded.settings.allowed_group) == 0


def test_parsing_names_a_group_without_asking_the_host():
    parsed = parse_text("settings: {allowed_group: no-such-group-qgft}\n")
    assert parsed.settings.allowed_group == "no-such-group-qgft"
    assert resolve_group(parsed.settings.allowed_group) is None


@pytest.mark.parametrize(
    ("value", "got"),
    [
        ("''", "string ''"),
        ("'two words'", "string 'two words'"),
        ("'-dash'", "string '-dash'"),
        ("5", "number 5"),
        ("[wheel]", "a list"),
    ],
)
def test_allowed_group_must_read_as_a_group_name(value, got):
    assert problems(f"settings: {{allowed_group: {value}}}\n") == [
        f"settings.allowed_group: expected a group name, got {got}"
    ]


def test_a_nul_byte_is_refused_with_its_place_where_it_would_reach_the_system(tmp_path):
    # os.stat and exec raise ValueError on a NUL byte: qgafreeze check printed a traceback.
    text = (
        'settings: {legacy_hooks: "/etc/hooks\\0", hook_log: "/var/log/x\\0"}\n'
        "apps:\n  a:\n"
        '    session: {argv: [/bin/cat, "a\\0"], ready: x, cwd: "/\\0", env: {X: "\\0"}}\n'
        '    freeze: [{exec: ["/bin/true\\0"]}, {shell: "true\\0"}]\n'
    )
    nul = "contains a NUL byte, which no path, argument or environment can hold"
    with pytest.raises(ConfigError) as caught:
        load_file(write_config(tmp_path, text))
    assert caught.value.problems == [
        f"settings.legacy_hooks: {nul}",
        f"settings.hook_log: {nul}",
        f"apps.a.session.argv[1]: {nul}",
        f"apps.a.session.env.X: {nul}",
        f"apps.a.session.cwd: {nul}",
        f"apps.a.freeze[0].exec[0]: {nul}",
        f"apps.a.freeze[1].shell: {nul}",
    ]


def test_the_settings_are_frozen_through_and_through_like_the_rest_of_the_config():
    settings = parse_text("settings: {allowed_group_ops: [ping]}\n").settings
    assert hash(settings) == hash(parse_text("settings: {allowed_group_ops: [ping]}\n").settings)


def test_the_ops_granted_to_the_allowed_group_reach_the_settings_in_order():
    text = "settings: {allowed_group_ops: [ping, status, freeze]}\n"
    assert parse_text(text).settings.allowed_group_ops == ("ping", "status", "freeze")
    assert parse_text("").settings.allowed_group_ops == ("ping", "status")


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        ("[ping, status, ping]", "[2]: 'ping' is listed twice"),
        ("[ping, reboot]", f"[1]: expected one of {', '.join(OPS)}, got string 'reboot'"),
        ("null", f": expected a list of {', '.join(OPS)}, got nothing"),
        ("ping", f": expected a list of {', '.join(OPS)}, got string 'ping'"),
    ],
)
def test_allowed_group_ops_is_a_list_of_known_ops_each_once(value, problem):
    assert problems(f"settings: {{allowed_group_ops: {value}}}\n") == [
        f"settings.allowed_group_ops{problem}"
    ]
