"""`make demo`: a local S3, a small versioned dataset, a pinned mount, and proof that it is pinned.

Everything lives under ``.demo/`` in the work tree (data root, cache, logs, state) so the demo
never touches /data or the system caches; the S3 server is a moto process on 127.0.0.1 that stops
at the end. Whatever happens, the mount is unmounted and the server stopped before exit.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from devtools.s3server import S3Server, clean_aws_env  # noqa: E402

WORK = Path(__file__).resolve().parent.parent / ".demo"
BUCKET = "demo-datasets"
PREFIX = "mnist-sample/"


def step(text: str) -> None:
    print(f"\n\033[1m== {text}\033[0m", flush=True)


def run(*argv: str, env: dict[str, str], check: bool = True) -> subprocess.CompletedProcess:
    print("$ " + " ".join(argv), flush=True)
    result = subprocess.run(argv, env=env, text=True, capture_output=True, check=False)
    output = (result.stdout + result.stderr).rstrip()
    if output:
        print(output, flush=True)
    if check and result.returncode != 0:
        raise SystemExit(f"demo: command failed with exit status {result.returncode}")
    return result


def upload_sample(s3) -> dict[str, bytes]:
    objects = {
        f"{PREFIX}labels.csv": b"file,label\n"
        + b"".join(f"train/{d}/img_{i:03d}.bin,{d}\n".encode() for d in range(3) for i in range(4))
    }
    for digit in range(3):
        for index in range(4):
            objects[f"{PREFIX}train/{digit}/img_{index:03d}.bin"] = os.urandom(784)
    objects[f"{PREFIX}weights/model.bin"] = os.urandom(24 * 1024 * 1024 + 5)
    s3.create_bucket(Bucket=BUCKET)
    s3.put_bucket_versioning(Bucket=BUCKET, VersioningConfiguration={"Status": "Enabled"})
    for key, body in objects.items():
        s3.put_object(Bucket=BUCKET, Key=key, Body=body)
    return objects


def main() -> int:
    shutil.rmtree(WORK, ignore_errors=True)
    with S3Server() as server:
        env = clean_aws_env()
        env.update(
            AWS_ENDPOINT_URL=server.endpoint,
            S3DATAFS_DATA_ROOT=str(WORK / "data"),
            S3DATAFS_CACHE_DIR=str(WORK / "cache"),
            S3DATAFS_RUNTIME_DIR=str(WORK / "run"),
            S3DATAFS_LOG_DIR=str(WORK / "log"),
        )
        step(f"A local S3 (moto) at {server.endpoint} with a versioned sample dataset")
        s3 = server.client()
        objects = upload_sample(s3)
        print(f"uploaded {len(objects)} objects under s3://{BUCKET}/{PREFIX}")
        mountpoint = WORK / "data" / "mnist-sample"
        s3datafs = [sys.executable, "-m", "s3datafs"]
        try:
            demonstrate(server, s3, objects, env, s3datafs, mountpoint)
        finally:
            if os.path.ismount(mountpoint):
                step("Unmount")
                run(*s3datafs, "unmount", str(mountpoint), env=env, check=False)
    step("Done: nothing is left mounted and the local S3 is stopped")
    return 0


def demonstrate(
    server: S3Server,
    s3,  # a boto3 client
    objects: dict[str, bytes],
    env: dict[str, str],
    s3datafs: list[str],
    mountpoint: Path,
) -> None:
    step("Mount it: pinned at this instant, nothing downloaded yet")
    run(*s3datafs, "mount", f"s3://{BUCKET}/{PREFIX}", env=env)
    server.reset_stats()
    step("The tree, answered from the local catalog")
    run("find", str(mountpoint), "-maxdepth", "2", env=env)
    run("ls", "-l", str(mountpoint / "weights"), env=env)
    print(f"S3 requests while listing: {sum(server.ops().values())}")

    step("Read a file lazily (ranged GETs pinned with VersionId + If-Match)")
    data = (mountpoint / "weights" / "model.bin").read_bytes()
    expected = objects[f"{PREFIX}weights/model.bin"]
    print(
        f"sha256 mount = {hashlib.sha256(data).hexdigest()[:16]}…  "
        f"original = {hashlib.sha256(expected).hexdigest()[:16]}…  "
        f"{'identical' if data == expected else 'DIFFERENT'}"
    )
    print(f"S3 requests so far: {server.ops()}")

    step("Overwrite labels.csv in S3 after the mount")
    s3.put_object(Bucket=BUCKET, Key=f"{PREFIX}labels.csv", Body=b"file,label\nsomething,else\n")
    current = s3.get_object(Bucket=BUCKET, Key=f"{PREFIX}labels.csv")["Body"].read()
    print(f"S3 now has:      {current[:40]!r}")
    served = (mountpoint / "labels.csv").read_bytes()
    print(
        f"the mount reads: {served[:40]!r}  (the pinned version: "
        f"{'yes' if served == objects[PREFIX + 'labels.csv'] else 'NO'})"
    )
    for name in os.listxattr(mountpoint / "labels.csv"):
        print(f"  {name} = {os.getxattr(mountpoint / 'labels.csv', name).decode()}")

    step("Status")
    run(*s3datafs, "status", env=env)
    step("Unmount")
    run(*s3datafs, "unmount", str(mountpoint), env=env)


if __name__ == "__main__":
    sys.exit(main())
