"""Dataset specs load the real shared files through `datasets.load_dataset`; bad data gets one precise error."""

from __future__ import annotations

import json

import pytest

import datasets
from conftest import REPO
from distill.data import find_spec, last_boxed, load_problems, load_source, load_spec
from distill.errors import DataError, RecipeError
from distill.files import write_jsonl
from distill.records import Problem
from distill.sources import DataSource

SPECS = sorted(p.stem for p in (REPO / "datasets").glob("*.yaml"))


@pytest.mark.parametrize("name", SPECS)
def test_data_every_shipped_spec_validates(name):
    spec = load_spec(name)
    assert spec.license and spec.description and (spec.hub or name.startswith("local_"))


@pytest.mark.parametrize(
    ("spec", "relpath", "count", "first_answer"),
    [
        ("math500", "math500/test.jsonl", 500, "\\left( 3, \\frac{\\pi}{2} \\right)"),
        ("gsm8k", "gsm8k/test.jsonl", 1319, "18"),
        ("gsm8k", "gsm8k/train_first500.jsonl", 500, "72"),
        ("aime24", "aime24/test.jsonl", 30, "204"),
        ("aime25", "aime25/test.jsonl", 30, "70"),
        ("aime25", "aime25/test_qwq.jsonl", 30, "70"),
    ],
)
def test_data_specs_load_the_shared_files(shared_data, spec, relpath, count, first_answer):
    loaded = load_source(DataSource(spec=spec, path=str(shared_data / relpath)))
    assert len(loaded.problems) == count and not loaded.dropped
    first = loaded.problems[0]
    assert first.answer == first_answer and first.kind == "math" and first.source == spec
    assert len({p.id for p in loaded.problems}) == count


def test_data_math500_keeps_meta_as_strings(shared_data):
    problem = load_source(DataSource(spec="math500", path=str(shared_data / "math500/test.jsonl"), limit=1)).problems[
        0
    ]
    assert problem.meta == {"subject": "Precalculus", "level": "2", "source_id": "test/precalculus/807.json"}
    assert problem.solution and "polar" in problem.solution


def test_data_limit_and_seed_are_deterministic_and_ids_stable(shared_data):
    source = DataSource(spec="math500", path=str(shared_data / "math500/test.jsonl"), limit=20, seed=3)
    first, again = load_source(source).problems, load_source(source).problems
    assert [p.id for p in first] == [p.id for p in again]
    unshuffled = load_source(DataSource(spec="math500", path=source.path)).problems
    assert [p.id for p in first] != [p.id for p in unshuffled[:20]]
    assert {p.id for p in first} <= {p.id for p in unshuffled}


def test_data_missing_column_names_it_and_the_existing_columns(tmp_path):
    path = tmp_path / "p.jsonl"
    write_jsonl(path, [{"question": "1+1?", "solution": "2"}])
    with pytest.raises(DataError) as info:
        load_source(DataSource(spec="local_jsonl", path=str(path)))
    assert str(info.value) == (
        f"{path}: spec local_jsonl maps fields.problem to column 'problem', which the data lacks; "
        "columns are: question, solution"
    )


