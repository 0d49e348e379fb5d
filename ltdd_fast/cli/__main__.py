"""python -m ltdd_fast.cli: the ltdd command."""
import sys

from . import main

sys.exit(main())
