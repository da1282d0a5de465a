"""qgafreeze-host on the host, as `make install-host` installs it, driving a real guest through
its real qemu-ga socket the way a backup service would: freeze, snapshot, always thaw, then the
guest's cycle report read back through guest-file-read, and an exit status that says what the
snapshot is worth.  Every report read here is validated against the schema.  On trixie (qemu-ga
10.0), whose failed freeze carries the hook's first line.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from guest import (
    HOOK_OUTPUT_IN_ERROR,
    SESSION_APP,
    configure,
    qemu_ga_version,
    sh,
    wait_for,
)
from vm import VM

from qgafreeze.presets import GUARANTEES

REPO_ROOT = Path(__file__).resolve().parents[2]
SCHEMA = json.loads((REPO_ROOT / "docs" / "cycle-report.schema.json").read_text())
_SYSTEM_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
UNITS = {
    "qgf-cache.service": "[Service]\nExecStart=/bin/sleep infinity\n",
    # Refuses the stop qgafreeze asks for: the app that fails.
    "qgf-stubborn.service": "[Unit]\nRefuseManualStop=yes\n"
    "[Service]\nExecStart=/bin/sleep infinity\n",
}
BOTH_APPS = (
    SESSION_APP + "  cache:\n    units: [qgf-cache.service]\n    mode: freeze\n    timeout: 4m\n"
)
STUBBORN = "  stubborn:\n    units: [qgf-stubborn.service]\n    timeout: 4m\n"
# TCG: the guest runs many times slower than a real one.
TIMEOUT = "600"


@pytest.fixture(scope="module")
def host_client(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """qgafreeze-host installed by `make install-host` under a scratch PREFIX."""
    prefix = tmp_path_factory.mktemp("host-client")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MAKE", "PYTHON"))}
    env["PATH"] = _SYSTEM_PATH
    result = subprocess.run(
        ["make", "--no-print-directory", "-C", str(REPO_ROOT), "install-host", f"PREFIX={prefix}"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return prefix / "bin" / "qgafreeze-host"


@pytest.fixture(scope="module")
def guest(shared_guest: VM) -> Iterator[VM]:
    vm = shared_guest
    for name, text in UNITS.items():
        vm.qga.write_file(f"/etc/systemd/system/{name}", text.encode())
    sh(vm, "systemctl daemon-reload && systemctl start " + " ".join(UNITS))
    wait_for(vm, "systemctl is-active mariadb.service")
    yield vm
    # Shared with the next modules: take away the units (the stubborn one refuses a stop).
    sh(
        vm,
        "systemctl kill -s KILL " + " ".join(UNITS) + "; rm -f "
        + " ".join(f"/etc/systemd/system/{name}" for name in UNITS)
        + "; systemctl daemon-reload; systemctl reset-failed",
        check=False,
    )


def qgafreeze_host(vm: VM, client: Path, *args: str) -> tuple[int, str, str]:
    """The client's exit status, stdout and stderr; the harness lets go of the agent's channel
    first, since QEMU serves one client on it at a time (its next call reconnects)."""
    vm.qga.close()
    result = subprocess.run(
        [str(client), *args, "--qga-socket", str(vm.sockdir / "qga.sock")],
        capture_output=True,
        text=True,
        timeout=1800,
        check=False,
    )
    assert "Traceback" not in result.stderr, result.stderr
    return result.returncode, result.stdout, result.stderr


def valid(doc: Any) -> dict[str, Any]:
    jsonschema.validate(doc, SCHEMA)
    assert isinstance(doc, dict)
    return doc


def last_report(vm: VM, client: Path) -> dict[str, Any]:
    """`qgafreeze-host report --json`, and the guest's own `qgafreeze status --json`: the same
    report, both valid."""
    _, out, err = qgafreeze_host(vm, client, "report", "--json")
    doc = valid(json.loads(out))
    status = valid(json.loads(sh(vm, "qgafreeze status --json").stdout))
    assert {k: v for k, v in status.items() if k != "daemon"} == doc, err
    return doc


def by_app(doc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {entry["app"]: entry for entry in doc["apps"]}


def test_a_backup_of_mariadb_and_a_cgroup_frozen_app_is_application_consistent(guest, host_client):
    configure(guest, BOTH_APPS)
    status, out, err = qgafreeze_host(
        guest, host_client, "backup", "--timeout", TIMEOUT, "--snapshot-cmd", "sleep 2"
    )
    assert status == 0, out + err
    lines = out.splitlines()
    assert lines[0].startswith("qgafreeze-host: application-consistent (cycle "), out
    assert any(
        line.startswith("  mariadb: freeze ok in ") and line.endswith(GUARANTEES["mariadb"])
        for line in lines
    ), out
    assert any(
        line.startswith("  cache: freeze ok in ") and line.endswith("processes frozen")
        for line in lines
    ), out
    doc = last_report(guest, host_client)
    assert doc["verdict"] == "application-consistent" and doc["phase"] == "thaw"
    apps = by_app(doc)
    assert sorted(apps) == ["cache", "mariadb"]
    for entry in apps.values():
        assert entry["quiesced"], entry
        assert entry["freeze"]["result"] == "ok", entry
        assert isinstance(entry["freeze"]["duration_ms"], int), entry
        assert entry["thaw"]["result"] == "ok", entry
    assert guest.qga.fsfreeze_status() == "thawed"


def test_a_failing_app_fails_the_backup_and_both_qemu_ga_and_the_report_name_it(guest, host_client):
    configure(guest, BOTH_APPS + STUBBORN)
    status, out, err = qgafreeze_host(guest, host_client, "backup", "--timeout", TIMEOUT, "--json")
    assert status == 2, out + err
    assert "qemu-ga refused the freeze: " in err, err
    assert qemu_ga_version(guest) >= HOOK_OUTPUT_IN_ERROR
    refusal = next(line for line in err.splitlines() if "refused the freeze" in line)
    assert "child process has failed to execute fsfreeze hook: qgafreeze: freeze FAILED" in refusal
    assert "stubborn" in refusal, refusal
    doc = valid(json.loads(out))  # read after the thaw the client always sends
    assert doc["verdict"] == "failed"
    stubborn = by_app(doc)["stubborn"]
    assert stubborn["freeze"]["result"] in ("failed", "timeout") and stubborn["freeze"]["message"]
    assert guest.qga.fsfreeze_status() == "thawed"
    wait_for(guest, "systemctl is-active mariadb.service qgf-cache.service qgf-stubborn.service")
    assert last_report(guest, host_client)["cycle"] == doc["cycle"]


def test_an_on_failure_continue_app_that_fails_makes_the_backup_crash_consistent(
    guest, host_client
):
    configure(guest, BOTH_APPS + STUBBORN + "    on_failure: continue\n")
    status, out, err = qgafreeze_host(guest, host_client, "backup", "--timeout", TIMEOUT, "--json")
    assert status == 1, out + err
    doc = valid(json.loads(out))
    assert doc["verdict"] == "crash-consistent"
    apps = by_app(doc)
    assert not apps["stubborn"]["quiesced"]
    assert apps["stubborn"]["note"].startswith("not quiesced: its freeze failed")
    assert apps["mariadb"]["quiesced"] and apps["cache"]["quiesced"]
    assert [r for r in doc["verdict_reasons"] if r.startswith("stubborn: ")], doc["verdict_reasons"]


def test_report_reads_the_last_report_without_freezing(guest, host_client):
    before = last_report(guest, host_client)
    status, out, err = qgafreeze_host(guest, host_client, "report")
    assert status == 1, out + err  # the crash-consistent backup above
    assert out.startswith(f"qgafreeze-host: crash-consistent (cycle {before['cycle']}, "), out
    assert last_report(guest, host_client) == before
