"""``python -m s3datafs`` is the ``s3datafs`` command."""

from . import startup
from .cli import main

startup.finish(main())
