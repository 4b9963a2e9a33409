"""Where the engine core's time goes, per step, with no model: the engine core alone, driven by
the null worker of `bench_engine_overhead.py` (it computes nothing and returns one token per
request that reached the end of its tokens), under a synthetic load of decoding requests.

`bench_engine_overhead.py` times the phases of a step (schedule, broadcast encoding, output);
this tool runs the same steps under cProfile and prints the functions that take the time,
in microseconds per step, so a regression points at a line of code.

    python tools/profile_engine.py                          # 256 decoding requests, 200 steps
    python tools/profile_engine.py --num-requests 64 --top 15
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import random
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import msgspec
from bench_engine_overhead import _VOCAB_SIZE, null_engine

from ember.enginecore.messages import EngineCoreOutputs, EngineCoreRequest
from ember.workers.rpc import ExecuteModel, call_encoder
from ember.workers.sampling_params import SamplingParams


def run_steps(core, num_steps: int) -> None:
    """The engine core's part of `num_steps` steps, as in the engine-core process."""
    encoder = msgspec.msgpack.Encoder()
    for _ in range(num_steps):
        scheduler_output = core.scheduler.schedule()
        call_encoder.encode(ExecuteModel(scheduler_output))
        runner_output = core.executor.null_step(scheduler_output)
        outputs = core.scheduler.update_from_output(scheduler_output, runner_output)
        encoder.encode(EngineCoreOutputs(outputs=outputs))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-requests", type=int, default=256)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--top", type=int, default=20, help="functions to show")
    args = parser.parse_args()
    core = null_engine(args.num_requests, args.prompt_len, args.steps, True)
    rng = random.Random(0)
    params = SamplingParams(temperature=0.0, max_tokens=None, ignore_eos=True)
    for index in range(args.num_requests):
        prompt = [rng.randrange(3, _VOCAB_SIZE) for _ in range(args.prompt_len)]
        core.add_request(EngineCoreRequest(f"req-{index}", prompt, params))
    while core.scheduler.num_waiting or any(
        r.num_computed_tokens < r.num_tokens - 1 for r in core.scheduler.running
    ):
        core.step()
    profiler = cProfile.Profile()
    profiler.enable()
    run_steps(core, args.steps)
    profiler.disable()
    stats = pstats.Stats(profiler)
    total_s = stats.total_tt
    print(
        f"{args.num_requests} decoding requests, {args.steps} steps: "
        f"{total_s / args.steps * 1e6:.0f} us per step under cProfile "
        "(profiling roughly doubles the time; see bench_engine_overhead.py for real figures)"
    )
    print(f"{'us/step (own)':>14} {'us/step (cum)':>14} {'calls/step':>11}  function")
    rows = sorted(stats.stats.items(), key=lambda item: item[1][2], reverse=True)[: args.top]
    for (filename, line, name), (_, calls, own_s, cum_s, _) in rows:
        where = f"{os.path.basename(filename)}:{line}({name})"
        print(
            f"{own_s / args.steps * 1e6:14.1f} {cum_s / args.steps * 1e6:14.1f} "
            f"{calls / args.steps:11.1f}  {where}"
        )
    core.shutdown()


if __name__ == "__main__":
    main()
