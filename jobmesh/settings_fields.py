"""Settings declared once, as dataclass fields: name, type, default, environment variable,
TOML key, flag and help. The environment, a TOML file, argparse flags and a README table
are read or made from these declarations by the functions here.

A field is declared with `setting(default, help=..., parse=..., read=...)`; the variable is
`JOBMESH_<NAME>`, the flag `--<name>` and the TOML key `[table] <name>`, unless declared
otherwise; without `read` it is not in a file. Fields declared without `setting` are
internal: not set from outside.
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import MISSING, Field, dataclass, field, fields
from itertools import chain
from typing import Any, TypeVar

T = TypeVar("T")

_SIZE_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_size(text: str) -> int:
    """A byte count such as `1048576`, `512M`, `512MiB` or `2G` (binary units); ValueError else."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(?:([KMGT])I?B?|B)?\s*", text.upper())
    if match is None:
        raise ValueError(f"expected a size such as 512M, 2G or a byte count, got {text!r}")
    return int(float(match[1]) * _SIZE_UNITS[match[2] or ""])


def typed(kind: Callable[[str], T]) -> Callable[[str], T]:
    """`kind` (int, float) as a parse whose error says "expected int, got 'many'"."""
    name = getattr(kind, "__name__", "value")

    def parse(text: str) -> T:
        try:
            return kind(text)
        except ValueError:
            raise ValueError(f"expected {name}, got {text!r}") from None

    parse.__name__ = name
    return parse


def parse_bool(text: str) -> bool:
    """true/false, yes/no, on/off or 1/0; ValueError else."""
    value = text.strip().lower()
    if value in ("true", "yes", "on", "1"):
        return True
    if value in ("false", "no", "off", "0"):
        return False
    raise ValueError(f"expected true or false, got {text!r}")


def concat(parts: Iterable[tuple[Any, ...]]) -> tuple[Any, ...]:
    """Values of a repeated flag, one after the other."""
    return tuple(chain.from_iterable(parts))


def by_key(parts: Iterable[tuple[tuple[str, T], ...]]) -> tuple[tuple[str, T], ...]:
    """(key, value) pairs from several sources, later ones winning key by key."""
    return tuple(dict(chain.from_iterable(parts)).items())


@dataclass(frozen=True)
class Setting:
    """How one settings field is set from outside the program."""

    help: str
    parse: Callable[[str], Any]
    """Reads the text of the environment variable and of each flag."""
    read: Callable[[Any], Any] | None = None
    """Reads the TOML value (the whole table if `whole`); None: not in the file."""
    name: str | None = None
    """The variable's, flag's and TOML key's name, if not the field's."""
    table: str = ""
    """The TOML table the key is in."""
    whole: bool = False
    """The field is the whole TOML table, not one key of it; `read` checks its keys."""
    file_key: str = ""
    """The file's key as the README shows it, if not `[table] name`."""
    env: bool = True
    flag: str = ""
    """The flag, if not --NAME."""
    metavar: str | None = None
    repeat: bool = False
    """The flag may be given several times; `combine` joins the values."""
    combine: Callable[[Iterable[Any]], Any] = concat
    layered: bool = False
    """File, environment and flags are combined (with `combine`) rather than replaced."""
    shown: str | None = None
    """The default as the README shows it, if not the value itself."""
    size: bool = False
    switch: bool = False
    """A boolean flag: given alone (`--insecure`) it means true."""
    secret: bool = False
    """The value is a credential: left out of the settings' repr, so no log shows it."""
    """A byte count: the README shows a default of whole MiB or GiB in those units."""


def setting(default: Any = MISSING, *, factory: Callable[[], Any] | None = None, **how: Any) -> Any:
    """A field set from outside: `how` is `Setting`'s fields. Without `parse`, the text is
    read as the default's type (int, float or str)."""
    if "parse" not in how:
        assert type(default) in (int, float, str), "declare `parse` for this type"
        how["parse"] = typed(type(default))
    metadata = {"setting": Setting(**how)}
    shown = not how.get("secret", False)
    if factory is not None:
        return field(default_factory=factory, metadata=metadata, repr=shown)
    return field(default=default, metadata=metadata, repr=shown)


def settings_of(cls: type) -> Iterator[tuple[Field[Any], Setting]]:
    """The fields of `cls` declared with `setting`, in order, with their declarations."""
    for f in fields(cls):
        if "setting" in f.metadata:
            yield f, f.metadata["setting"]


def key_name(f: Field[Any]) -> str:
    return str(f.metadata["setting"].name or f.name)


def env_name(f: Field[Any]) -> str:
    """The field's environment variable: JOBMESH_ and its name in capitals."""
    return "JOBMESH_" + key_name(f).upper()


def flag_name(f: Field[Any]) -> str:
    """The field's flag: --NAME with dashes, unless declared otherwise."""
    how: Setting = f.metadata["setting"]
    return how.flag or "--" + key_name(f).replace("_", "-")


def lay(values: dict[str, Any], f: Field[Any], value: Any) -> None:
    """Sets `value` over what `values` holds for the field: replacing it, or combined."""
    how: Setting = f.metadata["setting"]
    if how.layered and f.name in values:
        value = how.combine([values[f.name], value])
    values[f.name] = value


