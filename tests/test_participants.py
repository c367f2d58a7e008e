"""Participants: nodes that trade without being members.

A participant signs a ticket (its order or cancel); any member carries it in
its own log.  The carried order belongs to the participant (its id is the
ticket's hash, whichever member carried it), a repeat carry places nothing,
only the owner's cancel acts, and a ticket that does not verify or was
stamped outside the window counts nothing.  Pure core, in lockstep in this
process (``tests/test_node_participants.py`` runs real processes).
"""

from __future__ import annotations

import pytest

from crdt.entry import BUY, SELL, TICKET_WINDOW_MS, Cancel, Carry, Entry, Order, make_entry, make_ticket
from crdt.errors import BadTicket, ForeignCancel
from crdt.hlc import pack
from matching.engine import CANCELLED, FILLED, OPEN
from matching.exchange import Exchange, NotCancellable, UnknownOrder, record_of
from tests.conftest import key_for
from tests.test_matching_exchange import Lockstep

PARTICIPANT_KEYS = 200


def participant(lock: Lockstep, i: int = 0) -> Exchange:
    ex = Exchange(key_for(PARTICIPANT_KEYS + i), params=lock.params)
    ex.set_network(lock.nodes[0].network or b"")
    ex.receive(list(lock.log), now_ms=lock.now)
    return ex


def settle(lock: Lockstep, *others: Exchange, ms: int = 400) -> None:
    lock.run(ms)
    for ex in others:
        ex.receive(list(lock.log), now_ms=lock.now)


