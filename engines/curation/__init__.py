"""Training data better than the prompted teacher's raw answers.

Small models follow long prompts badly, and a student copies its teacher, so
the data sets the student's ceiling. The steps that raise it, each explicit
and recorded:

- passages (`context`): the prompt's sentences most relevant to the query
  (BM25) are shown to the teacher beside the question, so the facts it needs
  are where a small model looks;
- prefilled openings: where a rule fixes how an answer begins, the answer
  starts with that text and the model continues it (`opening`);
- adaptive best-of-N (`adaptive`): samples in rounds until one passes every
  rule and fact check once repaired, later rounds with a teacher-only
  reminder of what is still failing, so only hard queries cost more;
- repairs (`repairs`): rule kinds that can be fixed mechanically are fixed,
  and every change is recorded with its before and after;
- picking and the report (`settings`): the sample passing the most checks
  is kept; the report gives the pass rates after each stage and its cost;
- synthesis (`synthesis`): more queries, written by the teacher about the
  prompt's sections and facts, filtered (round trip, near-duplicates) and
  spread evenly over them, for a team with few real ones.

The public face of the package; outside code imports from here only.
"""

from engines.curation.adaptive import (
    EARLY_BELOW,
    Checker,
    Early,
    RoundCost,
    Sample,
    Sampled,
    reminder,
    sample_until_pass,
    verdict,
)
from engines.curation.context import (
    Passage,
    Retriever,
    facts_note,
    last_user_text,
    passages,
    rule_literals,
    student_view,
    unsupported_figures,
    with_note,
    with_passages,
)
from engines.curation.repairs import MAX_WORDS_TARGET, REPAIRS, Change, Repaired, repair
from engines.curation.select import opening, pass_rates, pick_best
from engines.curation.settings import Curated, CurationSettings, curate, quality_report
from engines.curation.synthesis import (
    ABSORB_COUNT,
    JOB_DEFAULT_COUNT,
    JOB_MAX_COUNT,
    NearDuplicates,
    SynthesisSettings,
    Synthesized,
    SyntheticQuery,
    parse_question,
    synthesize,
)

__all__ = [
    "EARLY_BELOW",
    "MAX_WORDS_TARGET",
    "NearDuplicates",
    "REPAIRS",
    "Change",
    "Checker",
    "Curated",
    "CurationSettings",
    "Early",
    "Passage",
    "Repaired",
    "Retriever",
    "RoundCost",
    "Sample",
    "Sampled",
    "SynthesisSettings",
    "ABSORB_COUNT",
    "JOB_DEFAULT_COUNT",
    "JOB_MAX_COUNT",
    "Synthesized",
    "SyntheticQuery",
    "curate",
    "facts_note",
    "last_user_text",
    "opening",
    "parse_question",
    "pass_rates",
    "passages",
    "rule_literals",
    "student_view",
    "pick_best",
    "quality_report",
    "reminder",
    "repair",
    "sample_until_pass",
    "unsupported_figures",
    "synthesize",
    "verdict",
    "with_note",
    "with_passages",
]
