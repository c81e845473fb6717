"""Catch-alls that hid errors: a prompt whose tokens cannot be counted says
why (and a bug is not mistaken for a broken model), and a fine-tune never
makes a variant silently served without its teacher's guard rails."""

import io
import json
import shutil
from pathlib import Path

import pytest

from jobs.registry import JobError
from jobs.runners.finetune import _guard_rails
from workbench.actions.datasets import import_dataset
from workbench.prompt_costs import TokenCountError, breakdown


def test_a_missing_model_directory_is_a_token_count_error(tmp_path, caplog):
    with pytest.raises(TokenCountError, match="cannot count tokens"):
        breakdown(str(tmp_path / "gone"), "Be brief.")
    assert "cannot count tokens" in caplog.text


def test_a_chat_template_that_does_not_render_is_a_token_count_error(tiny_model_dir: Path, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_model_dir, broken)
    config = json.loads((broken / "tokenizer_config.json").read_text())
    config["chat_template"] = "{% for m in messages %}{{ m.content | no_such_filter }}{% endfor %}"
    (broken / "tokenizer_config.json").write_text(json.dumps(config))
    (broken / "chat_template.jinja").unlink(missing_ok=True)
    with pytest.raises(TokenCountError):
        breakdown(str(broken), "Be brief.")


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("generation", "rails"),
    [
        (None, {}),
        (
            {"temperature": 0.0, "repetition_penalty": 1.3, "stop": ["\n\nUser:"]},
            {"repetition_penalty": 1.3, "stop": ["\n\nUser:"]},
        ),
        # a teacher setting other than the rails that no longer validates does not matter here
        ({"no_such_setting": 1, "no_repeat_ngram_size": 4}, {"no_repeat_ngram_size": 4}),
    ],
)
def test_the_variant_takes_its_teachers_guard_rails(alice, alice_project, generation, rails):
    version = import_dataset(alice_project, alice, "d", io.BytesIO(b"hi\n"), filename="d.txt")
    version.meta = {**version.meta, **({"generation": generation} if generation is not None else {})}
    assert _guard_rails(version) == rails


@pytest.mark.django_db
@pytest.mark.parametrize("generation", [{"repetition_penalty": "strong"}, {"stop": [""]}, ["stop"]])
def test_guard_rails_that_no_longer_validate_stop_the_fine_tune(alice, alice_project, generation):
    """They used to become {}: the variant was served without them and looped."""
    version = import_dataset(alice_project, alice, "d", io.BytesIO(b"hi\n"), filename="d.txt")
    version.meta = {**version.meta, "generation": generation}
    with pytest.raises(JobError, match="guard rails|generation settings"):
        _guard_rails(version)
