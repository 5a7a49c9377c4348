"""Dataset specs (``s3datafs.datasets``): all spellings, all bad input, no I/O but the spec."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest

from s3datafs.datasets import (
    ALIASES,
    ENV_VAR,
    FIELDS,
    SpecError,
    load_specs,
    parse_specs,
)
from s3datafs.errors import ConfigError

GRADIENT_EXAMPLE = """\
datasets: [
    {
        "uri": "s3://my-bucket/mnist-modified.zip",
        "awsSecretAccessKey": "<KEY>",
        "awsAccessKeyId": "<ID>",
        "name": "mnist",
    },
]
"""


def parse(text: str, fmt: str | None = None, base_dir: Path | None = None):
    return parse_specs(text, origin="spec", fmt=fmt, base_dir=base_dir)


def parse_one(**fields: object):
    (spec,) = parse(json.dumps([fields]), fmt="json")
    return spec


def test_gradient_example_parses_as_written() -> None:
    (spec,) = parse(GRADIENT_EXAMPLE)
    assert str(spec.uri) == "s3://my-bucket/mnist-modified.zip"
    assert spec.name == "mnist"
    assert (spec.access_key_id, spec.secret_access_key) == ("<ID>", "<KEY>")


def test_every_camel_case_field() -> None:
    spec = parse_one(
        uri="s3://b-1/d.csv",
        name="d",
        etag="ee1d4fd1",
        versionId="v1",
        endpointUrl="http://127.0.0.1:9000",
        region="eu-west-1",
        awsAccessKeyId="AKID",
        awsSecretAccessKey="SECRET",
        awsSessionToken="TOKEN",
        noSignRequest=False,
    )
    assert (spec.name, spec.etag, spec.version_id) == ("d", '"ee1d4fd1"', "v1")
    assert (spec.endpoint_url, spec.region) == ("http://127.0.0.1:9000", "eu-west-1")
    assert (spec.access_key_id, spec.secret_access_key, spec.session_token) == (
        "AKID",
        "SECRET",
        "TOKEN",
    )
    assert spec.no_sign_request is False
    assert spec.secrets() == ["AKID", "SECRET", "TOKEN"]


def test_snake_case_aliases_mean_the_same() -> None:
    snake = parse_one(
        uri="s3://b-1/d.csv",
        version_id="v1",
        endpoint_url="http://e:1",
        aws_access_key_id="AKID",
        aws_secret_access_key="SECRET",
        aws_session_token="TOKEN",
    )
    camel = parse_one(
        uri="s3://b-1/d.csv",
        versionId="v1",
        endpointUrl="http://e:1",
        awsAccessKeyId="AKID",
        awsSecretAccessKey="SECRET",
        awsSessionToken="TOKEN",
    )
    assert snake == camel
    assert set(ALIASES.values()) <= set(FIELDS)
    assert parse_one(uri="s3://b-1/p/", as_of="2024-01-01").as_of == "2024-01-01"
    assert parse_one(uri="s3://b-1/p/", no_sign_request=True).no_sign_request is True
    assert parse_one(uri="s3://b-1/p/", requester_pays="yes").requester_pays is True
    assert parse_one(uri="s3://b-1/p/", requesterPays=False).requester_pays is False
    assert parse_one(uri="s3://b-1/p/", kernel_readahead="128K").kernel_readahead == "128K"


def test_kernel_readahead_is_a_size_as_text_or_a_json_number_of_bytes() -> None:
    """Checked as ``mount --kernel-readahead`` is, when the dataset's mount is planned."""
    assert parse_one(uri="s3://b-1/p/", kernelReadahead="128K").kernel_readahead == "128K"
    assert parse_one(uri="s3://b-1/p/", kernelReadahead=131072).kernel_readahead == "131072"
    with pytest.raises(SpecError, match="'kernelReadahead' must be a string, not"):
        parse_one(uri="s3://b-1/p/", kernelReadahead=True)


def test_kernel_readahead_as_a_json_float_is_bytes_when_whole_and_refused_as_one_if_not() -> None:
    """A generated spec may write a byte count as ``131072.0`` (Python's ``json`` does for a
    float): still a number of bytes. A fraction of a byte is refused naming what is wanted, not
    with "must be a string", which a number of bytes need not be."""
    assert parse_one(uri="s3://b-1/p/", kernelReadahead=131072.0).kernel_readahead == "131072"
    for value in (4096.5, 1e-05):
        with pytest.raises(SpecError, match="'kernelReadahead' must be a size such as 128K or a "
                                            "whole number of bytes, not "):
            parse_one(uri="s3://b-1/p/", kernelReadahead=value)


