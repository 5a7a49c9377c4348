#!/bin/sh
# Job container entrypoint: mount the datasets, run the job, unmount, exit with the job's status.
#
# The datasets spec (JSON or YAML list, see the s3datafs README) comes from one of:
#   $S3DATAFS_DATASETS_FILE (a path), else $CONFIG/datasets.yaml or .json (e.g. a ConfigMap);
#   or $S3DATAFS_DATASETS (the spec text itself). A file and the variable both: refused.
#   With none of them the job runs as is.
# Default credentials for datasets without keys of their own: $S3DATAFS_CREDENTIALS_FILE, else
# $CONFIG/credentials/credentials when present (e.g. a Secret volume, mode 0400/0600),
# else the usual AWS chain (AWS_* variables, an instance or pod role).
# $CONFIG is $S3DATAFS_CONFIG_DIR, by default /etc/s3datafs.
# $S3DATAFS_OPTIONS: options of `s3datafs mount` for every dataset, split at blanks, e.g.
#   "--allow-other --uid 1000 --gid 1000" for a job that runs as another user.
# `s3datafs run` is PID 1: it forwards SIGTERM/SIGINT/SIGHUP to the job and reaps orphans.
set -eu

config="${S3DATAFS_CONFIG_DIR:-/etc/s3datafs}"
spec="${S3DATAFS_DATASETS_FILE:-}"
for candidate in "$config/datasets.yaml" "$config/datasets.yml" "$config/datasets.json"; do
    if [ -z "$spec" ] && [ -f "$candidate" ]; then spec="$candidate"; fi
done

credentials="${S3DATAFS_CREDENTIALS_FILE:-}"
if [ -z "$credentials" ] && [ -f "$config/credentials/credentials" ]; then
    credentials="$config/credentials/credentials"
fi

if [ -z "$spec" ] && [ -z "${S3DATAFS_DATASETS:-}" ]; then
    exec "$@"    # no datasets: just the job
fi
if [ -n "$spec" ] && [ -n "${S3DATAFS_DATASETS:-}" ]; then
    # Two specs: mounting one and dropping the other without a word would start a job without
    # the datasets it was promised.
    echo "s3datafs: datasets given twice, by $spec and by \$S3DATAFS_DATASETS: keep one of them" >&2
    exit 2
fi
set -- -- "$@"
if [ -n "${S3DATAFS_OPTIONS:-}" ]; then
    set -f  # split at blanks, never globbed
    # shellcheck disable=SC2086
    set -- $S3DATAFS_OPTIONS "$@"
    set +f
fi
if [ -n "$credentials" ]; then
    set -- --credentials-file "$credentials" "$@"
fi
if [ -n "$spec" ]; then
    set -- --datasets "$spec" "$@"
fi
exec s3datafs run "$@"
