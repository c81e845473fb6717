import pytest
from django.db import transaction
from kombu import Connection

from tests.conftest import database_url, redis_or_skip
from tests.processes import celery_worker, wait_for
from workbench.actions.models import send_ping
from workbench.celery import app
from workbench.models import WorkerHeartbeat, WorkerPing
from workbench.tasks import answer_ping

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.slow]


def connect(broker_url: str) -> Connection:
    # Not app.connection_for_write: the app's transport options belong to
    # its own broker (Redis in CI) and the SQLAlchemy transport rejects them.
    return Connection(broker_url)


def queued(conn: Connection, queue: str) -> int:
    return conn.default_channel.queue_declare(queue).message_count


def round_trip(broker_url: str, queue: str) -> WorkerPing:
    ping = WorkerPing.objects.create(queue=queue)
    with connect(broker_url) as conn:
        answer_ping.apply_async(args=[ping.pk], queue=queue, connection=conn)
    wait_for(lambda: WorkerPing.objects.get(pk=ping.pk).answered_at, 60, f"ping on {queue}")
    return WorkerPing.objects.get(pk=ping.pk)


def test_it_runs_a_task_on_a_real_worker_with_redis(tmp_path):
    broker = redis_or_skip()
    with celery_worker(broker, database_url(), tmp_path) as (_proc, name):
        assert round_trip(broker, "gpu").answered_by == name
        assert round_trip(broker, "default").answered_by == name


def test_it_runs_a_task_on_a_real_worker_with_the_embedded_broker(tmp_path):
    broker = f"sqla+sqlite:///{tmp_path}/broker.sqlite3"
    with celery_worker(broker, database_url(), tmp_path) as (_proc, name):
        assert round_trip(broker, "gpu").answered_by == name
        beat = WorkerHeartbeat.objects.get(hostname=name)
        assert beat.is_alive and beat.queues == "default,gpu"
    beat.refresh_from_db()
    assert beat.stopped and not beat.is_alive


def test_it_only_routes_to_the_named_queue(tmp_path):
    broker = f"sqla+sqlite:///{tmp_path}/broker.sqlite3"
    with celery_worker(broker, database_url(), tmp_path, queues="default") as (_proc, _name):
        ping = WorkerPing.objects.create(queue="gpu")
        with connect(broker) as conn:
            answer_ping.apply_async(args=[ping.pk], queue="gpu", connection=conn)
        round_trip(broker, "default")  # the worker is up and consuming
        ping.refresh_from_db()
        assert ping.answered_at is None


def test_it_enqueues_only_after_commit():
    with app.connection_for_write() as conn:
        conn.default_channel.queue_purge("default")
        with pytest.raises(RuntimeError), transaction.atomic():
            send_ping("default")
            raise RuntimeError("rolled back")
        assert queued(conn, "default") == 0
        send_ping("default")
        assert queued(conn, "default") == 1
        conn.default_channel.queue_purge("default")


def test_settings_route_every_task_and_the_ping_follows_its_queue_argument():
    from jobs.tasks import run_job
    from workbench.tasks import compute_token_stats

    def queue_of(task, *args, **kwargs):
        return app.amqp.router.route({}, task.name, args, kwargs)["queue"].name

    assert queue_of(run_job, 1) == "gpu"
    assert queue_of(compute_token_stats, 1, 2) == "default"
    assert queue_of(answer_ping, 1, queue="gpu") == "gpu"
    assert queue_of(answer_ping, 1, queue="default") == "default"
    with app.connection_for_write() as conn:
        conn.default_channel.queue_purge("gpu")
        send_ping("gpu")
        assert queued(conn, "gpu") == 1
        conn.default_channel.queue_purge("gpu")


def test_a_heartbeat_database_error_is_logged_and_retried_and_a_bug_is_raised(monkeypatch, caplog):
    """Every error used to be swallowed without a word, bugs included."""
    from django.db import OperationalError

    from workbench.celery import _touch

    WorkerHeartbeat.objects.create(hostname="w1")
    manager = WorkerHeartbeat.objects

    def lost_connection(*args, **kwargs):
        raise OperationalError("server closed the connection unexpectedly")

    monkeypatch.setattr(manager, "filter", lost_connection)
    assert _touch("w1") is False
    assert "heartbeat of w1 not written" in caplog.text and "server closed" in caplog.text

    def bug(*args, **kwargs):
        raise TypeError("a bug")

    monkeypatch.setattr(manager, "filter", bug)
    with pytest.raises(TypeError):
        _touch("w1")
    monkeypatch.undo()
    assert _touch("w1") is True
