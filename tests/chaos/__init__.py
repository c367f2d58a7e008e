"""The chaos suite: real nodes in network namespaces under faults, judged by a checker.

``python -m tests.chaos`` (``make chaos``) runs it; ``README.md`` says what
each nemesis does and how to read the table.  Modules: ``netlab`` (namespaces,
bridge, iptables faults), ``nfqueue`` and ``shaper`` (delay and reordering
in user space), ``cluster`` (node processes), ``client`` (the traders that
record every acknowledgement), ``observer`` (samples and checks), ``nemesis``
(the fault schedules), ``history`` (the recorded run), ``replay`` (the rule
for which entries count, and the reference replay), ``checker`` (a pure
function from a history to one row per nemesis), ``report`` (table and JSON),
``runner`` (one run, start to clean-up).
"""
