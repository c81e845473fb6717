"""Which backend answers the jobs' generation (teacher, evals, judge,
lm-eval), on the backend workbench.backend reads from settings, so a variant
answers the same there as in serving.

`hf` (default): the job loads the model in its own process
(`engines.generator.LocalGenerator`). `vllm`: the job asks the vLLM server
(VLLM_URL, else ENGINE_URL where the workbench started one) through
`engines.generator.RemoteGenerator`, after loading the variant's adapter into
it under the variant's engine name.

With `hf`, a teacher job asks the vLLM `make run` starts for teachers when
.venv-vllm is installed (TEACHER_VLLM_URL, TEACHER_BACKEND auto) and it is
up, else answers in process.

A teacher (an absorb's teacher job, the eval's teacher arm) is cached: its
answers go to the project's response cache as they arrive, so a rerun or a
resumed job asks only for what is missing. A teacher job with a
TeacherEndpoint asks that OpenAI-compatible server instead of its base model.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from django.conf import settings

from engines.generator import CachingGenerator, Generator, LocalGenerator, RemoteGenerator
from engines.inference import load_model
from engines.remote import TransportStats
from engines.response_cache import ResponseCache
from engines.vllm_server import VLLMError, load_adapter, served_models
from jobs.models import Job, TeacherEndpoint
from jobs.registry import JobError
from workbench.backend import api_key, engine_url, remote
from workbench.models import FoundationModel, Project, Variant

log = logging.getLogger(__name__)


def remote_generator(base_model: FoundationModel, variant: Variant | None = None) -> RemoteGenerator | None:
    """None with the in-process backend; else the base model, with the
    variant's adapter beside it (loaded into the engine if it is not yet), on
    the vLLM server."""
    if not remote():
        return None
    url = engine_url()
    if not url:
        raise JobError("INFERENCE_BACKEND is vllm but neither VLLM_URL nor ENGINE_URL is set")
    key = api_key()
    adapter = None
    if variant is not None and variant.adapter_path:
        try:
            load_adapter(url, variant.engine_model, variant.adapter_path, api_key=key)
        except VLLMError as exc:
            raise JobError(f"could not load the adapter of {variant} into the vLLM backend: {exc}") from exc
        adapter = variant.engine_model
    return RemoteGenerator(url, base_model.name, adapter, key)


def generator(base_model: FoundationModel, variant: Variant | None = None) -> Generator:
    """What answers for a job: the base model with the variant's adapter (if
    it has one; `adapter=False` asks the base alone), on the chosen backend.
    In process this loads the weights: call it once per job."""
    found = remote_generator(base_model, variant)
    if found is not None:
        return found
    adapter_path = variant.adapter_path if variant is not None and variant.adapter_path else None
    return LocalGenerator(load_model(base_model.path, adapter_path))


def teacher_cache_path(project: Project) -> Path:
    """One cache per project: a rerun of the same prompt and queries by any job hits it."""
    return Path(settings.DATA_DIR) / "teacher-cache" / f"project-{project.pk}.sqlite3"


def endpoint_generator(endpoint: TeacherEndpoint) -> RemoteGenerator:
    """The endpoint as a generator; a named key variable that is unset raises JobError."""
    return RemoteGenerator(
        endpoint.base_url,
        endpoint.model,
        api_key=endpoint.api_key(),
        max_concurrency=endpoint.max_concurrency,
        stats=TransportStats(),
    )


def job_teacher_endpoint(job: Job) -> TeacherEndpoint | None:
    """The endpoint a teacher job asks, or None for its base model; an
    endpoint deleted after the job was queued is an error naming it."""
    recorded = job.params.get("teacher_endpoint")
    if job.teacher_endpoint_id is None and recorded:
        raise JobError(f"the teacher endpoint {recorded.get('name')!r} this job was started with was deleted")
    return job.teacher_endpoint


def teacher_vllm(base_model: FoundationModel) -> RemoteGenerator | None:
    """The vLLM `make run` starts for teacher jobs beside the hf engine, if
    it is up and serves this base model (TEACHER_VLLM_URL); else None."""
    url = settings.TEACHER_VLLM_URL
    if remote() or settings.TEACHER_BACKEND != "auto" or not url:
        return None
    try:
        served = set(served_models(url, timeout=5, api_key=api_key()))
    except VLLMError as exc:
        log.info("teacher vLLM at %s not answering (%s): the teacher answers in process", url, exc)
        return None
    if base_model.name not in served:
        return None
    return RemoteGenerator(url, base_model.name, None, api_key(), stats=TransportStats())


def cached_teacher(
    project: Project, base_model: FoundationModel, endpoint: TeacherEndpoint | None
) -> CachingGenerator:
    """What answers WITH the prompt, behind the project's response cache."""
    inner: Generator
    if endpoint is not None:
        inner, identity = endpoint_generator(endpoint), endpoint.identity
    else:
        inner = teacher_vllm(base_model) or generator(base_model)
        identity = f"model:{base_model.name}|{base_model.path}"
    return CachingGenerator(inner, ResponseCache(teacher_cache_path(project)), identity)


