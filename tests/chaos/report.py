"""The report of a run: the Markdown table (one row per nemesis) and chaos-report.json.

Violations are in bold.  "n/a" stands where a number has no meaning: a
nemesis this node does not support, or the visible time of revoked fills
when none was revoked.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tests.chaos.checker import Row, Verdict, verdict_json

HEADER = ("nemesis", "fault s", "converged (heal to equal)", "orders acked", "lost", "acked voided",
          "cancels final / violated",
          "over-fills", "final fills", "final retracted", "provisional revoked", "revoked visible max / p50 ms",
          "replay mismatches", "client errors", "crashes", "tracebacks")


def _bad(n: int) -> str:
    return f"**{n}**" if n else "0"


def _errors(errors: dict[str, int]) -> str:
    total = sum(errors.values())
    if not total:
        return "0"
    kinds = ", ".join(f"{k} {v}" for k, v in sorted(errors.items(), key=lambda kv: -kv[1]))
    return f"{total} ({kinds})"


def cells(r: Row) -> list[str]:
    if not r.supported:
        return [f"{r.name}", "n/a", r.note or "not run", *["n/a"] * (len(HEADER) - 3)]
    converged = (f"yes, {r.converge_s:.1f} s" if r.converge_s is not None else "yes") if r.converged else "**NO**"
    visible = "n/a" if r.revoked_max_ms is None else (
        f"{r.revoked_max_ms} / {r.revoked_p50_ms if r.revoked_p50_ms is not None else 'n/a'}")
    return [
        r.name, f"{r.fault_s:.0f}", converged, str(r.orders_acked), _bad(r.lost), _bad(r.void),
        f"{r.cancels_final} / {_bad(r.cancel_violations)}", _bad(r.overfills), str(r.final_fills),
        _bad(r.final_retracted), str(r.revoked), visible, _bad(r.replay_mismatches), _errors(r.client_errors),
        _bad(r.crashes), _bad(r.tracebacks),
    ]


def table(verdict: Verdict) -> str:
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "|".join(" --- " for _ in HEADER) + "|"]
    for r in (*verdict.rows, verdict.total):
        lines.append("| " + " | ".join(cells(r)) + " |")
    return "\n".join(lines)


def markdown(verdict: Verdict, meta: dict[str, Any]) -> str:
    out = ["# Chaos run", ""]
    features = meta.get("features", {})
    nodes, parts = len(meta.get("nodes", ())) or 5, len(meta.get("participants", ()))
    out.append(f"{nodes - parts} members and {parts} participants in network namespaces, seed {meta.get('seed')}, "
               f"{meta.get('seconds', 0):.0f} s; node "
               f"features: finality {'yes' if features.get('finality') else 'no'}, client order ids "
               f"{'yes' if features.get('cid') else 'no'}, --evict-after "
               f"{'yes' if features.get('evict_after') else 'no'}, --clock-offset-ms "
               f"{'yes' if features.get('clock_offset') else 'no'}.")
    out += ["", table(verdict), ""]
    verdict_line = "no violations" if verdict.ok else f"**{verdict.violations} violation(s)**"
    out.append(f"Verdict: {verdict_line}.")
    titles = [f"- `{r.name}`: {r.title}" + (f" ({r.note})" if r.note else "")
              + (": " + ", ".join(f"{k} {v}" for k, v in r.faults.items()) if r.faults else "")
              for r in verdict.rows]
    out += ["", "Nemeses:", *titles]
    extra = []
    for r in verdict.rows:
        facts = []
        if r.void:
            facts.append(f"{r.void} acknowledged orders void")
        if r.cancels_overtaken:
            facts.append(f"{r.cancels_overtaken} cancels answered 'cancelled' (not final) whose order ended with "
                         "more filled")
        if r.cancel_misses:
            facts.append(f"{r.cancel_misses} cancels refused because the order had filled or closed")
        if facts:
            extra.append(f"- `{r.name}`: " + "; ".join(facts))
        for kind, examples in r.examples.items():
            for text in examples:
                extra.append(f"- `{r.name}` {kind}: {text}")
    for note in verdict.notes:
        extra.append(f"- {note}")
    if extra:
        out += ["", "Details:", *extra]
    return "\n".join(out) + "\n"


def write(verdict: Verdict, meta: dict[str, Any], out_dir: Path) -> tuple[Path, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    md = out_dir / "chaos-report.md"
    js = out_dir / "chaos-report.json"
    md.write_text(markdown(verdict, meta))
    js.write_text(json.dumps({"meta": meta, **verdict_json(verdict)}, indent=2) + "\n")
    return md, js
