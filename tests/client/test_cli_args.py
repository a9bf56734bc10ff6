"""Command-line values: -p parameters, inputs, labels, and where outputs may be written."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import pytest

from jobmesh import InvalidArgument
from jobmesh.cli import args


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("n=3", ("n", 3)),
        ("ratio=0.5", ("ratio", 0.5)),
        ("flag=true", ("flag", True)),
        ("nothing=null", ("nothing", None)),
        ("sizes=[64,128]", ("sizes", [64, 128])),
        ('opts={"q": 90}', ("opts", {"q": 90})),
        ('quoted="42"', ("quoted", "42")),
        ("name=cat", ("name", "cat")),
        ("empty=", ("empty", "")),
        ("expr=a=b", ("expr", "a=b")),
        ("spaced=hello world", ("spaced", "hello world")),
        ("broken={not json", ("broken", "{not json")),
        ("nan=NaN", ("nan", "NaN")),
        ("inf=Infinity", ("inf", "Infinity")),
    ],
)
def test_params_are_json_when_they_are_json_else_strings(text: str, expected: Any) -> None:
    assert args.param(text) == expected


@pytest.mark.parametrize("text", ["novalue", "=3", ""])
def test_a_param_needs_a_key_and_an_equals_sign(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError, match="KEY=VALUE"):
        args.param(text)


def test_inputs_are_named_after_the_file_unless_named(tmp_path: Path) -> None:
    plain = tmp_path / "photo.jpg"
    odd = tmp_path / "a=b.txt"  # an existing file whose name holds '='
    for f in (plain, odd):
        f.write_bytes(b"x")
    assert args.input_file(str(plain)) == ("photo.jpg", plain)
    assert args.input_file(f"image={plain}") == ("image", plain)
    assert args.input_file(str(odd)) == ("a=b.txt", odd)


def test_reading_inputs_refuses_duplicates_and_missing_files(tmp_path: Path) -> None:
    f = tmp_path / "in.txt"
    f.write_bytes(b"hello")
    assert args.read_inputs([("in.txt", f)]) == {"in.txt": f}
    with pytest.raises(InvalidArgument, match="two inputs are named 'x'"):
        args.read_inputs([("x", f), ("x", f)])
    with pytest.raises(InvalidArgument, match="cannot read"):
        args.read_inputs([("gone", tmp_path / "gone")])


@pytest.mark.parametrize("name", ["thumb.png", "a.b.c", "_x", "two words.txt", "x" * 128])
def test_plain_output_names_land_in_the_directory(tmp_path: Path, name: str) -> None:
    assert args.output_path(tmp_path, name) == tmp_path / name


@pytest.mark.parametrize(
    "name",
    [
        *("", ".", "..", "../escape", "a/b", "/etc/passwd", "a\\b", "x..y", "a..b", "nul\0"),
        *("new\nline.png", "tab\t", "esc\x1b[31m", "-dash", ".hidden", "caf\u00e9", "x" * 129),
    ],
)
def test_output_names_that_are_not_payload_names_are_refused(tmp_path: Path, name: str) -> None:
    with pytest.raises(args.OutputRefused, match="refusing"):
        args.output_path(tmp_path, name)


def test_numbers_and_addresses_are_checked() -> None:
    assert args.positive("2") == 2
    assert args.count("0") == 0
    assert args.address("localhost:50051") == "localhost:50051"
    for bad, parse in (("0", args.positive), ("-1", args.count), ("nope", args.address)):
        with pytest.raises(argparse.ArgumentTypeError):
            parse(bad)
