"""Hand-written inline SVG charts: no plotting dependency, nothing fetched, text stays searchable.

Each function returns one `<svg>` element as a string; all text is XML-escaped.
"""

from __future__ import annotations

import math
from html import escape

import numpy as np

FONT = 'font-family="system-ui,sans-serif" font-size="11"'
BAR, GOOD, BAD, GRID, CLIP = "#4c78a8", "#54a24b", "#e45756", "#b8b8b8", "#d62728"


def _svg(width: int, height: int, body: list[str], label: str) -> str:
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
            f'viewBox="0 0 {width} {height}" role="img" aria-label="{escape(label)}">'
            f'<title>{escape(label)}</title>{"".join(body)}</svg>')


def _text(x: float, y: float, s: str, anchor: str = "start", extra: str = "") -> str:
    return f'<text x="{x:.1f}" y="{y:.1f}" text-anchor="{anchor}" {FONT} {extra}>{escape(s)}</text>'


def _nice(v: float) -> str:
    return f"{v:.3g}" if v == 0 or 1e-3 <= abs(v) < 1e4 else f"{v:.2e}"


def bar_chart(items: list[tuple[str, float | None]], *, title: str, unit: str, width: int = 900,
              threshold: float | None = None, value_format: str = ".1f") -> str:
    """Horizontal bars, one per (label, value); None values are drawn as 'exact' with no bar.
    Bars below `threshold` are drawn in the warning colour. The axis spans the values and zero."""
    row, left, top = 16, 330, 24
    height = top + row * len(items) + 28
    values = [v for _, v in items if v is not None and math.isfinite(v)]
    vmax = max(values + [0.0] + ([threshold] if threshold is not None else []))  # keep the threshold line inside
    vmin = min(values + [0.0])
    span = vmax - vmin or 1.0
    scale = (width - left - 60) / span
    body = [_text(4, 14, title, extra='font-weight="bold"')]
    zero_x = left + (0 - vmin) * scale
    for i, (label, value) in enumerate(items):
        y = top + i * row
        short = label if len(label) <= 52 else "…" + label[-51:]
        body.append(_text(left - 6, y + 11, short, "end"))
        if value is None or not math.isfinite(value):
            body.append(_text(zero_x + 4, y + 11, "exact" if value is None else str(value)))
            continue
        x0, x1 = sorted((zero_x, left + (value - vmin) * scale))
        colour = BAD if threshold is not None and value < threshold else BAR
        body.append(f'<rect x="{x0:.1f}" y="{y + 2}" width="{max(1.0, x1 - x0):.1f}" height="{row - 4}" '
                    f'fill="{colour}"/>')
        body.append(_text(x1 + 4, y + 11, f"{value:{value_format}} {unit}".rstrip()))
    axis_y = top + row * len(items) + 4
    body.append(f'<line x1="{zero_x:.1f}" y1="{top}" x2="{zero_x:.1f}" y2="{axis_y}" stroke="#333"/>')
    if threshold is not None:
        tx = left + (threshold - vmin) * scale
        body.append(f'<line x1="{tx:.1f}" y1="{top}" x2="{tx:.1f}" y2="{axis_y}" stroke="{CLIP}" '
                    'stroke-dasharray="4 3"/>')
        body.append(_text(tx + 3, axis_y + 14, f"{threshold:g} {unit}", extra=f'fill="{CLIP}"'))
    return _svg(width, height, body, title)


