"""Alert rules over sliding windows.

A rule fires when more than ``threshold`` of its events happened within the
last ``window_seconds`` (in total, or from one address when ``per =
"address"``), then stays quiet for ``cooldown_seconds`` (per address for
per-address rules). Each window keeps only the last ``threshold + 1``
timestamps, which is exactly what deciding "more than threshold" needs, and
per-address state is capped (``alerts.max_addresses``), so an attacker rotating
addresses costs bounded memory.
"""

from __future__ import annotations

import collections
from collections.abc import Callable
from dataclasses import dataclass, field

from wsguard.config.model import AlertRuleConfig, AlertsConfig


@dataclass(frozen=True, slots=True)
class Alert:
    """One firing of a rule."""

    rule: str
    events: tuple[str, ...]
    per: str
    address: str | None
    count: int
    window_seconds: float
    ban_seconds: float
    at: float  # wall clock (time.time())


@dataclass(slots=True)
class _Track:
    times: collections.deque[float]
    quiet_until: float = 0.0


@dataclass(slots=True)
class _Rule:
    name: str
    config: AlertRuleConfig
    total: _Track
    addresses: dict[str, _Track] = field(default_factory=dict)


class AlertEngine:
    """Counts events against every enabled rule and reports firings to *on_fire*."""

    def __init__(
        self,
        config: AlertsConfig,
        on_fire: Callable[[Alert], None],
        *,
        clock: Callable[[], float],
        wall_clock: Callable[[], float],
    ) -> None:
        self._on_fire = on_fire
        self._clock = clock
        self._wall = wall_clock
        self._max_addresses = config.max_addresses
        self.rules: list[_Rule] = []
        self._by_event: dict[str, list[_Rule]] = {}
        if not config.enabled:
            return
        for name, rule in config.rules.items():
            if not rule.enabled:
                continue
            state = _Rule(name, rule, _Track(collections.deque(maxlen=rule.threshold + 1)))
            self.rules.append(state)
            for event in rule.events:
                self._by_event.setdefault(event, []).append(state)

    def observe(self, event: str, address: str | None = None) -> None:
        """Count one *event* (from *address*, when known)."""
        rules = self._by_event.get(event)
        if not rules:
            return
        now = self._clock()
        for rule in rules:
            if rule.config.per == "address":
                if address is None:
                    continue
                track = rule.addresses.get(address)
                if track is None:
                    track = self._new_track(rule, now)
                    rule.addresses[address] = track
                self._count(rule, track, now, address)
            else:
                self._count(rule, rule.total, now, None)

    def _new_track(self, rule: _Rule, now: float) -> _Track:
        tracks = rule.addresses
        cap = self._max_addresses
        if len(tracks) >= cap:
            window = rule.config.window_seconds
            for key in [k for k, t in tracks.items() if _idle(t, now, window)]:
                del tracks[key]
            # keep a tenth free, so the scans stay amortized O(1) per new address;
            # if that takes more, drop the oldest, those in a cool-down last (forgetting
            # one would let it fire, and be banned, again before its time)
            target = cap - cap // 10
            if len(tracks) >= target:
                cooling = [k for k, t in tracks.items() if now < t.quiet_until]
                others = [k for k, t in tracks.items() if now >= t.quiet_until]
                for key in (others + cooling)[: len(tracks) - target + 1]:
                    del tracks[key]
        return _Track(collections.deque(maxlen=rule.config.threshold + 1))

    def _count(self, rule: _Rule, track: _Track, now: float, address: str | None) -> None:
        times = track.times
        times.append(now)
        config = rule.config
        if len(times) <= config.threshold or times[0] < now - config.window_seconds:
            return
        if now < track.quiet_until:
            return
        track.quiet_until = now + config.cooldown_seconds
        times.clear()
        self._on_fire(
            Alert(
                rule=rule.name,
                events=config.events,
                per=config.per,
                address=address,
                count=config.threshold + 1,
                window_seconds=config.window_seconds,
                ban_seconds=config.ban_seconds,
                at=self._wall(),
            )
        )


def _idle(track: _Track, now: float, window: float) -> bool:
    return now >= track.quiet_until and (not track.times or track.times[-1] < now - window)
