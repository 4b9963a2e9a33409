"""Lockstep data parallelism in the engine core: the data-parallel ranks of a MoE model with
expert parallelism (`LockstepConfig`) place their experts over every rank's workers, so each
MoE layer of a step is a collective of all ranks (`FusedMoE.forward_across_data_parallel`). The
ranks therefore step together, in waves:

    start      each engine core, once its workers are up, writes lockstep/ready/<rank> in the
               store rank 0's user process hosts (VLLM_DP_MASTER_IP:PORT) and waits for every
               rank's key (TimeoutError naming the missing ranks after EMBER_DP_TIMEOUT_S)
    a wave     starts when an idle rank gets requests: it adds 1 to lockstep/wave and steps;
               an idle rank sees the counter pass the largest wave it knows (it looks every
               `POLL_S`) and steps too. Every step each rank runs its own tokens or, with none,
               an idle step that serves the others' MoE tokens; then all agree (one all-reduce
               of two numbers, `LockstepGroups.agree`) on whether any rank had requests at the
               step's start and on the largest wave number any rank holds
    the end    the first step at whose start no rank had requests: every rank leaves the wave
               at that same step, knowing the same largest wave number

A rank that adds to the counter is active until that agreement includes it, so a wave no rank
has seen cannot start: the idle ranks only follow counters larger than every wave they ended.
"""

from __future__ import annotations

import logging
import time

from ember.workers.config import LockstepConfig

logger = logging.getLogger(__name__)

POLL_S = 0.02  # how often an idle rank looks for a wave another rank started
_STORE_TIMEOUT_S = 30.0


class LockstepWaves:
    """One engine core's part of the waves: `active` while it must step."""

    def __init__(self, config: LockstepConfig):
        from ember.workers.distributed import tcp_store

        self.config = config
        self.store = tcp_store(
            config.master_ip, config.master_port, is_master=False, timeout_s=_STORE_TIMEOUT_S
        )
        self.wave = 0  # the largest wave number this rank knows
        self.active = False
        self.steps = 0
        self.idle_steps = 0  # steps that ran none of this rank's tokens
        self._next_poll = 0.0

    def meet(self) -> None:
        """Wait until every rank's engine is up (the first wave's collectives need them)."""
        config, store = self.config, self.store
        store.set(f"lockstep/ready/{config.rank}", "1")
        deadline = time.monotonic() + config.timeout_s
        waiting = set(range(config.size))
        while waiting:
            waiting = {r for r in waiting if not store.check([f"lockstep/ready/{r}"])}
            if waiting and time.monotonic() > deadline:
                raise TimeoutError(
                    f"lockstep data parallelism: the engines of data-parallel rank(s) "
                    f"{sorted(waiting)} did not start within {config.timeout_s:.0f} s "
                    "(EMBER_DP_TIMEOUT_S)"
                )
            if waiting:
                time.sleep(POLL_S)
        logger.info(
            "lockstep data parallelism: rank %d of %d, every engine is up",
            config.rank,
            config.size,
        )

    def begin(self, has_requests: bool) -> None:
        """Start a wave when this rank has requests and is idle; when it is idle without
        requests, join one another rank started (the counter is read every `POLL_S`)."""
        if self.active:
            return
        if has_requests:
            self.wave = max(self.wave, int(self.store.add("lockstep/wave", 1)))
            self.active = True
            return
        now = time.monotonic()
        if now < self._next_poll:
            return
        self._next_poll = now + POLL_S
        counter = int(self.store.add("lockstep/wave", 0))
        if counter > self.wave:
            self.wave = counter
            self.active = True

    def end_step(self, any_busy: bool, largest_wave: int, ran_tokens: bool) -> None:
        """The agreement of the step that just ran."""
        self.wave = max(self.wave, largest_wave)
        self.active = any_busy
        self.steps += 1
        self.idle_steps += not ran_tokens