def histogram(edges: np.ndarray, counts: np.ndarray, *, title: str, grid: np.ndarray,
              clip: tuple[float, float], x_label: str, width: int = 420, height: int = 190) -> str:
    """Histogram (log-scaled counts) with the quantization grid (grey ticks) and the clipping
    thresholds (red dashed lines; values beyond them saturate)."""
    left, right, top, bottom = 36, 10, 22, 34
    plot_w, plot_h = width - left - right, height - top - bottom
    lo, hi = float(min(edges[0], clip[0])), float(max(edges[-1], clip[1]))
    pad = 0.04 * (hi - lo or 1.0)
    lo, hi = lo - pad, hi + pad

    def x_of(v: float) -> float:
        return left + (v - lo) / (hi - lo) * plot_w

    heights = np.log10(1.0 + np.asarray(counts, np.float64))
    top_count = float(heights.max()) or 1.0
    body = [_text(4, 14, title, extra='font-weight="bold"'),
            f'<rect x="{left}" y="{top}" width="{plot_w}" height="{plot_h}" fill="#fafafa" stroke="#ddd"/>']
    shown = grid[(grid >= lo) & (grid <= hi)]
    step = max(1, math.ceil(len(shown) / 64))  # a dense grid would paint the plot solid grey
    path = []
    for a, b, h in zip(edges[:-1], edges[1:], heights):
        if h <= 0:
            continue
        y = top + plot_h * (1 - h / top_count)
        path.append(f"M{x_of(a):.1f} {top + plot_h}V{y:.1f}H{x_of(b):.1f}V{top + plot_h}Z")
    body.append(f'<path d="{"".join(path)}" fill="{BAR}" class="bars"/>')
    # Grid levels as ticks hanging below the axis, where bars cannot hide them.
    ticks = "".join(f"M{x_of(g):.1f} {top + plot_h}v6" for g in shown[::step])
    if ticks:
        body.append(f'<path d="{ticks}" stroke="#555" stroke-width="1" class="grid"/>')
    for edge in clip:
        x = x_of(edge)
        body.append(f'<line x1="{x:.1f}" y1="{top}" x2="{x:.1f}" y2="{top + plot_h}" stroke="{CLIP}" '
                    'stroke-width="1.5" stroke-dasharray="4 3" class="clip"/>')
    body.append(_text(left, height - 16, _nice(lo)))
    body.append(_text(left + plot_w, height - 16, _nice(hi), "end"))
    body.append(_text(left + plot_w / 2, height - 4, x_label
                      + (f" · grid: every {step}th level shown" if step > 1 else " · grid: every level"), "middle"))
    body.append(_text(4, top + 10, "log", extra='fill="#666"'))
    return _svg(width, height, body, title)


def scatter(points: list[tuple[float, float, str, bool]], *, title: str, x_label: str, y_label: str,
            width: int = 640, height: int = 320, y_limit: float | None = None) -> str:
    """(x, y, label, highlighted) points; `y_limit` draws a dashed horizontal budget line."""
    left, right, top, bottom = 60, 20, 26, 40
    plot_w, plot_h = width - left - right, height - top - bottom
    xs = [p[0] for p in points] or [0.0]
    ys = [p[1] for p in points] + ([y_limit] if y_limit is not None else []) or [0.0]
    x_lo, x_hi = min(xs + [0.0]), max(xs + [1.0])
    y_lo, y_hi = min(ys), max(ys)
    y_pad = 0.08 * (y_hi - y_lo or abs(y_hi) or 1.0)
    y_lo, y_hi = y_lo - y_pad, y_hi + y_pad
    x_pad = 0.05 * (x_hi - x_lo or 1.0)
    x_lo, x_hi = x_lo - x_pad, x_hi + x_pad

    def pos(x: float, y: float) -> tuple[float, float]:
        return left + (x - x_lo) / (x_hi - x_lo) * plot_w, top + (1 - (y - y_lo) / (y_hi - y_lo)) * plot_h

    body = [_text(4, 14, title, extra='font-weight="bold"'),
            f'<rect x="{left}" y="{top}" width="{plot_w}" height="{plot_h}" fill="#fafafa" stroke="#ccc"/>']
    if y_limit is not None:
        _, y = pos(x_lo, y_limit)
        body.append(f'<line x1="{left}" y1="{y:.1f}" x2="{left + plot_w}" y2="{y:.1f}" stroke="{CLIP}" '
                    'stroke-dasharray="5 4"/>')
        body.append(_text(left + plot_w - 4, y - 4, "budget", "end", f'fill="{CLIP}"'))
    for x, y, label, highlighted in points:
        px, py = pos(x, y)
        colour = GOOD if highlighted else BAR
        body.append(f'<circle cx="{px:.1f}" cy="{py:.1f}" r="{6 if highlighted else 4}" fill="{colour}" '
                    f'fill-opacity="0.8"><title>{escape(label)}</title></circle>')
    for v, anchor in ((x_lo + x_pad, "start"), (x_hi - x_pad, "end")):
        body.append(_text(pos(v, y_lo)[0], top + plot_h + 14, _nice(v), anchor))
    for v in (y_lo + y_pad, y_hi - y_pad):
        body.append(_text(left - 4, pos(x_lo, v)[1] + 4, _nice(v), "end"))
    body.append(_text(left + plot_w / 2, height - 6, x_label, "middle"))
    body.append(_text(12, top + plot_h / 2, y_label, "middle",
                      f'transform="rotate(-90 12 {top + plot_h / 2:.1f})"'))
    return _svg(width, height, body, title)
