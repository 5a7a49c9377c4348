"""s3datafs: mount a pinned S3 object or prefix read-only, fetched lazily, cached for good."""

import os as _os

__version__ = "0.1.0"

if _os.getpid() == 1:  # a container's init: catch stop signals before anything else (see pid1)
    from . import pid1 as _pid1

    _pid1.catch_stop_signals()