def teacher_backend(teacher: CachingGenerator) -> str:
    """Where a teacher's answers are generated, for the job's log."""
    inner = teacher.inner
    if isinstance(inner, RemoteGenerator):
        return f"{inner.model} on {inner.url}"
    return "in process"


def teacher_generator(job: Job) -> CachingGenerator:
    """The cached generator of a teacher job: its endpoint's RemoteGenerator
    if it has one, else `generator(job.base_model)`."""
    assert job.base_model is not None
    return cached_teacher(job.project, job.base_model, job_teacher_endpoint(job))


def variant_teacher_endpoint(variant: Variant) -> TeacherEndpoint | None:
    """The endpoint whose answers the variant was trained on: the teacher job
    that made its dataset version or an ancestor of it (the team may have
    reviewed and edited them since); None when its base model taught it."""
    version = variant.dataset_version
    for _ in range(100):  # versions form a chain; bounded all the same
        if version is None:
            return None
        job = (
            Job.objects.filter(kind="teacher", output_dataset=version)
            .select_related("teacher_endpoint")
            .first()
        )
        if job is not None:
            return job.teacher_endpoint
        version = version.parent
    return None


def eval_teacher(variant: Variant) -> CachingGenerator | None:
    """The teacher arm's answerer when the variant was taught by an endpoint
    (that endpoint, behind the project's cache); None: the base model answers."""
    endpoint = variant_teacher_endpoint(variant)
    if endpoint is None:
        return None
    return cached_teacher(variant.project, variant.base_model, endpoint)


def eval_teacher_usage(teacher: CachingGenerator, variant: Variant) -> str:
    """The log line of what an eval's endpoint teacher used."""
    return usage_line(teacher_usage(teacher, variant_teacher_endpoint(variant)))


def teacher_usage(teacher: CachingGenerator, endpoint: TeacherEndpoint | None) -> dict[str, Any]:
    """What a cached teacher cost so far, as JSON for a job's params: answers
    from the cache and asked for, tokens in and out (of the answers asked
    for), HTTP requests and retries, and the price when the endpoint has prices."""
    usage: dict[str, Any] = {"teacher": endpoint.snapshot() if endpoint else None, **teacher.stats.to_dict()}
    inner = teacher.inner
    if isinstance(inner, RemoteGenerator) and inner.stats is not None:
        transport = inner.stats.to_dict()
        usage.update(
            requests=int(transport["requests"]),
            retries=int(transport["retries"]),
            retry_wait_seconds=round(transport["retry_wait_seconds"], 1),
        )
    if endpoint is not None:
        cost = endpoint.cost(usage["prompt_tokens"], usage["completion_tokens"])
        if cost is not None:
            usage["cost"] = round(cost, 6)
    return usage


SUMMED = (
    "cache_hits",
    "asked",
    "prompt_tokens",
    "completion_tokens",
    "requests",
    "retries",
    "retry_wait_seconds",
    "cost",
)


def usage_line(usage: dict[str, Any]) -> str:
    teacher = usage.get("teacher")
    who = (
        f"endpoint {teacher['name']} ({teacher['model']} at {teacher['base_url']})"
        if teacher
        else "base model"
    )
    line = (
        f"teacher usage ({who}): {usage.get('asked', 0)} answers asked, {usage.get('cache_hits', 0)} from the "
        f"cache; tokens in {usage.get('prompt_tokens', 0)}, out {usage.get('completion_tokens', 0)}"
    )
    if "requests" in usage:
        line += f"; {usage['requests']} requests, {usage['retries']} retries"
    if "cost" in usage:
        line += f"; cost {usage['cost']:.4f}"
    return line


@contextmanager
def recording_usage(job: Job, teacher: CachingGenerator) -> Iterator[None]:
    """Around a job's teacher calls: on the way out, failed or not, add
    what this attempt used to job.params["teacher_usage"] (summed over the
    job's attempts) and log it, so a failed job still shows what it cost."""
    before = dict(job.params.get("teacher_usage") or {})
    try:
        yield
    finally:
        now = teacher_usage(teacher, job.teacher_endpoint)
        total = {**before, **now}
        for name in SUMMED:
            if name in now or name in before:
                total[name] = round(before.get(name, 0) + now.get(name, 0), 6)
        job.params = {**job.params, "teacher_usage": total}
        Job.objects.filter(pk=job.pk).update(params=job.params)
        job.append_log(usage_line(total))