class TestCarriedOrders:
    def test_a_carried_order_is_the_participants_own_and_becomes_final(self) -> None:
        lock = Lockstep(3)
        p = participant(lock)
        ticket = p.ticket(Order(side=BUY, price=100, qty=5), now_ms=lock.now)
        entry = lock.write(1, ticket)
        assert entry.origin == lock.nodes[1].node_id and entry.body == ticket
        lock.now += 5
        ask = lock.write(2, Order(side=SELL, price=100, qty=2))
        settle(lock, p)
        assert not p.is_member()  # a participant writes nothing, and is never asked to
        for ex in (*lock.nodes, p):
            assert ex.owner(ticket.ticket) == p.node_id
            st = ex.status(ticket.ticket)
            assert st is not None and (st.state, st.filled, st.remaining) == ("partially_filled", 2, 3)
            assert ex.order_final(ticket.ticket)
        assert lock.finals[0] == [(ask.hash, ticket.ticket, 100, 2)]

    def test_a_ticket_carried_twice_places_one_order(self) -> None:
        """A participant that got no answer retries through another member: the
        first carry in canonical order is the order, the other places nothing."""
        lock = Lockstep(3)
        p = participant(lock)
        ticket = p.ticket(Order(side=SELL, price=100, qty=3), now_ms=lock.now)
        lock.write(1, ticket)
        lock.now += 1
        lock.write(2, ticket)
        buy = lock.write(0, Order(side=BUY, price=100, qty=5))
        settle(lock, p)
        for i in range(3):  # filled and final: the engine let it go, the final orders hold it
            st = lock.final_orders[i][ticket.ticket].status
            assert (st.state, st.filled) == (FILLED, 3)
            assert [f[3] for f in lock.finals[i]] == [3]  # one fill of 3, not two
        for ex in (*lock.nodes, p):
            assert ex.engine.resting(BUY) == [(100, buy.hash, 2)]
        # the same ticket once more, after the first is final and closed: still nothing
        lock.write(0, ticket)
        settle(lock, p)
        assert lock.nodes[0].engine.resting(SELL) == [] and p.engine.resting(SELL) == []
        assert len({ex.state_hash() for ex in (*lock.nodes, p)}) == 1

    def test_only_the_owner_cancels_a_carried_order(self) -> None:
        lock = Lockstep(3)
        p, q = participant(lock, 0), participant(lock, 1)
        ticket = p.ticket(Order(side=BUY, price=90, qty=1), now_ms=lock.now)
        lock.write(1, ticket)
        settle(lock, p, q)
        with pytest.raises(ForeignCancel):
            q.ticket(Cancel(order_id=ticket.ticket), now_ms=lock.now)
        foreign = make_ticket(q.key, stamp=pack(lock.now, 0), inner=Cancel(order_id=ticket.ticket))
        with pytest.raises(ForeignCancel):
            lock.nodes[2].prepare(foreign, now_ms=lock.now)  # a member will not carry it
        with pytest.raises(ForeignCancel):
            lock.nodes[2].prepare(Cancel(order_id=ticket.ticket), now_ms=lock.now)  # nor cancel it itself
        cancel = p.ticket(Cancel(order_id=ticket.ticket), now_ms=lock.now)
        lock.write(2, cancel)  # any member carries the owner's cancel
        settle(lock, p, q)
        for i in range(3):
            assert lock.final_orders[i][ticket.ticket].status.state == CANCELLED
        for ex in (*lock.nodes, p, q):
            assert ex.engine.resting(BUY) == []

    def test_a_cancel_carried_before_is_carried_again(self) -> None:
        """Regression: a member refused a participant's cancel ticket that
        another member had carried (the order no longer rested in its view),
        and the participant answered 409 not_cancellable, though that first
        carry was not certified and could be voided.  Carrying a ticket again
        changes nothing, so a member does."""
        lock = Lockstep(3)
        p = participant(lock)
        ticket = p.ticket(Order(side=BUY, price=70, qty=1), now_ms=lock.now)
        lock.write(0, ticket)
        settle(lock, p)
        cancel = p.ticket(Cancel(order_id=ticket.ticket), now_ms=lock.now)
        lock.write(1, cancel)
        lock.deliver()
        again = lock.write(2, cancel)  # no NotCancellable: the same ticket, once more
        assert again.body == cancel
        settle(lock, p)
        assert lock.final_orders[0][ticket.ticket].status.state == CANCELLED
        other = make_ticket(p.key, stamp=pack(lock.now + 1, 0), inner=Cancel(order_id=ticket.ticket))
        with pytest.raises((NotCancellable, UnknownOrder)):  # a new cancel of it is refused
            lock.nodes[2].prepare(other, now_ms=lock.now)

    def test_a_forged_or_stale_ticket_counts_nothing(self) -> None:
        lock = Lockstep(3)
        p = participant(lock)
        good = p.ticket(Order(side=BUY, price=100, qty=1), now_ms=lock.now)
        forged = Carry(owner=good.owner, stamp=good.stamp, inner=Order(side=BUY, price=101, qty=1),
                       sig=good.sig, ticket=good.ticket)
        with pytest.raises(BadTicket):
            lock.nodes[1].prepare(forged, now_ms=lock.now)
        stale = make_ticket(p.key, stamp=pack(lock.now - TICKET_WINDOW_MS, 0), inner=Order(side=BUY, price=100, qty=1))
        with pytest.raises(BadTicket):
            lock.nodes[1].prepare(stale, now_ms=lock.now)
        # a member that writes them anyway (a faulty one) places nothing by them: a ticket
        # counts only within the window of the carrying entry's stamp, and with its signature
        entry = lock.write(1, good)
        assert record_of(entry) is not None
        far = make_ticket(p.key, stamp=pack(lock.now - TICKET_WINDOW_MS - 1, 0), inner=good.inner)
        edge = make_ticket(p.key, stamp=pack(lock.now - TICKET_WINDOW_MS, 0), inner=good.inner)
        for body, counts in ((forged, False), (far, False), (edge, True)):
            bad = type(entry)(origin=entry.origin, seq=entry.seq, hlc=pack(lock.now, 0), prev=entry.prev,
                              body=body, sig=entry.sig, hash=entry.hash, ack=entry.ack)
            assert (record_of(bad) is not None) == counts

    def test_a_participant_cancels_and_orders_again_while_members_finalize(self) -> None:
        lock = Lockstep(3)
        p = participant(lock)
        first = p.ticket(Order(side=BUY, price=95, qty=2), now_ms=lock.now)
        lock.write(0, first)
        settle(lock, p)
        lock.write(1, p.ticket(Cancel(order_id=first.ticket), now_ms=lock.now))
        second = p.ticket(Order(side=BUY, price=96, qty=2), now_ms=lock.now + 1)
        lock.write(2, second)
        settle(lock, p)
        assert lock.final_orders[0][first.ticket].status.state == CANCELLED
        st2 = p.status(second.ticket)
        assert st2 is not None and st2.state == OPEN
        assert first.ticket != second.ticket
        assert p.engine.resting(BUY) == [(96, second.ticket, 2)]


