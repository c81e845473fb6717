"""Reading a spec: YAML with each node's line kept, validated against the
published schema, then each settings section by its own dataclass, the
rules and facts by their validators, and the files it names (inside the
spec's folder, size-bounded). Every problem names the file, the line and
the key ("spec.yaml line 12: training.epochs: must be >= 1, got 0"), and
all of them are listed at once."""

from __future__ import annotations

import dataclasses
import difflib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jsonschema
import yaml

from engines import facts as facts_module
from engines import rules as rules_module
from engines.curation import ABSORB_COUNT, CurationSettings, SynthesisSettings
from engines.inference import GenerationSettings, SettingsError
from engines.training import ConfigError, TrainConfig
from workbench.actions import ActionError
from workbench.actions.prompts import (
    CheckedPrompt,
    check_prompt,
    parse_rules_json,
    read_prompt_file,
    rules_json_max_chars,
)
from workbench.pipeline.schema import DEFAULT_SPACE, build_schema

MAX_BYTES = 1 << 20  # a spec holds settings; the prompt and the data are files beside it
MAX_DEPTH = 12
Path_ = tuple[str | int, ...]


class SpecError(Exception):
    """The spec is wrong; `problems` lists each, with its file, line and key."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("\n".join(problems))


class _Loader(yaml.SafeLoader):
    """YAML 1.2 floats too: PyYAML reads 3e-4 (no dot) as a string, and a
    learning rate written so would be refused as "not a number"."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def dotted(path: Path_) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(the spec)"


def _type_name(value: Any) -> str:
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    if value is None:
        return "nothing (null)"
    return repr(value)


_JSON_TYPES = {
    "integer": "an integer",
    "number": "a number",
    "string": "a string",
    "boolean": "true or false",
    "object": "a mapping",
    "array": "a list",
    "null": "null",
}


@dataclass
class _Problems:
    name: str
    root: yaml.Node | None
    items: list[tuple[int, str]]

    def line(self, path: Path_) -> int:
        node, line = self.root, 1
        for part in path:
            if isinstance(node, yaml.MappingNode):
                found = next(((k, v) for k, v in node.value if k.value == part), None)
                if found is None:
                    break
                line, node = found[0].start_mark.line + 1, found[1]
            elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value):
                node = node.value[part]
                line = node.start_mark.line + 1
            else:
                break
        return line

    def add(self, path: Path_, message: str, line: int | None = None) -> None:
        line = self.line(path) if line is None else line
        where = f"{self.name} line {line}" + (f": {dotted(path)}" if path else "")
        self.items.append((line, f"{where}: {message}"))


class Spec:
    """A validated spec: its values as written (`data`) and what they mean."""

    def __init__(
        self,
        name: str,
        folder: Path | None,
        data: dict[str, Any],
        root: yaml.Node,
        prompt: CheckedPrompt | None,
    ):
        self.name, self.folder, self.data, self._root = name, folder, data, root
        self.checked_prompt = prompt

    def where(self, *path: str | int) -> str:
        """Where a value is, for messages about it: "spec.yaml line N: key.path"."""
        line = _Problems(self.name, self._root, []).line(path)
        return f"{self.name} line {line}: {dotted(path)}"

    def section(self, name: str) -> dict[str, Any]:
        value = self.data.get(name)
        return value if isinstance(value, dict) else {}

    def file(self, value: str) -> Path:
        assert self.folder is not None, "a spec without a folder names no files (parse_spec refused them)"
        return (self.folder / value).resolve()

    @property
    def project(self) -> str:
        return str(self.data["project"])

    @property
    def training(self) -> dict[str, Any]:
        return {k: v for k, v in self.section("training").items() if k != "train_on_failing"}

    @property
    def passing_only(self) -> bool:
        return not self.section("training").get("train_on_failing", False)

    @property
    def curation(self) -> dict[str, Any] | bool:
        value = self.data.get("curation", True)
        return value if isinstance(value, dict | bool) else True

    @property
    def synthesis(self) -> dict[str, Any] | None:
        """{"count": N, "settings": {...}} unless the spec says `synthesis: false`: as an
        absorb, the teacher first writes questions about the prompt (ABSORB_COUNT)."""
        value = self.data.get("synthesis", True)
        if value is True:
            value = {}
        if not isinstance(value, dict):
            return None
        settings = {k: v for k, v in value.items() if k != "count"}
        return {"count": int(value.get("count", ABSORB_COUNT)), "settings": settings}

    @property
    def promote(self) -> dict[str, Any] | None:
        value = self.data.get("promote")
        return value if isinstance(value, dict) else None


