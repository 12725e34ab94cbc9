"""Webhooks go to public addresses only unless the operator allows private ones (SSRF)."""

import socket

import pytest

from shared.messages import ServiceError
from services.notifier.destinations import Destinations, PublicOnlyResolver
from services.notifier.handlers import put_webhook
from services.notifier.schemas import PutWebhook


@pytest.mark.parametrize("url", [
    "http://127.0.0.1:8080/hook", "http://localhost/hook", "http://api.localhost/x", "http://10.1.2.3/x",
    "http://192.168.0.7/x", "http://169.254.169.254/latest/meta-data", "http://[::1]/x", "http://[::ffff:10.0.0.1]/x",
    "http://0.0.0.0/x", "http://100.64.0.1/x",
])
def test_private_loopback_and_reserved_hosts_are_refused(url):
    assert Destinations().refusal(url) is not None
    assert Destinations(allow_private=True).refusal(url) is None


@pytest.mark.parametrize("url", ["https://hooks.example.com/x", "http://8.8.8.8/x", "https://[2606:4700::1111]/x"])
def test_public_hosts_and_names_pass_the_url_check(url):
    assert Destinations().refusal(url) is None


class _Fixed:
    def __init__(self, *addresses):
        self.addresses = addresses

    async def resolve(self, host, port=0, family=socket.AF_INET):
        return [{"hostname": host, "host": a, "port": port, "family": family, "proto": 0, "flags": 0}
                for a in self.addresses]

    async def close(self):
        pass


async def test_a_name_that_resolves_to_private_addresses_is_not_connected_to():
    with pytest.raises(OSError, match="private or reserved"):
        await PublicOnlyResolver(_Fixed("10.0.0.5", "127.0.0.1")).resolve("rebind.example", 443)
    mixed = await PublicOnlyResolver(_Fixed("10.0.0.5", "93.184.216.34")).resolve("mixed.example", 443)
    assert [r["host"] for r in mixed] == ["93.184.216.34"]


async def test_setting_a_webhook_at_a_private_address_is_a_field_error():
    cmd = PutWebhook(tenant_id="t", url="http://169.254.169.254/x", secret="s" * 16)
    with pytest.raises(ServiceError) as refused:
        await put_webhook(None, cmd, Destinations())
    assert refused.value.code == "validation_error" and "url" in refused.value.details["fields"]
