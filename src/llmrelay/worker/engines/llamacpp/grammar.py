"""Constraints (worker/constraints.py) as llama.cpp grammars.

A constraint becomes GBNF: its JSON schemas through llama-cpp-python's own converter
(`llama_cpp.llama_grammar.SchemaConverter`, public methods only), its markers as literals,
and a `root` rule joining them. A lazy constraint (`tool_choice: auto`) becomes a lazy grammar
sampler, inactive until the generated text matches the opening marker (llama.cpp's trigger
patterns), which is fed to the grammar from the marker on.

That converter does not enforce every JSON-schema keyword (numeric bounds, `not`,
`uniqueItems`, ...): a schema using one is refused (400, naming the keyword and where it is)
rather than generating text that may not validate. Compiled grammars are cached per distinct
constraint; each sequence gets its own sampler (its own grammar state).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from llmrelay.protocol import ErrorCode
from llmrelay.worker.constraints import CompiledCache, Constraint
from llmrelay.worker.engines.base import EngineError

# Keywords that constrain values but that the converter ignores: refused, never hoped for.
UNENFORCED = ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "multipleOf",
              "minProperties", "maxProperties", "uniqueItems", "contains", "minContains",
              "maxContains", "patternProperties", "propertyNames", "not", "if", "then", "else",
              "dependentRequired", "dependentSchemas", "unevaluatedProperties",
              "unevaluatedItems")
# Where subschemas sit (anything else is a keyword's value, not a schema).
_SCHEMA_MAPS = ("properties", "$defs", "definitions")
_SCHEMA_LISTS = ("anyOf", "oneOf", "allOf", "prefixItems")
_SCHEMA_ONE = ("items", "additionalProperties")
CACHE_SIZE = 256


def check_schema(schema: Any, where: str = "schema") -> None:
    """Refuse what the grammar converter cannot enforce, naming the keyword and its place."""
    if isinstance(schema, bool):
        raise _refused(f"{where} is `{str(schema).lower()}`: give a schema object")
    if not isinstance(schema, dict):
        raise _refused(f"{where} must be a JSON schema object")
    for key in UNENFORCED:
        if key in schema:
            raise _refused(f"the JSON-schema keyword '{key}' (at {where}) cannot be enforced by "
                           "the llama.cpp engine's grammar; remove it from the schema")
    for key in _SCHEMA_MAPS:
        for name, sub in (schema.get(key) or {}).items():
            check_schema(sub, f"{where}.{key}.{name}")
    for key in _SCHEMA_LISTS:
        for i, sub in enumerate(schema.get(key) or []):
            check_schema(sub, f"{where}.{key}[{i}]")
    for key in _SCHEMA_ONE:
        sub = schema.get(key)
        if isinstance(sub, dict):
            check_schema(sub, f"{where}.{key}")
        elif isinstance(sub, list):
            for i, s in enumerate(sub):
                check_schema(s, f"{where}.{key}[{i}]")


def _refused(message: str) -> EngineError:
    return EngineError(message, ErrorCode.VALIDATION_TYPE_ERROR)


def literal(text: str) -> str:
    """A GBNF string literal."""
    escaped = (text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
               .replace("\r", "\\r").replace("\t", "\\t"))
    return f'"{escaped}"'


@dataclass(frozen=True)
class Grammar:
    """A compiled constraint: GBNF text, and the trigger pattern of a lazy one."""

    gbnf: str
    trigger: str | None = None


# A character inside a JSON string: the converter's own rule (`[^"\\]`) lets raw control
# characters through, which no JSON parser accepts; JSON (RFC 8259) and llama.cpp's newer
# converter exclude them.
STRICT_CHAR = (r'char ::= [^"\\\x7F\x00-\x1F] | "\\" (["\\/bfnrt] | "u" [0-9a-fA-F] [0-9a-fA-F] '
               r'[0-9a-fA-F] [0-9a-fA-F])')


def strict_strings(rules: str) -> str:
    """The converter's grammar with JSON's own rule for a string's characters."""
    return re.sub(r"^char ::= .*$", lambda _: STRICT_CHAR, rules, count=1, flags=re.M)


def compile_constraint(c: Constraint) -> Grammar:
    from llama_cpp.llama_grammar import SchemaConverter

    check_schema(c.schema)
    if c.alternative is not None:
        check_schema(c.alternative, "response_format.schema")
    conv = SchemaConverter(prop_order={"name": 0, "arguments": 1}, allow_fetch=False,
                           dotall=False, raw_pattern=False)
    try:
        value = conv.visit(conv.resolve_refs(c.schema, "input"), "constrained-value")
        answer = (conv.visit(conv.resolve_refs(c.alternative, "input"), "json-answer")
                  if c.alternative is not None else None)
        rules = strict_strings(conv.format_grammar())
    except Exception as e:  # the converter raises AssertionError, ValueError, KeyError, ...
        raise _refused(f"the JSON schema cannot be turned into a grammar: "
                       f"{type(e).__name__}: {e}") from e
    block = value
    if c.open or c.close:
        block = (f'{literal(c.open.rstrip())} "\\n"? {value} "\\n"? {literal(c.close.lstrip())}'
                 if c.open.endswith("\n") and c.close.startswith("\n")
                 else f"{literal(c.open)} {value} {literal(c.close)}")
    root = f"( {block} )"
    if c.max_blocks > 1:
        root = f'{root} ( "\\n"? {root} ){{0,{c.max_blocks - 1}}}'
    if answer is not None:
        root = f"( {root} ) | {answer}"
    trigger = None
    if c.lazy:
        trigger = r"[\s\S]*?(" + re.escape(c.open.rstrip()) + r")[\s\S]*"
    return Grammar(f"{rules}\nroot ::= {root}\n", trigger)


class GrammarCache(CompiledCache[Grammar]):
    """Compiled grammars by constraint key (least recently used dropped); thread-safe."""

    def __init__(self, size: int = CACHE_SIZE) -> None:
        super().__init__(compile_constraint, size)
