"""This team's worker functions. They run in geoiso-dagster's isolated workers, never
in the Dagster process: import geopandas freely here, and nowhere in definitions.py.

The contract: function(source, output, **inputs_and_config) -> dict. Read `source`
(the upstream asset's GeoParquet for this partition), write GeoParquet to `output`
(geoiso_dagster.ops.frames.write does it the standard way), return facts: `rows` is
checked against the file, the other numbers and strings go to the catalog. Raise
BadInputError for bad data: the run fails once, naming the file, without retries.
"""

import geopandas

from geoiso_dagster.errors import BadInputError
from geoiso_dagster.ops.frames import read, read_near, same_crs, write
from geoiso_dagster.pool import progress


def count_places(source: str, output: str, places: str, name_column: str = "name") -> dict:
    """Each region of `source` with `places` (how many of the points fall inside it) and
    `place_names` (theirs, sorted, comma-separated)."""
    regions = read(source)
    points = read_near(places, tuple(regions.total_bounds))
    same_crs(regions, points, places)
    if name_column not in points.columns:
        raise BadInputError(places, f"has no column {name_column!r}")
    progress(f"joining {len(points)} places to {len(regions)} regions")
    joined = geopandas.sjoin(
        points[[name_column, points.geometry.name]],
        regions[[regions.geometry.name]],  # only the shapes: no clash of column names
        predicate="within",
    )
    names = joined.groupby("index_right")[name_column].agg(lambda s: ", ".join(sorted(s)))
    regions["places"] = joined.groupby("index_right").size().reindex(regions.index, fill_value=0)
    regions["place_names"] = names.reindex(regions.index, fill_value="")
    facts = write(regions, output)
    return {"rows": facts["rows"], "places_matched": int(regions["places"].sum())}
