"""Research studies that regenerate docs/: scripts run from the repository root as
`PYTHONPATH=bench python -m studies.NAME` (the Makefile's bench-* targets); not installed."""