def load_spec(path: Path) -> Spec:
    try:
        with path.open("rb") as f:
            raw = f.read(MAX_BYTES + 1)
    except OSError as exc:
        raise SpecError([f"{path}: {exc.strerror or exc}"]) from exc
    if len(raw) > MAX_BYTES:
        raise SpecError([f"{path.name}: larger than {MAX_BYTES:,} bytes; keep the prompt and data in files"])
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        raise SpecError([f"{path.name} line {line}: not valid UTF-8"]) from exc
    return parse_spec(text, str(path), path.resolve().parent)


def parse_spec(text: str, name: str, folder: Path | None) -> Spec:
    """Validate a spec's text; files are read relative to `folder` (None: a
    spec pasted in the browser, which names versions and reads no file)."""
    problems = _Problems(name, None, [])
    root, data = _compose(text, problems)
    if root is None:
        raise SpecError([m for _, m in sorted(problems.items)])
    problems.root = root
    validator = jsonschema.Draft202012Validator(build_schema())
    broken: set[str | int] = set()  # sections the schema refused: not read further
    for error in validator.iter_errors(data):
        _schema_problem(error, problems)
        path = tuple(error.absolute_path)
        if error.validator == "additionalProperties":
            continue  # an unknown key leaves the known ones as they are
        if error.validator == "required" and not path and isinstance(data, dict):
            broken.update(k for k in error.validator_value if k not in data)
        else:
            broken.add(path[0] if path else "")
    prompt: CheckedPrompt | None = None
    if "" not in broken:  # past this point each section read has the types the schema says
        _settings(data, broken, problems)
        _exclusive(data, broken, problems)
        if "search" not in broken and isinstance(data.get("search"), dict):
            _search_space(data, problems)
        files = _Files(folder, problems)
        if "prompt" not in broken:
            prompt = files.prompt(data["prompt"])
        if "data" not in broken:
            files.data(data["data"])
    if problems.items:
        raise SpecError([m for _, m in sorted(problems.items, key=lambda item: item[0])])
    return Spec(name, folder, data, root, prompt)


# --- YAML ---------------------------------------------------------------------------------------


def _compose(text: str, problems: _Problems) -> tuple[yaml.Node | None, Any]:
    try:
        depth = 0  # the parser's events are flat; composing a node tree recurses, so bound it first
        for event in yaml.parse(text, Loader=_Loader):
            line = event.start_mark.line + 1 if event.start_mark is not None else 1
            if isinstance(event, yaml.AliasEvent):
                problems.add((), "YAML aliases (*name) are not allowed in a spec", line)
            elif isinstance(event, yaml.CollectionStartEvent):
                depth += 1
                if depth > MAX_DEPTH + 1:
                    problems.add((), f"nested deeper than {MAX_DEPTH} levels", line)
                    return None, None
            elif isinstance(event, yaml.CollectionEndEvent):
                depth -= 1
        if problems.items:
            return None, None
        loader = _Loader(text)
        try:
            root = loader.get_single_node()
            if root is None:
                problems.add((), "the spec is empty", 1)
                return None, None
            if not _walk(root, (), 0, problems):
                return None, None
            return root, loader.construct_document(root)
        finally:
            loader.dispose()
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark is not None else 1
        problems.add((), f"not valid YAML: {exc.problem or exc.context}", line)
    except yaml.YAMLError as exc:
        problems.add((), f"not valid YAML: {exc}", 1)
    return None, None


def _walk(node: yaml.Node, path: Path_, depth: int, problems: _Problems) -> bool:
    """Depth bounded; keys are plain strings, each once."""
    if depth > MAX_DEPTH:
        problems.add(path, f"nested deeper than {MAX_DEPTH} levels", node.start_mark.line + 1)
        return False
    ok = True
    if isinstance(node, yaml.MappingNode):
        seen: dict[str, int] = {}
        for key, value in node.value:
            line = key.start_mark.line + 1
            if not isinstance(key, yaml.ScalarNode) or key.tag != "tag:yaml.org,2002:str":
                problems.add(path, "keys must be plain words", line)
                ok = False
                continue
            if key.value in seen:
                problems.add((*path, key.value), f"appears twice (also on line {seen[key.value]})", line)
                ok = False
            seen[key.value] = line
            ok = _walk(value, (*path, key.value), depth + 1, problems) and ok
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            ok = _walk(item, (*path, i), depth + 1, problems) and ok
    return ok


# --- the schema ---------------------------------------------------------------------------------


