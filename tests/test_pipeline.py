"""Pipeline text: parsing, printing (round trip), named pipelines and syntax errors."""

import re

import pytest

from mmcompile.errors import PipelineError
from mmcompile.transform import NAMED_PIPELINES, Fixpoint, PassSpec, Pipeline, parse_pipeline


@pytest.mark.parametrize("text", [
    "fold-constants",
    "fold-constants,eliminate-dead-code",
    "fold-constants{size_threshold=1024}",
    "fold-constants{size_threshold=1024,fold_shapes=false},eliminate-dead-code",
    "fixpoint(fold-constants,eliminate-dead-code)",
    "fixpoint(fold-constants,eliminate-dead-code){max_iterations=3}",
    "a,fixpoint(b{k=v}){max_iterations=2},c",
    "fixpoint()",
    "",
])
def test_print_parse_round_trip(text):
    parsed = parse_pipeline(text)
    printed = str(parsed)
    assert printed == text
    assert parse_pipeline(printed) == parsed


def test_parse_builds_specs_with_options_as_given():
    pipeline = parse_pipeline("fold-constants{size_threshold=1024},eliminate-dead-code")
    assert pipeline.items == (PassSpec("fold-constants", (("size_threshold", "1024"),)),
                              PassSpec("eliminate-dead-code"))


def test_fixpoint_group_and_max_iterations():
    pipeline = parse_pipeline("a,fixpoint(b,c){max_iterations=4}")
    assert pipeline.items[0] == PassSpec("a")
    group = pipeline.items[1]
    assert isinstance(group, Fixpoint)
    assert group.items == (PassSpec("b"), PassSpec("c"))
    assert group.max_iterations == 4
    assert pipeline.pass_names() == ["a", "b", "c"]


def test_default_max_iterations_is_not_printed_and_reparses_equal():
    explicit = parse_pipeline("fixpoint(a){max_iterations=10}")
    assert explicit.items[0].max_iterations == 10
    assert str(explicit) == "fixpoint(a)"
    assert parse_pipeline(str(explicit)) == explicit


def test_whitespace_is_ignored():
    assert parse_pipeline(" a , fixpoint( b , c ) { max_iterations = 2 } ") == \
        parse_pipeline("a,fixpoint(b,c){max_iterations=2}")


def test_parse_pipeline_returns_a_pipeline_unchanged():
    pipeline = Pipeline((PassSpec("a"),))
    assert parse_pipeline(pipeline) is pipeline


def test_named_default_expands_and_round_trips():
    default = parse_pipeline("default")
    assert default == parse_pipeline(NAMED_PIPELINES["default"])
    assert any(isinstance(i, Fixpoint) for i in default.items)
    assert "default" not in default.pass_names()
    assert parse_pipeline(str(default)) == default


def test_named_none_is_empty_and_expands_in_place():
    assert parse_pipeline("none") == Pipeline(())
    assert parse_pipeline("a,none,b").pass_names() == ["a", "b"]
    assert parse_pipeline("fixpoint(none)") == Pipeline((Fixpoint(()),))


def test_named_pipeline_expands_in_the_middle_of_a_list():
    pipeline = parse_pipeline("first,default,last")
    default_names = parse_pipeline("default").pass_names()
    assert pipeline.pass_names() == ["first", *default_names, "last"]


@pytest.mark.parametrize("text, column, fragment", [
    ("a,,b", 3, "expected a pass name"),
    ("a{k=1", 6, "expected ','"),
    ("a{k}", 4, "expected '='"),
    ("a{k=}", 5, "option 'k' has no value"),
    ("fixpoint(a", 11, "expected ')'"),
    ("a)b", 2, "unexpected text"),
    ("1abc", 1, "expected a pass name"),
    ("a,", 3, "expected a pass name"),
])
def test_syntax_error_names_the_column(text, column, fragment):
    with pytest.raises(PipelineError) as info:
        parse_pipeline(text)
    message = str(info.value)
    assert f"column {column}" in message
    assert fragment in message
    assert text in message


def test_nested_fixpoint_is_rejected():
    with pytest.raises(PipelineError, match="cannot be nested"):
        parse_pipeline("fixpoint(a,fixpoint(b))")


def test_named_pipeline_with_fixpoints_is_rejected_inside_fixpoint():
    with pytest.raises(PipelineError, match=re.escape("cannot be used inside fixpoint()")):
        parse_pipeline("fixpoint(default)")


def test_named_pipeline_takes_no_options():
    with pytest.raises(PipelineError, match="takes no options"):
        parse_pipeline("default{x=1}")


@pytest.mark.parametrize("text, fragment", [
    ("fixpoint(a){foo=1}", "only max_iterations"),
    ("fixpoint(a){max_iterations=x}", "must be an integer"),
])
def test_bad_fixpoint_options(text, fragment):
    with pytest.raises(PipelineError, match=fragment):
        parse_pipeline(text)


@pytest.mark.parametrize("value", ["0", "-1"])
def test_fixpoint_rejects_non_positive_max_iterations(value):
    with pytest.raises(PipelineError, match="max_iterations"):
        parse_pipeline(f"fixpoint(a){{max_iterations={value}}}")
