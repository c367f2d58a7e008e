"""``make test`` runs ``pytest -n 4 --dist loadgroup``: the tests of a module
marked ``xdist_group`` run on one worker, so its module-scoped node
processes start once.  Regression: with pytest 9.2, pytest-xdist 3.8 set the
group suffix on an attribute pytest no longer reads; every group was split
over the workers, each started its own copy of the module's nodes, and two
workers ran the Grenache test's ``npm ci`` at once (ENOTEMPTY)."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.xdist_group("xdist_groups_check")


class TestGroups:
    def test_a_grouped_test_carries_its_group(self, request: pytest.FixtureRequest) -> None:
        if not request.config.getvalue("loadgroup"):
            pytest.skip("not under pytest-xdist with --dist loadgroup")
        assert request.node.nodeid.endswith("@xdist_groups_check"), request.node.nodeid
