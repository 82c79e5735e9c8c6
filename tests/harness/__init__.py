"""Harnesses: what the tests and the benchmarks stand up (a live dagster dev, the
deployment, an S3 API server) and read (runs, grids). No test lives here."""
