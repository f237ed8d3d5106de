"""`python -m specdec.serve`: see specdec.serve.cli."""

from specdec.serve.cli import main

raise SystemExit(main())
