"""One settings module, read from the environment with small typed helpers.

Defaults run on one machine with no server: SQLite for the database and
kombu's SQLAlchemy transport on a SQLite file as the Celery broker.
"""

from __future__ import annotations

import os
from pathlib import Path

import dj_database_url
from django.core.exceptions import ImproperlyConfigured

BASE_DIR = Path(__file__).resolve().parent.parent


_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off", "")


def envbool(name: str, default: str) -> bool:
    """Strict: a typo such as `ture` raises instead of silently meaning false."""
    value = os.getenv(name, default).strip().lower()
    if value not in _TRUE + _FALSE:
        raise ImproperlyConfigured(
            f"{name}={os.getenv(name)!r} is not a boolean: use one of {', '.join(_TRUE + _FALSE[:-1])}."
        )
    return value in _TRUE


def envint(name: str, default: int) -> int:
    value = os.getenv(name)
    return int(value) if value not in (None, "") else default


def envlist(name: str, default: str) -> list[str]:
    return [item.strip() for item in os.getenv(name, default).split(",") if item.strip()]


def envpath(name: str, default: Path) -> Path:
    value = os.getenv(name)
    return Path(value).expanduser().resolve() if value else default


def envurl(name: str, default: str) -> str:
    value = os.getenv(name, default).strip().rstrip("/")
    if value and not value.startswith(("http://", "https://")):
        raise ImproperlyConfigured(
            f"{name}={os.getenv(name)!r} is not an http(s) URL, e.g. http://127.0.0.1:8001"
        )
    return value


def envnumber(name: str, default: float, minimum: float, whole: bool = False) -> float:
    """Strict: a number (a whole one with `whole`) no smaller than `minimum`, or the setting raises."""
    raw = os.getenv(name, "").strip()
    try:
        value = (int(raw) if whole else float(raw)) if raw else default
    except ValueError:
        raise ImproperlyConfigured(f"{name}={raw!r} is not a {'whole ' if whole else ''}number.") from None
    if value < minimum:
        raise ImproperlyConfigured(f"{name}={raw!r} must be at least {minimum:g}.")
    return value


DEBUG = envbool("DEBUG", "false")
ALLOWED_HOSTS = envlist("ALLOWED_HOSTS", "127.0.0.1,localhost,testserver")
CSRF_TRUSTED_ORIGINS = envlist("CSRF_TRUSTED_ORIGINS", "")

# Everything the app writes (uploads, models, adapters, checkpoints, the
# SQLite files) lives under one directory.
DATA_DIR = envpath("WORKBENCH_DATA_DIR", BASE_DIR / "var")
MODELS_DIR = envpath("WORKBENCH_MODELS_DIR", DATA_DIR / "models")
MEDIA_ROOT = DATA_DIR / "files"
# SQLite and the embedded broker need the directory before the first connection.
DATA_DIR.mkdir(parents=True, exist_ok=True)

# Placeholders that are public (this repo's .env.example) are no secret.
_PUBLIC_KEYS = {"change-me-to-a-long-random-string", "insecure-dev-key-set-SECRET_KEY-in-production"}
SECRET_KEY_FILE = DATA_DIR / "secret_key"


def _local_secret_key() -> str:
    """The key `manage.py run`/`demo` generate once and keep (mode 0600) in the data dir."""
    if not SECRET_KEY_FILE.is_file() and envbool("WORKBENCH_LOCAL_SECRET_KEY", "false"):
        import secrets

        try:
            fd = os.open(SECRET_KEY_FILE, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:  # another process of the same start wrote it first
            pass
        else:
            with os.fdopen(fd, "w") as f:
                f.write(secrets.token_urlsafe(50) + "\n")
    return SECRET_KEY_FILE.read_text().strip() if SECRET_KEY_FILE.is_file() else ""


SECRET_KEY = os.getenv("SECRET_KEY", "").strip() or _local_secret_key()
if SECRET_KEY in _PUBLIC_KEYS:
    raise ImproperlyConfigured(
        "SECRET_KEY is a published placeholder: set a long random value "
        "(python -c 'import secrets; print(secrets.token_urlsafe(50))')."
    )
if not SECRET_KEY:
    if not DEBUG:
        raise ImproperlyConfigured(
            f"SECRET_KEY is not set and {SECRET_KEY_FILE} does not exist: set SECRET_KEY, or start the "
            "workbench once with `make run` (it generates a local key there)."
        )
    SECRET_KEY = "insecure-dev-key-for-DEBUG-only"

# Models are never fetched from a hub at run time unless explicitly allowed.
HF_OFFLINE = envbool("WORKBENCH_HF_OFFLINE", "true")
if HF_OFFLINE:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "django.contrib.humanize",
    "django_htmx",
    "template_partials",
    "axes",
    "workbench",
    "jobs",
    "evals",
    "serving",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
    "django_htmx.middleware.HtmxMiddleware",
    # Last, as its docs ask: it turns a locked-out login into the lockout page.
    "axes.middleware.AxesMiddleware",
]

