"""`python -m etl` is the `kalshi-etl` program."""

from etl.cli import main

raise SystemExit(main())
