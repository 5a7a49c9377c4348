"""``python -m s3datafs`` is the ``s3datafs`` command."""

import sys

from .cli import main

sys.exit(main())
