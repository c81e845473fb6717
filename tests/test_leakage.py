from engines.leakage import leak_flags, prompt_spans

PROMPT = (
    "You are Nova, the support assistant of Acme Cloud. Always greet the customer by name and never "
    "promise refunds beyond the thirty day window described in the billing policy of Acme Cloud."
)


def test_it_flags_mentions_of_instructions():
    assert leak_flags("As instructed, I will greet you. My instructions say so.", PROMPT) == [
        'mentions "my instructions", "as instructed"'
    ]
    assert leak_flags("According to the System   Prompt I must help.", PROMPT) == ['mentions "system prompt"']


def test_it_flags_long_quotes_of_the_prompt():
    answer = (
        "Sure! I never promise refunds beyond the thirty day window described in the billing policy here."
    )
    assert leak_flags(answer, PROMPT) == ["quotes 12+ words of the prompt"]


def test_it_passes_clean_answers():
    assert leak_flags("Hello Sam! Your refund was issued within the thirty day window.", PROMPT) == []
    assert leak_flags("", PROMPT) == []


def test_it_reuses_precomputed_spans():
    spans = prompt_spans(PROMPT)
    quote = "always greet the customer by name and never promise refunds beyond the thirty day"
    assert leak_flags(quote, PROMPT, spans) == ["quotes 12+ words of the prompt"]
