"""README.md is the user's manual: what it names must exist, and its defaults must be the program's.

Pure and fast (no S3, no mount): the README is read as text and checked against the parsers,
the constants the defaults come from, and the ``--help`` texts, so that a renamed option, a
changed default or a new spec field fails here until the README says so too.

- Every option in the ``s3datafs mount`` table is an option of ``mount``, and every option of
  ``mount`` is in the table.
- Every default the table states is the one the program uses, and the one ``--help`` states.
- Every ``s3datafs ...`` command line in a code block of the README parses.
- The dataset spec's field table names exactly the fields (and aliases) the parser knows, and the
  README's example spec parses.
- The mount(8) options the README says are accepted and ignored are.
"""

from __future__ import annotations

import argparse
import re
import shlex
from pathlib import Path

import pytest

from s3datafs import config, datasets, mount_helper
from s3datafs.archive.index import parse_archive_mode
from s3datafs.cli import build_parser
from s3datafs.errors import ConfigError, UsageError
from s3datafs.plan import FsSettings
from s3datafs.s3source import S3Settings
from s3datafs.units import parse_size

README = (Path(__file__).resolve().parent.parent / "README.md").read_text(encoding="utf-8")
CODE_SPAN = re.compile(r"`([^`]+)`")


def section(heading: str) -> str:
    """The README's text from ``heading`` (a whole line) to the next heading of any level (a
    ``#`` line of a code block, a shell comment, is not one)."""
    lines = README.splitlines()
    start = lines.index(heading) + 1
    in_code = False
    for end in range(start, len(lines)):
        in_code ^= lines[end].startswith("```")
        if not in_code and re.match(r"#{1,6} ", lines[end]):
            break
    else:
        end = len(lines)
    return "\n".join(lines[start:end])


def table_rows(text: str) -> list[list[str]]:
    """The cells of every row of the first markdown table in ``text`` (no header, no rule)."""
    lines = [line for line in text.splitlines() if line.startswith("|")]
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in lines[2:]]


def subcommand(name: str) -> argparse.ArgumentParser:
    parser = build_parser([name])
    commands = next(action for action in parser._actions  # argparse lists them nowhere else
                    if isinstance(action, argparse._SubParsersAction))
    return commands.choices[name]


def visible_long_options(parser: argparse.ArgumentParser) -> set[str]:
    return {option for action in parser._actions if action.help != argparse.SUPPRESS
            for option in action.option_strings if option.startswith("--") and option != "--help"}


def help_of(parser: argparse.ArgumentParser, option: str) -> str:
    return next(action.help or "" for action in parser._actions if option in action.option_strings)


MOUNT_TABLE = table_rows(section("### `s3datafs mount URI [MOUNTPOINT] [options]`"))


def mount_table_cell(option: str) -> str:
    """The meaning cell of ``option``'s row in the ``mount`` table."""
    return next(meaning for names, meaning in MOUNT_TABLE
                if option in re.findall(r"--[a-z-]+", names))


def test_the_mount_table_names_every_option_of_mount_and_no_other() -> None:
    in_table = {option for names, _meaning in MOUNT_TABLE
                for option in re.findall(r"--[a-z-]+", names)}
    assert in_table == visible_long_options(subcommand("mount"))


def default_in_readme(option: str) -> str:
    found = re.search(r"default `([^`]+)`|`([^`]+)` \(default\)", mount_table_cell(option))
    assert found, f"the README's row of {option} states no default"
    return found[1] or found[2]


def size(text: str) -> int:
    return parse_size(text, "README")


# option -> (the value the program uses when it is not given, how the README's text reads)
PROGRAM_DEFAULTS = {
    "--read-timeout": (S3Settings.read_deadline, float),
    "--cache-size": (config.DEFAULT_DISK_CACHE, size),
    "--cache-min-free": (config.DEFAULT_CACHE_MIN_FREE, lambda text: float(text.strip("%")) / 100),
    "--block-size": (config.DEFAULT_BLOCK_SIZE, size),
    "--memory-cache-size": (config.DEFAULT_MEMORY_CACHE, size),
    "--max-prefetch-memory": (config.DEFAULT_MAX_PREFETCH, size),
    "--prefetch-files": (config.DEFAULT_PREFETCH_FILES, int),
    "--kernel-readahead": (config.DEFAULT_KERNEL_READAHEAD, size),
    "--archive": (parse_archive_mode(None), str),
}


@pytest.mark.parametrize("option", sorted(PROGRAM_DEFAULTS))
def test_a_default_the_readme_states_is_the_programs_and_the_helps(option: str) -> None:
    value, read = PROGRAM_DEFAULTS[option]
    stated = default_in_readme(option)
    assert read(stated) == value, f"README: {option} default {stated}; the program: {value}"
    if option != "--archive":  # its help says "(default)" after the mode's meaning
        assert stated.rstrip("%") in help_of(subcommand("mount"), option)


def test_the_filesystem_defaults_are_the_programs() -> None:
    cell = mount_table_cell("--file-mode")
    assert f"`{FsSettings.file_mode:04o}` and `{FsSettings.dir_mode:04o}`" in cell
    mount = subcommand("mount")
    assert mount.get_default("file_mode") == f"{FsSettings.file_mode:04o}"
    assert mount.get_default("dir_mode") == f"{FsSettings.dir_mode:04o}"