class TestRestart:
    def test_a_repeat_after_a_restart_places_nothing(self) -> None:
        """Regression: the ids of closed ticket orders that final let go lived
        in memory only; after a restart from a checkpoint, a repeat of the
        ticket within the window placed the order a second time.  The node now
        keeps them (``FinalBatch.retired``) and hands them to ``load``."""
        lock = Lockstep(3)
        p = participant(lock)
        ticket = p.ticket(Order(side=SELL, price=100, qty=1), now_ms=lock.now)
        lock.write(1, ticket)
        lock.now += 5
        lock.write(0, Order(side=BUY, price=100, qty=1))
        settle(lock)
        assert ticket.ticket in dict(lock.retired[2])
        ex = lock.nodes[2]
        cp = ex.checkpoint()
        resting = [[fo.status.remaining, fo.oid, fo.status.qty, fo.status.qty - fo.status.filled - fo.status.remaining,
                    fo.status.side, fo.status.price, fo.key, fo.owner]
                   for fo in lock.final_orders[2].values() if fo.status.remaining]
        stored = [e for e in lock.log if e.seq > cp.bases.get(e.origin, (0,))[0]]
        for closed, places in ((lock.retired[2], False), ([], True)):
            again = Exchange(ex.key, network=cp.network, params=lock.params)
            again.load(cp, resting, stored, mono_ms=lock.now, closed=closed)
            repeat = lock.nodes[2].prepare(ticket, now_ms=lock.now)  # a member carries the ticket once more
            again.receive([repeat], now_ms=lock.now)
            assert (again.engine.resting(SELL) != []) == places  # without the kept ids it would rest again


class TestCancelMarks:
    def test_a_cancel_before_its_order_places_it_cancelled(self) -> None:
        """A participant's order whose first carry is voided is placed at a
        later carry; a certified cancel that sorts between them must still
        cancel it: the cancel marks the id, and the order comes in cancelled."""
        lock = Lockstep(3)
        p = participant(lock)
        order = p.ticket(Order(side=SELL, price=100, qty=1), now_ms=lock.now)
        cancel = make_ticket(p.key, stamp=order.stamp + 1, inner=Cancel(order_id=order.ticket))
        unchecked(lock, 1, cancel)  # as after the first carry was voided: the cancel finds no order yet
        lock.now += 5
        lock.write(2, order)
        settle(lock, p)
        assert lock.final_orders[0][order.ticket].status.state == CANCELLED
        assert lock.nodes[0].engine.resting(SELL) == [] and p.engine.resting(SELL) == []

    def test_a_mark_reaches_no_further_than_it_is_kept(self) -> None:
        """Regression: a mark was honoured for any later order of its id but
        let go once final passed it by twice the ticket window, so a node that
        still held it placed a late carry cancelled while the others placed
        it open.  A mark now applies only to an order carried within twice the
        window after it (only a cancel stamped before its order, signed by a
        faulty participant and written by a faulty member, can meet this)."""
        lock = Lockstep(3)
        p, lagging = participant(lock, 0), participant(lock, 1)
        t0 = lock.now
        order = make_ticket(p.key, stamp=pack(t0 + 55_000, 0), inner=Order(side=SELL, price=100, qty=1))
        unchecked(lock, 1, make_ticket(p.key, stamp=pack(t0, 0), inner=Cancel(order_id=order.ticket)))
        lock.run(200, step=20)
        lagging.receive(list(lock.log), now_ms=lock.now)
        assert order.ticket in lagging.engine.marks
        lock.run(62_000, step=100)  # the members' final passes the mark by twice the window: they let it go
        assert all(order.ticket not in ex.engine.marks for ex in lock.nodes)
        lock.write(0, order)
        settle(lock, lagging)
        states = {ex.status(order.ticket) for ex in (*lock.nodes, lagging)}
        assert len(states) == 1 and next(iter(states)) is not None, states


def unchecked(lock: Lockstep, i: int, body: Carry) -> Entry:
    """Member ``i`` writes ``body`` without the checks of ``prepare`` (a faulty member)."""
    ex = lock.nodes[i]
    seq, prev, _ = ex.replica.head_info(ex.node_id)
    entry = make_entry(ex.key, seq=seq + 1, hlc=ex.hlc.now(lock.now), prev=prev, body=body,
                       ack=ex.finality.own_ack())
    lock._apply(i, entry)
    return entry
