"""python -m ltdd_fast: the ltdd command (as torchrun can start it: torchrun ... -m ltdd_fast COMMAND ...)."""
import sys

from .cli import main

sys.exit(main())
