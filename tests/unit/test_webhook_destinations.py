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


@pytest.mark.parametrize("url", [
    "https://hooks.example.com/x", "http://8.8.8.8/x", "https://[2606:4700::1111]/x", "http://93.184.216.34/",
    "http://bücher.example/", "http://xn--bcher-kva.example/", "https://hooks.example.com./x", "http://a_b.example/",
    "http://" + "a" * 63 + ".example/", "http://" + ".".join(["a" * 63] * 3 + ["b" * 61]) + "/",
])
def test_public_hosts_and_names_pass_the_url_check(url):
    assert Destinations().refusal(url) is None
    assert Destinations(allow_private=True).refusal(url) is None


@pytest.mark.parametrize("url, address", [
    ("http://2130706433/", "127.0.0.1"), ("http://0x7f000001/", "127.0.0.1"), ("http://0177.0.0.1/", "127.0.0.1"),
    ("http://127.1/", "127.0.0.1"), ("http://0/", "0.0.0.0"), ("http://0xa9.254.169.254/x", "169.254.169.254"),
    ("http://10.1/x", "10.0.0.1"),
])
def test_numeric_forms_of_private_addresses_are_refused_like_the_address(url, address):
    host = url.split("/")[2]
    assert Destinations().refusal(url) == f"must not point at a private or reserved address ({host} is {address})"
    # Allowing private addresses does not make these usable: delivery refuses non-canonical IPv4 too.
    assert Destinations(allow_private=True).refusal(url) == \
        f"must give the IPv4 address in dotted-quad form ({address}, not {host})"


@pytest.mark.parametrize("url, host", [
    ("http://0x5db8d822/", "0x5db8d822"), ("http://1572395042/", "1572395042"),
    ("http://93.184.216.042/", "93.184.216.042"), ("http://93.184.216.34./", "93.184.216.34."),
    ("http://93.12113954/", "93.12113954"),
    ("http://0x5d.0xb8.0xd8.0x22/", "0x5d.0xb8.0xd8.0x22"),
])
def test_numeric_forms_of_public_addresses_must_be_dotted_quads(url, host):
    for destinations in (Destinations(), Destinations(allow_private=True)):
        refusal = destinations.refusal(url)
        assert refusal == f"must give the IPv4 address in dotted-quad form (93.184.216.34, not {host})"


@pytest.mark.parametrize("url, host", [
    ("http://1.2.3.4.5/", "1.2.3.4.5"), ("http://4294967296/", "4294967296"), ("http://256.1.1.1/", "256.1.1.1"),
    ("http://09.1.1.1/", "09.1.1.1"), ("http://example.123/", "example.123"), ("http://1.2.3.0x100/", "1.2.3.0x100"),
])
def test_numeric_hosts_that_are_no_address_are_refused(url, host):
    for destinations in (Destinations(), Destinations(allow_private=True)):
        assert destinations.refusal(url) == f"has a numeric host that is not an IPv4 address ({host})"


@pytest.mark.parametrize("url, refusal", [
    ("http://a..b/", "has an empty label in its host name (a..b)"),
    ("http://.example.com/", "has an empty label in its host name (.example.com)"),
    ("http://example.com../", "has an empty label in its host name (example.com..)"),
    ("http://bü..example/", "has an empty label in its host name (bü..example)"),
    ("http://xn--.com/", "has an invalid punycode label in its host name (xn--)"),
    ("http://xn--a.example/", "has an invalid punycode label in its host name (xn--a)"),
    ("http://" + "a" * 64 + ".example/", f"has a host name label longer than 63 characters ({'a' * 40}…)"),
    ("http://" + ".".join(["a" * 63] * 3 + ["b" * 62]) + "/", "has a host name longer than 253 characters (254)"),
    ("http://-hooks.example/", "has a host name label that starts or ends with '-' (-hooks)"),
    ("http://hooks-.example/", "has a host name label that starts or ends with '-' (hooks-)"),
    ("http://hooks.example-/", "has a host name label that starts or ends with '-' (example-)"),
    ("http://ex%61mple.com/", "has a character not allowed in a host name ('%')"),
    ("http://" + "ü" * 70 + ".example/", f"has a host name that is not valid IDNA ({'ü' * 40}…: Label too long)"),
])
def test_hosts_that_are_not_valid_dns_names_are_refused(url, refusal):
    assert Destinations().refusal(url) == refusal
    assert Destinations(allow_private=True).refusal(url) == refusal


