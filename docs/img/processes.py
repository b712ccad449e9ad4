"""Draw docs/img/processes.svg: the processes of ``textgen serve --workers N --shards M`` and the path of one token.

Standard library only; run ``python docs/img/processes.py`` after changing it (it writes the SVG next to itself).
Everything is laid out by hand in pixel coordinates. In text, `backticks` set a span in monospace.
"""

from __future__ import annotations

from pathlib import Path
from xml.sax.saxutils import escape

W, H = 900, 572
SANS = "Helvetica, Arial, 'DejaVu Sans', sans-serif"
MONO = "Menlo, Consolas, 'DejaVu Sans Mono', monospace"

INK = "#222"
GREY = "#666"
TOKEN = "#d9480f"  # the path of one token
FRONT = ("#e8f0fb", "#4a6fa5")  # fill, stroke
SHARD = ("#e9f5e9", "#4f8a4f")
PARENT = ("#f2eff9", "#7a68a6")
PORT = ("#f1f1f1", "#888")
INNER = ("#ffffff", "#9aa5b1")

out: list[str] = []


def rect(x: float, y: float, w: float, h: float, colors: tuple[str, str], *, rx: float = 6,
         dash: bool = False, width: float = 1.2) -> None:
    fill, stroke = colors
    extra = ' stroke-dasharray="5 4"' if dash else ""
    out.append(f'<rect x="{x}" y="{y}" width="{w}" height="{h}" rx="{rx}" fill="{fill}" stroke="{stroke}" '
               f'stroke-width="{width}"{extra}/>')


def text(x: float, y: float, s: str, *, size: float = 12, bold: bool = False, anchor: str = "start",
         color: str = INK, rotate: float = 0) -> None:
    """One line at baseline y; `backticked` parts in monospace."""
    spans = []
    for i, part in enumerate(s.split("`")):
        if not part:
            continue
        esc = escape(part)
        spans.append(f'<tspan font-family="{MONO}" font-size="{size - 0.5}">{esc}</tspan>' if i % 2 else esc)
    attrs = f'x="{x}" y="{y}" font-size="{size}" fill="{color}"'
    if bold:
        attrs += ' font-weight="bold"'
    if anchor != "start":
        attrs += f' text-anchor="{anchor}"'
    if rotate:
        attrs += f' transform="rotate({rotate} {x} {y})"'
    out.append(f'<text {attrs}>{"".join(spans)}</text>')


def lines(x: float, y: float, rows: list[str], *, size: float = 12, leading: float = 15, **kw: object) -> None:
    for i, row in enumerate(rows):
        text(x, y + i * leading, row, size=size, **kw)  # type: ignore[arg-type]


def arrow(points: list[tuple[float, float]], *, color: str = GREY, dash: bool = False, width: float = 1.4) -> None:
    path = " ".join(f"{x},{y}" for x, y in points)
    marker = "tok" if color == TOKEN else "arr"
    extra = ' stroke-dasharray="5 4"' if dash else ""
    out.append(f'<polyline points="{path}" fill="none" stroke="{color}" stroke-width="{width}"{extra} '
               f'marker-end="url(#{marker})"/>')


def badge(x: float, y: float, n: int) -> None:
    """A numbered step of the token's path, centred on (x, y)."""
    out.append(f'<circle cx="{x}" cy="{y}" r="9" fill="{TOKEN}"/>')
    out.append(f'<text x="{x}" y="{y + 4}" font-size="11" font-weight="bold" fill="#fff" '
               f'text-anchor="middle">{n}</text>')


def stack(x: float, y: float, w: float, h: float, colors: tuple[str, str], count: str) -> None:
    """A process box with two more behind it: there are ``count`` of them."""
    fill, stroke = colors
    for d in (12, 6):
        rect(x + d, y - d, w, h, (fill, stroke), width=1)
    rect(x, y, w, h, colors, width=1.6)
    text(x + w - 10, y + 20, count, size=14, bold=True, anchor="end", color=stroke)


