"""The figure `make bench` draws: the router's throughput against clients, new default against previous.

Drawn with OpenCV (already a dependency), not a plotting library: two lines and their axes.
"""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

WIDTH, HEIGHT, MARGIN = 640, 400, 60
COLOURS = {"new": (40, 120, 220), "previous": (120, 120, 120)}  # BGR: orange-ish new, grey previous


def clients_png(compared: dict, path: Path) -> None:
    """compared: scripts.bench.new_vs_previous's report."""
    levels = [int(c) for c in compared["clients"]]
    series = {which: [compared["clients"][str(c)][which]["per_second"] for c in levels] for which in COLOURS}
    top = max(max(values) for values in series.values()) * 1.15
    canvas = np.full((HEIGHT, WIDTH, 3), 255, np.uint8)
    plot_w, plot_h = WIDTH - 2 * MARGIN, HEIGHT - 2 * MARGIN

    def point(i: int, value: float) -> tuple[int, int]:
        x = MARGIN + int(plot_w * i / max(1, len(levels) - 1))
        return x, MARGIN + plot_h - int(plot_h * value / top)

    cv2.rectangle(canvas, (MARGIN, MARGIN), (MARGIN + plot_w, MARGIN + plot_h), (0, 0, 0), 1)
    for step in range(5):  # horizontal grid with req/s labels
        value = top * step / 4
        y = point(0, value)[1]
        cv2.line(canvas, (MARGIN, y), (MARGIN + plot_w, y), (225, 225, 225), 1)
        cv2.putText(canvas, f"{value:.0f}", (10, y + 4), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (0, 0, 0), 1)
    for i, clients in enumerate(levels):
        x = point(i, 0)[0]
        cv2.putText(canvas, str(clients), (x - 4, MARGIN + plot_h + 18), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (0, 0, 0), 1)
    for which, values in series.items():
        points = [point(i, v) for i, v in enumerate(values)]
        for a, b in zip(points, points[1:]):
            cv2.line(canvas, a, b, COLOURS[which], 2, cv2.LINE_AA)
        for p in points:
            cv2.circle(canvas, p, 4, COLOURS[which], -1, cv2.LINE_AA)
    version = {"new": compared["new_version"], "previous": compared["previous_version"]}
    for row, which in enumerate(COLOURS):
        y = MARGIN + 16 + 18 * row
        cv2.line(canvas, (MARGIN + 10, y - 4), (MARGIN + 30, y - 4), COLOURS[which], 2)
        cv2.putText(canvas, f"{which}: v{version[which]}", (MARGIN + 36, y), cv2.FONT_HERSHEY_SIMPLEX, 0.45,
                    (0, 0, 0), 1)
    cv2.putText(canvas, f"router requests/s against clients (policy {compared['policy']}, make bench)", (MARGIN, 30),
                cv2.FONT_HERSHEY_SIMPLEX, 0.5, (0, 0, 0), 1)
    cv2.putText(canvas, "clients", (MARGIN + plot_w // 2 - 20, HEIGHT - 12), cv2.FONT_HERSHEY_SIMPLEX, 0.45,
                (0, 0, 0), 1)
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), canvas)
