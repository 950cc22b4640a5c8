"""The Train sub-tab's loss plot: an inline SVG of the raw loss and a smoothed line.

Why not gradio's LinePlot: it draws with a fixed pixel width (too wide on a phone, too narrow in a wide column)
and re-renders the whole chart on every 2 s poll. An SVG with a viewBox scales to its column, costs a few kB, and
the smoothed line shows the trend the raw per-step loss (noisy by nature) hides.
"""

from __future__ import annotations

import html
import math

W, H = 600, 240
LEFT, RIGHT, TOP, BOTTOM = 48, 12, 24, 28


def smooth(values: list[float], weight: float | None = None) -> list[float]:
    """Exponential moving average with bias correction (tensorboard's smoothing); the weight grows with the run."""
    if not values:
        return []
    if weight is None:
        weight = min(0.95, max(0.6, 1 - 10 / max(1, len(values))))
    out, avg = [], 0.0
    for i, v in enumerate(values, start=1):
        avg = weight * avg + (1 - weight) * v
        out.append(avg / (1 - weight ** i))
    return out


def _ticks(low: float, high: float, n: int = 4) -> list[float]:
    if high <= low:
        return [low]
    step = (high - low) / n
    magnitude = 10 ** math.floor(math.log10(step))
    step = min((m * magnitude for m in (1, 2, 2.5, 5, 10) if m * magnitude >= step), default=step)
    first = math.ceil(low / step) * step
    return [first + i * step for i in range(int((high - first) / step + 1e-9) + 1)]


def loss_svg(points: list[tuple[int, float]], title: str = "Loss") -> str:
    """An SVG (in a div) of (step, loss) points: thin raw line, thick smoothed line, labelled axes."""
    points = [(int(s), float(v)) for s, v in points if v is not None and math.isfinite(float(v))]
    head = f"<div class='lora-train-plot'><svg viewBox='0 0 {W} {H}' width='100%' role='img' aria-label='{html.escape(title)}'>"
    if not points:
        return (head + f"<text x='{W / 2}' y='{H / 2}' text-anchor='middle' class='lt-plot-empty'>"
                "the loss appears here once a training runs</text></svg></div>")
    steps = [p[0] for p in points]
    losses = [p[1] for p in points]
    x0, x1 = min(steps), max(steps)
    x1 = x1 if x1 > x0 else x0 + 1
    y0, y1 = min(0.0, min(losses)), max(losses)
    y1 = y1 if y1 > y0 else y0 + 1
    y1 += (y1 - y0) * 0.05

    def x(step: float) -> float:
        return LEFT + (step - x0) / (x1 - x0) * (W - LEFT - RIGHT)

    def y(value: float) -> float:
        return H - BOTTOM - (value - y0) / (y1 - y0) * (H - TOP - BOTTOM)

    def path(values: list[float]) -> str:
        return "M" + " L".join(f"{x(s):.1f},{y(v):.1f}" for s, v in zip(steps, values))

    parts = [head, f"<text x='{LEFT}' y='16' class='lt-plot-title'>{html.escape(title)}: raw (thin) and smoothed; "
             f"last {losses[-1]:.4f}</text>"]
    for t in _ticks(y0, y1):
        parts.append(f"<line x1='{LEFT}' x2='{W - RIGHT}' y1='{y(t):.1f}' y2='{y(t):.1f}' class='lt-plot-grid'/>"
                     f"<text x='{LEFT - 6}' y='{y(t) + 4:.1f}' text-anchor='end' class='lt-plot-label'>{t:g}</text>")
    for t in _ticks(x0, x1):
        parts.append(f"<text x='{x(t):.1f}' y='{H - 8}' text-anchor='middle' class='lt-plot-label'>{t:g}</text>")
    parts.append(f"<text x='{W - RIGHT}' y='{H - BOTTOM - 4}' text-anchor='end' class='lt-plot-label'>step</text>")
    parts.append(f"<path d='{path(losses)}' class='lt-plot-raw'/>")
    parts.append(f"<path d='{path(smooth(losses))}' class='lt-plot-smooth'/>")
    parts.append("</svg></div>")
    return "".join(parts)
