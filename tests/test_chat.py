from transformers import AutoTokenizer

from engines.chat import prompt_completion, render


def test_it_renders_no_system_prompt_with_the_templates_own_default(smollm2_dir):
    tok = AutoTokenizer.from_pretrained(str(smollm2_dir))
    msgs = [{"role": "system", "content": "ignored"}, {"role": "user", "content": "hi"}]
    text = render(tok, msgs, system_prompt=None)
    assert "ignored" not in text
    assert text == tok.apply_chat_template([msgs[1]], tokenize=False, add_generation_prompt=True)


def test_it_splits_prompt_and_completion_on_the_full_rendering(smollm2_dir):
    tok = AutoTokenizer.from_pretrained(str(smollm2_dir))
    msgs = [{"role": "user", "content": "hi"}]
    prompt, completion = prompt_completion(tok, msgs, "Arrr!", system_prompt="Be a pirate.")
    assert prompt.startswith("<|im_start|>system\nBe a pirate.<|im_end|>")
    assert completion == "Arrr!<|im_end|>\n"