def test_names_follow_the_gradient_rule_and_secrets_stay_out_of_repr() -> None:
    specs = parse(
        "- uri: s3://my-bucket/mnist.zip\n"
        "- uri: s3://my-bucket\n"
        "- uri: s3://my-bucket/a/train/\n"
        "- {uri: s3://my-bucket/x.tar.gz, name: custom, awsAccessKeyId: ID, "
        "awsSecretAccessKey: TOPSECRET}\n"
    )
    assert [spec.name for spec in specs] == ["mnist", "my-bucket", "train", "custom"]
    assert [spec.index for spec in specs] == [1, 2, 3, 4]
    assert "TOPSECRET" not in repr(specs)


def test_yaml_scalars_stay_strings_and_nulls_mean_absent() -> None:
    (spec,) = parse(
        "- uri: s3://b-1/d.csv\n  etag: 0123456789\n  versionId: 1e10\n"
        "  noSignRequest: yes\n  region: ~\n  name:\n"
    )
    assert (spec.etag, spec.version_id) == ('"0123456789"', "1e10")
    assert spec.no_sign_request is True
    assert spec.region is None
    assert spec.name == "d"
    (quoted,) = parse("- {uri: s3://b-1/d.csv, region: 'null'}\n")
    assert quoted.region == "null"
    (from_json,) = parse('[{"uri": "s3://b-1/d.csv", "etag": null, "region": ""}]', fmt="json")
    assert from_json.etag is None
    assert from_json.region is None


def test_booleans_are_read_in_any_case() -> None:
    """YAML's BaseLoader keeps ``True`` and ``NO`` as written: they are booleans all the same."""
    values = [parse_one(uri="s3://b-1/a", noSignRequest=text).no_sign_request
              for text in ("True", "YES", "On", "FALSE", "No", "off")]
    assert values == [True, True, True, False, False, False]


def test_a_null_name_is_no_name_given() -> None:
    """``name: ~`` is the field left out: the name is derived, and a snapshot may name it."""
    (spec,) = parse("- {uri: s3://b-1/p/, snapshot: s.gz, name: ~}\n")
    assert (spec.name, spec.name_given) == ("p", False)


def test_relative_snapshot_paths_are_relative_to_the_spec_file(tmp_path: Path) -> None:
    (spec,) = parse("- {uri: s3://b-1/p/, snapshot: snaps/p.jsonl.gz}", base_dir=tmp_path)
    assert spec.snapshot == tmp_path / "snaps/p.jsonl.gz"
    (absolute,) = parse("- {uri: s3://b-1/p/, snapshot: /x/p.gz}", base_dir=tmp_path)
    assert absolute.snapshot == Path("/x/p.gz")


def test_relative_snapshot_paths_of_stdin_and_the_variable_start_in_the_working_directory(
) -> None:
    """There is no spec file to start from: the path stays relative, and the command makes it
    absolute from where it runs (``commands.mount._absolute``), as for ``--snapshot``."""
    text = "- {uri: s3://b-1/p/, snapshot: snaps/p.jsonl.gz}"
    for source, given in (("-", {"stdin": io.StringIO(text)}),
                          (None, {"environ": {"S3DATAFS_DATASETS": text}})):
        (spec,) = load_specs(source, **given)
        assert spec.snapshot == Path("snaps/p.jsonl.gz")


