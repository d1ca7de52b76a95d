"""`python -m diffrec_ext <command>`: the same command line as `diffrec`."""

from .cli import main

raise SystemExit(main())
