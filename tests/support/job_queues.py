"""The job queues as the gateway fills them: made ready for a test, and read back."""

from __future__ import annotations

from collections import Counter

import aio_pika

from sandfleet.common.topology import declare_topology, job_queue_name


async def job_queue(url: str, driver: str = "docker", host: str | None = None) -> str:
    """Declare the fleet's topology and `driver`'s job queue (`host`'s, if given), as a
    worker would; its name."""
    connection = await aio_pika.connect(url)
    async with connection:
        await declare_topology(connection, await connection.channel(), job_queues=[(driver, host)])
    return job_queue_name(driver, host)


async def queued_jobs(url: str, queue_name: str) -> Counter[str]:
    """How many copies of each job the queue holds (by job id), taking them all out."""
    copies: Counter[str] = Counter()
    connection = await aio_pika.connect(url)
    async with connection:
        queue = await (await connection.channel()).get_queue(queue_name)
        while (message := await queue.get(fail=False, no_ack=True)) is not None:
            copies[message.message_id or ""] += 1
    return copies
