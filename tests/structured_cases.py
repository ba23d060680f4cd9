"""Structured outputs asked the same of every engine (test_tools.py: llama.cpp, the shared stack;
test_transformers.py: transformers): a pydantic model with bounds through the SDK's `.parse()`,
a schema with each family of JSON-Schema keywords OpenAI's strict mode accepts, and keywords no
engine can enforce, refused with the same 400."""

from __future__ import annotations

import json
import re
from datetime import date, datetime
from typing import Any

import jsonschema
import openai
from pydantic import BaseModel, Field


class Person(BaseModel):
    name: str = Field(max_length=20)
    age: int = Field(ge=0, le=150)


PEOPLE = ["Describe a newborn baby.", "Describe the oldest tortoise alive, 190 years old.",
          "Describe a retired teacher.", "Describe a person who is -5 years old."]

FAMILIES = {
    "type": "object",
    "properties": {
        "count": {"type": "integer", "minimum": 1, "maximum": 9},
        "ratio": {"type": "number", "exclusiveMinimum": 0, "exclusiveMaximum": 1},
        "step": {"type": "integer", "multipleOf": 5, "minimum": 0, "maximum": 100},
        "code": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{2}$"},
        "when": {"type": "string", "format": "date-time", "maxLength": 30},
        "day": {"type": "string", "format": "date"},
        "at": {"type": "string", "format": "time", "maxLength": 20},
        "email": {"type": "string", "format": "email", "maxLength": 30},
        "id": {"type": "string", "format": "uuid"},
        "nick": {"type": "string", "minLength": 2, "maxLength": 8},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 10},
                 "minItems": 1, "maxItems": 3},
        "choice": {"anyOf": [{"type": "integer"}, {"type": "string", "maxLength": 5}]},
        "color": {"type": "string", "enum": ["red", "green", "blue"]},
        "kind": {"type": "string", "const": "item"},
        "note": {"type": ["string", "null"], "maxLength": 20},
        "parent": {"anyOf": [{"$ref": "#/$defs/node"}, {"type": "null"}]},
    },
    "required": ["count", "ratio", "step", "code", "when", "day", "at", "email", "id", "nick",
                 "tags", "choice", "color", "kind", "note", "parent"],
    "additionalProperties": False,
    "$defs": {"node": {
        "type": "object",
        "properties": {"value": {"type": "integer", "minimum": 0, "maximum": 9},
                       "children": {"type": "array", "items": {"$ref": "#/$defs/node"},
                                    "maxItems": 2}},
        "required": ["value", "children"], "additionalProperties": False}},
}

_TIME = re.compile(r"^\d{2}:\d{2}:\d{2}(\.\d+)?(Z|[+-]\d{2}:\d{2})$", re.I)
CHECKER = jsonschema.FormatChecker()
CHECKER.checks("date-time")(lambda v: not isinstance(v, str) or bool(datetime.fromisoformat(v)))
CHECKER.checks("date")(lambda v: not isinstance(v, str) or bool(date.fromisoformat(v)))
CHECKER.checks("time")(lambda v: not isinstance(v, str) or bool(_TIME.match(v)))


def validate(value: Any, schema: dict[str, Any]) -> None:
    """Valid against `schema`, formats included (date-time, date, time, email, uuid)."""
    jsonschema.Draft202012Validator(schema, format_checker=CHECKER).validate(value)


def parse_people(client: openai.OpenAI, model: str) -> list[Person]:
    """`.parse()` with a bounded pydantic model over several prompts (some tempting the model
    out of bounds); every answer within them."""
    people = []
    for i, prompt in enumerate(PEOPLE):
        r = client.chat.completions.parse(
            model=model, messages=[{"role": "user", "content": prompt}], response_format=Person,
            temperature=0.8, seed=i, max_tokens=60)
        person = r.choices[0].message.parsed
        assert isinstance(person, Person), r
        assert 0 <= person.age <= 150 and len(person.name) <= 20, person
        people.append(person)
    return people


def every_family(client: openai.OpenAI, model: str, stream: bool = False) -> dict[str, Any]:
    """An answer to FAMILIES, valid against it."""
    kw: dict[str, Any] = dict(
        model=model, messages=[{"role": "user", "content": "Fill in a record as JSON."}],
        response_format={"type": "json_schema", "json_schema": {"name": "record",
                                                                "schema": FAMILIES}},
        temperature=0, max_tokens=400)
    if stream:
        text = "".join(c.choices[0].delta.content or "" for c in
                       client.chat.completions.create(stream=True, **kw) if c.choices)
    else:
        r = client.chat.completions.create(**kw)
        assert r.choices[0].finish_reason == "stop", r
        text = r.choices[0].message.content or ""
    value = json.loads(text)
    validate(value, FAMILIES)
    return value


UNENFORCEABLE = {
    "uniqueItems": {"type": "object", "properties": {
        "tags": {"type": "array", "items": {"type": "string"}, "uniqueItems": True}},
        "required": ["tags"]},
    "not": {"type": "object", "properties": {"x": {"not": {"type": "string"}}}},
    "contains": {"type": "array", "contains": {"type": "integer"}},
}


def refusals(client: openai.OpenAI, model: str) -> dict[str, dict[str, Any]]:
    """The 400 body for each UNENFORCEABLE keyword, as a response format and as a tool's
    parameters (each naming the keyword)."""
    out = {}
    for keyword, schema in UNENFORCEABLE.items():
        asks: dict[str, dict[str, Any]] = {
            "response_format": {"response_format": {
                "type": "json_schema", "json_schema": {"name": "x", "schema": schema}}},
            "tools": {"tools": [{"type": "function", "function": {
                "name": "f", "parameters": {"type": "object", "properties": {"a": schema}}}}],
                "tool_choice": "required"}}
        for where, ask in asks.items():
            try:
                client.chat.completions.create(
                    model=model, messages=[{"role": "user", "content": "Go."}], max_tokens=5,
                    **ask)
            except openai.BadRequestError as e:
                body = e.body if isinstance(e.body, dict) else {}
                assert f'"{keyword}"' in body.get("message", ""), body
                out[f"{keyword} in {where}"] = body
            else:
                raise AssertionError(f"'{keyword}' in {where} was accepted")
    return out
