"""The CPU worker's glibc malloc settings (`workers/host_allocator.py`): a step's large
temporaries reuse the memory freed by the step before instead of faulting fresh pages in."""

from __future__ import annotations

import subprocess
import sys

import pytest

# Three 12 MiB tensors (a prefill chunk's gate/up outputs) made and freed together, step after
# step; prints the page faults of the last ten steps. Both runs start from glibc's starting
# mmap threshold (128 KiB; glibc raises it as mapped blocks are freed, so where it stands in a
# process depends on what the process did before, here torch's import): "set" then applies
# ember's settings.
_STEPS = """
import ctypes, resource, sys, torch
from ember.workers.host_allocator import keep_freed_blocks
ctypes.CDLL("libc.so.6").mallopt(-3, 128 * 1024)  # M_MMAP_THRESHOLD: glibc's starting value
if sys.argv[1] == "set":
    assert keep_freed_blocks()
def step():
    a, b, c = (torch.ones(2048, 1536) for _ in range(3))
    del a, b, c
for _ in range(5):
    step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    step()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _page_faults(mode: str, env: dict[str, str] | None = None) -> int:
    done = subprocess.run(
        [sys.executable, "-c", _STEPS, mode], capture_output=True, text=True, env=env, check=True
    )
    return int(done.stdout.split()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt: Linux only")
def test_freed_temporaries_serve_the_next_steps_without_page_faults():
    # from glibc's starting threshold each 12 MiB block is a fresh mapping, handed back to the
    # system when freed, and the next step faults it all in again
    assert _page_faults("initial") > 10 * 3 * (12 << 20) // 4096 // 2
    assert _page_faults("set") < 100


def test_an_environment_that_sets_malloc_is_left_as_it_is(monkeypatch):
    from ember.workers import host_allocator

    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "131072")
    assert host_allocator.keep_freed_blocks() is False
