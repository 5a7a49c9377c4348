"""Dataset specs: the list of datasets a job platform hands to a job, parsed and checked.

A spec is a JSON or YAML list of objects, one per dataset (the shape Gradient's experiment
``datasets`` use); a mapping whose only key is ``datasets`` is unwrapped, so Gradient's own example
parses as it is written. Where a spec comes from: a file, ``-`` (stdin), or the
``S3DATAFS_DATASETS`` environment variable holding the spec text itself.

Rules and invariants:
- Every field has a camelCase spelling and (where Gradient's SDK uses one) a snake_case alias;
  giving both spellings of one field, or one key twice, is an error. Unknown fields are errors
  that name the field and suggest the closest known spelling.
- Nothing here touches S3 or the filesystem beyond reading the spec: the result is a list of
  frozen ``DatasetSpec`` values with URIs parsed, names derived and validated (Gradient's rule:
  basename without its extension), ETags normalized, conflicts refused and names unique. Turning
  them into mount plans is ``commands.mount_all``'s job.
- YAML is read with PyYAML's ``BaseLoader``: every scalar stays a string, so an all-digit ETag or
  a version id such as ``0123`` is never turned into a number. ``.json`` files are strict JSON;
  other input that starts with ``[`` or ``{`` is tried as JSON first, then as YAML (a superset
  that also forgives Gradient's trailing commas). Syntax errors name line and column.
- A null or empty value is the same as leaving the field out (templated specs often produce
  ``null`` for an unset key); ``uri`` must still be present.
- Secrets (secret key, session token) are excluded from ``repr`` and never appear in an error.
"""

from __future__ import annotations

import difflib
import json
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import yaml

from .config import credential_value
from .errors import ConfigError, S3DataFSError, UsageError
from .model import normalize_etag
from .uri import S3Uri, dataset_name, parse_s3_uri, validate_name

ENV_VAR = "S3DATAFS_DATASETS"

# canonical (camelCase) field -> DatasetSpec attribute
FIELDS: dict[str, str] = {
    "uri": "uri",
    "name": "name",
    "etag": "etag",
    "versionId": "version_id",
    "asOf": "as_of",
    "snapshot": "snapshot",
    "endpointUrl": "endpoint_url",
    "region": "region",
    "awsAccessKeyId": "access_key_id",
    "awsSecretAccessKey": "secret_access_key",
    "awsSessionToken": "session_token",
    "noSignRequest": "no_sign_request",
    "requesterPays": "requester_pays",
    "archive": "archive",
    "kernelReadahead": "kernel_readahead",
}
# Gradient SDK / snake_case spelling -> canonical field
ALIASES: dict[str, str] = {
    "version_id": "versionId",
    "as_of": "asOf",
    "endpoint_url": "endpointUrl",
    "aws_access_key_id": "awsAccessKeyId",
    "aws_secret_access_key": "awsSecretAccessKey",
    "aws_session_token": "awsSessionToken",
    "no_sign_request": "noSignRequest",
    "requester_pays": "requesterPays",
    "kernel_readahead": "kernelReadahead",
}
_SPELLINGS = {**{name: name for name in FIELDS}, **ALIASES}
_TRUE = frozenset({"true", "yes", "on", "1"})
_FALSE = frozenset({"false", "no", "off", "0"})
_YAML_NULLS = frozenset({"~", "null", "Null", "NULL"})


class SpecError(UsageError):
    """The spec is malformed or describes impossible datasets (exit 2, like a bad command line)."""

    def __init__(self, message: str, position: tuple[int, int] = (0, 0)) -> None:
        super().__init__(message)
        self.position = position  # (line, column) of a syntax error, for choosing between two


class DatasetError(S3DataFSError):
    """One dataset of a spec failed (to plan or to mount); the message names it."""

    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code


