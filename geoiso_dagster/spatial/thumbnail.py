"""A small PNG map of polygons, drawn with numpy alone (no plotting library to import
into every worker). Even-odd scanline fill, one colour per row of the frame."""

import struct
import zlib

import numpy as np
import shapely

# Colour-blind-safe qualitative palette (Okabe-Ito), then repeats.
PALETTE = np.array(
    [
        (0, 114, 178),
        (230, 159, 0),
        (0, 158, 115),
        (204, 121, 167),
        (86, 180, 233),
        (213, 94, 0),
        (240, 228, 66),
        (100, 100, 100),
    ],
    dtype=np.uint8,
)
BACKGROUND = (255, 255, 255, 0)


def _rings(geometry) -> list[np.ndarray]:
    polygons = shapely.get_parts(geometry)
    rings = []
    for polygon in polygons:
        if polygon.is_empty or polygon.geom_type != "Polygon":
            continue
        rings.append(np.asarray(polygon.exterior.coords)[:, :2])
        rings.extend(np.asarray(r.coords)[:, :2] for r in polygon.interiors)
    return rings


def _fill(mask: np.ndarray, rings: list[np.ndarray]) -> None:
    """Set the pixels whose centres lie inside `rings` (even-odd), in pixel coordinates."""
    if not rings:
        return
    edges = np.concatenate([np.stack([r[:-1], r[1:]], axis=1) for r in rings])  # (n, 2, 2)
    (x0, y0), (x1, y1) = edges[:, 0].T, edges[:, 1].T
    height, width = mask.shape
    # only the rows the rings reach: a region of a thousand spans a few of the map's rows
    low = max(0, int(np.floor(min(y0.min(), y1.min()) - 0.5)))
    high = min(height, int(np.ceil(max(y0.max(), y1.max()) + 0.5)))
    for row in range(low, high):
        y = row + 0.5
        crosses = (y0 <= y) != (y1 <= y)
        if not crosses.any():
            continue
        t = (y - y0[crosses]) / (y1[crosses] - y0[crosses])
        xs = np.sort(x0[crosses] + t * (x1[crosses] - x0[crosses]))
        for left, right in zip(xs[::2], xs[1::2], strict=False):
            start, stop = (
                max(0, int(np.ceil(left - 0.5))),
                min(width, int(np.floor(right - 0.5)) + 1),
            )
            if stop > start:
                mask[row, start:stop] ^= True


def render(geometries, max_width: int = 240, max_height: int = 160) -> bytes:
    """PNG bytes of the geometries, scaled to fit, north up, one colour each."""
    geometries = np.asarray(geometries, dtype=object)
    minx, miny, maxx, maxy = shapely.total_bounds(geometries)
    span_x, span_y = max(maxx - minx, 1e-12), max(maxy - miny, 1e-12)
    scale = min((max_width - 2) / span_x, (max_height - 2) / span_y)
    width, height = max(1, int(span_x * scale) + 2), max(1, int(span_y * scale) + 2)
    image = np.zeros((height, width, 4), dtype=np.uint8)
    image[:] = BACKGROUND
    for i, geometry in enumerate(geometries):
        if geometry is None:
            continue
        rings = [
            np.column_stack([(r[:, 0] - minx) * scale + 1, (maxy - r[:, 1]) * scale + 1])
            for r in _rings(geometry)
        ]
        mask = np.zeros((height, width), dtype=bool)
        _fill(mask, rings)
        image[mask, :3] = PALETTE[i % len(PALETTE)]
        image[mask, 3] = 255
    return encode_png(image)


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def encode_png(rgba: np.ndarray) -> bytes:
    height, width, _ = rgba.shape
    raw = b"".join(b"\x00" + rgba[row].tobytes() for row in range(height))  # filter: none
    header = struct.pack(">IIBBBBB", width, height, 8, 6, 0, 0, 0)  # 8-bit RGBA
    return (
        b"\x89PNG\r\n\x1a\n"
        + _chunk(b"IHDR", header)
        + _chunk(b"IDAT", zlib.compress(raw, 6))
        + _chunk(b"IEND", b"")
    )
