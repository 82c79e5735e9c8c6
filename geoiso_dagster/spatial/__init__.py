"""The worker layer: plain functions that read and write GeoParquet by path.

No Dagster here. Each task takes paths and options, writes its output atomically and
returns a small JSON-able dict of facts about it. Only worker processes import this.
"""
