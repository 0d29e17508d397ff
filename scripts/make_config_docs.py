"""Write docs/configuration.md, the configuration reference, from the dataclasses in transformer/config.py.

    python scripts/make_config_docs.py            # rewrite docs/configuration.md
    python scripts/make_config_docs.py --check    # exit 1 if docs/configuration.md is out of date

A key's meaning is the comment beside its field in transformer/config.py, and its type and default
are read from the dataclass, so the reference cannot drift from the code: tests/test_docs.py fails
when the committed file differs from what this script writes. A field without a comment is an error.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import io
import sys
import tokenize
import typing
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
# Describe this checkout's transformer/config.py, not whichever copy of the package is installed.
sys.path.insert(0, str(ROOT))

from transformer import config  # noqa: E402

OUTPUT = ROOT / "docs" / "configuration.md"
COMMAND = "python scripts/make_config_docs.py"

HEADER = """# Configuration reference

<!-- Generated from transformer/config.py by `{command}`: edit the field comments there, not this file. -->

A run is configured by one YAML file whose sections ({sections})
are typed dataclasses in `transformer/config.py`, with the paper's base setting as defaults. A file may leave out any
section or key; `configs/` holds complete examples. Every key can also be set on the command line
as a dotted override, parsed as a YAML scalar:

```bash
transformer-train --config configs/multi30k_de_en.yaml train.max_steps=200 train.output_dir=runs/short model.norm_first=true
```

Unknown keys are errors that suggest the nearest valid key, and types and ranges are checked
before anything runs. Keys that size memory (model dimensions, lengths, batch tokens, the beam...)
have upper limits, far above any recipe here, which `TRANSFORMER_SIZE_LIMITS` raises; they are
listed in [run-folder.md](run-folder.md#size-limits). The resolved config is saved as `config.yaml`
in the run directory and inside every checkpoint, so a checkpoint alone rebuilds its model.
"""


def field_comments(cls: type) -> dict[str, str]:
    """Field name -> the comment on its line (continued by comment-only lines right below it).

    Raises:
        ValueError: a field of `cls` has no comment.
    """
    source = inspect.getsource(cls)
    comments: dict[str, list[str]] = {}
    current, column = None, 0  # the field of the line being read, and where its name starts
    line_start = True
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type in (tokenize.NEWLINE, tokenize.NL):
            line_start = True
            continue
        if tok.type in (tokenize.INDENT, tokenize.DEDENT):
            continue
        if tok.type == tokenize.COMMENT:
            # A comment-only line continues the field's comment when indented past the field's name;
            # one at the name's column introduces what follows instead.
            if current is not None and (not line_start or (comments[current] and tok.start[1] > column)):
                comments[current].append(tok.string.lstrip("#").strip())
            line_start = False
            continue
        if line_start:
            current = None
            if tok.type == tokenize.NAME and tok.start[1] > 0:
                current, column = tok.string, tok.start[1]
                comments[current] = []
        line_start = False
    names = [f.name for f in dataclasses.fields(cls)]
    missing = [n for n in names if not comments.get(n)]
    if missing:
        raise ValueError(f"transformer/config.py: {cls.__name__} field(s) {', '.join(missing)} have no comment; "
                         "give each field a comment that says what it does")
    return {n: " ".join(comments[n]) for n in names}


def _type_name(tp: object) -> str:
    """`str | None` -> "str or null", as a YAML author reads it."""
    args = typing.get_args(tp)
    if args:
        return " or ".join("null" if a is type(None) else a.__name__ for a in args)
    return getattr(tp, "__name__", str(tp))


def _yaml_value(value: object) -> str:
    """The default as it would be written in a YAML file."""
    return yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def render() -> str:
    """The whole of docs/configuration.md."""
    sections = ", ".join(f"`{s.name}`" for s in dataclasses.fields(config.Config))
    parts = [HEADER.format(command=COMMAND, sections=sections)]
    for section in dataclasses.fields(config.Config):
        cls = typing.get_type_hints(config.Config)[section.name]
        hints = typing.get_type_hints(cls)
        comments = field_comments(cls)
        defaults = cls()
        parts.append(f"\n## `{section.name}`\n\n{inspect.getdoc(cls)}\n\n")
        parts.append("| key | type | default | meaning |\n|---|---|---|---|\n")
        for f in dataclasses.fields(cls):
            default = _yaml_value(getattr(defaults, f.name))
            parts.append(f"| `{section.name}.{f.name}` | {_type_name(hints[f.name])} | `{_cell(default)}` "
                         f"| {_cell(comments[f.name])} |\n")
    return "".join(parts)


def main() -> None:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only check that the file is current (exit 1 if not)")
    args = parser.parse_args()
    text = render()
    if args.check:
        if not OUTPUT.exists() or OUTPUT.read_text(encoding="utf-8") != text:
            sys.exit(f"{OUTPUT.relative_to(ROOT)} is out of date: run `{COMMAND}` and commit the result")
        return
    OUTPUT.parent.mkdir(parents=True, exist_ok=True)
    OUTPUT.write_text(text, encoding="utf-8")
    print(f"wrote {OUTPUT.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
