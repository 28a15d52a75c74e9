"""The schema of where problems come from: dataset specs (`datasets/*.yaml`), a recipe's data sources and how
weighted sources mix. `distill.schema` builds the recipe on these; `distill.data` loads what they describe.
"""

from __future__ import annotations

from pathlib import PurePath
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from distill.records import Kind

Columns = str | list[str]  # one column name, or alternatives tried in order (hub and mirror files may differ)


class Section(BaseModel):
    """Unknown keys are errors (a typo must never be silently ignored)."""

    model_config = ConfigDict(extra="forbid", validate_default=True)


def as_sources(value: Any) -> Any:
    """Validator: a bare spec name stands for `{spec: name}`."""
    return [{"spec": v} if isinstance(v, str) else v for v in value] if isinstance(value, list) else value


def unweighted_sources(sources: list[Any], where: str) -> list[Any]:
    """Validator: benchmarks and decontamination sets are read whole, so a weight there is a mistake."""
    for index, source in enumerate(sources):
        if source.weight is not None:
            raise ValueError(
                f"item {index} ({source.name}) has a weight; weights mix training data (`data`), "
                f"{where} are read whole"
            )
    return sources


class FieldMap(Section):
    problem: Columns = Field(description="Column holding the problem text.")
    answer: Columns | None = Field(None, description="Column holding the reference answer.")
    id: Columns | None = Field(None, description="Column with the source's own id (kept in `meta.source_id`).")
    solution: Columns | None = Field(None, description="Column with a reference solution.")
    choices: list[str] | str | None = Field(
        None, description="Option columns (one per option), or one column holding a list of options."
    )
    tests: Columns | None = Field(
        None,
        description="Column with tests: a list of {input, output}, or {inputs: [...], outputs: [...], fn_name?} "
        "(APPS/TACO; with `fn_name` the tests call that function), JSON text ok.",
    )


class DatasetSpec(Section):
    name: str = Field(description="Spec name; must equal the file name without `.yaml` (inline: any name).")
    description: str = Field("", description="What the data is, in one or two sentences.")
    license: str = Field("unknown", description="License of the data (SPDX id where there is one).")
    kind: Kind = Field(description="Answer kind: `math`, `choice`, `code` or `none` (unverifiable).")
    hub: str | None = Field(None, description="Hugging Face Hub dataset id.")
    config: str | None = Field(None, description="Hub dataset config name.")
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit) to read.")
    data_dir: str | None = Field(None, description="Folder of the hub repo to read (`load_dataset(data_dir=...)`).")
    split: str = Field("train", description="Split to read by default.")
    path: str | None = Field(None, description="Default local file/glob, for specs of local data.")
    fields: FieldMap = Field(description="Column mapping onto the problem record.")
    problem_template: str | None = Field(
        None,
        description="Jinja template over the row's columns (plus `problem`, the mapped text) that builds the "
        "problem text, for statements split across columns (Codeforces) or with starter code (APPS).",
    )
    where: dict[str, Any] = Field(
        default_factory=dict,
        description="Keep only rows whose columns equal these values, or are one of a list of values (null matches "
        "a missing value); other rows are counted as `excluded_by_where`.",
    )
    answer_extract: Literal["as_is", "last_boxed", "regex"] = Field(
        "as_is", description="How to get the answer from its column: as is, its last \\boxed{}, or `answer_regex`."
    )
    answer_regex: str | None = Field(
        None, description="Regex whose first group is the answer (`answer_extract: regex`)."
    )
    shuffle_choices: bool = Field(False, description="Shuffle options per problem (seeded by the problem id).")
    meta: list[str] = Field(default_factory=list, description="Other columns to carry along in `meta`.")

    @model_validator(mode="after")
    def _consistent(self) -> DatasetSpec:
        needed = {"math": ["answer"], "choice": ["answer", "choices"], "code": ["tests"]}.get(self.kind, [])
        for key in ["problem", *needed]:
            if not getattr(self.fields, key):  # unset, or an empty list of column names
                raise ValueError(f"fields.{key}: required for kind {self.kind} (spec {self.name})")
        if self.answer_extract == "regex" and not self.answer_regex:
            raise ValueError("answer_regex: required when answer_extract is regex")
        return self


class DataSource(Section):
    spec: str | DatasetSpec = Field(
        description="Dataset spec: a name from `datasets/` (e.g. `math500`), a path to a spec YAML, or an inline "
        "spec mapping."
    )
    path: str | None = Field(
        None, description="Local file, glob or directory to read instead of the spec's hub location (same mapping)."
    )
    split: str | None = Field(None, description="Split to read; unset uses the spec's split.")
    limit: int | None = Field(None, ge=1, description="Keep only the first N problems (after the shuffle, if any).")
    seed: int | None = Field(
        None, description="Shuffle the problems with this seed before `limit` and mixing; unset keeps file order."
    )
    where: dict[str, Any] = Field(
        default_factory=dict,
        description="Row filter added to the spec's `where` (e.g. `{category: [physics, chemistry]}`); rows left "
        "out are counted as `excluded_by_where`.",
    )
    weight: float | None = Field(
        None,
        gt=0,
        description="Share of the mixture relative to the other sources' weights (set on every source or none); "
        "see `mixture`.",
    )
    prompt: str | None = Field(
        None,
        description="User prompt template for this source (`{problem}`); unset: `teacher.prompt`, else the "
        "default of the source's answer kind.",
    )

    @property
    def name(self) -> str:
        """The spec's name (what `Problem.source` holds)."""
        if isinstance(self.spec, DatasetSpec):
            return self.spec.name
        return PurePath(self.spec).stem if self.spec.endswith((".yaml", ".yml")) else self.spec


class Mixture(Section):
    total: int | None = Field(
        None,
        ge=1,
        description="Problems in a weighted mixture, shared out by weight (largest remainder); unset takes the "
        "largest mixture the sources allow at exactly these weights. Each source gives its first problems (file "
        "order, or after its `seed` shuffle).",
    )
