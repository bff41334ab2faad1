"""Draw a ``bench/scale.py --json`` result as an SVG: stitching rate against database size.

    python bench/plot_scale.py RESULT.json docs/scale-curve.svg

The history loads are the line (each point one ``--chunk``: the restitch-from-zero rate at that
size), the bursts the dots, labelled with their ratio to the first burst. Plain SVG text, so the
plot needs nothing installed and diffs as text.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

WIDTH, HEIGHT = 720, 360
LEFT, RIGHT, TOP, BOTTOM = 70, 20, 40, 50


def svg(steps: list[dict[str, Any]], title: str) -> str:
    """The SVG document of ``steps`` (the JSON's ``steps``; a restitch of everything, which
    is not a point on the size axis, is left out)."""
    steps = [s for s in steps if "db_events" in s]
    top_events = int(max(s["db_events"] for s in steps))
    top_rate = float(max(s["rate"] for s in steps)) * 1.15
    plot_w, plot_h = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM

    def x(events: float) -> float:
        return LEFT + plot_w * events / top_events

    def y(rate: float) -> float:
        return TOP + plot_h * (1 - rate / top_rate)

    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" '
        'font-family="sans-serif" font-size="12">',
        f'<rect width="{WIDTH}" height="{HEIGHT}" fill="white"/>',
        f'<text x="{LEFT}" y="22" font-size="14">{title}</text>',
        f'<line x1="{LEFT}" y1="{TOP + plot_h}" x2="{LEFT + plot_w}" y2="{TOP + plot_h}" '
        'stroke="black"/>',
        f'<line x1="{LEFT}" y1="{TOP}" x2="{LEFT}" y2="{TOP + plot_h}" stroke="black"/>',
        f'<text x="{LEFT + plot_w / 2}" y="{HEIGHT - 12}" text-anchor="middle">'
        "events in the database (millions)</text>",
        f'<text x="16" y="{TOP + plot_h / 2}" transform="rotate(-90 16 {TOP + plot_h / 2})" '
        'text-anchor="middle">events stitched per second</text>',
    ]
    step = 10 ** max(0, len(str(top_events)) - 2)
    for tick in range(0, top_events + 1, step * 2 if top_events / step > 10 else step):
        out.append(
            f'<text x="{x(tick):.1f}" y="{TOP + plot_h + 16}" text-anchor="middle">'
            f"{tick / 1e6:g}</text>"
        )
    for tick in range(0, int(top_rate), 2000):
        out.append(
            f'<text x="{LEFT - 6}" y="{y(tick) + 4:.1f}" text-anchor="end">{tick:,}</text>'
            f'<line x1="{LEFT}" y1="{y(tick):.1f}" x2="{LEFT + plot_w}" y2="{y(tick):.1f}" '
            'stroke="#ddd"/>'
        )
    history = [s for s in steps if s["kind"] == "history"]
    if history:
        points = " ".join(f"{x(s['db_events']):.1f},{y(s['rate']):.1f}" for s in history)
        out.append(f'<polyline points="{points}" fill="none" stroke="#1f77b4" stroke-width="2"/>')
        out.append(
            f'<text x="{LEFT + plot_w / 2:.1f}" y="{TOP + plot_h - 12:.1f}" '
            'text-anchor="middle" fill="#1f77b4">history (restitch from zero), per chunk</text>'
        )
    bursts = [s for s in steps if s["kind"] in ("burst", "new-only")]
    base = bursts[0]["rate"] if bursts else 1
    for s in bursts:
        colour = "#d62728" if s["kind"] == "burst" else "#ff7f0e"
        start = s["db_events"] - s["events"]
        right = x(start) > LEFT + plot_w * 0.7  # label on the left, inside the plot
        anchor, dx = ("end", -8) if right else ("start", 8)
        dy = 16 if s["kind"] == "new-only" else -8
        out.append(
            f'<circle cx="{x(start):.1f}" cy="{y(s["rate"]):.1f}" r="5" fill="{colour}"/>'
            f'<text x="{x(start) + dx:.1f}" y="{y(s["rate"]) + dy:.1f}" fill="{colour}" '
            f'text-anchor="{anchor}">{s["kind"]} {s["rate"]:,}/s ({s["rate"] / base:.2f})</text>'
        )
    out.append("</svg>")
    return "\n".join(out) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("result", type=Path, help="bench/scale.py --json output")
    parser.add_argument("svg", type=Path, help="where to write the plot")
    parser.add_argument("--title", default="", help="defaults to the result's profile")
    args = parser.parse_args()
    data = json.loads(args.result.read_text())
    title = args.title or f"bench/scale.py, {data['profile']} server"
    args.svg.write_text(svg(data["steps"], title))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