@pytest.mark.parametrize("url, refusal", [
    ("http://１２７.０.０.１/x", "must not point at a private or reserved address (127.0.0.1)"),
    ("http://127。0。0。1/x", "must not point at a private or reserved address (127.0.0.1)"),
    ("http://１０.0.0.1/x", "must not point at a private or reserved address (10.0.0.1)"),
    ("http://ｌｏｃａｌｈｏｓｔ/x", "must not point at this machine (localhost)"),
    ("http://localhost./x", "must not point at this machine (localhost)"),
])
def test_hosts_are_judged_in_the_ascii_form_delivery_uses(url, refusal):
    # yarl turns fullwidth digits and ideographic dots into 127.0.0.1, which aiohttp connects to directly.
    assert Destinations().refusal(url) == refusal
    assert Destinations(allow_private=True).refusal(url) is None


@pytest.mark.parametrize("url, refusal", [("http://[::1/x", "is not a valid URL"), ("http:///x", "must name a host")])
def test_urls_without_a_usable_host_are_refused(url, refusal):
    assert Destinations().refusal(url) == refusal
    assert Destinations(allow_private=True).refusal(url) == refusal


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


@pytest.mark.parametrize("url, refusal", [
    ("http://2130706433/x", "must not point at a private or reserved address (2130706433 is 127.0.0.1)"),
    ("http://a..b/x", "has an empty label in its host name (a..b)"),
])
async def test_setting_a_webhook_at_a_malformed_host_is_a_field_error(url, refusal):
    cmd = PutWebhook(tenant_id="t", url=url, secret="s" * 16)
    with pytest.raises(ServiceError) as refused:
        await put_webhook(None, cmd, Destinations())
    assert refused.value.code == "validation_error" and refused.value.details["fields"]["url"] == refusal


@pytest.mark.parametrize("url, address", [
    ("http://[::127.0.0.1]/x", "::127.0.0.1"),               # IPv4-compatible (::/96)
    ("http://[::a9fe:a9fe]/x", "::a9fe:a9fe"),               # the same, for 169.254.169.254
    ("http://[::ffff:0:7f00:1]/x", "::ffff:0:7f00:1"),       # IPv4-translated (::ffff:0:0:0/96)
    ("http://[::ffff:0:a00:1]/x", "::ffff:0:a00:1"),         # the same, for 10.0.0.1
    ("http://[64:ff9b::a9fe:a9fe]/x", "64:ff9b::a9fe:a9fe"),  # NAT64 well-known prefix, 169.254.169.254
    ("http://[64:ff9b::7f00:1]/x", "64:ff9b::7f00:1"),       # the same, for 127.0.0.1
    ("http://[64:ff9b:1::808:808]/x", "64:ff9b:1::808:808"),  # local-use NAT64 (64:ff9b:1::/48): never public
    ("http://[2002:7f00:1::1]/x", "2002:7f00:1::1"),         # 6to4 of 127.0.0.1
])
async def test_setting_a_webhook_at_an_ipv6_form_of_a_private_ipv4_address_is_a_field_error(url, address):
    refusal = f"must not point at a private or reserved address ({address})"
    cmd = PutWebhook(tenant_id="t", url=url, secret="s" * 16)
    with pytest.raises(ServiceError) as refused:
        await put_webhook(None, cmd, Destinations())
    assert refused.value.code == "validation_error" and refused.value.details["fields"]["url"] == refusal
    assert Destinations(allow_private=True).refusal(url) is None


