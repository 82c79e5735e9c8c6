"""The code location: one Definitions object for `dagster dev`, the CLI and the tests."""

from geoiso_dagster.defs.build import build_definitions

defs = build_definitions()
