"""URI parsing and the Gradient naming rule."""

from __future__ import annotations

import pytest

from s3datafs.errors import UsageError
from s3datafs.uri import S3Uri, dataset_name, parse_s3_uri, validate_name


@pytest.mark.parametrize(
    ("uri", "name"),
    [
        ("s3://my-bucket/mnist.zip", "mnist"),
        ("s3://my-bucket/fashion-mnist.zip", "fashion-mnist"),
        ("s3://my-bucket", "my-bucket"),
        ("s3://my-bucket/", "my-bucket"),
        ("s3://bkt/a/train/", "train"),
        ("s3://bkt/a/train", "train"),
        ("s3://bkt/data.tar.gz", "data"),
        ("s3://bkt/data.TAR.GZ", "data"),
        ("s3://bkt/x/data.tar.zst", "data"),
        ("s3://bkt/x/data.tar.bz2", "data"),
        ("s3://bkt/x/data.tar.xz", "data"),
        ("s3://bkt/x/archive.tar", "archive"),
        ("s3://bkt/x/v1.2.csv", "v1.2"),
        ("s3://bkt/.hidden", ".hidden"),
        ("s3://bkt/x/.tar.gz", ".tar"),  # a compound extension that is the whole name is kept
        ("s3://bkt/noext", "noext"),
    ],
)
def test_dataset_name_follows_the_gradient_rule(uri: str, name: str) -> None:
    assert dataset_name(parse_s3_uri(uri)) == name


@pytest.mark.parametrize(
    ("text", "bucket", "key"),
    [
        ("s3://bkt", "bkt", ""),
        ("s3://bkt/", "bkt", ""),
        ("s3://bkt/k", "bkt", "k"),
        ("s3://bkt/a/b/", "bkt", "a/b/"),
        ("s3://my.bucket-1/a b/ü", "my.bucket-1", "a b/ü"),
    ],
)
def test_parse_keeps_bucket_and_key(text: str, bucket: str, key: str) -> None:
    assert parse_s3_uri(text) == S3Uri(bucket, key)


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("", "empty"),
        ("http://b/k", "not an S3 URI"),
        ("s3:/b", "not an S3 URI"),
        ("s3://", "no bucket"),
        ("s3:///key", "no bucket"),
        ("s3://B_ad/k", "invalid bucket name"),
        ("s3://ab/k", "invalid bucket name"),
        ("s3://-abc/k", "invalid bucket name"),
        ("s3://a..b/k", "adjacent periods"),
        ("s3://192.168.1.1/k", "IP address"),
        ("s3://" + "a" * 64, "invalid bucket name"),
        ("s3://bkt/a\0b", "NUL byte"),  # no file name can hold one
    ],
)
def test_parse_refuses_malformed_uris(text: str, fragment: str) -> None:
    with pytest.raises(UsageError, match=fragment):
        parse_s3_uri(text)


def test_prefix_forms() -> None:
    assert parse_s3_uri("s3://bkt").as_prefix() == ""
    assert parse_s3_uri("s3://bkt/a/").as_prefix() == "a/"
    assert parse_s3_uri("s3://bkt/a").as_prefix() == "a/"
    assert not parse_s3_uri("s3://bkt/a").is_explicit_prefix


@pytest.mark.parametrize(
    "name", ["", ".", "..", "a/b", "a\0b", "x" * 256, "é" * 128, "a\nb", "a\tb", "a\x1bb", "a\x85"]
)
def test_validate_name_refuses_unsafe_names(name: str) -> None:
    with pytest.raises(UsageError):
        validate_name(name)


def test_the_default_name_replaces_control_characters() -> None:
    assert dataset_name(parse_s3_uri("s3://b-1/p/x\ty\n.csv")) == "x_y_"
    assert validate_name(dataset_name(parse_s3_uri("s3://b-1/\x1b[31mred/"))) == "_[31mred"


@pytest.mark.parametrize("name", ["mnist", "x" * 255, "with space", "ü"])
def test_validate_name_accepts_safe_names(name: str) -> None:
    assert validate_name(name) == name


def test_a_uri_covers_its_object_and_what_lies_under_it() -> None:
    data = parse_s3_uri("s3://b-1/data")
    assert [key for key in ("data", "data/x", "data2.csv", "database/x", "dat") if
            data.covers("b-1", key)] == ["data", "data/x"]
    assert not data.covers("b-2", "data")
    assert parse_s3_uri("s3://b-1/data/").covers("b-1", "data/x")
    assert not parse_s3_uri("s3://b-1/data/").covers("b-1", "data")
    assert parse_s3_uri("s3://b-1").covers("b-1", "anything/at/all")


def test_a_single_objects_tree_is_rooted_at_its_keys_parent() -> None:
    assert [parse_s3_uri(uri).parent_prefix() for uri in
            ("s3://b-1/x.bin", "s3://b-1/a/b/x.bin", "s3://b-1//x.bin")] == ["", "a/b/", "/"]