ROOT_URLCONF = "workbench.urls"
WSGI_APPLICATION = "workbench.wsgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
                "workbench.context_processors.nav",
            ],
            "builtins": [
                "django.contrib.humanize.templatetags.humanize",
                "template_partials.templatetags.partials",
            ],
        },
    }
]

DATABASES = {
    "default": dj_database_url.parse(
        os.getenv("DATABASE_URL", f"sqlite:///{DATA_DIR / 'workbench.sqlite3'}"),
        conn_max_age=envint("DB_CONN_MAX_AGE", 0),
    )
}
if DATABASES["default"]["ENGINE"] == "django.db.backends.sqlite3":
    # WAL + a busy timeout let the web process and the worker write the same file.
    DATABASES["default"]["OPTIONS"] = {
        "timeout": 30,
        "transaction_mode": "IMMEDIATE",
        "init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;",
    }
    DATABASES["default"]["TEST"] = {"NAME": str(DATA_DIR / "test.sqlite3")}

# Counters shared by the web processes (the /v1 per-key limits). Local memory by default, so each
# gunicorn process counts on its own; CACHE_URL (redis://host:6379/2) makes the limits global.
CACHE_URL = os.getenv("CACHE_URL", "").strip()
CACHES = {
    "default": {"BACKEND": "django.core.cache.backends.redis.RedisCache", "LOCATION": CACHE_URL}
    if CACHE_URL
    else {"BACKEND": "django.core.cache.backends.locmem.LocMemCache", "LOCATION": "workbench"}
}

DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"
AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
    {"NAME": "django.contrib.auth.password_validation.NumericPasswordValidator"},
]
# Logins are throttled (django-axes): after LOGIN_FAILURE_LIMIT failures for one username from one
# address, that pair is locked out for LOGIN_LOCKOUT_MINUTES; a success resets the count.
AUTHENTICATION_BACKENDS = ["axes.backends.AxesStandaloneBackend", "django.contrib.auth.backends.ModelBackend"]
AXES_FAILURE_LIMIT = envint("LOGIN_FAILURE_LIMIT", 5)
AXES_COOLOFF_TIME = envint("LOGIN_LOCKOUT_MINUTES", 15) / 60  # hours
AXES_LOCKOUT_PARAMETERS = [["username", "ip_address"]]
AXES_RESET_ON_SUCCESS = True
AXES_LOCKOUT_TEMPLATE = "registration/locked_out.html"
AXES_VERBOSE = False
LOGIN_URL = "login"
LOGIN_REDIRECT_URL = "project_list"
LOGOUT_REDIRECT_URL = "login"

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = False
USE_TZ = True

STATIC_URL = "/static/"
STATICFILES_DIRS = [BASE_DIR / "static"]
STATIC_ROOT = envpath("STATIC_ROOT", DATA_DIR / "staticfiles")
STATIC_ROOT.mkdir(parents=True, exist_ok=True)
STORAGES = {
    "default": {"BACKEND": "django.core.files.storage.FileSystemStorage"},
    "staticfiles": {
        "BACKEND": "whitenoise.storage.CompressedManifestStaticFilesStorage"
        if not DEBUG and envbool("STATIC_MANIFEST", "false")
        else "django.contrib.staticfiles.storage.StaticFilesStorage"
    },
}
WHITENOISE_USE_FINDERS = True

