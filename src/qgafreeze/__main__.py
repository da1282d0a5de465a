"""`python3 -m qgafreeze` runs the command-line interface."""

from qgafreeze.cli import main

raise SystemExit(main())
