"""`python -m ember.enginecore`: see `ember.enginecore.core_process`."""

from ember.enginecore.core_process import main

main()
