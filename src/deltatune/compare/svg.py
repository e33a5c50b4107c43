"""Small, dependency-free SVG charts for the report: line plots (linear or log x), bands, points, bars.

Why not matplotlib: the report must open from disk with nothing else, and inline SVG does that,
stays sharp at any zoom, is a few kilobytes, and can be checked in a browser's DOM (every chart
is an <svg class="plot" data-plot="NAME">). Hovering a point shows its exact values (<title>).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from html import escape

PALETTE = (
    "#4e79a7",
    "#f28e2b",
    "#59a14f",
    "#e15759",
    "#b07aa1",
    "#76b7b2",
    "#edc948",
    "#9c755f",
    "#ff9da7",
    "#1b9e77",
    "#d95f02",
    "#7570b3",
)
BASELINE_COLOR = "#2b2b2b"
FONT = "system-ui, -apple-system, 'Segoe UI', Roboto, Helvetica, Arial, sans-serif"


def method_colors(variants: list[str], baseline: str | None) -> dict[str, str]:
    """One colour per method variant, the same in every chart; the baseline is near-black."""
    colors, index = {}, 0
    for variant in variants:
        if variant == baseline:
            colors[variant] = BASELINE_COLOR
        else:
            colors[variant] = PALETTE[index % len(PALETTE)]
            index += 1
    return colors


def _number(value: float) -> str:
    return f"{value:.2f}".rstrip("0").rstrip(".")


def nice_ticks(low: float, high: float, count: int = 5) -> list[float]:
    """Round tick values (1, 2, 5 × 10^k steps) covering [low, high]."""
    if not math.isfinite(low) or not math.isfinite(high):
        return [0.0, 1.0]
    if high <= low:
        high = low + (abs(low) * 0.1 or 1.0)
    raw = (high - low) / max(1, count)
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 2.5, 5, 10) if m * magnitude >= raw)
    start = math.floor(low / step + 1e-9) * step
    ticks = []
    value = start
    while value <= high + step * 1e-6:
        ticks.append(round(value, 12))
        value += step
    if ticks[-1] < high - 1e-12:
        ticks.append(round(value, 12))
    return ticks


def format_tick(value: float) -> str:
    if value == 0:
        return "0"
    magnitude = abs(value)
    if magnitude >= 1e9:
        return f"{value / 1e9:g}G"
    if magnitude >= 1e6:
        return f"{value / 1e6:g}M"
    if magnitude >= 1e4:
        return f"{value / 1e3:g}k"
    if magnitude >= 1:
        return f"{value:g}"
    return f"{value:.3g}"


def log_ticks(low: float, high: float) -> list[float]:
    """Powers of ten covering [low, high] (with 2 and 5 between when the range is narrow)."""
    first, last = math.floor(math.log10(low)), math.ceil(math.log10(high))
    if last == first:
        last += 1
    ticks = [10.0**k for k in range(first, last + 1)]
    if last - first <= 2:
        ticks = sorted(t * m for t in ticks for m in (1, 2, 5) if t * m <= 10.0**last)
    return ticks


@dataclass
class _Series:
    kind: str
    xs: list[float]
    ys: list[float]
    color: str
    label: str | None = None
    extra: dict = field(default_factory=dict)


_MARGIN_LEFT, _MARGIN_RIGHT = 64, 16


@dataclass(frozen=True)
class _Frame:
    """Where a plot's data area sits in the SVG, and the scales from data to pixels."""

    left: float
    top: float
    plot_width: float
    plot_height: float
    x_low: float
    x_high: float
    x_ticks: list[float]
    y_ticks: list[float]
    sx: Callable[[float], float]
    sy: Callable[[float], float]