@dataclass(frozen=True)
class DatasetSpec:
    """One dataset of a spec, checked. ``name`` is always set (given, or derived from the URI)."""

    index: int  # 1-based position in the spec, for messages
    uri: S3Uri
    name: str
    etag: str | None = None  # normalized: quoted, as S3 sends it
    version_id: str | None = None
    as_of: str | None = None
    snapshot: Path | None = None
    endpoint_url: str | None = None
    region: str | None = None
    access_key_id: str | None = field(default=None, repr=False)
    secret_access_key: str | None = field(default=None, repr=False)
    session_token: str | None = field(default=None, repr=False)
    no_sign_request: bool | None = None  # None: not said, the command's default applies
    requester_pays: bool | None = None  # None: not said, the command's default applies
    name_given: bool = False  # False: ``name`` is derived from the URI (a snapshot may know better)
    archive: str | None = None  # "auto", "zip" or "file" (``mount --archive``); None: the command's
    kernel_readahead: str | None = None  # "128K" (``mount --kernel-readahead``); None: as archive

    @property
    def label(self) -> str:
        return f"dataset {self.name!r}"

    @property
    def has_keys(self) -> bool:
        return self.access_key_id is not None

    def secrets(self) -> list[str]:
        """Values to redact from every log (the key id too: it identifies the account)."""
        values = (self.access_key_id, self.secret_access_key, self.session_token)
        return [value for value in values if value]


# -- where a spec comes from -----------------------------------------------------------------


def read_spec_text(
    source: str | None, *, stdin: IO[str] | None = None, environ: Mapping[str, str] | None = None
) -> tuple[str, str, Path | None]:
    """(text, origin for messages, directory relative paths are taken from) of ``source``.

    ``None`` means the ``S3DATAFS_DATASETS`` variable, ``-`` stdin, anything else a file.
    """
    environ = os.environ if environ is None else environ
    if source is None:
        text = environ.get(ENV_VAR)
        if not text:
            raise SpecError(
                f"no datasets spec: give SPEC (a file, or - for stdin) or set {ENV_VAR}"
            )
        return text, f"${ENV_VAR}", None
    if source == "-":
        return (stdin or sys.stdin).read(), "<stdin>", None
    path = Path(source)
    try:
        # The directory of the path as given, its symlink not followed: a ConfigMap's
        # datasets.yaml links into a hidden ..2026_11_26_... directory of its volume.
        return path.read_text(encoding="utf-8"), str(path), Path(os.path.abspath(path)).parent
    except UnicodeDecodeError:
        raise ConfigError(f"datasets spec {path} is not UTF-8 text") from None
    except OSError as exc:
        raise ConfigError(f"cannot read datasets spec {path}: {exc.strerror}") from None


def load_specs(
    source: str | None, *, stdin: IO[str] | None = None, environ: Mapping[str, str] | None = None
) -> list[DatasetSpec]:
    """Read, parse and check the spec named by ``source`` (see ``read_spec_text``)."""
    text, origin, base = read_spec_text(source, stdin=stdin, environ=environ)
    fmt = (
        "json"
        if origin.endswith(".json")
        else "yaml"
        if origin.endswith((".yaml", ".yml"))
        else None
    )
    return parse_specs(text, origin=origin, fmt=fmt, base_dir=base)


def parse_specs(
    text: str, *, origin: str, fmt: str | None = None, base_dir: Path | None = None
) -> list[DatasetSpec]:
    """Parse spec ``text`` (``fmt`` "json", "yaml" or None to guess) and check every dataset."""
    document = _parse_document(text, origin, fmt)
    items = _dataset_list(document, origin)
    specs = [_check_item(item, index, origin, base_dir) for index, item in enumerate(items, 1)]
    _refuse_duplicate_names(specs, origin)
    return specs


# -- syntax ------------------------------------------------------------------------------------


