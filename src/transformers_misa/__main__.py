"""`python -m transformers_misa demo`."""

from .cli import main

raise SystemExit(main())
