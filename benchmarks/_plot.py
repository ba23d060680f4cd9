"""A small SVG line chart for the benchmark scripts' `--plot` option (no plotting dependency).

    line_chart(path, "title", "clients", "tokens/s", {"ours": [(1, 120.0), (8, 190.0)]},
               hlines={"raw, alone": 130.0})

Each series is a polyline with a dot per point, each horizontal line dashed; the x axis is
logarithmic when the xs span more than a factor of 4 (1, 2, 4, 8, 16 clients spread evenly).
"""

from __future__ import annotations

import math
from html import escape
from pathlib import Path

COLOURS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b"]
W, H = 720, 400
LEFT, RIGHT, TOP, BOTTOM = 70, 250, 40, 50


def _nice_top(v: float) -> float:
    """A round number just above v (for the y axis)."""
    if v <= 0:
        return 1.0
    step = 10 ** math.floor(math.log10(v))
    for m in (1, 2, 2.5, 5, 10):
        if m * step >= v:
            return m * step
    return 10 * step


def line_chart(path: str | Path, title: str, x_label: str, y_label: str,
               series: dict[str, list[tuple[float, float]]],
               hlines: dict[str, float] | None = None) -> None:
    hlines = hlines or {}
    xs = sorted({x for pts in series.values() for x, _ in pts})
    if not xs:
        raise ValueError("nothing to plot")
    ys = [y for pts in series.values() for _, y in pts] + list(hlines.values())
    y_top = _nice_top(max(ys) * 1.05)
    log_x = xs[0] > 0 and xs[-1] / xs[0] > 4
    fx = math.log if log_x else float
    x0, x1 = fx(xs[0]), fx(xs[-1])
    pw, ph = W - LEFT - RIGHT, H - TOP - BOTTOM

    def px(x: float) -> float:
        return LEFT + (0.5 * pw if x1 == x0 else (fx(x) - x0) / (x1 - x0) * pw)

    def py(y: float) -> float:
        return TOP + ph - y / y_top * ph

    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" '
           f'font-family="sans-serif" font-size="12">',
           f'<rect width="{W}" height="{H}" fill="white"/>',
           f'<text x="{W / 2}" y="22" text-anchor="middle" font-size="14">{escape(title)}</text>']
    for i in range(6):  # y grid and labels
        y = y_top * i / 5
        out.append(f'<line x1="{LEFT}" x2="{LEFT + pw}" y1="{py(y):.1f}" y2="{py(y):.1f}" '
                   f'stroke="#ddd"/>')
        out.append(f'<text x="{LEFT - 6}" y="{py(y) + 4:.1f}" text-anchor="end">{y:g}</text>')
    for x in xs:  # x ticks
        out.append(f'<line x1="{px(x):.1f}" x2="{px(x):.1f}" y1="{TOP + ph}" y2="{TOP + ph + 5}" '
                   f'stroke="black"/>')
        out.append(f'<text x="{px(x):.1f}" y="{TOP + ph + 18}" text-anchor="middle">{x:g}</text>')
    out.append(f'<rect x="{LEFT}" y="{TOP}" width="{pw}" height="{ph}" fill="none" '
               f'stroke="black"/>')
    out.append(f'<text x="{LEFT + pw / 2}" y="{H - 10}" text-anchor="middle">'
               f'{escape(x_label)}{" (log scale)" if log_x else ""}</text>')
    out.append(f'<text transform="translate(18 {TOP + ph / 2}) rotate(-90)" '
               f'text-anchor="middle">{escape(y_label)}</text>')
    legend_y = TOP + 10
    for i, (name, pts) in enumerate(series.items()):
        colour = COLOURS[i % len(COLOURS)]
        pts = sorted(pts)
        line = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in pts)
        out.append(f'<polyline points="{line}" fill="none" stroke="{colour}" stroke-width="2"/>')
        for x, y in pts:
            out.append(f'<circle cx="{px(x):.1f}" cy="{py(y):.1f}" r="3.5" fill="{colour}">'
                       f'<title>{escape(name)}: {y:.1f} at {x:g}</title></circle>')
        out.append(f'<line x1="{LEFT + pw + 12}" x2="{LEFT + pw + 32}" y1="{legend_y}" '
                   f'y2="{legend_y}" stroke="{colour}" stroke-width="2"/>')
        out.append(f'<text x="{LEFT + pw + 38}" y="{legend_y + 4}">{escape(name)}</text>')
        legend_y += 20
    for j, (name, y) in enumerate(hlines.items()):
        colour = COLOURS[(len(series) + j) % len(COLOURS)]
        out.append(f'<line x1="{LEFT}" x2="{LEFT + pw}" y1="{py(y):.1f}" y2="{py(y):.1f}" '
                   f'stroke="{colour}" stroke-width="1.5" stroke-dasharray="6 4"/>')
        out.append(f'<line x1="{LEFT + pw + 12}" x2="{LEFT + pw + 32}" y1="{legend_y}" '
                   f'y2="{legend_y}" stroke="{colour}" stroke-width="1.5" '
                   f'stroke-dasharray="6 4"/>')
        out.append(f'<text x="{LEFT + pw + 38}" y="{legend_y + 4}">{escape(name)}</text>')
        legend_y += 20
    out.append("</svg>")
    Path(path).write_text("\n".join(out) + "\n")
