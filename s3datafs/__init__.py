"""s3datafs: mount a pinned S3 object or prefix read-only, fetched lazily, cached for good."""

__version__ = "0.1.0"
