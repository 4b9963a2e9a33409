"""ember's engine core: the scheduler, the KV-cache block manager and the executor that drives
the workers. It runs in its own process (`python -m ember.enginecore`) or in-process for tests."""
