"""`python -m ember.workers`: see `ember.workers.worker_process`."""

from ember.workers.worker_process import main

main()
