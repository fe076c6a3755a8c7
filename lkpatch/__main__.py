"""``python -m lkpatch``: the ``lkpatch`` command."""
import sys

from .cli import main

sys.exit(main())