def lay_env(cls: type, values: dict[str, Any], env: Mapping[str, str]) -> None:
    """Lays the environment's values over `values` (field name to value)."""
    for f, how in settings_of(cls):
        variable = env_name(f)
        if how.env and variable in env:
            try:
                value = how.parse(env[variable])
            except ValueError as exc:
                raise ValueError(f"{variable}: {exc}") from None
            lay(values, f, value)


def add_arguments(
    parser: argparse.ArgumentParser,
    cls: type,
    only: Iterable[str] | None = None,
    notes: Mapping[str, str] | None = None,
) -> None:
    """One flag per setting of `cls` (`only` those fields, if given), `notes` appended to
    their help. A flag not given is absent from the namespace (its dest is the field's name),
    so lower layers' values stay."""
    wanted = None if only is None else set(only)
    notes = notes or {}
    for f, how in settings_of(cls):
        if wanted is not None and f.name not in wanted:
            continue
        env = f"env {env_name(f)}; " if how.env else ""
        default = shown_default(f).replace("`", "") or "none"
        switch: dict[str, Any] = {"nargs": "?", "const": True} if how.switch else {}
        parser.add_argument(
            flag_name(f),
            dest=f.name,
            type=_flag_type(how.parse),
            action="append" if how.repeat else "store",
            metavar=how.metavar,
            default=argparse.SUPPRESS,
            help=f"{how.help}{notes.get(f.name, '')} ({env}default {default})",
            **switch,
        )


def flag_values(cls: type, args: argparse.Namespace, current: Any) -> dict[str, Any]:
    """The fields the flags in `args` set, laid over `current`'s values."""
    values: dict[str, Any] = {}
    for f, how in settings_of(cls):
        given = getattr(args, f.name, None)
        if given is not None:
            values[f.name] = getattr(current, f.name)
            lay(values, f, how.combine(given) if how.repeat else given)
    return values


def _flag_type(parse: Callable[[str], T]) -> Callable[[str], T]:
    def convert(text: str) -> T:
        try:
            return parse(text)
        except ValueError as exc:  # argparse would drop the message
            raise argparse.ArgumentTypeError(str(exc)) from None

    convert.__name__ = getattr(parse, "__name__", "value")
    return convert


def file_values(cls: type, data: Mapping[str, Any]) -> dict[str, Any]:
    """The fields a parsed TOML document sets; ValueError naming the table and key of
    anything unknown or wrong."""
    in_file = [(f, how) for f, how in settings_of(cls) if how.read is not None]
    tables = tuple(dict.fromkeys(how.table for _, how in in_file))
    known_keys("the file", data, tables)
    values: dict[str, Any] = {}
    for name in tables:
        if name not in data:
            continue
        table = data[name]
        if not isinstance(table, Mapping):
            raise ValueError(f"{name} must be a table ([{name}])")
        members = [(f, how) for f, how in in_file if how.table == name]
        keys = {key_name(f): (f, how) for f, how in members if not how.whole}
        if keys:
            known_keys(f"[{name}]", table, tuple(keys))
        for f, how in members:
            read = how.read
            assert read is not None
            if how.whole:
                values[f.name] = read(table)
            elif (key := key_name(f)) in table:
                try:
                    values[f.name] = read(table[key])
                except ValueError as exc:
                    raise ValueError(f"[{name}] {key}: {exc}") from None
    return values


def known_keys(where: str, table: Mapping[str, Any], known: tuple[str, ...]) -> None:
    """ValueError naming the keys of `table` that are not `known`."""
    if unknown := sorted(set(table) - set(known)):
        raise ValueError(
            f"{where}: unknown key{'s' if len(unknown) > 1 else ''} "
            f"{', '.join(map(repr, unknown))}; expected {', '.join(known)}"
        )


def toml_str(value: object) -> str:
    if not isinstance(value, str):
        raise ValueError(f"expected a string, got {value!r}")
    return value


def toml_bool(value: object) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"expected true or false, got {value!r}")
    return value


def toml_int(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"expected an integer, got {value!r}")
    return value


def toml_number(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"expected a number, got {value!r}")
    return float(value)


def toml_size(value: object) -> int:
    return parse_size(value) if isinstance(value, str) else toml_int(value)


def markdown_rows(cls: type, *, file: bool = True) -> list[str]:
    """A README table row per setting: flag, env, config file key (if `file`), default, help."""
    rows = []
    for f, how in settings_of(cls):
        env = f"`{env_name(f)}`" if how.env else ""
        key = "" if how.read is None else how.file_key or f"`[{how.table}]` {key_name(f)}"
        cells = [f"`{flag_name(f)}`", env, *([key] if file else []), shown_default(f), how.help]
        rows.append(f"| {' | '.join(cells)} |")
    return rows


def shown_default(f: Field[Any]) -> str:
    """The field's default as the README shows it."""
    how: Setting = f.metadata["setting"]
    if how.shown is not None:
        return how.shown
    value = f.default
    if isinstance(value, tuple):
        value = ",".join(value)
    if value == "":
        return ""
    if isinstance(value, float):
        return f"`{value:g}` s"
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20)):
        if how.size and isinstance(value, int) and value >= size and value % size == 0:
            return f"{value // size} {unit}"
    return f"`{value}`"