async def test_a_name_resolving_to_ipv6_forms_of_private_ipv4_addresses_is_not_connected_to():
    forms = ("::127.0.0.1", "::ffff:0:7f00:1", "64:ff9b::a9fe:a9fe", "64:ff9b:1::808:808", "2002:a00:1::1")
    with pytest.raises(OSError, match="private or reserved"):
        await PublicOnlyResolver(_Fixed(*forms)).resolve("aaaa.example", 443)
    mixed = await PublicOnlyResolver(_Fixed(*forms, "64:ff9b::808:808")).resolve("aaaa.example", 443)
    assert [r["host"] for r in mixed] == ["64:ff9b::808:808"]
    # The same forms of a public address (8.8.8.8) are public.
    for url in ("http://[64:ff9b::808:808]/x", "http://[::ffff:0:808:808]/x", "http://[2002:808:808::1]/x"):
        assert Destinations().refusal(url) is None


async def test_setting_a_webhook_at_a_name_that_resolves_only_to_private_addresses_is_a_field_error(monkeypatch):
    import shared.destinations

    monkeypatch.setattr(shared.destinations, "DefaultResolver", lambda: _Fixed("127.0.0.1", "10.1.2.3"))
    cmd = PutWebhook(tenant_id="t", url="http://intranet.example/hook", secret="s" * 16)
    with pytest.raises(ServiceError) as refused:
        await put_webhook(None, cmd, Destinations())
    assert refused.value.details["fields"]["url"] == \
        "must not point at a private or reserved address (intranet.example resolves only to such)"
    # Allowed on an install that posts inside its own network: judged no further.
    assert await Destinations(allow_private=True).resolved_refusal("http://intranet.example/hook") is None


async def test_a_name_that_does_not_resolve_yet_is_left_to_delivery_time(monkeypatch):
    import shared.destinations

    class _Nowhere(_Fixed):
        async def resolve(self, host, port=0, family=socket.AF_INET):
            raise OSError("Name or service not known")

    monkeypatch.setattr(shared.destinations, "DefaultResolver", lambda: _Nowhere())
    assert await Destinations().resolved_refusal("http://not-yet.example/hook") is None
    monkeypatch.setattr(shared.destinations, "DefaultResolver", lambda: _Fixed("93.184.216.34"))
    assert await Destinations().resolved_refusal("http://public.example/hook") is None


def test_a_secret_of_blanks_is_refused():
    with pytest.raises(ValueError, match="16 characters that are not spaces"):
        PutWebhook(tenant_id="t", url="https://example.com/h", secret=" " * 20)
    with pytest.raises(ValueError, match="16 characters that are not spaces"):
        PutWebhook(tenant_id="t", url="https://example.com/h", secret="a" + " " * 14 + "b")
    assert PutWebhook(tenant_id="t", url="https://example.com/h", secret="  " + "s" * 16).secret == "  " + "s" * 16


def test_a_delivery_refused_for_a_private_address_says_so():
    import aiohttp
    from aiohttp.client_reqrep import ConnectionKey

    from services.notifier.webhooks import _said
    from shared.destinations import NonPublicAddress

    key = ConnectionKey("vm", 18631, False, False, None, None, None)
    exc = aiohttp.ClientConnectorDNSError(key, NonPublicAddress("vm resolves only to private or reserved addresses"))
    assert _said(exc, 3) == "refused: vm resolves only to private or reserved addresses (REDRIVE_WEBHOOK_ALLOW_PRIVATE)"


async def test_a_name_is_resolved_in_the_ascii_form_delivery_connects_to(monkeypatch):
    import shared.destinations

    asked: list[str] = []

    class _Recording(_Fixed):
        async def resolve(self, host, port=0, family=socket.AF_INET):
            asked.append(host)
            return await super().resolve(host, port, family)

    monkeypatch.setattr(shared.destinations, "DefaultResolver", lambda: _Recording("93.184.216.34"))
    assert await Destinations().resolved_refusal("http://straße.example/hook") is None
    assert asked == ["xn--strae-oqa.example"]  # IDNA 2008 (yarl's), not the codec's "strasse"
