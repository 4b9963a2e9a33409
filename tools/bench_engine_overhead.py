"""Engine-core overhead per step, with a null model: what the engine core itself costs around a
model step, at 1, 64 and 256 running requests that all decode.

Each timed step is `EngineCore.step` taken apart:

- ``schedule``: `Scheduler.schedule` (token budget, block allocation, prefix-cache hashing of the
  blocks that fill, the `SchedulerOutput` deltas);
- ``broadcast``: msgspec encoding of `ExecuteModel(scheduler_output)` as `MultiprocExecutor`
  writes it to the shared-memory queue, and decoding rank 0's `WorkerReply`;
- ``output``: `Scheduler.update_from_output` (append tokens, stop checks, `EngineCoreOutput`s)
  and the msgspec encoding of `EngineCoreOutputs` that the output thread sends to the client.

The model is `NullExecutor`: it keeps per-request token counts from the deltas as the model
runner does and returns one token per request that reached the end of its tokens, computing
nothing (its own bookkeeping and the worker-side encoding are not timed). Requests have random
128-token prompts and never stop; timing starts once every request decodes.

Examples::

    python tools/bench_engine_overhead.py                      # 1, 64, 256 requests
    python tools/bench_engine_overhead.py --num-requests 512 --steps 200 --no-prefix-caching
"""

from __future__ import annotations

import argparse
import gc
import json
import random
import statistics
import sys
import time
from dataclasses import dataclass, field

import msgspec

from ember.enginecore.engine_core import EngineCore
from ember.enginecore.executor import Executor
from ember.enginecore.messages import EngineCoreOutputs, EngineCoreRequest
from ember.workers.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
from ember.workers.rpc import ExecuteModel, WorkerReply, call_encoder, reply_decoder, reply_encoder
from ember.workers.sampling_params import SamplingParams
from ember.workers.scheduler_output import ModelRunnerOutput, SchedulerOutput

_NULL_TOKEN_ID = 7
_VOCAB_SIZE = 32000


class NullExecutor(Executor):
    """An executor whose worker computes nothing: per request it tracks how many tokens exist
    and are computed (from the scheduler's deltas) and samples `_NULL_TOKEN_ID` whenever a
    request reaches the end of its tokens. `execute_model` also encodes the call and decodes a
    reply as the multiprocess executor does; `null_step` is the worker's part alone."""

    def __init__(self, config: EngineConfig):
        super().__init__(config)
        self.num_tokens: dict[str, int] = {}
        self.num_computed_tokens: dict[str, int] = {}

    def determine_num_kv_blocks(self) -> int:
        return self.config.cache.num_kv_blocks

    def initialize_kv_cache(self, num_blocks: int) -> None:
        pass

    def start_profile(self, profile_dir: str) -> None:
        pass

    def stop_profile(self) -> list[str]:
        return []

    def execute_model(self, scheduler_output: SchedulerOutput) -> ModelRunnerOutput:
        call_encoder.encode(ExecuteModel(scheduler_output))
        reply = reply_encoder.encode(WorkerReply(0, runner_output=self.null_step(scheduler_output)))
        return reply_decoder.decode(reply).runner_output

    def null_step(self, scheduler_output: SchedulerOutput) -> ModelRunnerOutput:
        num_tokens, num_computed = self.num_tokens, self.num_computed_tokens
        for req_id in scheduler_output.finished_req_ids:
            num_tokens.pop(req_id, None)
            num_computed.pop(req_id, None)
        for new in scheduler_output.scheduled_new_reqs:
            num_tokens[new.req_id] = len(new.prompt_token_ids) + len(new.output_token_ids)
            num_computed[new.req_id] = new.num_computed_tokens
        for cached in scheduler_output.scheduled_cached_reqs:
            num_computed[cached.req_id] = cached.num_computed_tokens
        req_ids = []
        for req_id, count in scheduler_output.num_scheduled_tokens.items():
            num_computed[req_id] += count
            if num_computed[req_id] == num_tokens[req_id]:
                num_tokens[req_id] += 1
                req_ids.append(req_id)
        return ModelRunnerOutput(req_ids=req_ids, sampled_token_ids=[_NULL_TOKEN_ID] * len(req_ids))


@dataclass(slots=True)
class StepTimes:
    """Per-step microseconds of each phase (wall clock), and of the whole step in this thread's
    CPU time, which leaves out the time the OS gave the core to another process."""

    schedule_us: list[float] = field(default_factory=list)
    broadcast_us: list[float] = field(default_factory=list)
    output_us: list[float] = field(default_factory=list)
    cpu_us: list[float] = field(default_factory=list)

    def summary(self) -> dict[str, float]:
        totals = [a + b + c for a, b, c in zip(self.schedule_us, self.broadcast_us, self.output_us)]
        return {
            "schedule_median_us": statistics.median(self.schedule_us),
            "broadcast_median_us": statistics.median(self.broadcast_us),
            "output_median_us": statistics.median(self.output_us),
            "total_median_us": statistics.median(totals),
            "total_mean_us": statistics.fmean(totals),
            "total_p99_us": statistics.quantiles(totals, n=100)[98],
            "cpu_mean_us": statistics.fmean(self.cpu_us),
        }


