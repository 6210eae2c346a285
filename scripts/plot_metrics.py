"""Plot learning curves from a training run's ``metrics.jsonl`` to a PNG (Pillow only, no plotting library).

    python scripts/plot_metrics.py WORKDIR/metrics.jsonl -o curves.png --keys loss,lm_loss,im_loss --smooth 20

One panel per key: the raw values in a light colour, their moving average (``--smooth`` steps) on top; the y
axis is logarithmic when ``--log`` is given and every value is positive.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

WIDTH, PANEL_HEIGHT, MARGIN_LEFT, MARGIN_RIGHT, MARGIN_Y = 900, 260, 80, 20, 30
RAW, SMOOTH, AXIS, GRID = (170, 190, 230), (20, 60, 170), (0, 0, 0), (225, 225, 225)


def read_series(path: Path, keys: list[str]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """key -> (steps, values) over the lines that hold a finite value for it."""
    series: dict[str, list[tuple[int, float]]] = {k: [] for k in keys}
    for n, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{n}: not a JSON line ({e.msg})") from None
        for k in keys:
            if isinstance(row.get(k), (int, float)) and math.isfinite(row[k]):
                series[k].append((int(row["step"]), float(row[k])))
    missing = [k for k, v in series.items() if not v]
    if missing:
        raise ValueError(f"{path}: no finite values for {missing}")
    return {k: (np.array([s for s, _ in v]), np.array([x for _, x in v])) for k, v in series.items()}


def moving_average(values: np.ndarray, window: int) -> np.ndarray:
    if window <= 1:
        return values
    cumsum = np.cumsum(np.insert(values, 0, 0.0))
    counts = np.minimum(np.arange(1, len(values) + 1), window)
    return (cumsum[1:] - cumsum[np.arange(1, len(values) + 1) - counts]) / counts


def _ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    return list(np.linspace(lo, hi, n))


def draw_panel(draw: ImageDraw.ImageDraw, top: int, key: str, steps: np.ndarray, values: np.ndarray,
               window: int, log: bool, font) -> None:
    left, right = MARGIN_LEFT, WIDTH - MARGIN_RIGHT
    bottom = top + PANEL_HEIGHT - MARGIN_Y
    inner_top = top + MARGIN_Y
    log = log and bool(np.all(values > 0))
    ys = np.log10(values) if log else values
    smooth = moving_average(ys, window)
    y_lo, y_hi = float(ys.min()), float(ys.max())
    if y_hi == y_lo:
        y_lo, y_hi = y_lo - 0.5, y_hi + 0.5
    x_lo, x_hi = float(steps.min()), float(max(steps.max(), steps.min() + 1))

    def px(x, y):
        return (left + (x - x_lo) / (x_hi - x_lo) * (right - left),
                bottom - (y - y_lo) / (y_hi - y_lo) * (bottom - inner_top))

    for y in _ticks(y_lo, y_hi):
        _, yy = px(x_lo, y)
        draw.line([(left, yy), (right, yy)], fill=GRID)
        label = f"{10 ** y:.3g}" if log else f"{y:.3g}"
        draw.text((4, yy - 6), label, fill=AXIS, font=font)
    for x in _ticks(x_lo, x_hi):
        xx, _ = px(x, y_lo)
        draw.line([(xx, bottom), (xx, bottom + 4)], fill=AXIS)
        draw.text((xx - 12, bottom + 6), f"{int(round(x))}", fill=AXIS, font=font)
    draw.rectangle([left, inner_top, right, bottom], outline=AXIS)
    draw.text((left, top + 8), f"{key}{' (log)' if log else ''}   last {values[-1]:.4g}", fill=AXIS, font=font)
    if len(steps) == 1:
        draw.ellipse([*(v - 2 for v in px(steps[0], ys[0])), *(v + 2 for v in px(steps[0], ys[0]))], fill=SMOOTH)
        return
    draw.line([px(x, y) for x, y in zip(steps, ys)], fill=RAW, width=1)
    draw.line([px(x, y) for x, y in zip(steps, smooth)], fill=SMOOTH, width=2)


def plot(series: dict[str, tuple[np.ndarray, np.ndarray]], out: Path, window: int, log: bool) -> None:
    image = Image.new("RGB", (WIDTH, PANEL_HEIGHT * len(series)), "white")
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default()
    for i, (key, (steps, values)) in enumerate(series.items()):
        draw_panel(draw, i * PANEL_HEIGHT, key, steps, values, window, log, font)
    out.parent.mkdir(parents=True, exist_ok=True)
    image.save(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("metrics", type=Path, help="a metrics.jsonl file")
    parser.add_argument("-o", "--output", type=Path, default=None, help="PNG path (default: beside the input)")
    parser.add_argument("--keys", default="loss,lm_loss,im_loss", help="comma-separated metric names")
    parser.add_argument("--smooth", type=int, default=10, help="moving-average window in steps")
    parser.add_argument("--log", action="store_true", help="logarithmic y axis")
    args = parser.parse_args(argv)
    if not args.metrics.is_file():
        print(f"{args.metrics}: no such file", file=sys.stderr)
        return 2
    keys = [k for k in args.keys.split(",") if k]
    try:
        series = read_series(args.metrics, keys)
    except ValueError as e:
        print(e, file=sys.stderr)
        return 2
    out = args.output or args.metrics.with_name("curves.png")
    plot(series, out, args.smooth, args.log)
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
