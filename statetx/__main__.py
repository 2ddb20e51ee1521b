"""``python -m statetx``: the statetx command line."""

from __future__ import annotations

from statetx.cli import main

raise SystemExit(main())