class Plot:
    """A line/scatter chart with axes, grid, optional log x, and a legend of the labelled series."""

    def __init__(
        self,
        name: str,
        title: str,
        x_label: str,
        y_label: str,
        width: int = 560,
        height: int = 360,
        x_log: bool = False,
        subtitle: str | None = None,
        x_from_zero: bool = False,
    ) -> None:
        self.name, self.title, self.subtitle = name, title, subtitle
        self.x_label, self.y_label = x_label, y_label
        self.width, self.height, self.x_log, self.x_from_zero = width, height, x_log, x_from_zero
        self.series: list[_Series] = []
        self.x_ticks: list[float] | None = None

    # -- adding data ------------------------------------------------------------------------
    def line(
        self,
        xs,
        ys,
        color: str,
        label: str | None = None,
        dash: str | None = None,
        width: float = 2.2,
        markers: bool = True,
        opacity: float = 1.0,
        tooltips: list[str] | None = None,
    ) -> None:
        self.series.append(
            _Series(
                "line",
                list(xs),
                list(ys),
                color,
                label,
                {"dash": dash, "width": width, "markers": markers, "opacity": opacity, "tooltips": tooltips},
            )
        )

    def band(self, xs, lows, highs, color: str, opacity: float = 0.15) -> None:
        self.series.append(
            _Series("band", list(xs), list(lows), color, None, {"highs": list(highs), "opacity": opacity})
        )

    def points(
        self,
        xs,
        ys,
        color: str,
        label: str | None = None,
        radius: float = 3.0,
        opacity: float = 0.6,
        tooltips: list[str] | None = None,
        hollow: bool = False,
    ) -> None:
        self.series.append(
            _Series(
                "points",
                list(xs),
                list(ys),
                color,
                label,
                {"radius": radius, "opacity": opacity, "tooltips": tooltips, "hollow": hollow},
            )
        )

    def error_bars(self, xs, lows, highs, color: str) -> None:
        self.series.append(_Series("errors", list(xs), list(lows), color, None, {"highs": list(highs)}))

    def hline(self, y: float, color: str, label: str | None = None, dash: str = "5 4") -> None:
        self.series.append(_Series("hline", [], [y], color, label, {"dash": dash}))

    # -- drawing ----------------------------------------------------------------------------
    def _extent(self) -> tuple[float, float, float, float]:
        xs = [x for s in self.series for x in s.xs if x is not None and math.isfinite(x)]
        ys = [y for s in self.series for y in s.ys if y is not None and math.isfinite(y)]
        ys += [y for s in self.series for y in s.extra.get("highs", []) if y is not None and math.isfinite(y)]
        if self.x_log:
            xs = [x for x in xs if x > 0]
        if not xs:
            xs = [1.0, 10.0] if self.x_log else [0.0, 1.0]
        if not ys:
            ys = [0.0, 1.0]
        return min(xs), max(xs), min(ys), max(ys)

    def render(self) -> str:
        legend, legend_positions, legend_rows = self._legend_layout()
        height = self.height + (20 * legend_rows + 6 if legend else 0)
        frame = self._frame()
        parts = [
            f'<svg class="plot" data-plot="{escape(self.name)}" role="img" viewBox="0 0 {self.width} {height}" '
            f'width="{self.width}" height="{height}" aria-label="{escape(self.title)}" '
            f'font-family="{FONT}">',
            f"<title>{escape(self.title)}</title>",
            f'<rect x="0" y="0" width="{self.width}" height="{height}" fill="#ffffff"/>',
            f'<text x="{frame.left}" y="22" font-size="15" font-weight="600" fill="#1a1a1a">'
            f"{escape(self.title)}</text>",
        ]
        if self.subtitle:
            parts.append(f'<text x="{frame.left}" y="40" font-size="12" fill="#666">{escape(self.subtitle)}</text>')
        parts += self._axes(frame)
        draw = {
            "band": self._band,
            "line": self._line,
            "points": self._points,
            "errors": self._errors,
            "hline": self._hline,
        }
        for series in self.series:
            parts += draw[series.kind](series, frame)
        # legend under the axis label
        for (series, label), (x, y) in zip(legend, legend_positions, strict=True):
            dash = ' stroke-dasharray="5 4"' if series.kind == "hline" else ""
            swatch = (
                f'<line x1="{x:.1f}" x2="{x + 22:.1f}" y1="{y - 4:.1f}" y2="{y - 4:.1f}" '
                f'stroke="{escape(series.color)}" stroke-width="3"{dash}/>'
                if series.kind in ("line", "hline")
                else f'<circle cx="{x + 11:.1f}" cy="{y - 4:.1f}" r="4.5" fill="{escape(series.color)}"/>'
            )
            parts.append(
                swatch + f'<text x="{x + 28:.1f}" y="{y:.1f}" font-size="12" fill="#333">{escape(label)}</text>'
            )
        parts.append("</svg>")
        return "\n".join(parts)

    def _legend_layout(self) -> tuple[list[tuple[_Series, str]], list[tuple[float, int]], int]:
        """The labelled series (with their labels), where each one's legend entry goes, and how many legend rows
        they take."""
        left, right = _MARGIN_LEFT, _MARGIN_RIGHT
        legend = [(s, s.label) for s in self.series if s.label]
        positions, column, row = [], 0.0, 0
        for _, label in legend:  # flow left to right, wrapping at the plot's width
            item_width = 34 + 6.6 * len(label)
            if column and column + item_width > self.width - left - right:
                column, row = 0.0, row + 1
            positions.append((left + column, self.height + 8 + 20 * row))
            column += item_width + 10
        return legend, positions, row + 1

    def _frame(self) -> _Frame:
        """The plotting area and the data-to-pixel scales, with ticks that cover every point."""
        left, top, bottom = _MARGIN_LEFT, 58 if self.subtitle else 42, 54
        plot_width, plot_height = self.width - left - _MARGIN_RIGHT, self.height - top - bottom
        x_low, x_high, y_low, y_high = self._extent()
        y_span = (y_high - y_low) or (abs(y_high) * 0.1 or 1.0)
        y_ticks = nice_ticks(y_low - 0.04 * y_span, y_high + 0.04 * y_span)
        y_low, y_high = y_ticks[0], y_ticks[-1]
        if self.x_log:
            x_low, x_high = x_low / 1.8, x_high * 1.8  # keep the extreme points off the frame
            x_ticks = log_ticks(x_low, x_high)
            x_low, x_high = min(x_ticks[0], x_low), max(x_ticks[-1], x_high)
            log_low, log_high = math.log10(x_low), math.log10(x_high)

            def sx(x: float) -> float:
                return left + (math.log10(x) - log_low) / (log_high - log_low) * plot_width
        else:
            if self.x_from_zero:
                x_low = min(0.0, x_low)
            x_ticks = self.x_ticks or nice_ticks(x_low, x_high)
            x_low, x_high = min(x_ticks[0], x_low), max(x_ticks[-1], x_high)

            def sx(x: float) -> float:
                return left + (x - x_low) / ((x_high - x_low) or 1.0) * plot_width

        def sy(y: float) -> float:
            return top + plot_height - (y - y_low) / ((y_high - y_low) or 1.0) * plot_height

        return _Frame(left, top, plot_width, plot_height, x_low, x_high, x_ticks, y_ticks, sx, sy)

    def _axes(self, frame: _Frame) -> list[str]:
        """Grid lines, tick labels, the frame and the axis labels."""
        left, top, plot_width, plot_height = frame.left, frame.top, frame.plot_width, frame.plot_height
        parts = []
        for tick in frame.y_ticks:
            y = frame.sy(tick)
            parts.append(f'<line x1="{left}" x2="{left + plot_width}" y1="{y:.1f}" y2="{y:.1f}" stroke="#e6e6e6"/>')
            parts.append(
                f'<text x="{left - 8}" y="{y + 4:.1f}" font-size="11" fill="#555" text-anchor="end">'
                f"{format_tick(tick)}</text>"
            )
        for tick in frame.x_ticks:
            if not frame.x_low - 1e-12 <= tick <= frame.x_high + 1e-12:
                continue
            x = frame.sx(tick)
            parts.append(f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{top}" y2="{top + plot_height}" stroke="#f0f0f0"/>')
            parts.append(
                f'<text x="{x:.1f}" y="{top + plot_height + 17}" font-size="11" fill="#555" '
                f'text-anchor="middle">{format_tick(tick)}</text>'
            )
        parts.append(
            f'<rect x="{left}" y="{top}" width="{plot_width}" height="{plot_height}" fill="none" stroke="#bdbdbd"/>'
        )
        parts.append(
            f'<text x="{left + plot_width / 2:.1f}" y="{top + plot_height + 40}" font-size="12" '
            f'fill="#333" text-anchor="middle">{escape(self.x_label)}</text>'
        )
        parts.append(
            f'<text transform="translate(16 {top + plot_height / 2:.1f}) rotate(-90)" font-size="12" '
            f'fill="#333" text-anchor="middle">{escape(self.y_label)}</text>'
        )
        return parts

    def _usable(self, x, y) -> bool:
        return x is not None and y is not None and math.isfinite(x) and math.isfinite(y) and (x > 0 or not self.x_log)

    def _band(self, series: _Series, frame: _Frame) -> list[str]:
        sx, sy = frame.sx, frame.sy
        upper = [(sx(x), sy(h)) for x, h in zip(series.xs, series.extra["highs"], strict=True) if self._usable(x, h)]
        lower = [(sx(x), sy(low)) for x, low in zip(series.xs, series.ys, strict=True) if self._usable(x, low)]
        if len(upper) < 2:
            return []
        path = " ".join(f"{x:.1f},{y:.1f}" for x, y in upper + lower[::-1])
        return [
            f'<polygon points="{path}" fill="{escape(series.color)}" fill-opacity="{series.extra["opacity"]}" '
            'stroke="none"/>'
        ]

    def _line(self, series: _Series, frame: _Frame) -> list[str]:
        color, extra, parts = escape(series.color), series.extra, []
        coordinates = [
            (frame.sx(x), frame.sy(y), i)
            for i, (x, y) in enumerate(zip(series.xs, series.ys, strict=True))
            if self._usable(x, y)
        ]
        dash = f' stroke-dasharray="{extra["dash"]}"' if extra["dash"] else ""
        if len(coordinates) >= 2:
            path = " ".join(f"{x:.1f},{y:.1f}" for x, y, _ in coordinates)
            parts.append(
                f'<polyline points="{path}" fill="none" stroke="{color}" '
                f'stroke-width="{extra["width"]}" '
                f'stroke-opacity="{extra["opacity"]}" stroke-linejoin="round"{dash}/>'
            )
        if extra["markers"]:
            for x, y, i in coordinates:
                parts.append(
                    f'<circle cx="{x:.1f}" cy="{y:.1f}" r="3.6" fill="{color}" stroke="#fff" '
                    f'stroke-width="1.2">{_tooltip(extra["tooltips"], i)}</circle>'
                )
        return parts

    def _points(self, series: _Series, frame: _Frame) -> list[str]:
        color, extra, parts = escape(series.color), series.extra, []
        for i, (x, y) in enumerate(zip(series.xs, series.ys, strict=True)):
            if not self._usable(x, y):
                continue
            fill = "#fff" if extra["hollow"] else color
            parts.append(
                f'<circle cx="{frame.sx(x):.1f}" cy="{frame.sy(y):.1f}" r="{extra["radius"]}" fill="{fill}" '
                f'fill-opacity="{extra["opacity"] if not extra["hollow"] else 1}" stroke="{color}" '
                f'stroke-width="1.4">{_tooltip(extra["tooltips"], i)}</circle>'
            )
        return parts

    def _errors(self, series: _Series, frame: _Frame) -> list[str]:
        color, sy, parts = escape(series.color), frame.sy, []
        for x, low, high in zip(series.xs, series.ys, series.extra["highs"], strict=True):
            if self._usable(x, low) and self._usable(x, high):
                px = frame.sx(x)
                parts.append(
                    f'<line x1="{px:.1f}" x2="{px:.1f}" y1="{sy(low):.1f}" y2="{sy(high):.1f}" '
                    f'stroke="{color}" stroke-width="1.6"/>'
                )
                for value in (low, high):
                    parts.append(
                        f'<line x1="{px - 4:.1f}" x2="{px + 4:.1f}" y1="{sy(value):.1f}" '
                        f'y2="{sy(value):.1f}" stroke="{color}" stroke-width="1.6"/>'
                    )
        return parts

    def _hline(self, series: _Series, frame: _Frame) -> list[str]:
        y = frame.sy(series.ys[0])
        return [
            f'<line x1="{frame.left}" x2="{frame.left + frame.plot_width}" y1="{y:.1f}" y2="{y:.1f}" '
            f'stroke="{escape(series.color)}" stroke-width="1.2" stroke-dasharray="{series.extra["dash"]}"/>'
        ]


def _tooltip(tooltips: list[str] | None, index: int) -> str:
    """The <title> that shows a point's exact values on hover, or nothing."""
    tip = tooltips[index] if tooltips else None
    return f"<title>{escape(tip)}</title>" if tip else ""


def bar_chart(
    name: str,
    title: str,
    labels: list[str],
    values: list[float | None],
    colors: list[str],
    x_label: str,
    value_text: list[str],
    log: bool = False,
    width: int = 560,
    subtitle: str | None = None,
) -> str:
    """Horizontal bars, one per label (a method), with the value printed at the end of each bar."""
    left, right, top = 130, 90, 58 if subtitle else 42
    bar, gap = 22, 10
    plot_width = width - left - right
    height = top + len(labels) * (bar + gap) + 46
    present = [v for v in values if v is not None and v > 0]
    high = max(present) if present else 1.0
    if log:
        low = min(present) if present else 1.0
        ticks = log_ticks(low / 3, high)  # start well below the smallest bar, so it is visibly a bar
        log_low, log_high = math.log10(ticks[0]), math.log10(ticks[-1])

        def sx(v: float) -> float:
            return left + (math.log10(v) - log_low) / ((log_high - log_low) or 1) * plot_width

        origin: float = left
    else:
        ticks = nice_ticks(0, high)

        def sx(v: float) -> float:
            return left + v / (ticks[-1] or 1) * plot_width

        origin = sx(0)
    parts = [
        f'<svg class="plot" data-plot="{escape(name)}" role="img" viewBox="0 0 {width} {height}" width="{width}" '
        f'height="{height}" aria-label="{escape(title)}" font-family="{FONT}">',
        f"<title>{escape(title)}</title>",
        f'<rect x="0" y="0" width="{width}" height="{height}" fill="#ffffff"/>',
        f'<text x="{left}" y="22" font-size="15" font-weight="600" fill="#1a1a1a">{escape(title)}</text>',
    ]
    if subtitle:
        parts.append(f'<text x="{left}" y="40" font-size="12" fill="#666">{escape(subtitle)}</text>')
    axis_y = top + len(labels) * (bar + gap)
    for tick in ticks:
        x = sx(tick)
        parts.append(f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{top - 4}" y2="{axis_y}" stroke="#ececec"/>')
        parts.append(
            f'<text x="{x:.1f}" y="{axis_y + 16}" font-size="11" fill="#555" text-anchor="middle">'
            f"{format_tick(tick)}</text>"
        )
    for index, (label, value, color, text) in enumerate(zip(labels, values, colors, value_text, strict=True)):
        y = top + index * (bar + gap)
        parts.append(
            f'<text x="{left - 8}" y="{y + bar / 2 + 4:.1f}" font-size="12" fill="#333" text-anchor="end">'
            f"{escape(label)}</text>"
        )
        if value is not None and value > 0:
            end = sx(value)
            parts.append(
                f'<rect x="{origin:.1f}" y="{y}" width="{max(1.0, end - origin):.1f}" height="{bar}" '
                f'fill="{escape(color)}" rx="2"><title>{escape(label)}: {escape(text)}</title></rect>'
            )
            parts.append(
                f'<text x="{end + 6:.1f}" y="{y + bar / 2 + 4:.1f}" font-size="11" fill="#333">{escape(text)}</text>'
            )
        else:
            parts.append(f'<text x="{origin + 6:.1f}" y="{y + bar / 2 + 4:.1f}" font-size="11" fill="#888">n/a</text>')
    parts.append(f'<line x1="{left}" x2="{left + plot_width}" y1="{axis_y}" y2="{axis_y}" stroke="#bdbdbd"/>')
    parts.append(
        f'<text x="{left + plot_width / 2:.1f}" y="{axis_y + 36}" font-size="12" fill="#333" '
        f'text-anchor="middle">{escape(x_label)}</text>'
    )
    parts.append("</svg>")
    return "\n".join(parts)


__all__ = ["Plot", "bar_chart", "method_colors", "nice_ticks", "log_ticks", "PALETTE", "BASELINE_COLOR"]