def _schema_problem(error: jsonschema.ValidationError, problems: _Problems) -> None:
    path: Path_ = tuple(error.absolute_path)
    kind, expected, value = error.validator, error.validator_value, error.instance
    if kind == "additionalProperties" and isinstance(value, dict):
        known = list(error.schema.get("properties", {}))
        for key in sorted(set(value) - set(known)):
            close = difflib.get_close_matches(key, known, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else f" (known: {', '.join(known)})"
            problems.add((*path, key), f"unknown key{hint}")
    elif kind == "required" and isinstance(value, dict):
        for key in expected:
            if key not in value:
                problems.add(path, f"missing required key {key!r}")
    elif kind == "type":
        types = expected if isinstance(expected, list) else [expected]
        problems.add(
            path,
            f"must be {' or '.join(_JSON_TYPES.get(str(t), str(t)) for t in types)}, got {_type_name(value)}",
        )
    elif kind == "enum":
        problems.add(path, f"must be one of {', '.join(map(repr, expected))}, got {_type_name(value)}")
    elif kind == "const":
        problems.add(path, f"must be {expected!r}, got {_type_name(value)}")
    elif kind in ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"):
        sign = {"minimum": ">=", "maximum": "<=", "exclusiveMinimum": ">", "exclusiveMaximum": "<"}[kind]
        problems.add(path, f"must be {sign} {expected}, got {value!r}")
    elif kind == "minLength":
        problems.add(path, "must not be empty")
    elif kind == "maxLength":
        problems.add(path, f"at most {expected} characters")
    elif kind == "maxItems":
        problems.add(path, f"at most {expected} items")
    elif kind == "uniqueItems":
        problems.add(path, "lists an item twice")
    elif kind == "pattern":
        problems.add(path, f"must match {expected} (lowercase letters, digits, - and _), got {value!r}")
    else:
        problems.add(path, error.message)


# --- settings: each section checked by the dataclass it becomes ----------------------------------


def _settings(data: dict[str, Any], broken: set[str | int], problems: _Problems) -> None:
    training = {k: v for k, v in (data.get("training") or {}).items() if k != "train_on_failing"}
    try:
        if "training" not in broken:
            TrainConfig.from_dict(training)
    except ConfigError as exc:
        for key, message in exc.errors.items():
            problems.add(("training", key), message)
    curation = data.get("curation")
    if isinstance(curation, dict) and "curation" not in broken:
        for key, value in curation.items():  # one at a time: the message belongs to that key
            try:
                CurationSettings.from_dict({key: value})
            except (TypeError, ValueError) as exc:
                problems.add(("curation", key), str(exc).removeprefix(f"{key} "))
    synthesis = data.get("synthesis")
    if isinstance(synthesis, dict) and "synthesis" not in broken:
        try:  # whole: min_words is checked against max_words; each message names its setting
            SynthesisSettings.from_dict({k: v for k, v in synthesis.items() if k != "count"})
        except (TypeError, ValueError) as exc:
            problems.add(("synthesis",), str(exc))
    for section in ("teacher", "eval"):
        generation = (data.get(section) or {}).get("generation")
        if generation and section not in broken:
            try:
                GenerationSettings.from_dict(generation)
            except SettingsError as exc:
                for key, message in exc.errors.items():
                    problems.add((section, "generation", key), message)


def _search_space(data: dict[str, Any], problems: _Problems) -> None:
    """Each searched setting is a real one, and each value to try is one its section takes."""
    if "objectives" not in data:
        problems.add(("search",), "a search needs objectives to meet")
    space = data["search"].get("space") or DEFAULT_SPACE
    fields = {
        "training": [f.name for f in dataclasses.fields(TrainConfig)],
        "curation": [f.name for f in dataclasses.fields(CurationSettings)],
    }
    for key, values in space.items():
        section, _, name = key.partition(".")
        where = ("search", "space", key)
        if section not in fields or name not in fields[section]:
            known = [f"{s}.{n}" for s, names in fields.items() for n in names]
            close = difflib.get_close_matches(key, known, n=1)
            problems.add(
                where,
                "not a training or curation setting" + (f" (did you mean {close[0]!r}?)" if close else ""),
            )
            continue
        if section == "curation" and data.get("curation") is False:
            problems.add(where, "curation is off (curation: false): there is nothing to search")
            continue
        for n, value in enumerate(values):
            try:
                if section == "training":
                    TrainConfig.from_dict({name: value})
                else:
                    CurationSettings.from_dict({name: value})
            except ConfigError as exc:
                problems.add((*where, n), "; ".join(exc.errors.values()))
            except (TypeError, ValueError) as exc:
                problems.add((*where, n), str(exc).removeprefix(f"{name} "))


def _exclusive(data: dict[str, Any], broken: set[str | int], problems: _Problems) -> None:
    if "prompt" not in broken:
        _one_prompt(data["prompt"], problems)
    if "data" not in broken:
        _one_heldout(data["data"], problems)
    for section in ("teacher", ("eval", "judge")):
        path = (section,) if isinstance(section, str) else section
        if path[0] in broken:
            continue
        value: Any = data
        for part in path:
            value = (value or {}).get(part)
        if isinstance(value, dict) and "model" in value and "endpoint" in value:
            problems.add(path, "give model or endpoint, not both")
        elif path[-1] == "judge" and isinstance(value, dict) and not ({"model", "endpoint"} & set(value)):
            problems.add(path, "a judge needs a model or an endpoint")


def _one_prompt(prompt: dict[str, Any], problems: _Problems) -> None:
    if ("file" in prompt) == ("ref" in prompt):
        problems.add(
            ("prompt",), "give file (the prompt's text, with name) or ref (NAME or NAME@N), not both"
        )
    elif "ref" in prompt:
        for key in ("name", "rules", "facts"):
            if key in prompt:
                problems.add(("prompt", key), "comes with a file: a ref names a version with its own")
    elif "name" not in prompt:
        problems.add(("prompt",), "missing required key 'name' (the prompt's name in the project)")


def _one_heldout(spec_data: dict[str, Any], problems: _Problems) -> None:
    if "heldout" in spec_data and "heldout_percent" in spec_data:
        problems.add(
            ("data", "heldout_percent"), "give heldout (a file or a version) or heldout_percent, not both"
        )
    if "heldout_percent" in spec_data and isinstance(spec_data["train"], dict):
        problems.add(
            ("data", "heldout_percent"), "a version keeps its own split: hold out a file or a version"
        )
    if (
        "heldout" not in spec_data
        and "heldout_percent" not in spec_data
        and isinstance(spec_data["train"], str)
    ):
        problems.add(("data",), "missing the held-out set: heldout (a file) or heldout_percent")


# --- files --------------------------------------------------------------------------------------

_RULE_NUMBER = re.compile(r"^(?:rule|fact) (\d+)\b")


class _Files:
    """The files a spec names: relative paths inside its folder, read bounded."""

    def __init__(self, folder: Path | None, problems: _Problems) -> None:
        self.folder, self.problems = (folder.resolve() if folder else None), problems

    def path(self, where: Path_, value: str) -> Path | None:
        if self.folder is None:
            self.problems.add(
                where,
                f"{value!r}: a spec applied in the browser reads no files: name a version of the project "
                "(prompt: {ref: NAME@N}, data: {train: {version: NAME@N}}) and give rules and facts inline, "
                "or apply the spec with `manage.py apply`",
            )
            return None
        if Path(value).is_absolute():
            self.problems.add(where, f"{value!r}: give a path relative to the spec's folder")
            return None
        path = (self.folder / value).resolve()
        if not path.is_relative_to(self.folder):
            self.problems.add(where, f"{value!r} is outside the spec's folder")
            return None
        if not path.is_file():
            self.problems.add(where, f"{value!r}: no such file")
            return None
        return path

    def prompt(self, prompt: dict[str, Any]) -> CheckedPrompt | None:
        if "file" not in prompt:
            return None
        path = self.path(("prompt", "file"), prompt["file"])
        rules = self._checks(prompt, "rules", rules_module.validate_rules, rules_module.RulesError)
        facts = self._checks(prompt, "facts", facts_module.validate_facts, facts_module.FactsError)
        if path is None or rules is None or facts is None:
            return None
        try:
            with path.open("rb") as f:
                return check_prompt(read_prompt_file(f, prompt["file"]), rules, facts)
        except (OSError, ActionError) as exc:
            self.problems.add(("prompt", "file"), str(exc))
            return None

    def _checks(self, prompt: dict[str, Any], key: str, validate: Any, error: type[Exception]) -> Any:
        """The rules (facts) as written, or None after naming each problem: an
        inline one at its own line, one of a file with the file's name."""
        value = self._json(("prompt", key), prompt.get(key, []))
        if value is None:
            return None
        try:
            validate(value)
        except error as exc:
            for message in getattr(exc, "errors", [str(exc)]):
                match = _RULE_NUMBER.match(message)
                if match and isinstance(prompt.get(key), list):
                    self.problems.add(("prompt", key, int(match.group(1)) - 1), message)
                elif isinstance(prompt.get(key), str):
                    self.problems.add(("prompt", key), f"{prompt[key]}: {message}")
                else:
                    self.problems.add(("prompt", key), message)
            return None
        return value

    def _json(self, where: Path_, value: Any) -> Any:
        if not isinstance(value, str):
            return value
        path = self.path(where, value)
        if path is None:
            return None
        try:
            with path.open("rb") as f:
                raw = f.read(4 * rules_json_max_chars() + 1)
            return parse_rules_json(raw.decode("utf-8"), value)
        except (OSError, UnicodeDecodeError, ActionError) as exc:
            self.problems.add(where, str(exc))
            return None

    def data(self, data: dict[str, Any]) -> None:
        for key in ("train", "heldout"):
            if isinstance(data.get(key), str):
                self.path(("data", key), data[key])
