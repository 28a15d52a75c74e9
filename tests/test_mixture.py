"""Weighted multi-domain mixtures: proportions, determinism, stable ids, and the errors a recipe gets before any
generation. Math comes from the shared MATH-500 file; code and choice problems are small hand-written files."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import yaml

from distill.data import load_problems, load_source
from distill.errors import DataError, RecipeError
from distill.files import write_jsonl
from distill.mixture import interleave, largest_total, plan, shares
from distill.recipe import load_recipe
from distill.records import problem_id
from distill.sources import DataSource, Mixture

CODE = [
    {
        "id": "echo",
        "problem": "Read one line and print it back unchanged.",
        "tests": [{"input": "hi\n", "output": "hi"}],
    },
    {
        "id": "echo2",
        "problem": "Copy standard input to standard output: the program prints the single word it is given.",
        "tests": {"inputs": ["abc\n", "xyz\n"], "outputs": ["abc\n", "xyz\n"]},
    },
    {
        "id": "sum",
        "problem": "Given two integers a and b on one line, print a + b.",
        "tests": '[{"input": "1 2", "output": "3"}]',
    },
    {
        "id": "double",
        "problem": "Write a function double(x) that returns twice its argument.",
        "tests": {"inputs": [[2], [5]], "outputs": [[4], [10]], "fn_name": "double"},
    },
]
CHOICE = [
    {
        "id": "q1",
        "problem": "Which gas do plants take in for photosynthesis?",
        "choices": ["O2", "N2", "CO2", "He"],
        "answer": "C",
    },
    {
        "id": "q2",
        "problem": "What is the SI unit of force?",
        "choices": ["newton", "joule", "watt", "pascal"],
        "answer": 0,
    },
    {
        "id": "q3",
        "problem": "Which particle has a negative charge?",
        "choices": ["proton", "neutron", "electron"],
        "answer": "electron",
    },
    {
        "id": "q4",
        "problem": "What is the chemical symbol of sodium?",
        "choices": ["S", "Na", "So", "N"],
        "answer": "B",
    },
]


def write_sources(tmp_path: Path, shared_data: Path) -> list[dict]:
    """The three-domain mixture: MATH-500 weighted 2, four code problems and four choice questions weighted 1."""
    write_jsonl(tmp_path / "code.jsonl", CODE)
    write_jsonl(tmp_path / "choice.jsonl", CHOICE)
    return [
        {"spec": "math500", "path": str(shared_data / "math500/test.jsonl"), "seed": 7, "weight": 2},
        {"spec": "local_code_jsonl", "path": str(tmp_path / "code.jsonl"), "weight": 1},
        {"spec": "local_choice_jsonl", "path": str(tmp_path / "choice.jsonl"), "weight": 1},
    ]


def sources(raw: list[dict]) -> list[DataSource]:
    return [DataSource.model_validate(r) for r in raw]


def test_mixture_shares_add_up_and_stay_within_one_of_exact():
    rng = random.Random(0)
    for _ in range(500):
        weights = [rng.choice([0.1, 0.5, 1, 2, 3.3, 7]) for _ in range(rng.randint(1, 5))]
        total = rng.randint(0, 1000)
        counts = shares(weights, total)
        assert sum(counts) == total
        for count, weight in zip(counts, weights, strict=True):
            assert abs(count - total * weight / sum(weights)) < 1
    assert shares([2, 1, 1], 10) == [5, 3, 2], "ties go to the earlier source"
    assert largest_total([500, 4, 4], [2, 1, 1]) == 16
    assert largest_total([7, 100], [1, 1]) == 14


def test_mixture_interleave_keeps_proportions_in_every_prefix():
    math, code, choice = [f"m{i}" for i in range(8)], [f"c{i}" for i in range(4)], [f"q{i}" for i in range(4)]
    order = interleave([math, code, choice])
    assert sorted(order) == sorted(math + code + choice) and len(order) == 16
    for stop in range(4, 17, 4):
        prefix = order[:stop]
        assert [sum(x[0] == kind for x in prefix) for kind in "mcq"] == [stop // 2, stop // 4, stop // 4], stop
    assert [x for x in order if x[0] == "m"] == math, "each source keeps its own order"


def test_mixture_three_domains_in_proportion_deterministic_with_stable_ids(tmp_path, shared_data):
    raw = write_sources(tmp_path, shared_data)
    loaded = load_problems(sources(raw))
    assert [len(s.problems) for s in loaded] == [8, 4, 4], "2:1:1, the largest mixture the small sources allow"
    assert [s.spec.kind for s in loaded] == ["math", "code", "choice"]
    assert loaded[0].dropped == {"over_mixture_share": 492}, "problems left out of the mixture are counted"
    assert sum(len(s.problems) + sum(s.dropped.values()) for s in loaded) == 500 + 4 + 4

    again = load_problems(sources(raw))
    assert [p.id for s in again for p in s.problems] == [p.id for s in loaded for p in s.problems]
    alone = load_source(DataSource.model_validate({**raw[0], "weight": None})).problems
    assert [p.id for p in loaded[0].problems] == [p.id for p in alone[:8]], "a source gives its first problems"
    assert all(p.id == problem_id("math500", p.problem) for p in loaded[0].problems), "ids do not depend on mixing"

    reseeded = load_problems(sources([{**raw[0], "seed": 8}, *raw[1:]]))
    assert {p.id for p in reseeded[0].problems} != {p.id for p in loaded[0].problems}, "another seed, other problems"

    sized = load_problems(sources(raw), Mixture(total=12))
    assert [len(s.problems) for s in sized] == [6, 3, 3]
    assert [p.id for p in sized[0].problems] == [p.id for p in loaded[0].problems[:6]], "a smaller mix is a prefix"


def test_mixture_total_beyond_a_source_names_it_and_the_largest_total(tmp_path, shared_data):
    raw = write_sources(tmp_path, shared_data)
    with pytest.raises(RecipeError) as info:
        load_problems(sources(raw), Mixture(total=40))
    assert str(info.value) == (
        "mixture.total: 40 problems at these weights asks data.1 (local_code_jsonl) for 10 problems, but it has 4; "
        "the largest total these sources allow is 16 (or lower that source's weight, or raise its `limit`)"
    )
    with pytest.raises(RecipeError, match=r"weight 1\.0 but no problems to mix"):
        plan([5, 0], [1.0, 1.0], total=None, names=["a", "b"])


def test_mixture_code_and_choice_rows_map_to_tests_and_letters(tmp_path, shared_data):
    _, code, choice = load_problems(sources(write_sources(tmp_path, shared_data)))
    by_id = {p.meta["source_id"]: p for p in code.problems}
    assert by_id["echo"].tests == [{"input": "hi\n", "output": "hi"}]
    assert by_id["echo2"].tests == [{"input": "abc\n", "output": "abc\n"}, {"input": "xyz\n", "output": "xyz\n"}]
    assert by_id["sum"].tests == [{"input": "1 2", "output": "3"}], "tests given as JSON text"
    assert by_id["double"].tests == [
        {"input": "[2]", "output": "[4]", "fn_name": "double"},
        {"input": "[5]", "output": "[10]", "fn_name": "double"},
    ], "call-based tests: JSON arguments and return value"
    assert [p.answer for p in choice.problems] == ["C", "A", "C", "B"], "gold as letter, index or option text"


def write_recipe(tmp_path: Path, data) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def recipe_errors(tmp_path: Path, **recipe) -> str:
    with pytest.raises(RecipeError) as info:
        load_recipe(write_recipe(tmp_path, {"name": "m", **recipe}))
    return str(info.value)


def test_mixture_bad_input_fails_at_recipe_load(tmp_path, shared_data):
    raw = write_sources(tmp_path, shared_data)
    where = str(tmp_path / "recipe.yaml")
    assert recipe_errors(tmp_path, data=[raw[0], {**raw[1], "weight": 0}, raw[2]]) == (
        f"{where}: data.1.weight: Input should be greater than 0, got 0"
    )
    assert recipe_errors(tmp_path, data=[raw[0], {**raw[1], "weight": -2}, raw[2]]).endswith(
        "data.1.weight: Input should be greater than 0, got -2"
    )
    assert "data.2 (local_choice_jsonl) has none" in recipe_errors(
        tmp_path, data=[raw[0], raw[1], {**raw[2], "weight": None}]
    )
    unknown = recipe_errors(tmp_path, data=[raw[0], {**raw[1], "spec": "appz"}, raw[2]])
    assert unknown.startswith(f"{where}: data.1.spec: unknown dataset spec 'appz'; known specs: ")
    assert "apps" in unknown and "codeforces" in unknown and "local_code_jsonl" in unknown
    both = recipe_errors(tmp_path, data=[raw[0], {**raw[1], "spec": "appz", "weight": 0}, raw[2]]).splitlines()
    assert len(both) == 2 and both[0] == f"{where}: data.1.weight: Input should be greater than 0, got 0"
    assert both[1].startswith(f"{where}: data.1.spec: unknown dataset spec 'appz'"), "every error at once"
    no_tests = {"name": "mycode", "kind": "code", "fields": {"problem": "problem"}}
    assert "fields.tests: required for kind code (spec mycode)" in recipe_errors(
        tmp_path, data=[{"spec": no_tests, "path": raw[1]["path"]}]
    )
    assert "data.0.prompt: the template must contain {problem}" in recipe_errors(
        tmp_path, data=[{**raw[0], "prompt": "Solve it."}]
    )
    assert "mixture.total: needs a `weight` on every data source" in recipe_errors(
        tmp_path, data=[{"spec": "math500"}], mixture={"total": 10}
    )
    assert "item 0 (aime24) has a weight" in recipe_errors(
        tmp_path, data="math500", eval={"benchmarks": [{"spec": "aime24", "weight": 1}]}
    )


def test_mixture_code_source_whose_rows_have_no_tests_is_one_error(tmp_path):
    path = tmp_path / "code.jsonl"
    write_jsonl(path, [{"problem": f"Task {i}", "tests": []} for i in range(3)])
    with pytest.raises(DataError) as info:
        load_source(DataSource(spec="local_code_jsonl", path=str(path)))
    assert str(info.value) == (
        f"data source local_code_jsonl ({path}): kind code needs tests, and none of its 3 rows has usable tests in "
        "column 'tests'"
    )


def test_mixture_inline_spec_and_short_forms(tmp_path):
    path = tmp_path / "qa.jsonl"
    write_jsonl(path, [{"q": "2+2?", "a": "4"}, {"q": "3+3?", "a": "6"}])
    inline = {"name": "my_qa", "kind": "math", "fields": {"problem": "q", "answer": "a"}}
    recipe = load_recipe(write_recipe(tmp_path, {"name": "m", "data": {"spec": inline, "path": str(path)}}))
    (loaded,) = load_problems(recipe.data)
    assert [(p.source, p.answer) for p in loaded.problems] == [("my_qa", "4"), ("my_qa", "6")]
    short = load_recipe(write_recipe(tmp_path, {"name": "m", "data": "math500"}))
    assert short.data[0].spec == "math500" and short.data[0].weight is None
    listed = load_recipe(write_recipe(tmp_path, {"name": "m", "data": ["math500", "gsm8k"]}))
    assert [s.spec for s in listed.data] == ["math500", "gsm8k"]
    names = [DataSource(spec=spec).name for spec in ("math500", "specs/my_qa.yaml", "specs/my_qa.yml")]
    assert names == ["math500", "my_qa", "my_qa"], "the name problems carry, whatever the spec file's suffix"


def test_mixture_apps_taco_codeforces_and_mmlu_pro_specs_map_their_columns(tmp_path):
    """Rows in each hub dataset's own column layout (as its card documents it), read through the shipped spec."""
    apps = tmp_path / "apps.jsonl"
    write_jsonl(
        apps,
        [
            {
                "problem_id": 1,
                "question": "Return the sum of a list.",
                "solutions": json.dumps(["def total(xs):\n    return sum(xs)"]),
                "input_output": json.dumps({"inputs": [[[1, 2]], [[]]], "outputs": [[3], [0]], "fn_name": "total"}),
                "difficulty": "introductory",
                "url": "u1",
                "starter_code": "def total(xs):\n    ",
            },
            {
                "problem_id": 2,
                "question": "Print the input twice.",
                "solutions": "[]",
                "input_output": json.dumps({"inputs": ["a\n"], "outputs": ["a\na\n"]}),
                "difficulty": "interview",
                "url": "u2",
                "starter_code": "",
            },
            {
                "problem_id": 3,
                "question": "No tests here.",
                "solutions": "[]",
                "input_output": "",
                "difficulty": "interview",
                "url": "u3",
                "starter_code": "",
            },
        ],
    )
    loaded = load_source(DataSource(spec="apps", path=str(apps)))
    call, stdin = loaded.problems
    assert loaded.dropped == {"missing_tests": 1}
    assert call.problem.endswith("Complete this starter code:\n```python\ndef total(xs):\n    \n```")
    assert call.tests[0] == {"input": "[[1, 2]]", "output": "[3]", "fn_name": "total"}
    assert stdin.problem == "Print the input twice." and stdin.tests == [{"input": "a\n", "output": "a\na\n"}]
    assert call.meta == {"difficulty": "introductory", "url": "u1", "source_id": "1"}

    from distill.filter.answers import check

    solved = "<think>\nsum it\n</think>\n\n```python\ndef total(xs):\n    return sum(xs)\n```"
    item = {"kind": "code", "tests": call.tests, "final": solved.split("</think>\n\n")[1]}
    assert check(item, timeout_s=5) == "ok", "an APPS call-based row runs in the sandbox as mapped"

    taco = tmp_path / "taco.jsonl"
    write_jsonl(
        taco,
        [
            {
                "question": "Echo.",
                "solutions": "[]",
                "starter_code": "",
                "input_output": json.dumps({"inputs": [["1", "2"]], "outputs": [["1", "2"]]}),
                "difficulty": "EASY",
                "source": "codeforces",
                "url": "t",
                "time_limit": "1 second",
                "memory_limit": "256 megabytes",
            }
        ],
    )
    (echo,) = load_source(DataSource(spec="taco", path=str(taco))).problems
    assert echo.tests == [{"input": "1\n2", "output": "1\n2"}], "line lists are joined, as APPS's harness does"

    codeforces = tmp_path / "cf.jsonl"
    base = {
        "id": "1A",
        "title": "Theatre Square",
        "time_limit": 1.0,
        "memory_limit": 256.0,
        "description": "Cover the square with flagstones.",
        "input_format": "n m a",
        "output_format": "The count.",
        "examples": [{"input": "6 6 4", "output": "4"}],
        "note": None,
        "official_tests": [{"input": "6 6 4", "output": "4"}, {"input": "1 1 1", "output": "1"}],
        "official_tests_complete": True,
        "interaction_format": None,
        "generated_checker": None,
        "contest_name": "Beta Round 1",
        "rating": 1000,
        "tags": ["math"],
    }
    write_jsonl(
        codeforces,
        [
            base,
            {**base, "id": "2B", "description": "Guess the number.", "interaction_format": "Ask queries."},
            {**base, "id": "3C", "description": "Any valid path.", "generated_checker": "def check(): ..."},
        ],
    )
    loaded = load_source(DataSource(spec="codeforces", path=str(codeforces)))
    (square,) = loaded.problems
    assert loaded.dropped == {"excluded_by_where": 2}, "interactive and checker problems are counted, not run"
    assert square.problem == (
        "Theatre Square\n\nTime limit per test: 1.0 seconds. Memory limit per test: 256.0 megabytes.\n\n"
        "Cover the square with flagstones.\n\nInput\nn m a\n\nOutput\nThe count.\n\nExample 1\nInput:\n6 6 4\n"
        "Output:\n4"
    )
    assert len(square.tests) == 2 and square.meta["source_id"] == "1A"

    mmlu = tmp_path / "mmlu.jsonl"
    row = {"question_id": 7, "question": "Unit of charge?", "options": ["volt", "coulomb", "ohm"], "answer": "B"}
    write_jsonl(mmlu, [{**row, "answer_index": 1, "cot_content": "", "category": "physics", "src": "s"}])
    (charge,) = load_source(DataSource(spec="mmlu_pro", path=str(mmlu))).problems
    assert (charge.kind, charge.answer, charge.choices) == ("choice", "B", ["volt", "coulomb", "ohm"])