def test_data_unreadable_jsonl_line_is_reported_as_file_and_line(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"problem": "a", "answer": "1"}\n{"problem": "b", "answer": "2"}\n{"problem": "c", answ\n')
    with pytest.raises(DataError, match=rf"^{path}:3: not valid JSON"):
        load_source(DataSource(spec="local_jsonl", path=str(path)))


def test_data_unknown_spec_lists_the_known_ones():
    with pytest.raises(RecipeError) as info:
        find_spec("math5000")
    assert "unknown dataset spec 'math5000'; known specs: " in str(info.value)
    assert "math500" in str(info.value) and "gsm8k" in str(info.value)


def test_data_spec_lookup_order_path_then_cwd_then_checkout(tmp_path, monkeypatch):
    """A user's own datasets/ (in the cwd) overrides a shipped spec of the same name and adds its own; other names
    still come from the checkout (an installed wheel's copy: tests/test_packaging.py)."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "datasets").mkdir()
    own = (REPO / "datasets" / "math500.yaml").read_text().replace("MATH-500:", "My MATH-500:")
    (tmp_path / "datasets" / "math500.yaml").write_text(own)
    (tmp_path / "datasets" / "mine.yaml").write_text(own.replace("name: math500", "name: mine"))
    (tmp_path / "elsewhere.yaml").write_text(own.replace("name: math500", "name: elsewhere"))
    assert find_spec("math500").resolve() == tmp_path / "datasets" / "math500.yaml"
    assert load_spec("math500").description.startswith("My MATH-500")
    assert find_spec("gsm8k") == REPO / "datasets" / "gsm8k.yaml"
    assert find_spec(str(tmp_path / "elsewhere.yaml")) == tmp_path / "elsewhere.yaml"
    with pytest.raises(RecipeError, match=r"known specs: .*gsm8k.*mine"):
        find_spec("math5000")
    with pytest.raises(RecipeError, match=r"dataset spec nowhere\.yaml: file not found"):
        find_spec("nowhere.yaml")


def test_data_rows_not_turned_into_problems_are_counted(tmp_path):
    path = tmp_path / "p.jsonl"
    rows = [
        {"problem": "1+1?", "answer": "2"},
        {"problem": "  ", "answer": "3"},
        {"problem": "2+2?", "answer": None},
        {"problem": "1+1?", "answer": "2"},
    ]
    write_jsonl(path, rows)
    (loaded,) = load_problems([DataSource(spec="local_jsonl", path=str(path))])
    assert len(loaded.problems) == 1
    assert dict(loaded.dropped) == {"empty_problem": 1, "missing_answer": 1, "duplicate_id": 1}


def test_data_choice_spec_shuffles_options_reproducibly_and_tracks_the_gold_letter(tmp_path):
    spec = tmp_path / "quiz.yaml"
    spec.write_text(
        "name: quiz\ndescription: GPQA-shaped test data.\nlicense: CC0-1.0\nkind: choice\n"
        "fields: {problem: Question, answer: Correct Answer, choices: [Correct Answer, Wrong 1, Wrong 2, Wrong 3]}\n"
        "shuffle_choices: true\n"
    )
    data = tmp_path / "quiz.jsonl"
    rows = [
        {"Question": f"Which is {i}?", "Correct Answer": str(i), "Wrong 1": "x", "Wrong 2": "y", "Wrong 3": "z"}
        for i in range(12)
    ]
    write_jsonl(data, rows)
    problems = load_source(DataSource(spec=str(spec), path=str(data))).problems
    again = load_source(DataSource(spec=str(spec), path=str(data))).problems
    assert [p.choices for p in problems] == [p.choices for p in again]
    for i, problem in enumerate(problems):
        assert problem.kind == "choice" and problem.choices[ord(problem.answer) - ord("A")] == str(i)
    assert len({p.answer for p in problems}) > 1, "the correct option must not always sit in the same place"


def test_data_problem_records_round_trip_through_datasets_json(tmp_path, shared_data):
    problems = load_source(DataSource(spec="aime24", path=str(shared_data / "aime24/test.jsonl"))).problems
    path = tmp_path / "problems.jsonl"
    write_jsonl(path, (p.to_dict() for p in problems))
    table = datasets.load_dataset("json", data_files=str(path), split="train")
    assert len(table) == 30
    back = [Problem.from_dict(row, where=f"{path}:{i + 1}") for i, row in enumerate(table)]
    assert [p.to_dict() for p in back] == [p.to_dict() for p in problems]
    assert json.loads(path.read_text().splitlines()[0])["id"] == problems[0].id


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("so \\boxed{12}", "12"),
        ("\\boxed{a} then \\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),
        ("none", None),
        ("\\boxed{unclosed", None),
        ("\\fbox{7}", "7"),
    ],
)
def test_data_last_boxed(text, expected):
    assert last_boxed(text) == expected
