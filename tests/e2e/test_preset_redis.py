"""The redis preset against each release's own Redis (6.0 on bullseye, 7.0 on bookworm, 8.0 on
trixie, as Debian configures it) through the real qemu-ga: a backup whose freeze has saved the
RDB file in the background, after the freeze request, before the filesystems froze."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from typing import Any

import jsonschema
import pytest
from guest import NO_APPS, REPORT_SCHEMA, backup, configure, sh, wait_for
from vm import VM

VERSION = {"bullseye": "6.0.", "bookworm": "7.0.", "trixie": "8.0."}
RDB = "/var/lib/redis/dump.rdb"  # Debian's dir and dbfilename
# TCG runs the guest about 15 times slower than the host: generous, bounded deadlines.
PRESET_APP = """version: 1
settings: {freeze_timeout: 5m, thaw_timeout: 5m}
apps:
  cache: {preset: redis, timeout: 4m}
"""


def cli(vm: VM, *args: str) -> str:
    return sh(vm, "redis-cli " + " ".join(args)).stdout.strip()


@pytest.fixture(scope="module")
def redis_guest(shared_guest: VM) -> Iterator[VM]:
    vm = shared_guest
    sh(vm, "systemctl start redis-server.service", timeout=120)
    wait_for(vm, "test \"$(redis-cli PING)\" = PONG", timeout=120)
    yield vm
    # Shared with the next modules: thawed, no apps, Redis stopped, its dump gone.
    if vm.qga.fsfreeze_status() == "frozen":
        vm.qga.fsfreeze_thaw()
    configure(vm, NO_APPS)
    sh(vm, f"systemctl stop redis-server.service; rm -f {RDB}", timeout=120, check=False)


def cache_entry(vm: VM) -> dict[str, Any]:
    doc = json.loads(sh(vm, "cat /run/qgafreeze/report.json").stdout)
    jsonschema.Draft202012Validator(REPORT_SCHEMA).validate(doc)
    assert doc["phase"] == "thaw" and doc["verdict"] == "application-consistent", doc
    return next(entry for entry in doc["apps"] if entry["app"] == "cache")


@pytest.mark.suites("bullseye", "bookworm", "trixie")
def test_each_releases_redis_is_saved_in_the_background_after_the_freeze_request(
    redis_guest, suite
):
    vm = redis_guest
    server = cli(vm, "INFO", "server")
    assert re.search(r"^redis_version:" + re.escape(VERSION[suite]), server, re.M), server
    configure(vm, PRESET_APP)
    sh(vm, "truncate -s0 /var/log/qga-fsfreeze-hook.log")
    for i in range(3):
        cli(vm, "SET", f"qgf:{i}", str(i))
    asked = float(sh(vm, "date +%s.%N").stdout)
    started = time.monotonic()
    backup(vm, frozen_seconds=1.0)
    print(f"redis {suite}: backup {time.monotonic() - started:.1f}s")  # figures

    entry = cache_entry(vm)
    # Nothing is held: the thaw has nothing to undo.
    assert entry["freeze"]["result"] == "ok" and entry["thaw"]["result"] in ("ok", "skipped"), entry
    rdb = entry["details"]["rdb"]
    assert rdb["file"] == RDB
    assert rdb["saved_at"] >= time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(int(asked)))
    assert entry["details"]["aof"] == {"enabled": False, "restore_loads": "rdb"}
    # The file on disk was written after the freeze was asked for, and Redis says it succeeded.
    assert float(sh(vm, f"stat -c %.9Y {RDB}").stdout) > asked
    persistence = cli(vm, "INFO", "persistence")
    assert "rdb_last_bgsave_status:ok" in persistence
    saved = re.search(r"^rdb_last_save_time:(\d+)", persistence, re.M)
    assert saved is not None and int(saved.group(1)) >= int(asked), persistence
    log = sh(vm, "cat /var/log/qga-fsfreeze-hook.log").stdout
    assert "redis: background save done" in log, log
    assert re.search(r": qgafreeze:cache finished with status=0$", log, re.M), log
    assert "status=1" not in log, log