def test_the_credentials_file_modes_said_to_do_are_the_ones_that_do(tmp_path: Path) -> None:
    """The README's modes are read; a file its group may change, or others read, is refused;
    and ``--help`` names the same modes (it used to say 0600 alone)."""
    cell = mount_table_cell("--credentials-file")
    modes = re.findall(r"\b0[0-7]{3}\b", cell[cell.index("refused"):])
    assert len(modes) == 4
    keys = tmp_path / "credentials"
    keys.write_text("[default]\naws_access_key_id = AKIDEXAMPLE\naws_secret_access_key = s\n")
    for mode in modes:
        keys.chmod(int(mode, 8))
        assert config.read_credentials_file(keys, None).access_key_id == "AKIDEXAMPLE"
    for mode in (0o660, 0o620, 0o604, 0o602):
        keys.chmod(mode)
        with pytest.raises(ConfigError, match="open to other users"):
            config.read_credentials_file(keys, None)
    in_help = re.findall(r"\b0[0-7]{3}\b", help_of(subcommand("mount"), "--credentials-file"))
    assert set(in_help) == set(modes)


def readme_command_lines() -> list[str]:
    """Every ``s3datafs ...`` line of the README's code blocks (a ``$ `` prompt taken off)."""
    lines = []
    for block in re.findall(r"^```[a-z]*\n(.*?)^```", README, re.MULTILINE | re.DOTALL):
        for line in block.splitlines():
            line = line.removeprefix("$ ")
            if line.startswith("s3datafs "):
                lines.append(line.split("  #", 1)[0].strip())
    return lines


@pytest.mark.parametrize("line", readme_command_lines())
def test_every_command_line_of_the_readme_parses(line: str) -> None:
    argv = shlex.split(line)[1:]
    args, unknown = build_parser(argv).parse_known_args(argv)
    assert not unknown, f"{line}: not options of {args.subcommand}: {unknown}"
    # spelled out, not an abbreviation argparse would also take (``--arch``)
    own = argv[: argv.index("--")] if "--" in argv else argv
    actions = subcommand(argv[0])._actions
    spelled = {option for action in actions for option in action.option_strings}
    assert {word for word in own if word.startswith("-")} <= spelled


def test_the_readme_shows_command_lines() -> None:
    """So that the test above cannot pass by finding none."""
    commands = {shlex.split(line)[1] for line in readme_command_lines()}
    assert {"mount", "unmount", "status", "mount-all", "run", "snapshot", "diff"} <= commands


SPEC_SECTION = section("### Dataset specs")


def test_the_spec_field_table_names_every_field_and_alias() -> None:
    fields = set()
    for names, alias_cell, _meaning in table_rows(SPEC_SECTION):
        row_fields = CODE_SPAN.findall(names)
        fields.update(row_fields)
        for alias in CODE_SPAN.findall(alias_cell):  # a row of three keys shows the first's
            assert datasets.ALIASES[alias] == row_fields[0]
    assert fields == set(datasets.FIELDS)


def test_the_example_spec_parses(tmp_path: Path) -> None:
    example = re.search(r"```yaml\n(.*?)```", SPEC_SECTION, re.DOTALL)
    assert example is not None
    specs = datasets.parse_specs(example[1], origin="README", fmt="yaml", base_dir=tmp_path)
    assert [spec.name for spec in specs] == ["mnist", "train", "glue", "cifar10"]


MOUNT8_SECTION = section("## mount(8), fstab and systemd")


def test_the_mount8_options_said_to_be_ignored_are() -> None:
    paragraph = MOUNT8_SECTION[MOUNT8_SECTION.index("`_netdev`"):
                               MOUNT8_SECTION.index("are accepted and ignored")]
    named = [span.replace("*", "anything") for span in CODE_SPAN.findall(paragraph)]
    assert len(named) > 15
    translated = mount_helper.translate_options(",".join(named))
    assert translated.args == []
    assert sorted(translated.ignored) == sorted(named)
    for lifting in ("dev", "suid"):  # "refused"
        with pytest.raises(UsageError):
            mount_helper.translate_options(lifting)
    assert mount_helper.translate_options("noexec").args == ["--noexec"]


def test_the_mount8_lines_of_the_readme_translate() -> None:
    lines = re.findall(r"^mount -t s3datafs \S+ \S+ -o (\S+)$|^s3://\S+ +\S+ +s3datafs +(\S+) ",
                       README, re.MULTILINE)
    assert len(lines) >= 3
    for options in (dash_o or fstab for dash_o, fstab in lines):
        assert mount_helper.translate_options(options).args, options


def test_every_long_option_of_mount_but_two_is_an_o_option() -> None:
    table = mount_helper.option_table()
    expected = {option for option in visible_long_options(subcommand("mount"))
                if option not in ("--foreground", "--data-root")}
    assert {spec.long for spec in table.values()} == expected


def test_cache_clears_help_names_what_the_readme_says_it_deletes() -> None:
    """It said "delete cached blocks"; the README: blocks, zip member indexes and the catalogs
    kept of snapshot files."""
    cache_section = section("### `s3datafs cache stats [--json]`, `s3datafs cache clear [URI]`")
    deletes = cache_section[cache_section.index("`clear` deletes"):]
    actions = next(action for action in subcommand("cache")._actions
                   if isinstance(action, argparse._SubParsersAction))
    clear_help = next(choice.help for choice in actions._choices_actions
                      if choice.dest == "clear")
    for what in ("block", "member indexes", "snapshot"):
        assert what in deletes
        assert what in clear_help


def test_prefetch_archive_help_agrees_with_the_readme() -> None:
    """The README: a zip is warmed as the archive object itself (its blocks are what a mount
    reads members from); the help said ``--archive`` chose to "warm its members"."""
    prefetch_section = section("### `s3datafs prefetch URI|--snapshot FILE [options]`")
    assert "is warmed as the archive object itself" in prefetch_section
    archive_help = help_of(subcommand("prefetch"), "--archive")
    assert "warm its members" not in archive_help
    assert "warmed either way" in archive_help