def draw() -> str:
    # -- title
    text(16, 28, "textgen serve --workers N --shards M: the processes and the path of one token", size=16,
         bold=True)

    # -- gRPC clients and the shared port
    for d in (8, 4, 0):
        rect(16 + d, 150 - d, 78, 96, ("#fff8e6", "#b08a2e"), width=1)
    lines(55, 184, ["gRPC", "clients"], size=13, bold=True, anchor="middle")
    text(55, 222, "Generate,", size=11, anchor="middle", color=GREY)
    text(55, 235, "Feed, …", size=11, anchor="middle", color=GREY)
    lines(16, 272, ["the kernel", "spreads the", "connections", "over the", "front ends"], size=10.5,
          leading=13, color=GREY)

    px = 112
    rect(px, 92, 38, 262, PORT)
    text(px + 16, 285, "one TCP port", size=12, bold=True, anchor="middle", rotate=-90)
    text(px + 30, 285, "SO_REUSEPORT", size=10.5, anchor="middle", color=GREY, rotate=-90)
    arrow([(102, 172), (px - 2, 172)])
    for y in (120, 172, 330):
        arrow([(px + 38, y), (170, y)])
    arrow([(170, 210), (102, 210)], color=TOKEN, width=2)
    badge(px + 19, 210, 4)

    # -- a front end
    fx, fy, fw, fh = 172, 84, 244, 270
    stack(fx, fy, fw, fh, FRONT, "× N")
    text(fx + 10, fy + 20, "front-end process", size=14, bold=True)
    text(fx + 10, fy + 36, "grpc.aio server on one asyncio loop", size=11, color=GREY)
    ix, iw = fx + 10, fw - 20
    rect(ix, 128, iw, 38, INNER)
    lines(ix + 8, 143, ["interceptors: auth (bearer token) →", "admission (--max-concurrent-calls)"], size=11,
          leading=14)
    rect(ix, 174, iw, 52, INNER)
    text(ix + 8, 190, "servicer", size=12, bold=True)
    lines(ix + 8, 205, ["protobuf ↔ domain, status codes;", "writes each message of the stream"], size=11,
          leading=14)
    rect(ix, 236, iw, 66, INNER)
    text(ix + 8, 252, "RemoteCore", size=12, bold=True)
    lines(ix + 8, 267, ["a Core: each call a wire message to", "the shard its session id names;",
                        "one ZeroMQ DEALER socket per shard"], size=11, leading=14)
    lines(ix, 320, ["also: health, reflection; health is", "NOT_SERVING while a shard is down"], size=11,
          leading=14, color=GREY)
    arrow([(ix + iw - 30, 236), (ix + iw - 30, 228)], color=TOKEN, width=2)  # RemoteCore -> servicer

    # -- a shard
    sx, sy, sw, sh = 556, 84, 316, 270
    stack(sx, sy, sw, sh, SHARD, "× M")
    text(sx + 10, sy + 20, "engine shard process k", size=14, bold=True)
    text(sx + 10, sy + 36, "ROUTER on `ipc://<private folder>/shard-k.sock`", size=11, color=GREY)
    jx, jw = sx + 10, sw - 20
    gx = jx + 28  # text after a badge
    rect(jx, 128, jw, 108, INNER)
    text(jx + 8, 144, "event loop: TextgenCore", size=12, bold=True)
    text(jx + 8, 159, "sessions (hidden state, pending token), limits", size=11)
    badge(jx + 14, 176, 2)
    lines(gx, 180, ["its Generate stream gets the tokens;", "at its pace a `Tok` joins the front end's batch"], size=11,
          leading=14)
    badge(jx + 14, 210, 6)
    lines(gx, 214, ["on `Ack`: the session is committed past", "them (the session is the text delivered)"],
          size=11, leading=14)
    rect(jx, 256, jw, 88, INNER)
    text(jx + 8, 272, "scheduler thread (BatchingEngine)", size=12, bold=True)
    text(jx + 8, 287, "owns the onnxruntime session; each round:", size=11)
    badge(jx + 14, 298, 1)
    lines(gx, 302, ["one batched decode step for all streams,", "(B, 1) tokens and (B, S) states; sample",
                    "every row; prompt chunks in between"], size=11, leading=14)
    arrow([(jx + 40, 256), (jx + 40, 238)], color=TOKEN, width=2)
    text(jx + 50, 250, "its tokens: one hand-over per round", size=10.5, color=GREY)

    # -- the wire between them
    wx0, wx1 = fx + fw + 12, sx
    arrow([(wx0 + 2, 254), (wx1 - 2, 254)], color=TOKEN, dash=True, width=1.6)
    arrow([(wx1 - 2, 284), (wx0 + 2, 284)], color=TOKEN, width=2)
    badge(wx0 + 16, 254, 5)
    badge(wx1 - 16, 284, 3)
    cx = (wx0 + wx1) / 2
    text(cx + 8, 244, "calls, `Ack`", size=10.5, anchor="middle")
    text(cx - 6, 300, "`Tok`, `Fin`, `Ok`/`Err`", size=10.5, anchor="middle")
    lines(cx, 124, ["ZeroMQ", "DEALER → ROUTER", "over ipc://"], size=11, leading=14, anchor="middle")
    lines(cx, 178, ["typed msgpack", "batches: one per", "loop turn and", "direction"], size=10.5, leading=13,
          anchor="middle", color=GREY)
    lines(cx, 324, ["every front end", "to every shard"], size=10.5, leading=13, anchor="middle", color=GREY)

    # -- the parent
    py = 384
    rect(16, py, 868, 66, PARENT, width=1.6)
    text(26, py + 20, "parent process", size=14, bold=True)
    text(160, py + 20, "holds no gRPC object and no model", size=11, color=GREY)
    lines(26, py + 38, ["spawns the shards, then the front ends; starts again a child that died; serves /metrics "
                        "for all (prometheus-client",
                        "multiprocess files in the private folder); SIGTERM/SIGINT: front ends drain, then the "
                        "shards stop; SIGHUP passed on (tokens reload)"], size=11, leading=15)
    for x in (fx + fw / 2, sx + sw / 2):
        arrow([(x, py - 2), (x, fy + fh + 4)], dash=True)
        text(x + 6, py - 12, "spawn, restart, signals", size=10.5, color=GREY)

    # -- the path of one token, in words
    ly = 474
    text(16, ly, "The path of one token", size=13, bold=True, color=TOKEN)
    steps = [
        "scheduler thread: one batched step, every row sampled",
        "shard loop: the stream gets its tokens; `tok` joins the batch",
        "one ZeroMQ message per step to each front end",
        "RemoteCore yields them; the servicer writes the gRPC message",
        "once gRPC has taken it: `ack` back to the shard",
        "the shard commits the session past those tokens",
    ]
    for i, step in enumerate(steps):
        col, row = divmod(i, 3)
        x, y = 16 + col * 446, ly + 22 + row * 19
        badge(x + 9, y - 4, i + 1)
        text(x + 24, y, step, size=11.5)
    text(16, H - 10, "With --workers 1 --shards 1 (the default) all of this is one process: the servicer calls "
         "TextgenCore directly, no parent, no ZeroMQ.", size=11.5, color=GREY)

    defs = (
        "<defs>"
        f'<marker id="arr" viewBox="0 0 10 10" refX="9" refY="5" markerWidth="7" markerHeight="7" '
        f'orient="auto"><path d="M0,0 L10,5 L0,10 z" fill="{GREY}"/></marker>'
        f'<marker id="tok" viewBox="0 0 10 10" refX="9" refY="5" markerWidth="6" markerHeight="6" '
        f'orient="auto"><path d="M0,0 L10,5 L0,10 z" fill="{TOKEN}"/></marker>'
        "</defs>"
    )
    head = (f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" viewBox="0 0 {W} {H}" '
            f'font-family="{SANS}">')
    return "\n".join([head, defs, f'<rect width="{W}" height="{H}" fill="#fff"/>', *out, "</svg>", ""])


if __name__ == "__main__":
    target = Path(__file__).with_name("processes.svg")
    target.write_text(draw(), encoding="utf-8")
    print(f"wrote {target}")
