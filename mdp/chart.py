"""`mdp chart SYMBOL`: a candlestick chart of stored bars, as a self-contained HTML page (inline
SVG, no dependency) or a PNG (matplotlib, the `chart` extra).

One pure geometry function places every candle by its *time*, not its index, so a stretch
without bars is an empty stretch of the time axis (shaded and labelled as a gap); both outputs
draw exactly what it returns.
"""

from __future__ import annotations

import html
import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from mdp.shared.contract.messages import Bar

WIDTH, HEIGHT = 1200, 600
MARGIN_LEFT, MARGIN_RIGHT, MARGIN_TOP, MARGIN_BOTTOM = 70, 20, 40, 40
UP, DOWN, GAP = "#26a69a", "#ef5350", "#eeeeee"
MAX_BARS = 20_000  # more candles than pixels is no chart: narrow the range (--from, --to)


@dataclass(frozen=True)
class Candle:
    """One bar in pixels: body `[body_top, body_bottom]`, wick `[wick_top, wick_bottom]`."""

    start: int
    x: float  # the body's left edge
    width: float
    body_top: float
    body_bottom: float
    wick_top: float
    wick_bottom: float
    up: bool  # close >= open


@dataclass(frozen=True)
class Layout:
    """The chart in pixels: candles, gaps (`(x0, x1, start_ns, end_ns)`), axes' ranges."""

    candles: list[Candle]
    gaps: list[tuple[float, float, int, int]]
    t0: int
    t1: int
    low: float
    high: float
    width: int
    height: int


def gaps(bars: Sequence[Bar]) -> list[tuple[int, int]]:
    """`(from, to)` in ns of every stretch between two bars with no bar in it."""
    return [(a.end, b.start) for a, b in itertools.pairwise(bars) if b.start > a.end]


def layout(bars: Sequence[Bar], width: int = WIDTH, height: int = HEIGHT) -> Layout:
    """Place the candles of `bars` (one symbol and interval, ordered by start) on the canvas."""
    if not bars:
        raise ValueError("no bars to chart")
    t0, t1 = bars[0].start, max(b.end for b in bars)
    low, high = min(b.low for b in bars), max(b.high for b in bars)
    if high == low:  # a flat series still needs a vertical scale
        low, high = low - 0.5, high + 0.5
    plot_w = width - MARGIN_LEFT - MARGIN_RIGHT
    plot_h = height - MARGIN_TOP - MARGIN_BOTTOM

    def x(ns: int) -> float:
        return MARGIN_LEFT + (ns - t0) / (t1 - t0) * plot_w

    def y(price: float) -> float:
        return MARGIN_TOP + (high - price) / (high - low) * plot_h

    candles = []
    for bar in bars:
        left, right = x(bar.start), x(bar.end)
        pad = (right - left) * 0.15  # space between neighbours
        top, bottom = sorted((y(bar.open), y(bar.close)))
        candles.append(
            Candle(
                start=bar.start,
                x=left + pad,
                width=max(right - left - 2 * pad, 0.5),
                body_top=top,
                body_bottom=max(bottom, top + 0.5),  # a doji is still visible
                wick_top=y(bar.high),
                wick_bottom=y(bar.low),
                up=bar.close >= bar.open,
            )
        )
    holes = [(x(a), x(b), a, b) for a, b in gaps(bars)]
    return Layout(candles, holes, t0, t1, low, high, width, height)


def _time(ns: int) -> str:
    return datetime.fromtimestamp(ns / 1e9, UTC).strftime("%Y-%m-%d %H:%M:%S")


