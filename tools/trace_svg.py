#!/usr/bin/env python3
"""Render a Chrome trace written by `tessera train --trace` as an SVG timeline.

Usage: tools/trace_svg.py TRACE.json OUT.svg [--from-ms A] [--to-ms B]

One row per track (simulated rank); spans coloured by category: compute
(forward/backward), collective, p2p (pipeline sends and receives), update.
Standard library only, so the README's picture can be regenerated anywhere.
"""
import html
import json
import sys

COLOURS = {"compute": "#4c78a8", "collective": "#f58518", "p2p": "#54a24b", "update": "#b279a2"}


def main(argv):
    if len(argv) < 3:
        print(__doc__)
        return 2
    trace = json.load(open(argv[1]))
    lo = hi = None
    if "--from-ms" in argv:
        lo = float(argv[argv.index("--from-ms") + 1]) * 1000
    if "--to-ms" in argv:
        hi = float(argv[argv.index("--to-ms") + 1]) * 1000
    events = trace["traceEvents"]
    names = {e["tid"]: e["args"]["name"] for e in events if e.get("ph") == "M"}
    spans = [e for e in events if e.get("ph") == "X"]
    if lo is not None:
        spans = [e for e in spans if e["ts"] + e["dur"] >= lo]
    if hi is not None:
        spans = [e for e in spans if e["ts"] <= hi]
    t0 = min(e["ts"] for e in spans) if lo is None else lo
    t1 = max(e["ts"] + e["dur"] for e in spans) if hi is None else hi
    tracks = sorted(names)
    left, width, row, top = 190, 900, 28, 30
    scale = width / max(t1 - t0, 1.0)
    h = top + row * len(tracks) + 40
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{left + width + 20}" height="{h}" font-family="monospace" font-size="11">']
    out.append(f'<rect width="100%" height="100%" fill="white"/>')
    for i, tid in enumerate(tracks):
        y = top + i * row
        out.append(f'<text x="5" y="{y + 17}">{html.escape(names[tid])}</text>')
        out.append(f'<line x1="{left}" y1="{y + row - 2}" x2="{left + width}" y2="{y + row - 2}" stroke="#ddd"/>')
    for e in spans:
        i = tracks.index(e["tid"])
        x = left + (max(e["ts"], t0) - t0) * scale
        w = max(min(e["ts"] + e["dur"], t1) - max(e["ts"], t0), 0) * scale
        y = top + i * row + 3
        c = COLOURS.get(e.get("cat"), "#999")
        out.append(f'<rect x="{x:.1f}" y="{y}" width="{max(w, 0.5):.1f}" height="{row - 8}" fill="{c}"><title>{html.escape(e["name"])} {e["dur"] / 1000:.2f} ms</title></rect>')
        if e.get("cat") == "compute" and w > 24:
            out.append(f'<text x="{x + 2:.1f}" y="{y + 14}" fill="white">{html.escape(e["name"])}</text>')
    y = top + row * len(tracks) + 20
    x = left
    for cat, c in COLOURS.items():
        out.append(f'<rect x="{x}" y="{y - 10}" width="12" height="12" fill="{c}"/><text x="{x + 16}" y="{y}">{cat}</text>')
        x += 120
    out.append(f'<text x="{left + width - 160}" y="{y}">{(t1 - t0) / 1000:.1f} ms shown</text>')
    out.append("</svg>")
    open(argv[2], "w").write("\n".join(out))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
