"""Constrained decoding in the engine: JSON-schema and JSON-object outputs on both runners, masks only on
the rows that asked, seeded sampling inside the grammar, and the compile guards (grammar.py)."""

from __future__ import annotations

import json
from typing import Any

import jsonschema_rs
import pytest

from node.serving import Constraint, Engine, FastRunner, GrammarError, HFRunner, SamplingParams
from node.serving.grammar import UNENFORCED, unenforced_keywords
from tests.node.serving.conftest import CharTokenizer, hf_greedy, run_together, tiny_qwen, token_ids

SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "urgency": {"enum": ["routine", "urgent", "emergency"]},
        "admit": {"type": "boolean"},
        "note": {"type": "string", "maxLength": 8},
    },
    "required": ["urgency", "admit", "note"],
    "additionalProperties": False,
}
PROMPTS = [[5, 9, 14, 3], [40, 2, 77], [8, 8, 30, 31, 60]]


@pytest.fixture(scope="module")
def model() -> Any:
    return tiny_qwen(seed=3)


def make_engine(model: Any, kind: str) -> Engine:
    runner: Any = (
        FastRunner(model, max_slots=4, max_len=256, cuda_graphs=False, fused=False)
        if kind == "fast"
        else HFRunner(model, max_slots=4, max_len=256)
    )
    return Engine(runner, CharTokenizer())


@pytest.mark.parametrize("kind", ["fast", "hf"])
def test_schema_output_parses_and_validates_and_other_rows_are_untouched(model: Any, kind: str) -> None:
    engine = make_engine(model, kind)
    schema = Constraint.json_schema(SCHEMA)
    requests = [
        (PROMPTS[0], SamplingParams(max_tokens=None, constraint=schema), None),  # greedy in the grammar
        (PROMPTS[1], SamplingParams(max_tokens=None, temperature=1.0, seed=11, constraint=schema), None),
        (PROMPTS[2], SamplingParams(max_tokens=12, ignore_eos=True), None),  # no constraint, same batch
    ]
    try:
        events = run_together(engine, requests)
    finally:
        engine.stop()
    validator = jsonschema_rs.validator_for(SCHEMA)
    for evs in events[:2]:
        text = "".join(e.text for e in evs)
        assert evs[-1].finish_reason == "stop", text  # the grammar ended it: only EOS was allowed
        validator.validate(json.loads(text))
    assert token_ids(events[2]) == hf_greedy(model, PROMPTS[2], 12)  # its row was never masked


def test_seeded_sampling_in_the_grammar_repeats_in_any_batch(model: Any) -> None:
    params = SamplingParams(max_tokens=None, temperature=1.0, seed=5, constraint=Constraint.json_schema(SCHEMA))
    outputs = []
    for company in ([], [(PROMPTS[2], SamplingParams(max_tokens=30, ignore_eos=True), None)]):
        engine = make_engine(model, "fast")
        try:
            events = run_together(engine, [(PROMPTS[0], params, None), *company])
        finally:
            engine.stop()
        outputs.append(token_ids(events[0]))
    assert outputs[0] == outputs[1]


def test_json_object_is_an_object(model: Any) -> None:
    engine = make_engine(model, "fast")
    try:
        events = run_together(
            engine, [(PROMPTS[1], SamplingParams(max_tokens=None, constraint=Constraint.json_object()), None)]
        )
    finally:
        engine.stop()
    text = "".join(e.text for e in events[0])
    assert events[0][-1].finish_reason == "stop", text
    assert isinstance(json.loads(text), dict)


def test_refusals_come_before_anything_runs(model: Any) -> None:
    engine = make_engine(model, "hf")
    try:
        for schema in ({"type": "object"}, {}, {"type": "nonsense"}):  # generic (too costly) or invalid
            with pytest.raises(GrammarError):
                engine.submit([5], SamplingParams(constraint=Constraint.json_schema(schema)), on_event=print)
        # a schema whose automaton explodes (outlines-core: maxLength 16 took 7.9 s, 20 over a minute,
        # even over this 512-token vocabulary) is cut off and its compile process replaced
        engine.grammars.compile_timeout_s = 1.0
        with pytest.raises(GrammarError, match="did not compile within"):
            engine.grammars.guide(Constraint.json_schema({"type": "string", "maxLength": 40}))
        engine.grammars.compile_timeout_s = 30.0
        assert engine.grammars.guide(Constraint.json_schema(SCHEMA)) is not None  # a fresh process compiles
        assert engine.stats()["waiting"] == 0
    finally:
        engine.stop()


# ---- keywords outlines leaves out ---------------------------------------------------------------------

_BASE_FOR: dict[str, dict[str, Any]] = {
    "number": {"type": "integer"},
    "array": {"type": "array", "items": {"type": "integer"}},
    "object": {"type": "object", "properties": {"a": {"type": "integer"}}},
}
_EXAMPLE: dict[str, tuple[str, Any]] = {
    "minimum": ("number", 3),
    "maximum": ("number", 3),
    "exclusiveMinimum": ("number", 3),
    "exclusiveMaximum": ("number", 3),
    "multipleOf": ("number", 3),
    "uniqueItems": ("array", True),
    "contains": ("array", {"const": 1}),
    "minContains": ("array", 1),
    "maxContains": ("array", 2),
    "minProperties": ("object", 1),
    "maxProperties": ("object", 1),
    "not": ("number", {"const": 1}),
    "if": ("number", {"const": 1}),
    "then": ("number", {"const": 1}),
    "else": ("number", {"const": 2}),
    "propertyNames": ("object", {"pattern": "a"}),
    "patternProperties": ("object", {"b": {"type": "integer"}}),
    "dependentRequired": ("object", {"a": ["b"]}),
    "dependentSchemas": ("object", {"a": {"required": ["b"]}}),
}


def test_every_keyword_called_unenforced_leaves_the_expression_unchanged() -> None:
    """The list is measured, not assumed: outlines builds the same expression with and without each
    keyword, and a different one for keywords it does hold."""
    assert set(_EXAMPLE) == UNENFORCED
    for keyword, (kind, value) in _EXAMPLE.items():
        base = _BASE_FOR[kind]
        assert Constraint.json_schema({**base, keyword: value}).to_regex() == Constraint.json_schema(base).to_regex()
    for kind, keyword, value in (("number", "enum", [1, 2]), ("array", "minItems", 2), ("object", "required", ["a"])):
        base = _BASE_FOR[kind]
        assert Constraint.json_schema({**base, keyword: value}).to_regex() != Constraint.json_schema(base).to_regex()


def test_unenforced_keywords_are_found_in_subschemas_only() -> None:
    schema = {
        "type": "object",
        "properties": {
            "minimum": {"type": "integer", "maximum": 9},  # a property named like a keyword
            "doses": {"type": "array", "items": {"type": "integer", "minimum": 1}, "uniqueItems": True},
            "code": {"enum": [{"minimum": 1}]},  # data, not a schema
        },
        "$defs": {"x": {"anyOf": [{"type": "number", "multipleOf": 2}, {"type": "null"}]}},
    }
    assert sorted(unenforced_keywords(schema)) == [
        (".$defs.x.anyOf[0]", "multipleOf"),
        (".properties.doses", "uniqueItems"),
        (".properties.doses.items", "minimum"),
        (".properties.minimum", "maximum"),
    ]
    assert unenforced_keywords(SCHEMA) == []
