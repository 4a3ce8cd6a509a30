"""`python -m minillm` is the same as the `minillm` command."""

from minillm.cli import main

raise SystemExit(main())