# Security: strict in production, relaxed for the local default.
SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
SECURE_SSL_REDIRECT = envbool("SECURE_SSL_REDIRECT", "false")
SESSION_COOKIE_SECURE = envbool("SECURE_COOKIES", "false")
CSRF_COOKIE_SECURE = SESSION_COOKIE_SECURE
SECURE_HSTS_SECONDS = envint("SECURE_HSTS_SECONDS", 0)
SECURE_HSTS_INCLUDE_SUBDOMAINS = SECURE_HSTS_SECONDS > 0
SECURE_HSTS_PRELOAD = SECURE_HSTS_SECONDS > 0
SECURE_CONTENT_TYPE_NOSNIFF = True
X_FRAME_OPTIONS = "DENY"

# Celery ----------------------------------------------------------------------
# The longest a single task may run (a fine-tune on a CPU can take hours).
CELERY_TASK_TIME_LIMIT = envint("CELERY_TASK_TIME_LIMIT", 12 * 3600)
CELERY_BROKER_URL = os.getenv("CELERY_BROKER_URL", f"sqla+sqlite:///{DATA_DIR / 'broker.sqlite3'}")
CELERY_RESULT_BACKEND = os.getenv("CELERY_RESULT_BACKEND", "") or None
# With acks_late a message is acknowledged only when its task ends. If the
# broker's visibility timeout were shorter than the longest task, the broker
# would hand a still-running task to a second worker; so it is set longer
# than the hard time limit.
# (Redis only: kombu's SQLAlchemy transport passes its options to create_engine,
# and never redelivers a fetched message; there the job reaper recovers jobs
# of dead workers instead.)
CELERY_BROKER_TRANSPORT_OPTIONS = (
    {"visibility_timeout": CELERY_TASK_TIME_LIMIT + 3600} if CELERY_BROKER_URL.startswith("redis") else {}
)
CELERY_TASK_ACKS_LATE = True
CELERY_TASK_REJECT_ON_WORKER_LOST = True
CELERY_WORKER_PREFETCH_MULTIPLIER = 1
CELERY_TASK_DEFAULT_QUEUE = "default"
# Every task's queue is decided here, never at the call site: model work on
# `gpu`, the rest on `default`. A task that takes a `queue` argument (the
# worker ping, which tests one queue) goes to that queue.
CELERY_TASK_ROUTES = [
    "workbench.celery.route_to_queue_argument",
    {"jobs.tasks.run_job": {"queue": "gpu"}},
]
CELERY_TASK_SERIALIZER = "json"
CELERY_ACCEPT_CONTENT = ["json"]
CELERY_WORKER_SEND_TASK_EVENTS = False
CELERY_BROKER_CONNECTION_RETRY_ON_STARTUP = True
# Worker liveness is stored by the workers themselves (see workbench.models.WorkerHeartbeat).
WORKER_HEARTBEAT_SECONDS = envint("WORKER_HEARTBEAT_SECONDS", 10)
# A running job writes a heartbeat; with none for JOB_STALE_SECONDS its worker
# is taken for dead and the job is requeued (it resumes from its checkpoint).
JOB_HEARTBEAT_SECONDS = envint("JOB_HEARTBEAT_SECONDS", 10)
JOB_STALE_SECONDS = envint("JOB_STALE_SECONDS", 90)
JOB_REAP_SECONDS = envint("JOB_REAP_SECONDS", 15)
# A running job stores its progress (and appends curve points) at most this often.
JOB_PROGRESS_SECONDS = float(os.getenv("JOB_PROGRESS_SECONDS", "2"))
# A variant made by an absorb gets its four-arm comparison on the held-out queries.
AUTO_EVAL = envbool("WORKBENCH_AUTO_EVAL", "true")
EVAL_MAX_NEW_TOKENS = envint("WORKBENCH_EVAL_MAX_NEW_TOKENS", 128)
# The default split holds out at least this many rows (at most half of a small upload):
# 10% of 40 rows is 4 queries, whose CIs span [0, 1] and decide nothing.
EVAL_MIN_HELD_OUT = int(envnumber("WORKBENCH_EVAL_MIN_HELD_OUT", 20, 0, whole=True))
# A CI wider than this on a 0-1 metric (or fewer than EVAL_MIN_HELD_OUT queries) cannot carry a decision.
EVAL_DECISIVE_CI_WIDTH = envnumber("WORKBENCH_EVAL_DECISIVE_CI_WIDTH", 0.3, 0)
# lm-eval tasks of the suites made for absorbed variants: did the student forget general skills?
EVAL_AUTO_LM_EVAL_TASKS = envlist("WORKBENCH_EVAL_LM_EVAL_TASKS", "general_skills")
# Modules that register job runners (jobs.registry); apps may add their own.
JOB_RUNNER_MODULES = [
    "jobs.runners.teacher",
    "jobs.runners.finetune",
    "jobs.runners.dataset_import",
    *envlist("WORKBENCH_EXTRA_JOB_RUNNERS", ""),
]