def svg(bars: Sequence[Bar], title: str) -> str:
    """The chart as one `<svg>` element: a `<g class="candle">` per bar, a rect per gap."""
    lay = layout(bars)
    bottom = lay.height - MARGIN_BOTTOM
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{lay.width}" height="{lay.height}" '
        f'viewBox="0 0 {lay.width} {lay.height}" font-family="sans-serif" font-size="12">',
        f'<rect width="{lay.width}" height="{lay.height}" fill="white"/>',
        f'<text x="{MARGIN_LEFT}" y="24" font-size="16">{html.escape(title)}</text>',
    ]
    for x0, x1, a, b in lay.gaps:
        parts.append(
            f'<rect class="gap" x="{x0:.2f}" y="{MARGIN_TOP}" width="{x1 - x0:.2f}" '
            f'height="{bottom - MARGIN_TOP}" fill="{GAP}"><title>no bars from {_time(a)} to '
            f"{_time(b)} UTC</title></rect>"
        )
    for bar, c in zip(bars, lay.candles, strict=True):
        color = UP if c.up else DOWN
        mid = c.x + c.width / 2
        tip = (
            f"{_time(bar.start)} UTC O {bar.open:g} H {bar.high:g} L {bar.low:g} "
            f"C {bar.close:g} V {bar.volume:g}"
        )
        parts.append(
            f'<g class="candle" data-start="{bar.start}"><title>{tip}</title>'
            f'<line x1="{mid:.2f}" x2="{mid:.2f}" y1="{c.wick_top:.2f}" y2="{c.wick_bottom:.2f}" '
            f'stroke="{color}"/><rect x="{c.x:.2f}" y="{c.body_top:.2f}" width="{c.width:.2f}" '
            f'height="{c.body_bottom - c.body_top:.2f}" fill="{color}"/></g>'
        )
    right = lay.width - MARGIN_RIGHT
    parts += [
        f'<line x1="{MARGIN_LEFT}" x2="{right}" y1="{bottom}" y2="{bottom}" stroke="#888"/>',
        f'<text x="{MARGIN_LEFT - 6}" y="{MARGIN_TOP + 4}" text-anchor="end">{lay.high:g}</text>',
        f'<text x="{MARGIN_LEFT - 6}" y="{bottom}" text-anchor="end">{lay.low:g}</text>',
        f'<text x="{MARGIN_LEFT}" y="{bottom + 16}">{_time(lay.t0)} UTC</text>',
        f'<text x="{right}" y="{bottom + 16}" text-anchor="end">{_time(lay.t1)} UTC</text>',
        "</svg>",
    ]
    return "\n".join(parts)


def page(bars: Sequence[Bar], title: str) -> str:
    """A self-contained HTML page holding the SVG chart (no script, no external file)."""
    return (
        f'<!doctype html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{html.escape(title)}</title></head>\n<body>\n{svg(bars, title)}\n"
        f"<p>{len(bars)} bars, {len(gaps(bars))} gap(s) shown shaded.</p>\n</body></html>\n"
    )


def title_of(bars: Sequence[Bar]) -> str:
    """`SYMBOL interval, from .. to UTC (provider)`."""
    first = bars[0]
    return (
        f"{first.symbol} {first.interval}, {_time(first.start)} .. {_time(bars[-1].end)} UTC "
        f"({first.provider})"
    )


def write_png(bars: Sequence[Bar], path: Path) -> None:
    """Draw `layout(bars)` with matplotlib (Agg) into a PNG file."""
    from mdp.export import require

    require("matplotlib", "chart")
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    from matplotlib import pyplot as plt
    from matplotlib.patches import Rectangle

    lay = layout(bars)
    dpi = 100
    fig = plt.figure(figsize=(lay.width / dpi, lay.height / dpi), dpi=dpi)
    # One axes over the whole canvas in pixel units, y down: the layout's own coordinates.
    ax = fig.add_axes((0, 0, 1, 1))
    ax.set_xlim(0, lay.width)
    ax.set_ylim(lay.height, 0)
    ax.axis("off")
    bottom = lay.height - MARGIN_BOTTOM
    for x0, x1, _, _ in lay.gaps:
        ax.add_patch(Rectangle((x0, MARGIN_TOP), x1 - x0, bottom - MARGIN_TOP, color=GAP))
    for c in lay.candles:
        color = UP if c.up else DOWN
        mid = c.x + c.width / 2
        ax.plot([mid, mid], [c.wick_top, c.wick_bottom], color=color, linewidth=1)
        ax.add_patch(Rectangle((c.x, c.body_top), c.width, c.body_bottom - c.body_top, color=color))
    ax.plot([MARGIN_LEFT, lay.width - MARGIN_RIGHT], [bottom, bottom], color="#888")
    ax.text(MARGIN_LEFT, 24, title_of(bars), fontsize=12)
    ax.text(MARGIN_LEFT - 6, MARGIN_TOP + 4, f"{lay.high:g}", ha="right", fontsize=9)
    ax.text(MARGIN_LEFT - 6, bottom, f"{lay.low:g}", ha="right", fontsize=9)
    ax.text(MARGIN_LEFT, bottom + 16, f"{_time(lay.t0)} UTC", fontsize=9)
    ax.text(lay.width - MARGIN_RIGHT, bottom + 16, f"{_time(lay.t1)} UTC", ha="right", fontsize=9)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)


def write(bars: Sequence[Bar], path: Path) -> None:
    """Write the chart to `path`: `.html`/`.htm` as a page, `.png` as an image."""
    suffix = path.suffix.lower()
    if suffix in (".html", ".htm"):
        path.write_text(page(bars, title_of(bars)), encoding="utf-8")
    elif suffix == ".png":
        write_png(bars, path)
    else:
        raise ValueError(f"{path}: the chart is written as .html or .png")
