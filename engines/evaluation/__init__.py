"""Evals of a prompt-absorbed variant: score answers, compare arms, judge, run lm-eval.

The public face of the package; outside code imports from here only.

- `arms`: the four arms (floor, teacher, student, student+prompt) defined
  once, and generating them through one `engines.generator.Generator`.
- `scoring`: one answer's rule checks, reference metrics (exact match, chrF,
  ROUGE-L) and agreement with the teacher.
- `stats`: bootstrap confidence intervals, paired over the examples
  (`mean_ci`, `paired_difference`, `prompt_effect_retained`), latency and
  judge-human agreement.
- `judge`: the LLM-as-judge protocol (`judge_messages`, `parse_judge`) and
  grading through a Generator (`judge_answers`).
- `harness`: lm-eval tasks written from local data and `run_lm_eval`,
  offline, on lm-eval's hf model or through a Generator.

Plain Python: no Django, no Celery; torch, lm_eval, sacrebleu, rouge_score,
scipy and scikit-learn are imported only by the functions that use them.
"""

from engines.evaluation.arms import (
    ARM_BY_NAME,
    ARM_SPECS,
    ARMS,
    FLOOR,
    STUDENT,
    STUDENT_PROMPT,
    TEACHER,
    Arm,
    arm,
    arm_spec,
    generate_arms,
    single_request_latency,
)
from engines.evaluation.harness import (
    DATA_DIR,
    GENERAL_SKILLS_SHOTS,
    METRICS_MODULE,
    EvalError,
    LmEvalResult,
    MetricValue,
    TaskResult,
    general_skills_rows,
    general_skills_task,
    generator_lm,
    lm_eval_process_results,
    run_lm_eval,
    write_task,
)
from engines.evaluation.judge import JudgeVerdict, judge_answers, judge_format, judge_messages, parse_judge
from engines.evaluation.scoring import ExampleScore, chrf, normalize_answer, rouge_l, score_example
from engines.evaluation.stats import (
    Estimate,
    judge_human_agreement,
    latency_summary,
    mean_ci,
    paired_difference,
    prompt_effect_retained,
)

__all__ = [
    "ARMS",
    "ARM_BY_NAME",
    "ARM_SPECS",
    "DATA_DIR",
    "FLOOR",
    "GENERAL_SKILLS_SHOTS",
    "METRICS_MODULE",
    "STUDENT",
    "STUDENT_PROMPT",
    "TEACHER",
    "Arm",
    "Estimate",
    "EvalError",
    "ExampleScore",
    "JudgeVerdict",
    "LmEvalResult",
    "MetricValue",
    "TaskResult",
    "arm",
    "arm_spec",
    "chrf",
    "general_skills_rows",
    "general_skills_task",
    "generate_arms",
    "generator_lm",
    "judge_answers",
    "judge_format",
    "judge_human_agreement",
    "judge_messages",
    "latency_summary",
    "lm_eval_process_results",
    "mean_ci",
    "normalize_answer",
    "paired_difference",
    "parse_judge",
    "prompt_effect_retained",
    "rouge_l",
    "run_lm_eval",
    "score_example",
    "single_request_latency",
    "write_task",
]
