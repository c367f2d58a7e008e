"""One data dir, one network: what a node says when it meets a peer of another.

Owns ``NetworkConflict``, the value a node keeps (and shows in
``/v1/status``) when a peer turns out to serve another network than its data
dir's, with the one line that names both networks (short hex ids) and, when
the conflict stops the node, what to do; and the rule for when it does: a
node started with ``--bootstrap`` (and without ``--genesis``) whose data dir
serves a network, before any peer of that network answered it, was pointed
at another network.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

SHORT_NETWORK = 16  # hex characters of a network id in messages


def short_network(network: bytes | None) -> str:
    return "(unknown)" if network is None else network.hex()[:SHORT_NETWORK]


def is_fatal(*, bootstrap: bool, genesis: bool, met_own: bool) -> bool:
    """Whether meeting another network's peer stops the node: it was started
    with --bootstrap, not with --genesis (which founds next to other networks on
    purpose), and no peer of its own network has answered it yet."""
    return bootstrap and not genesis and not met_own


@dataclass(frozen=True, slots=True, kw_only=True)
class NetworkConflict:
    """A peer of another network than this data dir's."""

    ours: bytes
    theirs: bytes | None  # None: the peer refused us as of another network without naming its own
    peer: str  # the peer's short id
    url: str
    founded: bool  # this data dir founded ``ours`` (else it joined it)
    fatal: bool  # the node stops: its --bootstrap leads to another network

    @property
    def detail(self) -> str:
        ours, theirs = short_network(self.ours), short_network(self.theirs)
        if self.fatal:
            return (f"this data dir {'founded' if self.founded else 'joined'} network {ours}, but --bootstrap "
                    f"leads to network {theirs} (peer {self.peer} at {self.url}); a data dir serves one network: "
                    f"to join {theirs} start with a fresh --data-dir, to go on with {ours} drop --bootstrap "
                    f"or point it at a node of {ours}")
        return (f"peer {self.peer} at {self.url} serves network {theirs}, this data dir network {ours}: "
                f"it is not a peer of this node (a data dir serves one network)")

    def view(self) -> dict[str, Any]:
        return {"ours": self.ours.hex(), "theirs": None if self.theirs is None else self.theirs.hex(),
                "peer": self.peer, "url": self.url, "founded": self.founded, "fatal": self.fatal,
                "detail": self.detail}
