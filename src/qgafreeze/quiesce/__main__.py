"""`python3 -m qgafreeze.quiesce NAME ARGS...` runs the helper NAME (see the package)."""

from qgafreeze.quiesce import main

raise SystemExit(main())
