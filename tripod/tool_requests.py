"""The structured parts of a chat request: ``tools`` with ``tool_choice``, and ``response_format``.

Validated at the edge like the rest of a body (``tripod/protocol.py`` calls these), so that a tool without a name, a
schema that is not one, or a schema the grammar engine cannot enforce is a 400 naming the field, before anything
reaches a worker. Schemas travel on as JSON text: the job protocol carries strings, and the grammar engine takes them.
"""

from __future__ import annotations

import json
import re
from typing import Any

from jsonschema import Draft202012Validator, SchemaError

from tripod.errors import InvalidRequest

MAX_TOOLS = 128
MAX_SCHEMA_BYTES = 64 * 1024
# OpenAI's rule for function and schema names.
_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


def _schema_text(value: Any, param: str) -> str:
    """A JSON Schema object as compact JSON text, after checking that it is one (Draft 2020-12) and not too big."""
    if not isinstance(value, dict):
        raise InvalidRequest(f"'{param}' must be a JSON Schema object.", param=param, code="invalid_type")
    try:
        Draft202012Validator.check_schema(value)
    except SchemaError as exc:
        where = "/".join(str(part) for part in exc.path)
        raise InvalidRequest(
            f"'{param}' is not a valid JSON Schema: {exc.message}" + (f" (at '{where}')" if where else ""),
            param=param,
            code="invalid_schema",
        ) from None
    text = json.dumps(value, separators=(",", ":"), ensure_ascii=False)
    if len(text.encode()) > MAX_SCHEMA_BYTES:
        raise InvalidRequest(
            f"'{param}' is {len(text.encode())} bytes of JSON; the limit is {MAX_SCHEMA_BYTES}.",
            param=param,
            code="schema_too_large",
        )
    return text


def _enforceable(schema: str, param: str) -> None:
    """Refuse a schema the grammar engine cannot compile: the reply would not be held to it."""
    from tripod.engines.grammar import validate_response_format
    from tripod.protocol import ResponseFormat

    problem = validate_response_format(ResponseFormat("json_schema", schema))
    if problem:
        raise InvalidRequest(
            f"'{param}' cannot be enforced by this server's grammar engine: {problem}",
            param=param,
            code="unsupported_schema",
        )


def _name(value: Any, param: str) -> str:
    if value is None:
        raise InvalidRequest(f"'{param}' is required.", param=param, code="missing_required_parameter")
    if not isinstance(value, str) or not _NAME.match(value):
        raise InvalidRequest(
            f"'{param}' must be 1 to 64 letters, digits, '_' or '-', got {value!r}.", param=param, code="invalid_value"
        )
    return value


def _strict(value: Any, param: str) -> bool:
    if value is None:
        return False
    if not isinstance(value, bool):
        raise InvalidRequest(f"'{param}' must be a boolean.", param=param, code="invalid_type")
    return value


def parse_response_format(value: Any):
    """``response_format``: None for plain text, else a :class:`~tripod.protocol.ResponseFormat`."""
    from tripod.protocol import ResponseFormat

    if value is None:
        return None
    if not isinstance(value, dict):
        raise InvalidRequest("'response_format' must be an object.", param="response_format", code="invalid_type")
    kind = value.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return ResponseFormat("json_object")
    if kind != "json_schema":
        raise InvalidRequest(
            f"'response_format.type' must be 'text', 'json_object' or 'json_schema', got {kind!r}.",
            param="response_format.type",
            code="invalid_value",
        )
    spec = value.get("json_schema")
    if not isinstance(spec, dict):
        raise InvalidRequest(
            "'response_format.json_schema' must be an object with 'name' and 'schema'.",
            param="response_format.json_schema",
            code="invalid_type",
        )
    name = _name(spec.get("name"), "response_format.json_schema.name")
    param = "response_format.json_schema.schema"
    # OpenAI lets 'schema' out for "any JSON"; a schema of {} says the same to the grammar.
    schema = _schema_text(spec.get("schema", {}), param)
    _enforceable(schema, param)
    strict = _strict(spec.get("strict"), "response_format.json_schema.strict")
    return ResponseFormat("json_schema", schema, name=name, strict=strict)


