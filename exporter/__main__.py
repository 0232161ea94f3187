"""`python -m exporter` runs the command-line entry point."""

from exporter.cli import main

raise SystemExit(main())
