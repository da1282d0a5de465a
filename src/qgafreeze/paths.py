"""Every file path and environment name qgafreeze uses by default, written once.

Standard library only, and nothing but constants (QUIESCE is worked out once, from where the
package is installed): the shim imports it on qemu-ga's clock, and the config schema, the
daemon, ``make install`` and the docs' tests all read their defaults here.
"""

from __future__ import annotations

import os

CONFIG = "/etc/qgafreeze.yaml"
# The socket lives where qgafreeze.socket's ListenStream= puts it; the shim, the CLI and a daemon
# started without socket activation all use this path, or $QGAFREEZE_SOCKET when it is set.
SOCKET = "/run/qgafreeze/qgafreeze.sock"
SOCKET_ENV = "QGAFREEZE_SOCKET"
# The cycle's state, on tmpfs so that it can be written while the disks are frozen.
STATE_FILE = "/run/qgafreeze/state.json"
HOOK_LOG = "/var/log/qga-fsfreeze-hook.log"
# qemu-ga creates this while it is frozen (its --statedir, /var/run by default).
AGENT_STATE_FILE = "/run/qga.state.isfrozen"
# Commands run with this PATH; a bare program name in the config is looked up in it too.
SAFE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# The last cycle's report (docs/cycle-report.schema.json), on tmpfs beside the socket: written
# while the disks are frozen, and read by the host through qemu-ga's guest-file-read after the thaw.
REPORT_FILE = "/run/qgafreeze/report.json"
# The quiesce helpers' program (`make install`'s wrapper of `python3 -m qgafreeze.quiesce`),
# which database presets run.  make install puts the package in PREFIX/lib/qgafreeze and the
# program in PREFIX/libexec/qgafreeze: an install under another PREFIX (/usr/local, /opt) finds
# its own program by where this file is; the source tree (and a package) uses /usr's.
QUIESCE = "/usr/libexec/qgafreeze/quiesce"
_PREFIX, _LIB = os.path.split(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if _LIB == "qgafreeze" and os.path.basename(_PREFIX) == "lib":
    QUIESCE = os.path.join(os.path.dirname(_PREFIX), "libexec", "qgafreeze", "quiesce")