def _parse_document(text: str, origin: str, fmt: str | None) -> Any:
    if fmt == "json":
        return _parse_json(text, origin)
    if fmt is None and text.lstrip().startswith(("[", "{")):
        try:
            return _parse_json(text, origin)
        except SpecError as json_error:
            try:
                return _parse_yaml(text, origin)
            except SpecError as yaml_error:
                # The parser that got further speaks: its format is the one the text is in. On
                # a tie (most slips in JSON, a missing comma, stop both at the same place) JSON
                # does: the text looks like JSON, and "invalid YAML" would puzzle its writer.
                raise max(json_error, yaml_error, key=lambda e: e.position) from None
    return _parse_yaml(text, origin)


def _parse_json(text: str, origin: str) -> Any:
    try:
        return json.loads(text, object_pairs_hook=_json_object)
    except json.JSONDecodeError as exc:
        raise SpecError(
            f"datasets spec {origin}: line {exc.lineno}, column {exc.colno}: "
            f"invalid JSON: {exc.msg}",
            (exc.lineno, exc.colno),
        ) from None
    except _DuplicateKey as exc:
        raise SpecError(f"datasets spec {origin}: field {exc.key!r} is given twice") from None
    except (RecursionError, ValueError) as exc:  # nesting past the stack; a 5,000-digit number
        raise SpecError(f"datasets spec {origin}: {_beyond(exc)}") from None


def _beyond(exc: Exception) -> str:
    return ("nested too deeply for a list of datasets" if isinstance(exc, RecursionError)
            else f"unusable JSON: {exc}")


class _DuplicateKey(Exception):
    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key


def _json_object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise _DuplicateKey(key)
        result[key] = value
    return result


