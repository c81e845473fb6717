"""Eval runs as a kind of job: every run of one job shares one generator (one
loaded base model, or one server; the adapter is switched off for the base
arms, never reloaded); each example's output and checks are stored, then the
run's summary, then the four-arm headline when the runs are a comparison."""

from __future__ import annotations

import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from django.db import transaction

from engines import evaluation as ev
from engines.evaluation import ARM_BY_NAME, EvalError
from engines.facts import FactsError, fact_checks, validate_facts
from engines.generator import Generator, LocalGenerator
from engines.inference import GenerationSettings
from engines.progress import Progress
from engines.remote import RemoteGenerationError
from engines.rules import Rule, check_all, validate_rules
from evals.models import ArmComparison, EvalExample, EvalResult, EvalRun, EvalSuite
from jobs.backend import endpoint_generator, eval_teacher, eval_teacher_usage, generator, remote_generator
from jobs.registry import JobCancelled, JobRunner, register
from workbench.models import DatasetRow

LATENCY_SAMPLE = 4  # single requests timed per run for p50/p95 (each costs a full generation)
NOT_AN_ARM = len(ARM_BY_NAME)  # plain runs come after the arms


def run_order(run: EvalRun) -> tuple[int, int]:
    arm = ARM_BY_NAME.get(run.arm)
    return (arm.run_order if arm else NOT_AN_ARM, run.pk)


def with_adapter(run: EvalRun) -> bool:
    """Whether the job's adapter answers for this run: as its arm says, or
    (a plain run) when the run names a variant."""
    arm = ARM_BY_NAME.get(run.arm)
    return arm.with_adapter if arm else run.variant_id is not None


def estimate_json(e: ev.Estimate) -> dict[str, Any]:
    return {"value": e.value, "low": e.low, "high": e.high, "n": e.n, "note": e.note}


def teacher_answers(suite: EvalSuite) -> dict[int, str]:
    """Example id -> the prompted base model's answer, from the suite's
    latest finished teacher run (what agreement is measured against)."""
    run = (
        suite.runs.filter(arm=ev.TEACHER, summary__complete=True).order_by("-created_at").first()
        or suite.runs.filter(variant__isnull=True, prompt_version__isnull=False, summary__complete=True)
        .order_by("-created_at")
        .first()
    )
    if run is None:
        return {}
    return dict(run.results.values_list("example_id", "output"))


def data_compliance(run_rules: Sequence[Rule], comparison: ArmComparison) -> dict[str, float]:
    """Per-rule pass rate of the answers the student was trained on: the
    ceiling it learned from."""
    version = comparison.variant.dataset_version
    if version is None or not run_rules:
        return {}
    passed: dict[str, int] = {}
    n = 0
    rows = version.rows.filter(split=DatasetRow.TRAIN).values_list("messages", flat=True)
    for messages in rows.iterator(chunk_size=2000):
        if messages[-1]["role"] != "assistant":
            continue
        n += 1
        checks = check_all(run_rules, messages[-1]["content"])
        for name, ok in checks.items():
            passed[f"rule:{name}"] = passed.get(f"rule:{name}", 0) + int(ok)
        passed["all_rules"] = passed.get("all_rules", 0) + int(all(checks.values()))
    return {k: v / n for k, v in passed.items()} if n else {}


