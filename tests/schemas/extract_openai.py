"""Extract the component schemas the tests validate against from OpenAI's OpenAPI document.

    python tests/schemas/extract_openai.py path/to/openai-openapi/openapi.json COMMIT DATE

writes tests/schemas/openai.json: the named roots (ROOTS) and every component they reference,
unchanged, with the source in `$comment`. The document itself is too large to vendor whole.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

ROOTS = ["CreateChatCompletionResponse", "CreateChatCompletionStreamResponse",
         "CreateCompletionResponse", "ErrorResponse"]
PREFIX = "#/components/schemas/"


def refs(node: Any) -> set[str]:
    """The component names `node` references."""
    if isinstance(node, dict):
        out = set()
        for key, value in node.items():
            if key == "$ref" and isinstance(value, str) and value.startswith(PREFIX):
                out.add(value[len(PREFIX):])
            else:
                out |= refs(value)
        return out
    if isinstance(node, list):
        return set().union(*(refs(v) for v in node)) if node else set()
    return set()


def closure(schemas: dict[str, Any], roots: list[str]) -> dict[str, Any]:
    todo, seen = list(roots), {}
    while todo:
        name = todo.pop()
        if name not in seen:
            seen[name] = schemas[name]
            todo += sorted(refs(schemas[name]) - seen.keys())
    return dict(sorted(seen.items()))


def main(path: str, commit: str, date: str) -> None:
    doc = json.loads(Path(path).read_text())
    out = {
        "$comment": f"Extracted by tests/schemas/extract_openai.py from openai/openai-openapi, "
                    f"openapi.json at commit {commit} ({date}), OpenAPI {doc['openapi']}, API "
                    f"version {doc['info']['version']}: the components {', '.join(ROOTS)} and "
                    "everything they reference, unchanged.",
        "openapi": doc["openapi"],
        "components": {"schemas": closure(doc["components"]["schemas"], ROOTS)},
    }
    target = Path(__file__).with_name("openai.json")
    target.write_text(json.dumps(out, indent=1, ensure_ascii=False) + "\n")
    print(f"{target}: {len(out['components']['schemas'])} schemas")


if __name__ == "__main__":
    main(*sys.argv[1:4])
