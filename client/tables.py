"""Rich tables of what the client returns, for people: the book, fills, a
node's status and its peers, and the console to print them on.

Owns the human layout only; machine-readable output is the node's JSON (the
``raw`` of each result).  Text goes in as ``rich.text.Text``, never as markup,
so a value such as ``[seed]`` prints as it is.  Printed to a pipe or a file
(not a terminal) the console is wide enough that no row wraps, and rows start
in the first column, so ``grep ^name`` finds them.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from itertools import zip_longest
from typing import IO, Any

from rich import box
from rich.console import Console
from rich.table import Table
from rich.text import Text

from client.models import Book, Fill, Peer, Status

#: Width of the console when output is not a terminal: no row wraps.
PIPE_WIDTH = 240


def console(file: IO[str] | None = None) -> Console:
    """A console on ``file`` (default: the current ``sys.stdout``): no markup,
    no highlighting; a terminal's width, or ``PIPE_WIDTH`` elsewhere."""
    out = Console(file=file, markup=False, highlight=False, emoji=False)
    if not out.is_terminal:
        out.width = PIPE_WIDTH
    return out


def show(renderable: Any, out: Console | None = None) -> None:
    """Print a table: on a terminal as rich does; elsewhere (a pipe, a file)
    without the padding rich leaves at the end of lines."""
    out = out or console()
    if out.is_terminal:
        out.print(renderable)
        return
    with out.capture() as captured:
        out.print(renderable)
    out.file.write("".join(line.rstrip() + "\n" for line in captured.get().splitlines()))
    out.file.flush()


def table(*columns: str | tuple[str, str], title: str | None = None, header: bool = True) -> Table:
    """A borderless table: a rule under the header, two spaces between columns,
    the first column at the left margin.  A column is a name, or ``(name,
    "right")`` to right-align it (numbers)."""
    t = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, collapse_padding=True, show_header=header,
              title=title, title_justify="left", header_style="bold", highlight=False)
    for col in columns:
        name, justify = (col, "left") if isinstance(col, str) else col
        t.add_column(name, justify="right" if justify == "right" else "left", no_wrap=True)
    return t


def row(t: Table, *cells: Any) -> None:
    """Add a row; None prints as ``-``."""
    t.add_row(*(Text("-" if c is None else str(c)) for c in cells))


def book_table(book: Book) -> Table:
    """Bids on the left (best first, going down), asks on the right."""
    t = table(("orders", "right"), ("bid qty", "right"), ("bid", "right"), "ask", ("ask qty", "right"),
              ("orders", "right"))
    for b, a in zip_longest(book.bids, book.asks):
        row(t, b and b.orders, b and b.qty, b and b.price, a and a.price, a and a.qty, a and a.orders)
    return t


def fills_table(fills: Sequence[Fill]) -> Table:
    t = table(("seq", "right"), "side", ("qty", "right"), ("price", "right"), "taker", "maker", "final")
    for f in fills:
        row(t, f"#{f.seq}" if f.seq is not None else None, f.taker_side or "?", f.qty, f.price, f.taker[:12],
            f.maker[:12], "final" if f.final else "provisional")
    return t


def status_table(st: Status) -> Table:
    """One row per topic: node, state, counts, peers, finality, clock."""
    raw = st.raw
    c = raw["counts"]
    r = raw["replication"]
    fin = raw["finality"]
    holding = fin.get("holding")
    up = sum(1 for p in st.peers if p.state == "up")
    clock = raw["clock"]
    t = table("", "", header=False)
    t.columns[0].min_width = len("state hash")  # keys never shrink; values wrap on a narrow terminal
    t.columns[1].no_wrap = False
    row(t, "node", f"{st.short_id} ({st.name}) at {st.url}" + ("" if st.trading else " [seed]")
        + ("" if st.ready else ", not ready"))
    row(t, "state hash", st.state_hash)
    row(t, "entries", f"{c['entries']} (own {c['own_entries']}), orders {c['orders']}, fills {c['fills']}, "
                      f"resting {c['resting']}, buffered {c['buffered']}")
    row(t, "peers", f"{len(st.peers)} ({up} up); replication p50 {_ms(r['latency_p50_ms'])}, "
                    f"p99 {_ms(r['latency_p99_ms'])}")
    role = fin.get("role") or ("member" if fin["member"] else "not a member")
    row(t, "finality", f"network {str(fin['network'])[:16]}, {role} "
                       f"({len(fin['members'])} members); final fills {c['final_fills']}, provisional "
                       f"{c['provisional_fills']}; lag {fin['lag_ms']} ms"
        + (f", held back by {holding['member'][:8]} (silent {holding['for_ms'] / 1000:.1f} s)" if holding else ""))
    row(t, "clock", f"{-clock['offset_ms']} ms off the peers' median"
        + ("" if clock["healthy"] else f", more than {clock['limit_ms']} ms: orders are refused"))
    if st.network_conflict:
        row(t, "network", f"CONFLICT: {st.network_conflict}")
    return t


def peers_table(peers: Iterable[Peer]) -> Table:
    t = table("peer", "state", "url", ("failures", "right"), ("rtt ms", "right"), ("clock ms", "right"),
              ("behind", "right"), ("latency p50/p99 ms", "right"), "last error")
    for p in peers:
        row(t, p.short, p.state, p.url, p.failures, _num(p.rtt_ms), _num(p.clock_offset_ms), _num(p.behind_entries),
            f"{_num(p.latency_p50_ms) or '-'}/{_num(p.latency_p99_ms) or '-'}", p.last_error)
    return t


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:g} ms"


def _num(value: float | None) -> str | None:
    return None if value is None else f"{value:g}"