@register
class EvalRunner(JobRunner):
    kind = "eval"
    label = "Eval run"
    requires = ("base_model",)
    user_errors = (EvalError, RemoteGenerationError)

    def run(self) -> None:
        job = self.job
        assert job.base_model is not None
        runs = sorted(
            EvalRun.objects.filter(job=job).select_related(
                "suite", "variant", "prompt_version", "base_model"
            ),
            key=run_order,
        )
        if not runs:
            self.log("no eval runs attached to this job")
            return
        suite = runs[0].suite
        examples = list(suite.examples.order_by("index"))
        rules = validate_rules(suite.rules)
        settings = GenerationSettings.from_dict(job.params.get("generation"))
        variants = {
            r.variant.adapter_path: r.variant
            for r in runs
            if r.variant_id and r.variant and r.variant.adapter_path
        }
        if len(variants) > 1:
            raise ValueError(
                "one eval job loads one base model and at most one adapter"
            )  # a bug in the caller
        todo = [r for r in runs if not r.summary.get("complete")]
        self.log(
            f"eval: {len(runs)} run(s) on {suite} ({len(examples)} examples), base {job.base_model.name}"
            f"{', adapter ' + next(iter(variants)) if variants else ''}; {len(runs) - len(todo)} already done"
        )
        started = time.monotonic()
        # Every stage counts in one total, so the page says what runs now and an ETA for all of it:
        # an answer per arm and example, a verdict per judged answer, an arm's worth per lm-eval pass.
        lm_arms = (
            len([r for r in runs if r.arm in (ev.FLOOR, ev.STUDENT)]) if runs[0].comparison_id else len(runs)
        )
        self.total = len(examples) * (
            len(todo) + (len(runs) if suite.has_judge else 0) + lm_arms * len(suite.lm_eval_tasks)
        )
        self.done, self.started, self.per_arm, self.stage = 0, started, len(examples), ""
        self.answered, self.answer_seconds = 0, 0.0
        self.loads = 0  # base model loads of this job: one in process, whatever the number of arms
        if todo:
            answerer = generator(job.base_model, next(iter(variants.values()), None))
            self.loads += isinstance(answerer, LocalGenerator)
            for n, run in enumerate(todo, start=1):
                stage = f"answers of {run.label} (arm {n} of {len(todo)})"

                def progress(p: Progress, offset: int = self.done, stage: str = stage) -> None:
                    self._stage(stage, offset + p.done)

                self._stage(stage, self.done)
                began = time.monotonic()
                self._generate(answerer, run, examples, settings, progress)
                self.answer_seconds += time.monotonic() - began
                self.answered += len(examples)
                self.done += len(examples)
                if self.should_stop():
                    raise JobCancelled()
            del answerer
        for run in runs:
            self._score(run, examples, rules)
        if suite.has_judge:
            self._judge(suite, runs, examples)
        for task in suite.lm_eval_tasks:
            self._lm_eval(suite, runs, task)
        self._stage("scores and the headline", self.total)
        for run in runs:
            self._summarize(run, rules)
        comparison = runs[0].comparison
        if comparison is not None:
            self._headline(comparison, runs, rules)
        self.log(f"eval: done in {time.monotonic() - started:.0f} s")

    # --- steps -------------------------------------------------------------------

    def _stage(self, stage: str, done: float) -> None:
        """Progress over the whole eval, the unit naming the stage now running."""
        # The answers and their seconds apart: what the plan's eval estimate measures its rate by.
        metrics = {"stage": stage, "answers": self.answered, "answer_seconds": round(self.answer_seconds, 1)}
        self.progress(
            Progress.since(self.started, done, self.total or None, "eval steps", metrics=metrics),
            now=stage != self.stage,
        )
        self.stage = stage

    def _generate(
        self,
        answerer: Generator,
        run: EvalRun,
        examples: list[EvalExample],
        settings: GenerationSettings,
        progress: Any,
    ) -> None:
        conversations = [e.messages for e in examples]
        prompt = run.prompt_version.text if run.prompt_version else None
        sample = int(self.job.params.get("latency_sample", LATENCY_SAMPLE))
        adapter = with_adapter(run)
        if adapter and run.variant is not None:
            # The adapter answers as it is served: with its prompt's passages if it learned to read them.
            conversations = [run.variant.student_view(c) for c in conversations]
        # A variant taught by an endpoint: the teacher arm asks that endpoint (cached), not the base.
        taught = run.comparison.variant if run.arm == ev.TEACHER and run.comparison else None
        endpoint = eval_teacher(taught) if taught else None
        began = time.monotonic()
        completions = (endpoint or answerer).generate(
            conversations, prompt, settings, adapter=adapter, progress=progress, should_stop=self.should_stop
        )
        wall = time.monotonic() - began
        latencies = ev.single_request_latency(  # timed on real requests, never on cache hits
            endpoint.inner if endpoint else answerer,
            conversations,
            prompt,
            settings,
            sample=sample,
            adapter=adapter,
        )
        if endpoint is not None and taught is not None:
            self.log(f"{run.label}: {eval_teacher_usage(endpoint, taught)}")
        with transaction.atomic():
            EvalResult.objects.filter(run=run).delete()
            EvalResult.objects.bulk_create(
                [
                    EvalResult(
                        run=run,
                        example=e,
                        output=c.text,
                        finish_reason=c.finish_reason,
                        prompt_tokens=c.prompt_tokens,
                        completion_tokens=c.completion_tokens,
                        seconds=c.seconds,
                    )
                    for e, c in zip(examples, completions, strict=True)
                ]
            )
            run.generation = settings.to_dict()
            run.summary = {
                "wall_seconds": wall,
                "seconds_per_example": wall / max(1, len(examples)),
                "batch_size": settings.batch_size,
                "latency": ev.latency_summary(latencies),
                "generated": True,
            }
            run.save(update_fields=["generation", "summary"])
        self.log(f"{run.label}: {len(examples)} answers in {wall:.1f} s")

    def _score(self, run: EvalRun, examples: list[EvalExample], rules: Sequence[Rule]) -> None:
        teacher = teacher_answers(run.suite) if run.arm != ev.TEACHER else {}
        results = list(run.results.select_related("example"))
        try:
            facts = validate_facts(run.suite.facts)
        except FactsError as exc:  # stored before today's limits: say so, score the rest
            self.log(f"{run.arm or 'run'}: facts not checked: {'; '.join(exc.errors)[:500]}")
            facts = []
        unchecked: dict[str, tuple[int, str]] = {}  # rule -> (answers, first reason)
        for r in results:
            score = ev.score_example(
                r.output,
                rules=rules,
                reference=r.example.reference or None,
                teacher=teacher.get(r.example_id),
            )
            r.checks = {**score.metrics(), **fact_checks(facts, r.example.query, r.output)}
            for name, reason in score.rule_errors.items():
                count, first = unchecked.get(name, (0, reason))
                unchecked[name] = (count + 1, first)
        EvalResult.objects.bulk_update(results, ["checks"], batch_size=500)
        # A check that could not run (a pattern past its time limit) counts as failed: say why.
        for name, (count, reason) in unchecked.items():
            self.log(
                f"{run.arm or 'run'}: rule {name!r} failed on {count} answer(s) without a verdict: {reason}"
            )

    def _judge(self, suite: EvalSuite, runs: list[EvalRun], examples: list[EvalExample]) -> None:
        judge_variant = suite.judge
        judge: Generator
        if suite.judge_endpoint is not None:
            judge = endpoint_generator(suite.judge_endpoint)
        else:
            base = judge_variant.base_model if judge_variant else suite.judge_base
            assert base is not None
            judge = generator(base, judge_variant)
        # Room for judge_format's reasoning (at most 400 characters) and its score.
        settings = GenerationSettings(max_new_tokens=384, batch_size=8)
        for n, run in enumerate(runs, start=1):
            self._stage(f"the judge on {run.label} (arm {n} of {len(runs)})", self.done)
            results = list(run.results.select_related("example"))
            verdicts = ev.judge_answers(
                judge,
                suite.judge_rubric,
                [(r.example.query, r.output, r.example.reference or None) for r in results],
                settings,
                should_stop=self.should_stop,
            )
            for r, (verdict, text) in zip(results, verdicts, strict=True):
                r.judge_score = verdict.score
                r.judge_reasoning = (
                    verdict.reasoning if verdict.score is not None else f"{verdict.error}\n---\n{text}"
                )
            EvalResult.objects.bulk_update(results, ["judge_score", "judge_reasoning"], batch_size=500)
            self.done += len(examples)
        self.log(f"judge: {suite.judge_label} scored {len(runs)} run(s)")

    def _lm_eval(self, suite: EvalSuite, runs: list[EvalRun], task: str) -> None:
        if runs[0].comparison_id is not None:
            # What the four arms ask of lm-eval: did the student forget what the base knew?
            runs = [r for r in runs if r.arm in (ev.FLOOR, ev.STUDENT)]
        with tempfile.TemporaryDirectory(prefix="wb-lmeval-") as tmp:
            task_dir = Path(tmp)
            name = task
            if task == "suite":
                rows = [
                    {"query": e.query, "answer": e.reference}
                    for e in suite.examples.order_by("index")
                    if e.reference
                ]
                if not rows:
                    self.log("lm-eval: the suite has no reference answers; task 'suite' skipped")
                    return
                name = ev.write_task(task_dir, f"wb_suite_{suite.pk}", rows)
            elif task == "general_skills":
                name = ev.general_skills_task(task_dir)
            for n, run in enumerate(runs, start=1):
                self._stage(f"lm-eval {task} on {run.label} (arm {n} of {len(runs)})", self.done)
                variant = run.variant if run.variant_id and run.variant else None
                # In process lm-eval loads the model itself (its own hf model); on the vLLM backend the server answers.
                result = ev.run_lm_eval(
                    run.base_model.path,
                    [name],
                    task_dir=task_dir,
                    adapter_dir=variant.adapter_path if variant else None,
                    system_prompt=run.prompt_version.text if run.prompt_version else None,
                    generator=remote_generator(run.base_model, variant),
                    adapter=with_adapter(run),
                )
                task_result = result.tasks[name]
                lm = dict(run.summary.get("lm_eval") or {})
                lm[task] = {
                    "task": name,
                    "metric": task_result.metric,
                    "samples": task_result.correct,
                    "per_document": task_result.per_document,
                    "metrics": {
                        k: {"value": v.value, "stderr": v.stderr} for k, v in task_result.metrics.items()
                    },
                }
                run.summary = {**run.summary, "lm_eval": lm}
                run.save(update_fields=["summary"])
                self.done += self.per_arm
        self.log(f"lm-eval {task}: {len(runs)} run(s)")

    def _summarize(self, run: EvalRun, rules: Sequence[Rule]) -> None:
        results = list(
            run.results.order_by("example__index").values(
                "checks", "judge_score", "prompt_tokens", "completion_tokens"
            )
        )
        metrics: dict[str, Any] = {}
        names = sorted({k for r in results for k in r["checks"]})
        for name in names:
            values = [float(r["checks"][name]) for r in results if name in r["checks"]]
            metrics[name] = estimate_json(ev.mean_ci(values))
        judged = [float(r["judge_score"]) for r in results if r["judge_score"] is not None]
        if judged:
            metrics["judge"] = estimate_json(ev.mean_ci(judged))
        for task, data in (run.summary.get("lm_eval") or {}).items():
            metrics[f"lm_eval:{task}"] = estimate_json(
                ev.mean_ci([float(x) for x in data.get("samples", [])])
            )
            # The task's other metrics beside its primary one (general skills: the strict exact match).
            for name, values in (data.get("per_document") or {}).items():
                if name != data.get("metric"):
                    metrics[f"lm_eval:{task}:{name}"] = estimate_json(ev.mean_ci([float(x) for x in values]))
        n = max(1, len(results))
        run.summary = {
            **run.summary,
            "metrics": metrics,
            "examples": len(results),
            "prompt_tokens": sum(r["prompt_tokens"] for r in results) / n,
            "completion_tokens": sum(r["completion_tokens"] for r in results) / n,
            "model_loads": self.loads,
            "complete": True,
        }
        run.save(update_fields=["summary"])

    def _headline(self, comparison: ArmComparison, runs: list[EvalRun], rules: Sequence[Rule]) -> None:
        by_arm = {r.arm: r for r in runs}
        metric = comparison.suite.main_metric

        def per_example(arm: str, name: str) -> list[float | None]:
            """The arm's value per example; None where the metric is absent (a
            fact metric on a query no fact applies to). An unjudged answer scores 0."""
            run = by_arm.get(arm)
            if run is None:
                return []
            rows = run.results.order_by("example__index").values_list("checks", "judge_score")
            if name == "judge":
                return [float(j) if j is not None else 0.0 for _c, j in rows]
            if name.startswith("fact"):
                return [float(c[name]) if name in c else None for c, _j in rows]
            return [float(c.get(name, 0.0)) for c, _j in rows]

        def paired(name: str, *arms: str) -> list[list[float]]:
            """The arms' values on the examples where every one of them has the metric."""
            columns = [per_example(arm, name) for arm in arms]
            rows = [row for row in zip(*columns, strict=True) if None not in row]
            return [[float(v) for v in column] for column in zip(*rows, strict=True)] or [[] for _ in arms]

        headline: dict[str, Any] = {"metric": metric}
        if {ev.FLOOR, ev.TEACHER, ev.STUDENT} <= set(by_arm):
            student, floor, teacher = paired(metric, ev.STUDENT, ev.FLOOR, ev.TEACHER)
            retained = ev.prompt_effect_retained(student, floor, teacher)
            headline["retained"] = estimate_json(retained)
            headline["absolute"] = {arm: (by_arm[arm].metric(metric) or {}).get("value") for arm in by_arm}
            saved = by_arm[ev.TEACHER].summary.get("prompt_tokens", 0) - by_arm[ev.STUDENT].summary.get(
                "prompt_tokens", 0
            )
            headline["tokens_saved_per_1000"] = round(saved * 1000)
            for task in comparison.suite.lm_eval_tasks:
                floor = (by_arm[ev.FLOOR].summary.get("lm_eval") or {}).get(task, {}).get("samples") or []
                student = (by_arm[ev.STUDENT].summary.get("lm_eval") or {}).get(task, {}).get("samples") or []
                if floor and len(floor) == len(student):
                    diff = ev.paired_difference([float(x) for x in student], [float(x) for x in floor])
                    headline.setdefault("lm_eval", {})[task] = estimate_json(diff)
        # Substance beside form: fact recall per arm (mean over the queries a fact
        # applies to, with its CI) and the student's paired difference from the teacher.
        if any(r.metric("fact_recall") for r in runs):
            headline["fact_recall"] = {arm: by_arm[arm].metric("fact_recall") for arm in by_arm}
            if {ev.TEACHER, ev.STUDENT} <= set(by_arm):
                student, teacher = paired("fact_recall", ev.STUDENT, ev.TEACHER)
                headline["fact_recall_vs_teacher"] = estimate_json(ev.paired_difference(student, teacher))
        if comparison.suite.has_judge:
            headline["judge"] = {arm: by_arm[arm].metric("judge") for arm in by_arm}
        headline["data_compliance"] = data_compliance(rules, comparison)
        headline["model_loads"] = self.loads
        comparison.headline = headline
        comparison.save(update_fields=["headline"])
