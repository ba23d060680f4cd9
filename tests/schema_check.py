"""Validate our answers against the providers' published schemas, vendored in tests/schemas/
(sources in tests/schemas/README.md): OpenAI's OpenAPI components, the Open Responses spec,
Anthropic's types.

The documents are OpenAPI 3.1 (some of OpenAI's components still say `nullable: true`, as 3.0
did): `load` turns one into a JSON Schema that `jsonschema` validates with draft 2020-12, every
`$ref` pointing into its own `components`, and `nullable: true` becoming "or null".
"""

from __future__ import annotations

import copy
import json
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema

SCHEMAS = Path(__file__).parent / "schemas"
OPENAI = "openai.json"
OPEN_RESPONSES = "openresponses-2026-04-24.json"
ANTHROPIC = "anthropic.json"


def _json_schema(node: Any) -> Any:
    """OpenAPI's dialect -> plain JSON Schema: `nullable: true` -> anyOf [it, null]."""
    if isinstance(node, list):
        return [_json_schema(v) for v in node]
    if not isinstance(node, dict):
        return node
    out = {k: _json_schema(v) for k, v in node.items() if k != "nullable"}
    if node.get("nullable") is True:
        return {"anyOf": [out, {"type": "null"}]}
    return out


@cache
def load(document: str) -> dict[str, Any]:
    """A vendored document's components, as JSON Schema."""
    doc = json.loads((SCHEMAS / document).read_text())
    return {"components": _json_schema(doc["components"])}


def errors(document: str, component: str, instance: Any) -> list[str]:
    """What in `instance` breaks `component` of `document` (empty when it validates)."""
    schema = copy.copy(load(document))
    schema["$ref"] = f"#/components/schemas/{component}"
    validator = jsonschema.Draft202012Validator(schema)
    out = []
    for e in sorted(validator.iter_errors(instance), key=lambda e: list(e.absolute_path)):
        # a oneOf/anyOf failure says little by itself: name its closest branch's failure too
        best = jsonschema.exceptions.best_match(e.context) if e.context else None
        where = "/".join(str(p) for p in e.absolute_path) or "(top)"
        out.append(f"{where}: {e.message[:300]}"
                   + (f" [{'/'.join(map(str, best.absolute_path))}: {best.message[:200]}]"
                      if best is not None else ""))
    return out


def check(document: str, component: str, instance: Any) -> None:
    """Fails, naming every problem, unless `instance` is a valid `component` of `document`."""
    problems = errors(document, component, instance)
    assert not problems, (f"not a valid {component} ({document}):\n  " + "\n  ".join(problems)
                          + f"\n{json.dumps(instance)[:1500]}")
