"""Render docs/config.md from the field docstrings in schema.py (read with `ast`: dataclass
field docstrings are not kept at run time)."""

from __future__ import annotations

import ast
import dataclasses
import inspect

from flamingo_dist.config import schema as config_module
from flamingo_dist.config.flavors import FLAVORS


def field_docs() -> dict[str, dict[str, str]]:
    """{class name: {field name: docstring}} for every dataclass in schema.py."""
    tree = ast.parse(inspect.getsource(config_module))
    out: dict[str, dict[str, str]] = {}
    for node in tree.body:
        if not isinstance(node, ast.ClassDef):
            continue
        docs: dict[str, str] = {}
        body = node.body
        for i, stmt in enumerate(body):
            if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name):
                nxt = body[i + 1] if i + 1 < len(body) else None
                doc = ""
                if isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant) and isinstance(nxt.value.value, str):
                    doc = inspect.cleandoc(nxt.value.value)
                docs[stmt.target.id] = doc
        out[node.name] = docs
    return out


def render() -> str:
    docs = field_docs()
    lines = ["# Configuration reference", "",
             "Generated from the docstrings in `flamingo_dist/config/schema.py` by `python tools/gen_config_docs.py`;",
             "a test fails when this file is out of date. A YAML file selects values (`flavor:` first, then",
             "any field below, nested); `--set dotted.key=value` overrides one field on the command line.",
             f"Flavors: {', '.join(f'`{n}`' for n in FLAVORS)} (see `flamingo_dist/config/flavors.py`). Defaults below",
             "are the dataclass defaults; a flavor changes some of them.", ""]

    def section(cls, prefix: str, title: str, doc: str) -> None:
        default = cls()
        fields = dataclasses.fields(cls)
        lines.extend([f"## {title}", "", doc, ""] if doc else [f"## {title}", ""])
        leaves = [f for f in fields if not dataclasses.is_dataclass(getattr(default, f.name))]
        if leaves:
            lines.extend(["| field | default | meaning |", "| --- | --- | --- |"])
            for f in leaves:
                text = " ".join(docs[cls.__name__].get(f.name, "").split())
                lines.append(f"| `{prefix}{f.name}` | `{getattr(default, f.name)!r}` | {text} |")
            lines.append("")
        for f in fields:
            value = getattr(default, f.name)
            if dataclasses.is_dataclass(value):
                section(type(value), f"{prefix}{f.name}.", f"`{prefix}{f.name}`",
                        " ".join(docs[cls.__name__].get(f.name, "").split()))

    section(config_module.JobConfig, "", "Top level", "")
    section(config_module.SourceConfig, "data.sources[].", "`data.sources[]` entries",
            " ".join(inspect.cleandoc(config_module.SourceConfig.__doc__ or "").split()))
    return "\n".join(lines).rstrip() + "\n"
