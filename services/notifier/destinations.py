"""Where webhooks may be sent: public addresses only, unless the operator allows private ones.

A webhook is the platform making HTTP requests wherever a tenant says. Pointed at
127.0.0.1, 10.0.0.0/8 or 169.254.169.254 it would reach the platform's own internals
(server-side request forgery). So, unless ``REDRIVE_WEBHOOK_ALLOW_PRIVATE=true`` (a
single-tenant install posting to its own network):

* a URL whose host is a literal non-public address, or ``localhost``, is refused when the
  webhook is set (422) and never posted to;
* a host name is checked when the connection is made, by a resolver that drops non-public
  addresses: a name that resolves to one later (DNS rebinding) is caught there too.
"""

from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass
from urllib.parse import urlsplit

from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import DefaultResolver


def is_public(address: str) -> bool:
    ip = ipaddress.ip_address(address.split("%", 1)[0])  # drop an IPv6 zone
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_global and not ip.is_multicast


@dataclass(frozen=True)
class Destinations:
    allow_private: bool = False

    def refusal(self, url: str) -> str | None:
        """Why ``url`` may not be posted to, judged from the URL alone; None if it may."""
        if self.allow_private:
            return None
        host = (urlsplit(url).hostname or "").rstrip(".").lower()
        if host == "localhost" or host.endswith(".localhost"):
            return "must not point at this machine (localhost)"
        try:
            public = is_public(host)
        except ValueError:
            return None  # a name: checked when it is resolved
        return None if public else f"must not point at a private or reserved address ({host})"

    def resolver(self) -> AbstractResolver | None:
        return None if self.allow_private else PublicOnlyResolver()


class PublicOnlyResolver(AbstractResolver):
    """aiohttp's resolver, minus every address that is not public."""

    def __init__(self, inner: AbstractResolver | None = None) -> None:
        self._inner = inner or DefaultResolver()

    async def resolve(self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET) -> list[ResolveResult]:
        results = [r for r in await self._inner.resolve(host, port, family) if is_public(r["host"])]
        if not results:
            raise OSError(f"{host} resolves only to private or reserved addresses; webhooks go to public ones")
        return results

    async def close(self) -> None:
        await self._inner.close()
