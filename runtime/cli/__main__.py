"""`python -m trapedge.runtime.cli`."""

from . import main

main()
