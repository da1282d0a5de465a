"""The soak's steady write load, run inside the container by bench/soak_inside.py.

    python3 soak_writer.py ACKED_FILE [INTERVAL]

Inserts rows 1, 2, 3, ... into qgft_soak.t through one `mariadb` client, one at a time, and
appends each id to ACKED_FILE (on /run, a tmpfs) only once MariaDB has answered for it: those are
the writes a backup must never lose.  A client that dies (MariaDB restarted, its connection
killed) is replaced; the id it was writing is skipped, never retried, since it may or may not have
been committed.  Standard library only: it runs on the container's /usr/bin/python3.
"""

from __future__ import annotations

import subprocess
import sys
import time

CLIENT = ["mariadb", "--batch", "--skip-column-names", "--unbuffered", "qgft_soak"]


def main(argv: list[str]) -> int:
    acked_path = argv[0]
    interval = float(argv[1]) if len(argv) > 1 else 0.02
    next_id = 1
    # Line-buffered: the driver reads the file while we write it.
    with open(acked_path, "a", buffering=1, encoding="ascii") as acked:
        while True:
            client = subprocess.Popen(
                CLIENT,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,
                text=True,
                bufsize=1,
            )
            assert client.stdin is not None and client.stdout is not None
            while True:
                row = next_id
                next_id += 1
                try:
                    client.stdin.write(f"INSERT INTO t (id) VALUES ({row}); SELECT {row};\n")
                    client.stdin.flush()
                except OSError:
                    break
                # Blocks for as long as a freeze holds the mariadb preset's lock (BACKUP STAGE
                # BLOCK_COMMIT: the INSERT's commit waits for the thaw).
                answer = client.stdout.readline()
                if answer.strip() != str(row):
                    break  # the client died or failed: this row is not acknowledged
                acked.write(f"{row}\n")
                time.sleep(interval)
            client.kill()
            client.wait()
            time.sleep(0.2)  # MariaDB may be restarting


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
