"""Celery's `apply_async` to a quorum queue with publisher confirms: what a Celery user
gets for "submit a job", measured the way a user calls it.

One thread, one `apply_async` after another (Celery's producer is synchronous, and
with `confirm_publish` each call returns once the broker confirmed its message). The
task is never run: no Celery worker consumes; submissions/s is all that is measured,
as for the gateway's admissions. Each call carries the same job request, as JSON (the
Celery default serializer), persistent (the Celery default delivery mode).

Celery 5 settings, as its documentation gives them for quorum queues and confirms:
    broker_transport_options={"confirm_publish": True}
    task_queues=[Queue(name, queue_arguments={"x-queue-type": "quorum"})]
    task_default_queue=name
"""

from __future__ import annotations

import json
import time
from typing import Any

CELERY_QUEUE = "bench.celery"
WARM_UP = 20  # calls before the clock starts: the connection and the queue's declaration


def _admit(request: dict[str, Any]) -> None:
    """The task's body; never runs (no worker)."""


def celery_rate(url: str, bodies: list[bytes]) -> float | None:
    """Submissions/s of `bodies` through apply_async on broker `url`; None without Celery."""
    try:
        from celery import Celery  # noqa: PLC0415 (the bench extra is optional)
        from kombu.entity import Queue  # noqa: PLC0415
    except ImportError:
        return None
    quorum_queue = Queue(CELERY_QUEUE, queue_arguments={"x-queue-type": "quorum"})  # type: ignore[no-untyped-call]
    app = Celery("sandfleet_bench", broker=url, set_as_current=False)
    app.conf.update(
        broker_transport_options={"confirm_publish": True},
        task_queues=[quorum_queue],
        task_default_queue=CELERY_QUEUE,
        broker_connection_retry_on_startup=False,
    )
    task = app.task(name="bench.admit")(_admit)
    requests = [json.loads(body) for body in bodies]
    try:
        for request in requests[:WARM_UP]:
            task.apply_async(args=[request])
        started = time.perf_counter()
        for request in requests:
            task.apply_async(args=[request])
        elapsed = time.perf_counter() - started
    finally:
        app.close()
    return len(requests) / elapsed
