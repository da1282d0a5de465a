#!/bin/sh
# A legacy fsfreeze-hook.d script in the pattern of QEMU's MySQL sample hook, written for the
# container and VM tests: the freeze starts a background client, fed the lock request and then
# whatever the FIFO gives, and exits once the lock holds (a named lock taken after it in the same
# session says so); the client keeps running and keeps the script's output open.  The thaw
# writes the FIFO: the client unlocks and exits, and the FIFO goes with it.
fifo=/run/qgf-legacy-lock.fifo
case "$1" in
freeze)
    mkfifo -m 0600 "$fifo" || exit 1
    feed() {
        echo "FLUSH TABLES WITH READ LOCK;"
        echo "SELECT GET_LOCK('qgf-legacy', 0);"
        read -r _ < "$fifo"
        echo "UNLOCK TABLES;"
        rm -f "$fifo"
    }
    feed | mariadb --batch --skip-column-names &
    tries=0
    until [ "$(mariadb -N -e "SELECT IS_USED_LOCK('qgf-legacy') IS NOT NULL")" = 1 ]; do
        tries=$((tries + 1))
        [ "$tries" -gt 600 ] && exit 2
        sleep 0.1
    done
    echo "global read lock held"
    ;;
thaw)
    [ -p "$fifo" ] || exit 1
    echo unlock > "$fifo"
    ;;
esac
