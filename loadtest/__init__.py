"""Bounded load test: `python -m loadtest` (or `make load`).

Starts the service under gunicorn (the project's gunicorn.conf.py, 2 workers, loopback only),
sends sustained mixed traffic from 32 concurrent clients for a bounded time and number of
requests (patient-view, order-select and order-sign with realistic prefetch built from the
service's clinical scenarios plus chart filler, and feedback on the cards they return), stops by
itself, and then checks that every feedback item acknowledged with 200 is in the database.

Prints a summary and writes loadtest/results/latest.md. Exit status 0 only when there were no
errors and no acknowledged feedback was lost. See docs/reliability.md.
"""