def null_engine(
    num_requests: int, prompt_len: int, num_steps: int, enable_prefix_caching: bool
) -> EngineCore:
    block_size = 16
    max_model_len = prompt_len + 8 + num_steps + 64
    blocks_per_request = -(-max_model_len // block_size)
    config = EngineConfig(
        model=ModelConfig(
            model="null",
            model_dir="",
            architecture="LlamaForCausalLM",
            dtype="float32",
            max_model_len=max_model_len,
            vocab_size=_VOCAB_SIZE,
            eos_token_ids=(2,),
        ),
        cache=CacheConfig(
            block_size=block_size,
            num_kv_blocks=1 + num_requests * blocks_per_request,
            enable_prefix_caching=enable_prefix_caching,
        ),
        scheduler=SchedulerConfig(
            max_num_seqs=max(256, num_requests),
            max_num_batched_tokens=max(2048, num_requests),
            max_model_len=max_model_len,
        ),
    )
    return EngineCore(config, NullExecutor)


def measure(
    num_requests: int, prompt_len: int, num_steps: int, enable_prefix_caching: bool
) -> dict[str, float]:
    core = null_engine(num_requests, prompt_len, num_steps, enable_prefix_caching)
    rng = random.Random(0)
    params = SamplingParams(temperature=0.0, max_tokens=None, ignore_eos=True)
    for index in range(num_requests):
        # Lengths spread over a block, so that requests fill their blocks on different steps.
        length = prompt_len - 8 + index % 16
        prompt = [rng.randrange(3, _VOCAB_SIZE) for _ in range(length)]
        core.add_request(EngineCoreRequest(f"req-{index}", prompt, params))
    scheduler, executor = core.scheduler, core.executor
    # Prefill everything, then a few decode steps before timing.
    while scheduler.num_waiting or any(
        r.num_computed_tokens < r.num_tokens - 1 for r in scheduler.running
    ):
        core.step()
    for _ in range(16):
        core.step()
    output_encoder = msgspec.msgpack.Encoder()
    times = StepTimes()
    clock, cpu_clock = time.perf_counter_ns, time.thread_time_ns
    gc.collect()
    for _ in range(num_steps):
        cpu_start = cpu_clock()
        start = clock()
        scheduler_output = scheduler.schedule()
        scheduled = clock()
        call_encoder.encode(ExecuteModel(scheduler_output))
        sent = clock()
        cpu_sent = cpu_clock()
        # The worker's part (the null model and its reply's encoding) is not counted.
        reply = reply_encoder.encode(
            WorkerReply(0, runner_output=executor.null_step(scheduler_output))
        )
        cpu_replied = cpu_clock()
        replied = clock()
        runner_output = reply_decoder.decode(reply).runner_output
        received = clock()
        outputs = scheduler.update_from_output(scheduler_output, runner_output)
        output_encoder.encode(EngineCoreOutputs(outputs=outputs))
        done = clock()
        cpu_done = cpu_clock()
        assert len(scheduler_output.num_scheduled_tokens) == num_requests == len(outputs)
        times.schedule_us.append((scheduled - start) / 1e3)
        times.broadcast_us.append((sent - scheduled + received - replied) / 1e3)
        times.output_us.append((done - received) / 1e3)
        times.cpu_us.append((cpu_sent - cpu_start + cpu_done - cpu_replied) / 1e3)
    core.shutdown()
    return times.summary()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num-requests", default="1,64,256", help="comma-separated counts")
    parser.add_argument("--steps", type=int, default=500, help="timed decode steps per count")
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--no-prefix-caching", action="store_true")
    parser.add_argument("--json", action="store_true", help="print one JSON line per count")
    args = parser.parse_args()
    print(
        f"engine-core overhead per decode step, null model, prompt {args.prompt_len} tokens, "
        f"prefix caching {'off' if args.no_prefix_caching else 'on'}, {args.steps} steps, "
        f"Python {sys.version.split()[0]}"
    )
    print("µs per step; wall-clock medians per phase, and the whole step's wall median / mean /")
    print("p99 and mean CPU time of this thread (the CPU is shared: the OS may run others)")
    header = ("requests", "schedule", "broadcast", "output", "median", "mean", "p99", "cpu mean")
    print("  ".join(f"{name:>9}" for name in header))
    for num_requests in (int(n) for n in args.num_requests.split(",")):
        result = measure(num_requests, args.prompt_len, args.steps, not args.no_prefix_caching)
        if args.json:
            print(json.dumps({"num_requests": num_requests, **result}))
            continue
        keys = (
            "schedule_median_us",
            "broadcast_median_us",
            "output_median_us",
            "total_median_us",
            "total_mean_us",
            "total_p99_us",
            "cpu_mean_us",
        )
        print(f"{num_requests:>9}  " + "  ".join(f"{result[key]:>9.1f}" for key in keys))


if __name__ == "__main__":
    main()