class _SpecLoader(yaml.BaseLoader):
    """BaseLoader (every scalar a string) that refuses duplicate keys and knows plain nulls."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        result: dict[Any, Any] = {}
        merged: dict[Any, Any] = {}  # ``<<: *defaults``: under the mapping's own keys
        for key_node, value_node in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge" or (
                isinstance(key_node, yaml.ScalarNode) and key_node.value == "<<"
                and key_node.style is None
            ):
                for source in _merge_sources(value_node):
                    for key, value in self.construct_mapping(source, deep=deep).items():
                        merged.setdefault(key, value)  # the first source wins, as YAML says
                continue
            key = self.construct_object(key_node, deep=deep)
            if not isinstance(key, str):
                raise yaml.constructor.ConstructorError(
                    None, None, "a field name must be a string", key_node.start_mark
                )
            if key in result:
                raise yaml.constructor.ConstructorError(
                    None, None, f"field {key!r} is given twice", key_node.start_mark
                )
            result[key] = self._value(value_node, deep)
        return {**merged, **result}

    def _value(self, node: yaml.Node, deep: bool) -> Any:
        if isinstance(node, yaml.ScalarNode) and node.style is None and node.value in _YAML_NULLS:
            return None
        return self.construct_object(node, deep=deep)


def _merge_sources(node: yaml.Node) -> list[yaml.MappingNode]:
    """The mappings a merge key names: one, or a list of them."""
    sources = node.value if isinstance(node, yaml.SequenceNode) else [node]
    if not all(isinstance(source, yaml.MappingNode) for source in sources):
        raise yaml.constructor.ConstructorError(
            None, None, "'<<' merges a mapping or a list of mappings", node.start_mark)
    return sources


def _parse_yaml(text: str, origin: str) -> Any:
    try:
        return yaml.load(text, Loader=_SpecLoader)  # noqa: S506 - BaseLoader builds plain data
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        position = (mark.line + 1, mark.column + 1) if mark else (0, 0)
        where = f"line {position[0]}, column {position[1]}: " if mark else ""
        problem = exc.problem or exc.context or "malformed"
        raise SpecError(
            f"datasets spec {origin}: {where}invalid YAML: {problem}", position
        ) from None
    except yaml.YAMLError as exc:
        raise SpecError(f"datasets spec {origin}: invalid YAML: {exc}") from None
    except RecursionError as exc:
        raise SpecError(f"datasets spec {origin}: {_beyond(exc)}") from None


def _dataset_list(document: Any, origin: str) -> list[Any]:
    # ``datasets:``, beside which ``x-`` keys may hold what YAML anchors point at (the
    # convention of compose files): ``x-defaults: &defaults {...}``.
    if isinstance(document, dict) and "datasets" in document and all(
        key == "datasets" or str(key).startswith("x-") for key in document
    ):
        document = document["datasets"]
    if document is None or document == "":
        raise SpecError(f"datasets spec {origin} is empty: expected a list of datasets")
    if not isinstance(document, list):
        raise SpecError(
            f"datasets spec {origin} is not a list: expected a list of datasets such as "
            f'[{{"uri": "s3://bucket/key"}}] (or a mapping with a "datasets" key, and x- keys), '
            f"got {_kind(document)}"
        )
    return document


def _kind(value: Any) -> str:
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    return "a string"


# -- one dataset -------------------------------------------------------------------------------


def _check_item(item: Any, index: int, origin: str, base_dir: Path | None) -> DatasetSpec:
    where = f"datasets spec {origin}: dataset #{index}"
    if not isinstance(item, dict):
        raise SpecError(f"{where} is {_kind(item)}, not an object with a 'uri'")
    values = _canonical_fields(item, where)
    if "uri" not in values:
        raise SpecError(f"{where} has no 'uri' (required): e.g. uri: s3://bucket/key")
    try:
        uri = parse_s3_uri(values["uri"])
        name = validate_name(values.get("name") or dataset_name(uri))
    except UsageError as exc:
        raise SpecError(f"{where}: {exc}") from None
    where = f"datasets spec {origin}: dataset #{index} ({name!r})"
    spec = DatasetSpec(
        index=index,
        uri=uri,
        name=name,
        etag=normalize_etag(values["etag"]) if "etag" in values else None,
        version_id=values.get("versionId"),
        as_of=values.get("asOf"),
        snapshot=_snapshot_path(values.get("snapshot"), base_dir),
        endpoint_url=values.get("endpointUrl"),
        region=values.get("region"),
        access_key_id=_credential(values, "awsAccessKeyId", where),
        secret_access_key=_credential(values, "awsSecretAccessKey", where),
        session_token=_credential(values, "awsSessionToken", where),
        no_sign_request=values.get("noSignRequest"),
        requester_pays=values.get("requesterPays"),
        name_given="name" in values,
        archive=values.get("archive"),
        kernel_readahead=values.get("kernelReadahead"),
    )
    _refuse_conflicts(spec, where)
    return spec


def _credential(values: dict[str, Any], field_name: str, where: str) -> str | None:
    value = values.get(field_name)
    if value is None:
        return None
    try:
        return credential_value(value, f"{where}: {field_name!r}")
    except ConfigError as exc:
        raise SpecError(str(exc)) from None


def _canonical_fields(item: dict[Any, Any], where: str) -> dict[str, Any]:
    """Map every given field to its canonical name, with its value checked for type."""
    values: dict[str, Any] = {}
    given_as: dict[str, str] = {}
    for key, value in item.items():
        canonical = _SPELLINGS.get(key) if isinstance(key, str) else None
        if canonical is None:
            raise SpecError(f"{where}: {_unknown_field(str(key))}")
        if canonical in given_as:
            raise SpecError(
                f"{where}: {canonical!r} is given twice (as {given_as[canonical]!r} and {key!r})"
            )
        given_as[canonical] = key
        checked = _checked_value(canonical, key, value, where)
        if checked is not None:
            values[canonical] = checked
    return values


def _unknown_field(key: str) -> str:
    by_lower = {spelling.lower(): spelling for spelling in _SPELLINGS}
    close = difflib.get_close_matches(key.lower(), list(by_lower), n=1, cutoff=0.6)
    if close:
        return f"unknown field {key!r}: did you mean {by_lower[close[0]]!r}?"
    return f"unknown field {key!r}: known fields are {', '.join(FIELDS)}"


def _checked_value(canonical: str, key: str, value: Any, where: str) -> Any:
    """The field's value, or None when it is null or empty (the same as absent)."""
    if value is None or value == "":
        return None
    if canonical in ("noSignRequest", "requesterPays"):
        return _boolean(key, value, where)
    if canonical == "kernelReadahead" and isinstance(value, (int, float)) \
            and not isinstance(value, bool):
        return _byte_count(key, value, where)
    if not isinstance(value, str):
        raise SpecError(f"{where}: {key!r} must be a string, not {_kind(value)}")
    return value


