"""Benchmark of the rpl-cds service under gunicorn: `python -m bench` (see bench/README.md)."""
