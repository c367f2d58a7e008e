"""A whole network in one process under one seed.

The core is sans-I/O, so N replicas (``matching.exchange.Exchange`` with its
membership and finality) run over a simulated network driven by one seeded
random generator: message delay, loss, duplication and reordering,
partitions that heal, crashes with restart from what was committed, pauses,
clock skew and a clock that steps back, evictions, and traders, on members
and on participants (nodes that trade through tickets members carry,
``sim.node``).  A checker runs after every step; a failing seed replays
exactly (``python -m sim --seed N``).
"""
