"""The persistent block cache (``disk``) and its on-disk block format (``blockfile``)."""