def test_mixture_source_where_narrows_a_spec_and_counts_what_it_leaves_out(tmp_path):
    path = tmp_path / "mmlu.jsonl"
    categories = ["physics", "law", "chemistry", "history", "biology"]
    write_jsonl(
        path,
        [
            {"question_id": i, "question": f"Q{i}?", "options": ["a", "b"], "answer": "A", "category": c, "src": "s"}
            for i, c in enumerate(categories)
        ],
    )
    source = DataSource(spec="mmlu_pro", path=str(path), where={"category": ["physics", "chemistry", "biology"]})
    loaded = load_source(source)
    assert [p.meta["category"] for p in loaded.problems] == ["physics", "chemistry", "biology"]
    assert loaded.dropped == {"excluded_by_where": 2}
    with pytest.raises(DataError, match="filters on column 'subject'"):
        load_source(DataSource(spec="mmlu_pro", path=str(path), where={"subject": "physics"}))


def test_mixture_dataset_card_lists_each_source_with_domain_weight_and_prompt(tmp_path, shared_data):
    from distill.hub_cards import dataset_card

    raw = write_sources(tmp_path, shared_data)
    raw[2]["prompt"] = "Q: {problem}\nLetter?"
    recipe = load_recipe(write_recipe(tmp_path, {"name": "m", "data": raw}))
    facts = {"recipe": "r", "recipe_hash": "h", "git_rev": "g", "stages": {}, "versions": {}}
    card = dataset_card(recipe, tmp_path, rows=10, facts=facts)
    assert "| math500 | HuggingFaceH4/MATH-500 | MIT | math | 2 | " in card
    assert (
        '| local_code_jsonl | local file | your own | code | 1 | "{problem}\\nPlease reason step by step, then' in card
    )
    assert '| local_choice_jsonl | local file | your own | choice | 1 | "Q: {problem}\\nLetter?" |' in card
