"""The NATS plumbing against the real server."""

from shared import bus
from shared.subjects import Names


async def test_streams_and_consumers_are_declared_idempotently_and_updates_apply(make_settings):
    settings = await make_settings(migrate=False)
    names = Names(settings.prefix)
    nc = await bus.connect(settings, "test")
    try:
        js = nc.jetstream()
        for _ in range(2):
            await bus.ensure_streams(js, settings)
        info = await js.stream_info(names.jobs_stream)
        assert info.config.subjects == [names.jobs_all] and info.config.duplicate_window >= 600
        await bus.ensure_consumer(js, names.jobs_stream, "executor", names.jobs_all, ack_wait_s=30, max_deliver=5)
        await bus.ensure_consumer(js, names.jobs_stream, "executor", names.jobs_all, ack_wait_s=10, max_deliver=7)
        consumer = await js.consumer_info(names.jobs_stream, "executor")
        assert (consumer.config.max_deliver, consumer.config.ack_wait) == (7, 10)
        item = bus.Outgoing(names.job("t"), b"{}", "same-id")
        await bus.publish_many(js, [item, item])
        assert (await js.stream_info(names.jobs_stream)).state.messages == 1  # deduped by Nats-Msg-Id
    finally:
        await nc.close()
