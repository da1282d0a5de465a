"""The harness itself, checked against the real systemd it boots."""

from __future__ import annotations

import time

from container import Container


def test_container_runs_systemd_as_pid_1(container: Container) -> None:
    assert container.run(["cat", "/proc/1/comm"]).stdout.strip() == "systemd"
    state = container.run(["systemctl", "is-system-running"], check=False).stdout.strip()
    assert state in ("running", "degraded")


def test_system_bus_answers(container: Container) -> None:
    result = container.run(
        [
            "busctl",
            "--system",
            "call",
            "org.freedesktop.systemd1",
            "/org/freedesktop/systemd1",
            "org.freedesktop.systemd1.Manager",
            "GetUnit",
            "s",
            "dbus.service",
        ]
    )
    assert result.stdout.startswith('o "/org/freedesktop/systemd1/unit/dbus_2eservice"')


def test_installed_unit_can_be_started_and_stopped(container: Container) -> None:
    container.install_unit(
        "qgft-sleeper.service",
        "[Service]\nExecStart=/bin/sleep infinity\nExecStop=/bin/sleep 0.3\n",
    )
    container.run(["systemctl", "start", "qgft-sleeper.service"])
    assert container.run(["systemctl", "is-active", "qgft-sleeper.service"]).stdout.strip() == (
        "active"
    )
    started = time.monotonic()
    container.run(["systemctl", "stop", "qgft-sleeper.service"])
    # systemctl stop waits for ExecStop, which proves the stop went through the unit's logic.
    assert time.monotonic() - started >= 0.3
    state = container.run(["systemctl", "is-active", "qgft-sleeper.service"], check=False)
    assert state.stdout.strip() == "inactive"


def test_journal_records_are_read_back_with_fields(container: Container) -> None:
    container.run(
        [
            "/usr/bin/python3",
            "-c",
            'from systemd import journal; journal.send("x", SYSLOG_IDENTIFIER="qgft",'
            ' QGFT_FIELD="42")',
        ]
    )
    records = container.journal(SYSLOG_IDENTIFIER="qgft")
    assert [r["QGFT_FIELD"] for r in records if r.get("MESSAGE") == "x"] == ["42"]


def test_distro_python_modules_import_inside(container: Container) -> None:
    result = container.run(
        ["/usr/bin/python3", "-c", "import yaml, pydbus, systemd.journal; print('ok')"]
    )
    assert result.stdout.strip() == "ok"
