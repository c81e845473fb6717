"""Declarative absorption: one YAML spec says what a run is (project, prompt,
data, teacher, curation, training, eval, gate, alias). This package reads and
validates it (`spec`) against the published JSON Schema (`schema`, derived
from the settings dataclasses); serving.pipeline plans and applies it."""

from workbench.pipeline.schema import SCHEMA_PATH, build_schema
from workbench.pipeline.spec import Spec, SpecError, load_spec, parse_spec

__all__ = ["SCHEMA_PATH", "Spec", "SpecError", "build_schema", "load_spec", "parse_spec"]
