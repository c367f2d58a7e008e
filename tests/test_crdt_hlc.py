"""Hybrid logical clock: packing, strict monotonicity, observing remote stamps."""

from __future__ import annotations

from itertools import pairwise

from hypothesis import given
from hypothesis import strategies as st

from crdt.hlc import COUNTER_BITS, COUNTER_MASK, Hlc, pack, physical_ms
from tests.conftest import NOW_MS, prop


class TestPack:
    def test_layout_is_48_bit_ms_then_16_bit_counter(self) -> None:
        assert COUNTER_BITS == 16
        assert pack(1, 0) == 1 << 16
        assert pack(NOW_MS, 7) == (NOW_MS << 16) | 7
        assert pack(NOW_MS, COUNTER_MASK) < pack(NOW_MS + 1, 0)

    def test_fits_in_64_bits_for_any_48_bit_ms(self) -> None:
        assert pack((1 << 48) - 1, COUNTER_MASK) == (1 << 64) - 1

    @given(st.integers(0, (1 << 48) - 1), st.integers(0, COUNTER_MASK))
    @prop(100)
    def test_physical_inverts_pack(self, ms: int, counter: int) -> None:
        stamp = pack(ms, counter)
        assert physical_ms(stamp) == ms
        assert stamp & COUNTER_MASK == counter

    @given(
        st.tuples(st.integers(0, 1 << 40), st.integers(0, COUNTER_MASK)),
        st.tuples(st.integers(0, 1 << 40), st.integers(0, COUNTER_MASK)),
    )
    @prop(100)
    def test_order_is_lexicographic_in_ms_then_counter(
        self, a: tuple[int, int], b: tuple[int, int]
    ) -> None:
        assert (pack(*a) < pack(*b)) == (a < b)


class TestNow:
    def test_first_stamp_is_wall_clock_with_counter_zero(self) -> None:
        assert Hlc().now(NOW_MS) == pack(NOW_MS, 0)

    def test_same_millisecond_bumps_the_counter(self) -> None:
        c = Hlc()
        stamps = [c.now(NOW_MS) for _ in range(4)]
        assert stamps == [pack(NOW_MS, i) for i in range(4)]

    def test_wall_clock_going_backwards_never_goes_backwards(self) -> None:
        c = Hlc()
        a = c.now(NOW_MS)
        b = c.now(NOW_MS - 1_000)
        assert b == a + 1
        assert physical_ms(b) == NOW_MS

    def test_wall_clock_moving_on_resets_the_counter(self) -> None:
        c = Hlc()
        c.now(NOW_MS)
        c.now(NOW_MS)
        assert c.now(NOW_MS + 1) == pack(NOW_MS + 1, 0)

    @given(st.lists(st.integers(NOW_MS - 50, NOW_MS + 50), min_size=1, max_size=60))
    @prop(100)
    def test_strictly_increasing_for_any_wall_clock(self, walls: list[int]) -> None:
        c = Hlc()
        stamps = [c.now(w) for w in walls]
        assert all(x < y for x, y in pairwise(stamps))
        # never behind the wall clock it was given
        assert all(physical_ms(s) >= w for s, w in zip(stamps, walls, strict=True))
        assert c.last == stamps[-1]


class TestObserve:
    def test_observe_moves_past_a_remote_stamp(self) -> None:
        c = Hlc()
        c.now(NOW_MS)
        remote = pack(NOW_MS + 3_000, 9)
        c.observe(remote)
        assert c.now(NOW_MS) == remote + 1

    def test_observe_of_an_older_stamp_changes_nothing(self) -> None:
        c = Hlc()
        mine = c.now(NOW_MS)
        c.observe(pack(NOW_MS - 10, 0))
        assert c.last == mine
        assert c.now(NOW_MS) == mine + 1

    @given(
        st.lists(
            st.tuples(st.booleans(), st.integers(NOW_MS - 100, NOW_MS + 100), st.integers(0, 50)),
            min_size=1,
            max_size=60,
        )
    )
    @prop(100)
    def test_every_stamp_exceeds_everything_seen_before(self, events: list[tuple[bool, int, int]]) -> None:
        c = Hlc()
        seen = 0
        for local, ms, counter in events:
            if local:
                stamp = c.now(ms)
                assert stamp > seen
                seen = stamp
            else:
                remote = pack(ms, counter)
                c.observe(remote)
                seen = max(seen, remote)
            assert c.last == seen
