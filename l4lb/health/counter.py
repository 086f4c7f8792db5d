"""HAProxy's health counter: how check results turn into "up" and "down".

The counter runs from 0 to ``rise + fall - 1`` and the server is up while it is
at least ``rise`` (HAProxy ``src/check.c``, ``set_server_check_status``):

- a success adds one, and once the counter reaches ``rise`` it jumps to the top
  (full health), so a down server needs ``rise`` successes in a row;
- a failure takes one away, and once the counter falls below ``rise`` it drops
  to 0, so an up server at full health needs ``fall`` failures in a row, and a
  server on its way up starts over after any failure.

The check interval follows the counter (HAProxy ``srv_getinter``): ``interval``
at full health, ``down_interval`` at 0, ``fast_interval`` anywhere in between
(going up or going down).

Pure: no Twisted, no clock.
"""

from __future__ import annotations

import attrs

UP = "up"
DOWN = "down"
GOING_UP = "going up"
GOING_DOWN = "going down"


@attrs.define
class HealthCounter:
    """One server's counter; `record` returns True when up/down flipped."""

    rise: int
    fall: int
    health: int

    @classmethod
    def start(cls, rise: int, fall: int, initial_state: str) -> HealthCounter:
        """``"up"`` starts at ``rise`` (one failure marks it down, as HAProxy does
        at start); ``"down"`` starts at 0 (it must rise first)."""
        return cls(rise, fall, rise if initial_state == UP else 0)

    @property
    def top(self) -> int:
        return self.rise + self.fall - 1

    @property
    def up(self) -> bool:
        return self.health >= self.rise

    @property
    def state(self) -> str:
        """``up``/``down`` when settled, ``going up``/``going down`` in between."""
        if self.health == self.top:
            return UP
        if self.health == 0:
            return DOWN
        return GOING_DOWN if self.up else GOING_UP

    def record(self, ok: bool) -> bool:
        """Count one check result; True when the server changed between up and down."""
        was_up = self.up
        if ok:
            if self.health < self.top:
                self.health += 1
                if self.health >= self.rise:
                    self.health = self.top
        elif self.health > 0:
            self.health -= 1
            if self.health < self.rise:
                self.health = 0
        return self.up != was_up