def _byte_count(key: str, value: int | float, where: str) -> str:
    """A size given as a JSON/YAML number: bytes, as text the mount option's check takes. A
    whole float (``131072.0``, as Python's ``json`` writes a float) is one too; a fraction is
    refused here (``parse_size`` would cut ``4096.5`` to 4096 and ``1e-05`` to 0)."""
    if isinstance(value, float):
        if not value.is_integer():  # NaN and infinities too
            raise SpecError(f"{where}: {key!r} must be a size such as 128K or a whole number "
                            f"of bytes, not {value!r}")
        value = int(value)
    return str(value)


def _boolean(key: str, value: Any, where: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in _TRUE | _FALSE:
        return value.lower() in _TRUE
    raise SpecError(f"{where}: {key!r} must be true or false, not {value!r}")


def _snapshot_path(value: str | None, base_dir: Path | None) -> Path | None:
    if value is None:
        return None
    path = Path(value).expanduser()
    return path if path.is_absolute() or base_dir is None else base_dir / path


def _refuse_conflicts(spec: DatasetSpec, where: str) -> None:
    problem = _conflict(spec)
    if problem:
        raise SpecError(f"{where}: {problem}")


def _conflict(spec: DatasetSpec) -> str | None:
    if spec.uri.is_explicit_prefix:
        for pin, value in (("etag", spec.etag), ("versionId", spec.version_id)):
            if value is not None:
                return (
                    f"{pin!r} pins a single object but {spec.uri} is a prefix: "
                    f"remove {pin!r}, or name an object"
                )
    if spec.as_of is not None and spec.version_id is not None:
        return "'asOf' and 'versionId' both choose the version: keep one"
    if spec.snapshot is not None:
        for pin, value in (
            ("versionId", spec.version_id),
            ("etag", spec.etag),
            ("asOf", spec.as_of),
        ):
            if value is not None:
                return f"'snapshot' already pins every object: remove {pin!r}"
    return _credentials_conflict(spec)


def _credentials_conflict(spec: DatasetSpec) -> str | None:
    if (spec.access_key_id is None) != (spec.secret_access_key is None):
        given, missing = (
            ("awsAccessKeyId", "awsSecretAccessKey")
            if spec.access_key_id is not None
            else ("awsSecretAccessKey", "awsAccessKeyId")
        )
        return f"{given!r} is given without {missing!r}: give both, or neither"
    if spec.session_token is not None and spec.access_key_id is None:
        return "'awsSessionToken' needs 'awsAccessKeyId' and 'awsSecretAccessKey'"
    if spec.has_keys and spec.no_sign_request:
        return "'noSignRequest' and AWS keys contradict each other: keep one"
    return None


def _refuse_duplicate_names(specs: list[DatasetSpec], origin: str) -> None:
    first_with: dict[str, DatasetSpec] = {}
    for spec in specs:
        if spec.snapshot is not None and not spec.name_given:
            continue  # its snapshot file names it; mount-all checks the mount points it gets
        other = first_with.setdefault(spec.name, spec)
        if other is not spec:
            raise SpecError(
                f"datasets spec {origin}: datasets #{other.index} and #{spec.index} are both "
                f"named {spec.name!r}: give one of them another 'name'"
            )