def _tool(value: Any, where: str):
    from tripod.protocol import Tool

    if not isinstance(value, dict):
        raise InvalidRequest(f"'{where}' must be an object.", param=where, code="invalid_type")
    if value.get("type") != "function":
        raise InvalidRequest(
            f"'{where}.type' must be 'function', got {value.get('type')!r}.",
            param=f"{where}.type",
            code="unsupported_value",
        )
    function = value.get("function")
    if not isinstance(function, dict):
        raise InvalidRequest(
            f"'{where}.function' must be an object with a 'name'.", param=f"{where}.function", code="invalid_type"
        )
    where = f"{where}.function"
    name = _name(function.get("name"), f"{where}.name")
    description = function.get("description") or ""
    if not isinstance(description, str):
        raise InvalidRequest(f"'{where}.description' must be a string.", param=f"{where}.description")
    # No parameters: a function of no arguments, as OpenAI reads it.
    parameters = _schema_text(function.get("parameters", {"type": "object", "properties": {}}), f"{where}.parameters")
    return Tool(name, description, parameters, strict=_strict(function.get("strict"), f"{where}.strict"))


def _choice(value: Any, names: list[str]) -> tuple[str, str | None]:
    """``tool_choice`` as (choice, function name): "none", "auto", "required" or ("function", name)."""
    if value is None:
        return ("auto" if names else "none"), None
    if value in ("none", "auto", "required"):
        return value, None
    if isinstance(value, dict) and value.get("type") == "function":
        function = value.get("function")
        name = function.get("name") if isinstance(function, dict) else None
        if not isinstance(name, str):
            raise InvalidRequest(
                "'tool_choice.function.name' is required.",
                param="tool_choice.function.name",
                code="missing_required_parameter",
            )
        if name not in names:
            raise InvalidRequest(
                f"'tool_choice' names the function {name!r}, which is not among 'tools'.",
                param="tool_choice",
                code="invalid_value",
            )
        return "function", name
    raise InvalidRequest(
        "'tool_choice' must be 'none', 'auto', 'required' or {'type': 'function', 'function': {'name': ...}}.",
        param="tool_choice",
        code="invalid_value",
    )


def parse_tool_use(body: dict[str, Any]):
    """``tools``, ``tool_choice`` and ``parallel_tool_calls`` as a :class:`~tripod.protocol.ToolUse`, or None when
    the model is offered no tool (none given, or ``tool_choice`` "none")."""
    from tripod.protocol import ToolUse

    raw = body.get("tools")
    if raw is None:
        raw = []
    if not isinstance(raw, list):
        raise InvalidRequest("'tools' must be a list of tool objects.", param="tools", code="invalid_type")
    if len(raw) > MAX_TOOLS:
        raise InvalidRequest(
            f"'tools' has {len(raw)} tools; the limit is {MAX_TOOLS}.", param="tools", code="too_many_tools"
        )
    tools = []
    for i, value in enumerate(raw):
        tool = _tool(value, f"tools[{i}]")
        if any(other.name == tool.name for other in tools):
            raise InvalidRequest(
                f"Two tools are named {tool.name!r}.", param=f"tools[{i}].function.name", code="duplicate_tool_name"
            )
        tools.append(tool)
    parallel = body.get("parallel_tool_calls")
    if parallel is not None and not isinstance(parallel, bool):
        raise InvalidRequest("'parallel_tool_calls' must be a boolean.", param="parallel_tool_calls")
    choice, function = _choice(body.get("tool_choice"), [tool.name for tool in tools])
    if choice in ("required", "function") and not tools:
        raise InvalidRequest(
            f"'tool_choice' is {choice!r} but the request offers no 'tools'.", param="tool_choice", code="invalid_value"
        )
    if choice == "none" or not tools:
        return None
    forced = [tool for tool in tools if choice == "required" or tool.name == function]
    for tool in forced:  # a forced call is held to its schema by the grammar: it must compile
        _enforceable(tool.parameters, f"tools[{tools.index(tool)}].function.parameters")
    # A named function is exactly one call of it.
    return ToolUse(tuple(tools), choice, function, parallel=parallel is not False and choice != "function")