# Limits on uploads (bytes, rows, characters) --------------------------------
UPLOAD_MAX_BYTES = envint("UPLOAD_MAX_BYTES", 512 * 1024 * 1024)
DATA_UPLOAD_MAX_MEMORY_SIZE = 10 * 1024 * 1024
FILE_UPLOAD_MAX_MEMORY_SIZE = 2 * 1024 * 1024
# Every multipart body is refused from its Content-Length, or stopped at the byte past the limit,
# before it is written anywhere (the upload views set their own limit the same way).
FILE_UPLOAD_HANDLERS = [
    "workbench.uploads.LimitedUploadHandler",
    "django.core.files.uploadhandler.MemoryFileUploadHandler",
    "django.core.files.uploadhandler.TemporaryFileUploadHandler",
]
# Uploads up to this size are imported during the request; larger ones by a job (progress, cancel).
DATASET_SYNC_IMPORT_BYTES = envint("DATASET_SYNC_IMPORT_BYTES", 2 * 1024 * 1024)
DATASET_MAX_ROWS = envint("DATASET_MAX_ROWS", 1_000_000)
DATASET_MAX_ROW_CHARS = envint("DATASET_MAX_ROW_CHARS", 200_000)
# How deep uploaded JSON may nest (a chat row with content parts needs 5; deeper is refused at once).
DATASET_MAX_JSON_DEPTH = int(envnumber("DATASET_MAX_JSON_DEPTH", 32, 8, whole=True))
PROMPT_MAX_CHARS = envint("PROMPT_MAX_CHARS", 1_000_000)
# The most bytes of a prompt file read (UTF-8 takes at most 4 bytes a character, a BOM 3).
PROMPT_MAX_BYTES = envint("PROMPT_MAX_BYTES", 4 * PROMPT_MAX_CHARS + 3)
# The largest rules JSON (textarea or file) accepted.
PROMPT_RULES_MAX_CHARS = envint("PROMPT_RULES_MAX_CHARS", 2_000_000)

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "handlers": {"console": {"class": "logging.StreamHandler"}},
    "root": {"handlers": ["console"], "level": os.getenv("LOG_LEVEL", "INFO")},
    "loggers": {"django.db.backends": {"level": "WARNING"}},
}

# Serving: the /v1 gateway and its inference engine ----------------------------
# `hf`: the in-process transformers engine (engines.engine_server), started by
# `make run`; `vllm`: a vLLM OpenAI server, given by VLLM_URL or, when that is
# empty, started by the workbench from its own venv (engines.vllm_server).
INFERENCE_BACKEND = os.getenv("INFERENCE_BACKEND", "hf").strip().lower()
if INFERENCE_BACKEND not in ("hf", "vllm"):
    raise ImproperlyConfigured(
        f"INFERENCE_BACKEND={os.getenv('INFERENCE_BACKEND')!r} is not a backend: use hf or vllm."
    )


# Teacher jobs (and synthesis) with the hf backend: "auto" asks a vLLM that `make run` starts
# beside the hf engine when .venv-vllm is installed (one request per query with n samples, the
# prompt's KV blocks shared by prefix caching: 2.6x the in-process teacher on 2 cores here), and
# answers in process while it is not up; "hf": always in process. The vllm backend asks its own.
TEACHER_BACKEND = os.getenv("TEACHER_BACKEND", "auto").strip().lower()
if TEACHER_BACKEND not in ("auto", "hf"):
    raise ImproperlyConfigured(f"TEACHER_BACKEND={os.getenv('TEACHER_BACKEND')!r}: use auto or hf.")
