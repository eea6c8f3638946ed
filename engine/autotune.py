"""How many transfers a fetcher keeps in flight: found while running, so no one has to tune it.

Little's law: to hand the workers bodies at the rate they consume them (``mu`` images/s) when
a transfer takes ``W`` seconds, ``mu x W`` transfers must be in flight. At 100 KB/s per
connection a 300 KB photo takes ~3 s, so two workers doing 150 img/s need ~450 in flight; on
a fast host a transfer takes 20 ms and a few dozen are plenty. A fixed ``--transfers`` is
wrong for one of the two, and users do not know which number to pick.

:class:`TransferTuner` is pure logic (the fetcher feeds it measurements; tests feed it
recorded ones). Every ``period_s`` it takes

- ``W``: the mean duration of the transfer attempts that ended since the last update
  (fed one by one with :meth:`TransferTuner.transfer_done`);
- the workers' cumulative processing seconds and images (the stats matrix): their mean
  seconds per image gives their capacity ``mu = workers / seconds per image`` (what they
  could do if never starved), the busy share tells whether they starve;
- the bodies waiting for a worker (the supervisor's queue): workers lagging behind;

and sets ``target = mu x share x W x g``, clamped to ``[floor, limit]`` where ``limit`` is the
smallest of the ``--transfers`` cap, the connections this fetcher may open and what its share
of the memory budget (``--ring-mb``) holds at the current mean body size. ``g`` (headroom,
1.25-4) covers the spread of download times: it grows while the workers starve although the
target is full, and shrinks while bodies queue for the workers. So the target rises when
downloads get slower or workers faster, and falls when downloads get faster, workers lag
(their capacity drops or bodies queue) or bodies get larger (the memory budget binds).
Moves are damped (at most x1.5 up, x0.8 down per update) so one noisy period cannot swing it.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class TuneConfig:
    #: never more transfers in flight than this (``--transfers``)
    cap: int
    #: never fewer (unless the cap is lower): a few dozen in flight cost nothing and absorb jitter
    floor: int = 32
    #: before anything is measured (the first bodies take seconds on a slow host)
    start: int = 64
    period_s: float = 0.5
    headroom_min: float = 1.25
    headroom_max: float = 4.0
    headroom_start: float = 1.5
    #: workers busier than this are fed; below it (and the target full) they starve
    busy_enough: float = 0.9
    #: bodies waiting for workers beyond this many seconds of their work: they lag
    backlog_s: float = 0.5
    #: weight of a new period's measurement in the running means (~2 s of memory at 0.5 s)
    alpha: float = 0.2
    #: largest moves per update: a ramp from 64 to 1,000 takes ~3.5 s, and one noisy period
    #: (a scheduling hiccup on a busy machine) cannot swing the target
    step_up: float = 1.5
    step_down: float = 0.8


@dataclass(frozen=True)
class Observation:
    """What the fetcher sees at an update (cumulative counters are totals for the run)."""

    now: float
    workers: int
    #: processing seconds summed over every worker, since the run started
    workers_busy_s: float
    #: images processed by every worker, since the run started
    workers_done: int
    #: bodies waiting for a worker (the supervisor's queue)
    bodies_waiting: int
    #: this fetcher's transfers in flight now
    in_flight: int
    #: transfers the memory budget holds at the current mean body size
    memory_limit: int
    #: connections this fetcher may open (file descriptors and --max-connections)
    connection_limit: int


class TransferTuner:
    def __init__(self, cfg: TuneConfig, share: float = 1.0) -> None:
        self.cfg = cfg
        self.share = share  # this fetcher's share of the workers (1 / fetchers)
        self.target = max(1, min(cfg.cap, cfg.start))
        self.headroom = cfg.headroom_start
        self.transfer_s: float | None = None  # running mean duration of one attempt
        self.process_s: float | None = None  # running mean worker seconds per image
        self.busy = 0.0  # workers' busy share over the last period
        self.limit = cfg.cap
        self._next = 0.0
        self._last: Observation | None = None
        self._t_sum = 0.0
        self._t_n = 0

    def transfer_done(self, seconds: float) -> None:
        """One attempt ended (any outcome): it held a slot for ``seconds``."""
        self._t_sum += seconds
        self._t_n += 1

    def due(self, now: float) -> bool:
        return now >= self._next

    @property
    def workers_rate(self) -> float | None:
        """The workers' capacity in images/s, once measured."""
        last = self._last
        if self.process_s is None or last is None or self.process_s <= 0:
            return None
        return last.workers / self.process_s

    def update(self, obs: Observation) -> int:
        """Take a period's measurements; returns the new target."""
        cfg = self.cfg
        last, self._last = self._last, obs
        self._next = obs.now + cfg.period_s
        if self._t_n:
            self.transfer_s = _mean(self.transfer_s, self._t_sum / self._t_n, cfg.alpha)
            self._t_sum, self._t_n = 0.0, 0
        self.limit = max(1, min(cfg.cap, obs.memory_limit, obs.connection_limit))
        if last is None or obs.now <= last.now:
            self.target = min(self.target, self.limit)
            return self.target
        dt = obs.now - last.now
        busy_s = max(0.0, obs.workers_busy_s - last.workers_busy_s)
        done = obs.workers_done - last.workers_done
        if done > 0:
            self.process_s = _mean(self.process_s, busy_s / done, cfg.alpha)
        self.busy = min(1.0, busy_s / (dt * max(1, obs.workers)))
        rate = self.workers_rate
        if rate is None or self.transfer_s is None:
            want = float(self.target)  # nothing to reason from yet
        else:
            little = rate * self.share * self.transfer_s  # in flight for exactly the workers' rate
            full = obs.in_flight >= 0.9 * self.target
            if obs.bodies_waiting > max(2 * obs.workers, rate * cfg.backlog_s):
                self.headroom = max(cfg.headroom_min, self.headroom * 0.85)
            elif (self.busy < cfg.busy_enough and full and obs.bodies_waiting < obs.workers
                  and self.target >= 0.95 * little * self.headroom):
                # at the target Little's law asked for, and still starving: the spread of
                # download times is wider than the headroom covers (not merely still ramping)
                self.headroom = min(cfg.headroom_max, self.headroom * 1.2)
            want = little * self.headroom
        want = min(max(want, cfg.step_down * self.target), cfg.step_up * self.target)
        self.target = max(1, min(self.limit, max(min(cfg.floor, self.limit), round(want))))
        return self.target


def _mean(old: float | None, new: float, alpha: float) -> float:
    return new if old is None else old + alpha * (new - old)
