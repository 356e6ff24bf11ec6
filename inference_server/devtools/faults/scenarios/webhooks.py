"""Faults on the webhook side: the receiver down then back, and the dispatcher killed while
deliveries are in flight. Every terminal event must arrive, under one webhook id."""

from __future__ import annotations

import time

from inference_server.devtools.faults.lab import Lab
from inference_server.devtools.faults.scenarios.kit import QUICK, bodies, expect_codes
from inference_server.devtools.faults.tally import Tally


def receiver_down(lab: Lab, size: int, *, down_for: float = 10.0) -> Tally:
    """The receiver refuses connections while ``size`` jobs run to the end (every event subscribed),
    and comes back ``down_for`` seconds later."""
    with lab.run("receiver_down") as s:
        s.warm_up()
        s.receiver.down()
        s.mark("receiver down")
        t0 = time.monotonic()
        s.submit(bodies(s, QUICK, size, all_events=True))
        s.wait_terminal(s.accepted_ids(), 60)
        time.sleep(max(0.0, down_for - (time.monotonic() - t0)))
        s.receiver.up()
        s.healed()
        tally = s.settle()
        tally.notes.append(f"receiver down {s.last_heal - t0:.0f} s")
        expect_codes(tally)
        return tally


def dispatcher_kill(lab: Lab, size: int) -> Tally:
    """SIGKILL the dispatcher while the receiver (a second per answer) holds deliveries in flight; a
    new dispatcher takes over once their leases expire."""
    with lab.run("dispatcher_kill", receiver_delay=1.0) as s:
        s.warm_up()
        s.submit(bodies(s, QUICK, size))
        deadline = time.monotonic() + 60
        while not (s.receiver.in_flight and s.receiver.deliveries) and time.monotonic() < deadline:
            time.sleep(0.02)
        in_flight = s.receiver.in_flight
        dispatcher = s.system.dispatcher()
        assert dispatcher is not None, "the system's dispatcher is not running"
        s.mark(f"SIGKILL dispatcher with {in_flight} delivery(ies) in flight")
        dispatcher.kill()
        time.sleep(2.0)
        s.system.start_dispatcher()
        s.healed()
        tally = s.settle()
        tally.check("killed mid-delivery", in_flight > 0, f"{in_flight} delivery(ies) in flight at the kill")
        tally.notes.append(f"{len(s.receiver.deliveries)} deliveries received in all")
        expect_codes(tally)
        return tally