def test_relative_paths_start_beside_the_spec_file_as_named_not_where_its_link_points(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A Kubernetes ConfigMap volume: datasets.yaml -> ..data/datasets.yaml, ..data ->
    ..2026_11_26_10_00_00.123, all in the volume's directory (here spec/, beside snapshots/)."""
    volume = tmp_path / "spec"
    (volume / "..2026_11_26_10_00_00.123").mkdir(parents=True)
    (volume / "..2026_11_26_10_00_00.123" / "datasets.yaml").write_text(
        "- {uri: s3://b-1/p/, snapshot: ../snapshots/p.gz}\n")
    (volume / "..data").symlink_to("..2026_11_26_10_00_00.123")
    (volume / "datasets.yaml").symlink_to("..data/datasets.yaml")
    monkeypatch.chdir(tmp_path)
    for given in (volume / "datasets.yaml", Path("spec/datasets.yaml")):
        (spec,) = load_specs(str(given))
        assert spec.snapshot == tmp_path / "spec/../snapshots/p.gz"


def test_sources_file_stdin_and_environment(tmp_path: Path) -> None:
    text = '[{"uri": "s3://b-1/a.bin"}]'
    for name in ("spec.json", "spec.yaml", "spec"):
        (tmp_path / name).write_text(text)
        assert load_specs(str(tmp_path / name))[0].name == "a"
    assert load_specs("-", stdin=io.StringIO("- uri: s3://b-1/b.bin\n"))[0].name == "b"
    assert load_specs(None, environ={ENV_VAR: "- uri: s3://b-1/c.bin"})[0].name == "c"
    assert parse("[]") == []


def test_credentials_lose_the_line_break_a_yaml_block_leaves() -> None:
    (spec,) = parse("- uri: s3://b-1/a\n  awsAccessKeyId: AKID\n  awsSecretAccessKey: |\n"
                    "    SECRET\n  awsSessionToken: |\n    TOKEN\n")
    assert (spec.secret_access_key, spec.session_token) == ("SECRET", "TOKEN")


@pytest.mark.parametrize(
    ("text", "fragment"),
    [("[" * 100_000, "nested too deeply"), ("- " * 50_000 + "x", "nested too deeply"),
     ("[" + "9" * 5000 + "]", "unusable JSON")],
    ids=["json-nesting", "yaml-nesting", "json-huge-number"],
)
def test_specs_beyond_reason_are_one_line_errors(text: str, fragment: str) -> None:
    with pytest.raises(SpecError, match=fragment) as caught:
        parse(text, fmt="json" if text.startswith("[") else None)
    assert "\n" not in str(caught.value)


def bad(id_: str, text: str, fragment: str, fmt: str | None = None):
    return pytest.param(text, fmt, fragment, id=id_)


BAD_SPECS = [
    bad("json", '[{"uri": "s3://b-1/a",}]', "line 1, column 23: invalid JSON", "json"),
    bad(  # both parsers stop at the same place: the text looks like JSON, so JSON speaks
        "json-guess",
        '[\n  {"uri": "s3://b-1/a"\n  "name": "x"}\n]',
        "line 3, column 3: invalid JSON: Expecting ',' delimiter",
    ),
    bad(  # YAML's flow style gets further: its error is the one that helps
        "yaml-flow-guess",
        "[{uri: s3://b-1/a, name: [x}]",
        "line 1, column 28: invalid YAML",
    ),
    bad(  # a tab is JSON's whitespace, and YAML's error: the parser that got further speaks
        "json-guess-with-tab",
        '[{"uri": "s3://b-1/a",\t"name": "x"}, {"uri": "s3://b-1/b" "name": "y"}]',
        "line 1, column 59: invalid JSON: Expecting ',' delimiter",
    ),
    bad("yaml", "- uri: s3://b-1/a\n  name: [x\n", "line 3, column 1: invalid YAML"),
    bad("tab", "- uri: s3://b-1/a\n\tname: x\n", "line 2, column 1: invalid YAML", "yaml"),
    bad("two-docs", "- uri: a\n- uri: b\n---\n- uri: c\n", "line 3, column 1"),
    bad(
        "dup-key-yaml",
        "- {uri: s3://b-1/a, uri: s3://b-1/b}",
        "line 1, column 21: invalid YAML: field 'uri' is given twice",
    ),
    bad(
        "dup-key-json",
        '[{"uri": "s3://b-1/a", "uri": "s3://b-1/b"}]',
        "field 'uri' is given twice",
        "json",
    ),
    bad("empty", "", "is empty: expected a list"),
    bad("mapping", "uri: s3://b-1/a\n", "is not a list: expected a list of datasets"),
    bad("datasets-not-list", '{"datasets": "s3://b-1/a"}', "is not a list"),
    bad("string", '"s3://b-1/a"', "got a string", "json"),
    bad("item-string", "- s3://b-1/a\n", "dataset #1 is a string, not an object"),
    bad("no-uri", "- name: x\n", "dataset #1 has no 'uri' (required)"),
    bad("null-uri", "- {uri: ~}\n", "dataset #1 has no 'uri'"),
    bad("bad-uri", "- uri: http://b-1/a\n", "dataset #1: not an S3 URI"),
    bad("bad-bucket", "- uri: s3://B/a\n", "dataset #1: invalid bucket name"),
    bad("bad-name", "- {uri: s3://b-1/a, name: ..}\n", "invalid dataset name '..'"),
    bad(
        "typo-case",
        "- {uri: s3://b-1/a, versionid: v}\n",
        "unknown field 'versionid': did you mean 'versionId'?",
    ),
    bad(
        "typo-snake",
        "- {uri: s3://b-1/a, aws_secret_key: v}\n",
        "did you mean 'aws_secret_access_key'?",
    ),
    bad(
        "typo-plural",
        "- {uri: s3://b-1/a, etags: v}\n",
        "unknown field 'etags': did you mean 'etag'?",
    ),
    bad(
        "unknown",
        "- {uri: s3://b-1/a, colour: red}\n",
        "unknown field 'colour': known fields are uri, name",
    ),
    bad(
        "both-spellings",
        "- {uri: s3://b-1/a, versionId: a, version_id: b}\n",
        "'versionId' is given twice (as 'versionId' and 'version_id')",
    ),
    bad("list-value", "- {uri: s3://b-1/a, name: [x]}\n", "'name' must be a string, not a list"),
    bad(
        "number",
        '[{"uri": "s3://b-1/a", "etag": 12}]',
        "'etag' must be a string, not a number",
        "json",
    ),
    bad(
        "bool",
        "- {uri: s3://b-1/a, noSignRequest: maybe}\n",
        "'noSignRequest' must be true or false",
    ),
    bad(
        "etag-prefix",
        "- {uri: s3://b-1/p/, etag: abc}\n",
        "'etag' pins a single object but s3://b-1/p/ is a prefix",
    ),
    bad("version-bucket", "- {uri: s3://b-1, versionId: v}\n", "'versionId' pins a single object"),
    bad(
        "asof-version",
        "- {uri: s3://b-1/a, asOf: 7d, versionId: v}\n",
        "'asOf' and 'versionId' both choose the version",
    ),
    bad(
        "snapshot-asof",
        "- {uri: s3://b-1/p/, snapshot: s.gz, asOf: 7d}\n",
        "'snapshot' already pins every object: remove 'asOf'",
    ),
    bad(
        "snapshot-etag",
        "- {uri: s3://b-1/a.csv, snapshot: s.gz, etag: abc}\n",
        "'snapshot' already pins every object: remove 'etag'",
    ),
    bad(
        "id-only",
        "- {uri: s3://b-1/a, awsAccessKeyId: ID}\n",
        "'awsAccessKeyId' is given without 'awsSecretAccessKey'",
    ),
    bad(
        "secret-only",
        "- {uri: s3://b-1/a, aws_secret_access_key: S}\n",
        "'awsSecretAccessKey' is given without 'awsAccessKeyId'",
    ),
    bad("token-only", "- {uri: s3://b-1/a, awsSessionToken: T}\n", "'awsSessionToken' needs"),
    bad(
        "token-on-two-lines",  # the value itself never appears in the message
        "- uri: s3://b-1/a\n  awsAccessKeyId: I\n  awsSecretAccessKey: S\n"
        "  awsSessionToken: \"TOKENPART1\\nTOKENPART2\"\n",
        "dataset #1 ('a'): 'awsSessionToken' is empty or holds a line break",
    ),
    bad(  # pasted with a space or a no-break space inside: no AWS credential has one
        "key-with-a-space",
        '[{"uri": "s3://b-1/a", "awsAccessKeyId": "AKID EXAMPLE", "awsSecretAccessKey": "S"}]',
        "dataset #1 ('a'): 'awsAccessKeyId' is empty or holds a line break, a space",
        "json",
    ),
    bad(
        "secret-with-a-no-break-space",
        '[{"uri": "s3://b-1/a", "awsAccessKeyId": "I", "awsSecretAccessKey": "SE\u00a0CRET"}]',
        "'awsSecretAccessKey' is empty or holds a line break, a space",
        "json",
    ),
    bad(
        "keys-unsigned",
        "- {uri: s3://b-1/a, awsAccessKeyId: I, awsSecretAccessKey: S, noSignRequest: true}\n",
        "'noSignRequest' and AWS keys contradict",
    ),
    bad(
        "dup-derived",
        "- uri: s3://b-1/x/mnist.zip\n- uri: s3://b-2/mnist.tar.gz\n",
        "datasets #1 and #2 are both named 'mnist'",
    ),
    bad(
        "dup-explicit",
        "- {uri: s3://b-1/a, name: n}\n- {uri: s3://b-1/b}\n- {uri: s3://b-1/c, name: n}\n",
        "datasets #1 and #3 are both named 'n'",
    ),
    bad(  # a snapshot file's name is skipped, one given is still checked
        "dup-explicit-with-snapshots",
        "- {uri: s3://b-1/a/, snapshot: a.gz, name: n}\n- {uri: s3://b-1/b/, snapshot: b.gz, "
        "name: n}\n",
        "datasets #1 and #2 are both named 'n'",
    ),
]


def test_yaml_merge_keys_share_fields_and_the_datasets_own_win() -> None:
    text = (
        "- &minio {uri: s3://b-1/a/, endpointUrl: 'http://127.0.0.1:9000', region: eu-west-1}\n"
        "- {<<: *minio, uri: s3://b-1/b/}\n"
        "- {<<: [*minio], uri: s3://b-1/c/, region: us-east-1}\n"
    )
    specs = parse(text)
    assert [(s.uri.key, s.endpoint_url, s.region) for s in specs] == [
        ("a/", "http://127.0.0.1:9000", "eu-west-1"),
        ("b/", "http://127.0.0.1:9000", "eu-west-1"),
        ("c/", "http://127.0.0.1:9000", "us-east-1"),
    ]
    first_wins = parse(  # YAML: of merged mappings, the first one given wins
        "- &eu {uri: s3://b-1/a/, region: eu-west-1}\n"
        "- &us {uri: s3://b-1/b/, region: us-east-1, endpointUrl: 'http://127.0.0.1:9000'}\n"
        "- {<<: [*eu, *us], uri: s3://b-1/c/}\n"
    )[2]
    assert (first_wins.region, first_wins.endpoint_url) == ("eu-west-1", "http://127.0.0.1:9000")
    with pytest.raises(SpecError, match="merges a mapping"):
        parse("- {<<: oops, uri: s3://b-1/a}\n")
    beside = parse("x-minio: &m {endpointUrl: 'http://127.0.0.1:9000'}\n"
                   "datasets:\n- {<<: *m, uri: s3://b-1/a/}\n")  # anchors kept in x- keys
    assert [spec.endpoint_url for spec in beside] == ["http://127.0.0.1:9000"]
    with pytest.raises(SpecError, match="is not a list"):
        parse("other: 1\ndatasets:\n- {uri: s3://b-1/a/}\n")


def test_datasets_named_by_their_snapshot_files_are_not_refused_by_their_uris(
    tmp_path: Path,
) -> None:
    """A snapshot file names its dataset; only mount-all, once planned, knows that name."""
    specs = parse("- {uri: s3://b-1/glue/, snapshot: v1.gz}\n- {uri: s3://b-1/glue/, "
                  "snapshot: v2.gz}\n", base_dir=tmp_path)
    assert [spec.snapshot.name for spec in specs] == ["v1.gz", "v2.gz"]


@pytest.mark.parametrize(("text", "fmt", "fragment"), BAD_SPECS)
def test_bad_specs_give_one_line_errors(text: str, fmt: str | None, fragment: str) -> None:
    with pytest.raises(SpecError) as caught:
        parse(text, fmt=fmt)
    message = str(caught.value)
    assert fragment in message
    assert message.startswith("datasets spec spec")
    assert "\n" not in message
    assert caught.value.exit_code == 2


def test_errors_never_show_secrets() -> None:
    with pytest.raises(SpecError) as caught:
        parse("- {uri: s3://b-1/a, awsSecretAccessKey: TOPSECRET, noSignRequest: maybe}\n")
    assert "TOPSECRET" not in str(caught.value)


def test_missing_unreadable_and_unset_sources(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read datasets spec .*No such file"):
        load_specs(str(tmp_path / "absent.yaml"))
    (tmp_path / "latin1.yaml").write_bytes(b"- uri: s3://b-1/\xe9\n")
    with pytest.raises(ConfigError, match="is not UTF-8"):
        load_specs(str(tmp_path / "latin1.yaml"))
    with pytest.raises(SpecError, match=f"no datasets spec: .*{ENV_VAR}"):
        load_specs(None, environ={})