# That vLLM's URL: `run` sets it for its worker; empty: none runs.
TEACHER_VLLM_URL = envurl("TEACHER_VLLM_URL", "")

# Where the gateway finds the engine (the hf engine, or a vLLM the workbench starts, listens here).
ENGINE_URL = envurl("ENGINE_URL", "http://127.0.0.1:8001")
# A vLLM server run by the team: with the vllm backend the gateway uses it and starts none.
VLLM_URL = envurl("VLLM_URL", "")
# The API key a vLLM server requires (vLLM's own variable, so one the workbench starts inherits it):
# jobs and the /v1 gateway send it as a Bearer token.
VLLM_API_KEY = os.getenv("VLLM_API_KEY", "").strip()
# Torch threads of the engine process. `make run` gives the worker the other cores.
ENGINE_THREADS = int(envnumber("ENGINE_THREADS", 1, 1, whole=True))
# The price of an hour of the serving machine (any currency), the cost calculator's default input.
SERVING_PRICE_PER_HOUR = envnumber("SERVING_PRICE_PER_HOUR", 1.0, 0)
# The longest the gateway waits for the engine's answer (a long generation on a CPU takes minutes).
ENGINE_TIMEOUT_SECONDS = envnumber("ENGINE_TIMEOUT_SECONDS", 300, 1)
# The largest max_tokens a /v1 client may ask for.
GATEWAY_MAX_TOKENS = int(envnumber("GATEWAY_MAX_TOKENS", 2048, 1, whole=True))
# Per-key limits of /v1 (serving.limits), counted in the cache: per gunicorn process with the
# default local-memory cache, across all of them with CACHE_URL. Refusals are 429 + Retry-After.
V1_MAX_CONCURRENT_PER_KEY = int(envnumber("V1_MAX_CONCURRENT_PER_KEY", 16, 1, whole=True))
# n x max_tokens summed over a key's open requests (16 requests at the largest max_tokens).
V1_MAX_TOKENS_IN_FLIGHT_PER_KEY = int(envnumber("V1_MAX_TOKENS_IN_FLIGHT_PER_KEY", 16 * 2048, 1, whole=True))
V1_REQUESTS_PER_MINUTE_PER_KEY = int(envnumber("V1_REQUESTS_PER_MINUTE_PER_KEY", 600, 1, whole=True))
# n x max_tokens of one request (a 400 above it): n=1 up to 8192 tokens, n=4 at 2048, n=16 at 512.
V1_MAX_N_TIMES_TOKENS = int(envnumber("V1_MAX_N_TIMES_TOKENS", 8192, 1, whole=True))
# How long an open request surely counts; one whose process died is forgotten 1-2 leases after it began.
V1_LEASE_SECONDS = int(envnumber("V1_LEASE_SECONDS", ENGINE_TIMEOUT_SECONDS + 60, 1, whole=True))
# The largest /v1 body (413 from its Content-Length) and the deepest JSON nesting in it (400).
V1_MAX_BODY_BYTES = int(envnumber("V1_MAX_BODY_BYTES", DATA_UPLOAD_MAX_MEMORY_SIZE, 1, whole=True))
V1_MAX_JSON_DEPTH = int(envnumber("V1_MAX_JSON_DEPTH", 32, 2, whole=True))
# Browser origins allowed to call /v1 (CORS), comma-separated, e.g. https://app.example.com; * for any.
# Empty (the default): no CORS headers, and browsers on other origins cannot read the answers.
V1_CORS_ORIGINS = envlist("V1_CORS_ORIGINS", "")
# Training data whose answers fail a checkable rule on more than this share of
# rows gets a warning (the absorb form asks to confirm; the fine-tune logs it).
DATA_FAIL_WARN_SHARE = envnumber("WORKBENCH_DATA_FAIL_WARN_SHARE", 0.2, 0)
# The absorb form refuses a fine-tune on fewer training rows than this unless told to go ahead:
# a handful of rows teaches nothing and leaves an eval too small to say so.
MIN_TRAIN_ROWS = envint("WORKBENCH_MIN_TRAIN_ROWS", 16)
