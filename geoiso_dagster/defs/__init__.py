"""The orchestration layer: assets, checks, sensor, jobs and the pool's Dagster side.

Nothing under this package may import a library that loads GDAL, GEOS or PROJ;
tests/test_layers.py guards it.
"""
