"""
What watches a training run, beside train.py's loop: two checks that turn a silent failure into
one line.

    Watchdog          a rank stuck in a collective (a dead GPU, a frozen process) ends the run
                      with an error naming the phase and the rank, within --dist-timeout
    DependenceCheck   a bilevel run whose outer loss is low only thanks to the fast weights, which
                      inference drops, gets a warning

train.py creates both (setup, train_loop) and feeds them: `with rt.phase(name):` around the code
that waits for the other ranks, and `DependenceCheck.update` with each step's losses.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable


# -----------------------------------------------------------------------------
# A stuck rank


class Watchdog:
    """Stops this rank with one line when a phase that waits for the other ranks lasts longer than
    --dist-timeout: a dead GPU or a frozen process otherwise holds every other rank in its next
    collective, silently, for the backend's timeout (gloo 30 min, NCCL 10 min).

    NOTE: a try/except around the collectives is not enough: on a timeout NCCL's own watchdog
    aborts the process before Python sees an exception, and the main thread of a stuck rank sits
    in C++. So a thread of our own reads the current phase (set by `with rt.phase(name):`), prints
    the phase, the rank and the last checkpoint, and leaves with exit code 2 (os._exit: there is
    no way to raise in the main thread); torchrun then stops the other ranks. The backend's own
    timeout is set a minute longer, as a backstop for collectives outside any phase."""

    def __init__(self, rank: int, timeout: float):
        self.rank, self.timeout = rank, timeout
        self.note: Callable[[], str] = lambda: ""  # what the error adds: train.py names the last checkpoint
        self.current: tuple[str, float] | None = None  # (phase, its start); replaced whole, so read without a lock
        threading.Thread(target=self._watch, name="dist-watchdog", daemon=True).start()

    @contextlib.contextmanager
    def phase(self, name: str):
        outer, self.current = self.current, (name, time.monotonic())
        try:
            yield
        finally:
            self.current = outer

    def _watch(self):
        while True:
            time.sleep(min(1.0, self.timeout / 20))
            current = self.current
            if current is not None and time.monotonic() - current[1] > self.timeout:
                print(f"error: rank {self.rank} waited more than {self.timeout:g} s (--dist-timeout) for the other "
                      f"ranks in {current[0]}: a rank is stuck or gone. {self.note()}",
                      file=sys.stderr, flush=True)
                os._exit(2)


# -----------------------------------------------------------------------------
# The plain model left behind by the adapted one


# The fast-weight dependence check (bilevel methods): a step is flagged when the plain model's loss
# is at least RATIO x the outer loss AND at least GAP nats above it; the check fires when SHARE of
# the last WINDOW steps after warm-up are flagged. See DependenceCheck for why these numbers.
DEPENDENCE_RATIO, DEPENDENCE_GAP, DEPENDENCE_WINDOW, DEPENDENCE_SHARE = 3.0, 1.0, 50, 40


@dataclass
class DependenceCheck:
    """Warns once when the outer loss is low only thanks to the fast weights, which inference drops.

    `inner_first` is the loss of the plain model on the batch (the fast weights start with B = 0),
    i.e. of the model that is saved and evaluated; the outer loss is that of the adapted model.
    Healthy runs, measured: the inner steps help a little, inner_first is 0.98-1.05x the loss (at
    most 0.03 nats above it) in the demo preset (300 steps) from step 35 on, and 1.00x in the
    tests' tiny runs. More while a model learns from scratch or from little data: up to 1.75x and
    1.4 nats in the demo's first 35 steps; 1.6-1.85x but under 0.5 nats after step 30 of a run on
    200 of the demo's conversations (batch 8). A run that has come to lean on the fast weights keeps
    a low outer loss while the plain model stays bad, for as long as it runs: loss 0.2 against
    inner_first 5.7 (28x, 5.5 nats; the saved model scored 0 %), and 14-120x, 2.5-3.8 nats from
    step 20 on in the run tests/test_train.py reproduces it with.

    Hence both conditions for a flagged step, each well clear of the healthy runs: the ratio
    alone would flag two small losses (0.01 against 0.05), the gap alone a run whose losses are
    both high. And a count over a window, not a mean: a mean would let a strong start or one bad
    batch decide; 40 flagged steps of the last 50 are a sustained stretch that a short transient
    or a few noisy steps do not make, and the check cannot fire before step warm-up + 50 (warm-up
    steps are not counted).

    State: the last WINDOW (loss, inner_first) pairs and the warning. Nothing is saved in a
    checkpoint: on --resume train_loop replays the kept records of OUT/log.jsonl through `update`,
    so a resumed run warns at the step the uninterrupted run warns at, and only once."""
    warmup: int  # the schedule's warm-up steps (train.warmup_steps)
    window: deque = field(default_factory=lambda: deque(maxlen=DEPENDENCE_WINDOW))
    warning: str | None = None

    def update(self, step: int, loss: float, inner_first: float) -> str | None:
        """Add optimizer step `step` (1-based); returns the warning at the step where it fires, else None."""
        if step <= self.warmup:
            return None
        self.window.append((loss, inner_first))
        flagged = sum(i >= DEPENDENCE_RATIO * l and i - l >= DEPENDENCE_GAP for l, i in self.window)
        if self.warning is not None or len(self.window) < DEPENDENCE_WINDOW or flagged < DEPENDENCE_SHARE:
            return None
        mean_loss, mean_first = (sum(x) / len(self.window) for x in zip(*self.window))
        self.warning = (f"step {step}: the plain model's loss (inner_first, mean {mean_first:.2f}) stayed far above "
                        f"the outer loss (mean {mean_loss:.2f}) in {flagged} of the last {DEPENDENCE_WINDOW} steps: "
                        f"the model is learning to depend on fast weights that inference does not use; "
                        f"try a lower --lr, a longer --warmup-ratio or fewer --inner-steps")
        return self.warning
