"""Rows in Hilbert order, so that a GeoParquet file's row groups each cover a compact
piece of space and a reader's bbox filter skips the rest (GeoParquet 1.1 bbox covering
statistics: a row group is read only when its min/max box meets the query).

Each row's key is the Hilbert index of its bbox centre on a 2**32 x 2**32 grid over
everything its CRS can hold (io.coordinate_limits): fixed, so that a key needs no
knowledge of the rest of the file and streamed runs of rows can be sorted apart and
merged. The grid is square (the domain's longer side on both axes) and fine enough for
any extent (5 cm cells over the +/-1e8 m of a projected CRS, 2e-7 degrees over a
geographic one's +/-360). Rows without a box sort last.

Files larger than a run (RUN_BYTES of Arrow data) are sorted in bounded memory: sorted
runs go to an Arrow IPC file in small batches, then a k-way merge reads one batch of
each run at a time (stream.TableSink, stream.concatenate).
"""

from collections.abc import Iterator

import numpy as np
import pyarrow as pa

ORDER = 32
KEY = "__geoiso_hilbert"  # only in part and spill files, never in an output
LAST = np.uint64(2**64 - 1)
# A run is sorted in memory: its Arrow data, plus the sorted copy. Fixed, so that memory
# does not grow with the file; the merge then holds one batch of each run.
RUN_BYTES = 96 * 2**20
MERGE_BATCH_ROWS = 2048


def index(x: np.ndarray, y: np.ndarray, order: int = ORDER) -> np.ndarray:
    """The Hilbert index of each cell (x, y) of a 2**order grid (the classic xy2d,
    vectorised over arrays of uint64)."""
    x, y = x.astype(np.uint64), y.astype(np.uint64)  # copies: changed in place below
    top = np.uint64(2**order - 1)
    d = np.zeros(len(x), dtype=np.uint64)
    for shift in range(order - 1, -1, -1):
        s = np.uint64(1 << shift)
        rx = ((x & s) != 0).astype(np.uint64)
        ry = ((y & s) != 0).astype(np.uint64)
        d += (s * s) * ((np.uint64(3) * rx) ^ ry)
        # Rotate the quadrant: flip both (x ^ top == top - x) where rx and not ry, then
        # swap x and y where not ry, as masks rather than branches.
        low = np.uint64(1) - ry
        flip = rx * low * top
        x ^= flip
        y ^= flip
        swap = (x ^ y) & (low * top)
        x ^= swap
        y ^= swap
    return d


def keys(bbox: pa.Array | pa.ChunkedArray, domain: tuple[float, float, float, float]) -> np.ndarray:
    """The sort key of each row from its bbox covering (a struct of xmin, ymin, xmax,
    ymax); LAST where the row has no box."""
    if isinstance(bbox, pa.ChunkedArray):
        bbox = bbox.combine_chunks()
    fields = [bbox.field(name).to_numpy(zero_copy_only=False) for name in _FIELDS]
    missing = np.asarray(bbox.is_null(), dtype=bool) if bbox.null_count else None
    minx, miny, maxx, maxy = domain
    # Square cells: a geographic CRS's +/-360 x +/-90 degrees would otherwise make them 4
    # times wider than tall, and the row groups' boxes with them (measured on the
    # reprojected benchmark output, a 1% bbox query read on average 17.0 % of its row
    # groups at 1M and 3.9 % at 10M; with square cells 15.5 % and 3.7 %).
    side = max(maxx - minx, maxy - miny)
    minx, miny = (minx + maxx - side) / 2, (miny + maxy - side) / 2
    cells = float(2**ORDER - 1)
    with np.errstate(invalid="ignore"):
        cx = ((fields[0] + fields[2]) / 2 - minx) / side
        cy = ((fields[1] + fields[3]) / 2 - miny) / side
    no_box = ~(np.isfinite(cx) & np.isfinite(cy))
    if missing is not None:
        no_box |= missing
    gx = (np.clip(np.nan_to_num(cx), 0.0, 1.0) * cells).astype(np.uint64)
    gy = (np.clip(np.nan_to_num(cy), 0.0, 1.0) * cells).astype(np.uint64)
    out = index(gx, gy)
    out[no_box] = LAST
    return out


_FIELDS = ("xmin", "ymin", "xmax", "ymax")


# A row group ends where the curve leaves the largest quadtree cell it can, between this
# share of the wanted rows and all of them: groups then cover whole cells (squarer boxes)
# rather than cutting across them. Simulated on the 1M reprojected benchmark output in
# groups of 5,000 rows, 200 random 1% queries read 3.7 % of the row groups on average
# (7.0 % at worst) at fixed sizes, 3.2 % (5.4 %) with these cuts, for 21 % more groups.
CUT_FROM = 0.7


def cut(keys: np.ndarray, rows: int) -> int:
    """Where to end a row group of at most `rows` rows, given the keys of at least
    rows + 1 sorted rows: the position, from CUT_FROM * rows on, where the curve crosses
    the highest quadtree boundary (the latest such position)."""
    first = max(1, int(rows * CUT_FROM))
    crossed = keys[first : rows + 1] ^ keys[first - 1 : rows]
    with np.errstate(divide="ignore"):
        level = np.where(crossed > 0, np.log2(crossed.astype(np.float64)) // 2, -1)
    return first + int(np.flatnonzero(level == level.max())[-1])


def with_keys(table: pa.Table, domain) -> pa.Table:
    return table.append_column(KEY, pa.array(keys(table["bbox"], domain), type=pa.uint64()))


def sort(table: pa.Table) -> pa.Table:
    """`table` (with its KEY column) in key order; ties keep their order."""
    order = np.argsort(table[KEY].to_numpy(), kind="stable")
    return table.take(order)


def merge(runs: list[Iterator[pa.Table]]) -> Iterator[pa.Table]:
    """Merge sorted runs (each an iterator of tables in key order, with the KEY column)
    into tables in key order. Holds one table of each run at a time: each round takes
    from every run the rows up to the smallest last key among their current tables, so
    at least one table is used up per round. Ties keep run order, then row order."""
    heads: list[list] = []
    for run in runs:
        head = _next(run)
        if head is not None:
            heads.append([run, *head])
    while heads:
        bound = min(keys_[-1] for _, _, keys_ in heads)
        pieces, next_heads = [], []
        for run, table, keys_ in heads:
            n = int(np.searchsorted(keys_, bound, side="right"))
            if n:
                pieces.append(table.slice(0, n))
            if n < table.num_rows:
                next_heads.append([run, table.slice(n), keys_[n:]])
            else:
                head = _next(run)
                if head is not None:
                    next_heads.append([run, *head])
        heads = next_heads
        if pieces:
            yield sort(pa.concat_tables(pieces)) if len(pieces) > 1 else pieces[0]


def _next(run: Iterator[pa.Table]):
    for table in run:
        if table.num_rows:
            return table, table[KEY].to_numpy()
    return None
