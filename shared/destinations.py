"""Where the platform may send a request a tenant chose: public addresses only, unless the
operator allows private ones.

Webhooks (services/notifier) and the executor's built-in ``download`` and ``http_call``
handlers make HTTP requests wherever a tenant (or a member's file URL) says. Pointed at
127.0.0.1, 10.0.0.0/8 or 169.254.169.254 they would reach the platform's own internals
(server-side request forgery). So, unless the operator allows private destinations
(``REDRIVE_WEBHOOK_ALLOW_PRIVATE``, ``REDRIVE_EXECUTOR_ALLOW_PRIVATE_URLS``: a single-tenant
install reaching its own network):

* a URL whose host is a literal non-public address, or ``localhost``, is refused before any
  request (aiohttp connects to a literal address without asking the resolver);
* a host name is checked when the connection is made, by a resolver that drops non-public
  addresses: a name that resolves to one later (DNS rebinding) is caught there too.

An IPv6 address that carries an IPv4 one (IPv4-mapped ``::ffff:0:0/96``, IPv4-compatible
``::/96``, IPv4-translated ``::ffff:0:0:0/96``, NAT64 ``64:ff9b::/96``, 6to4 ``2002::/16``) is
judged by the IPv4 address it carries; local-use NAT64 (``64:ff9b:1::/48``) is never public.

Whatever the mode, a host must be one the delivery side (aiohttp/yarl) can use, judged as it
judges it: an internationalized name is first turned into its ASCII form (``１２７.０.０.１`` is
127.0.0.1), an IPv4 address must be a canonical dotted quad (not ``2130706433``, ``0x7f000001``,
``0177.0.0.1``, ``127.1`` or ``0``: many stacks read those as addresses), and a name must be a
valid DNS name (no empty label, labels of 1-63 characters not starting or ending with '-',
valid punycode in ``xn--`` labels, at most 253 characters).
"""

from __future__ import annotations

import asyncio
import ipaddress
import re
import socket
from dataclasses import dataclass
from urllib.parse import urlsplit

import idna  # yarl's own IDNA codec (a dependency of aiohttp's): the same ASCII form as delivery
from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import DefaultResolver


# IPv6 prefixes whose last 32 bits are an IPv4 address, the one a packet really goes to.
_CARRY_IPV4 = tuple(ipaddress.IPv6Network(n) for n in (
    "::ffff:0:0/96",    # IPv4-mapped
    "::/96",            # IPv4-compatible (deprecated); also :: and ::1, judged as 0.0.0.0 and 0.0.0.1
    "::ffff:0:0:0/96",  # IPv4-translated (RFC 2765)
    "64:ff9b::/96",     # NAT64 well-known prefix (RFC 6052)
))
# Local-use NAT64 (RFC 8215): translated into whatever the operator's own network holds.
_NEVER_PUBLIC = (ipaddress.IPv6Network("64:ff9b:1::/48"),)


def is_public(address: str) -> bool:
    ip = ipaddress.ip_address(address.split("%", 1)[0])  # drop an IPv6 zone
    if isinstance(ip, ipaddress.IPv6Address):
        if any(ip in net for net in _NEVER_PUBLIC):
            return False
        if any(ip in net for net in _CARRY_IPV4):
            ip = ipaddress.IPv4Address(int(ip) & 0xFFFF_FFFF)
        elif ip.sixtofour is not None:  # 2002:AABB:CCDD::/48 is routed to A.B.C.D
            ip = ip.sixtofour
    return ip.is_global and not ip.is_multicast


@dataclass(frozen=True)
class Destinations:
    allow_private: bool = False

    def refusal(self, url: str) -> str | None:
        """Why ``url`` may not be requested, judged from the URL alone; None if it may."""
        try:
            host = urlsplit(url).hostname or ""
        except ValueError:
            return "is not a valid URL"
        if not host:
            return "must name a host"
        if ":" in host:  # an IPv6 literal (urlsplit has checked the brackets)
            try:
                public = is_public(host)
            except ValueError:
                return f"has a host that is not a valid IPv6 address ({_short(host)})"
            return None if public or self.allow_private else f"must not point at a private or reserved address ({host})"
        bad_form, host = _ascii_host(host)
        if bad_form is not None:
            return bad_form
        name = host[:-1] if host.endswith(".") else host  # one trailing dot: the root
        if _NUMERIC_LABEL.fullmatch(name.rsplit(".", 1)[-1]):  # an IPv4 address, in some form
            address = _ipv4(name)
            if address is None:
                return f"has a numeric host that is not an IPv4 address ({_short(host)})"
            if not self.allow_private and not is_public(address):
                denotes = address if host == address else f"{_short(host)} is {address}"
                return f"must not point at a private or reserved address ({denotes})"
            if host != address:  # delivery refuses it too ("not a canonical IPv4 address")
                return f"must give the IPv4 address in dotted-quad form ({address}, not {_short(host)})"
            return None
        bad_name = _dns_name_refusal(name)
        if bad_name is not None:
            return bad_name
        if not self.allow_private and (name == "localhost" or name.endswith(".localhost")):
            return "must not point at this machine (localhost)"
        return None  # a name: checked when it is resolved

    def resolver(self) -> AbstractResolver | None:
        return None if self.allow_private else PublicOnlyResolver()

    async def resolved_refusal(self, url: str, timeout_s: float = 2.0) -> str | None:
        """``refusal``, and for a host name what it resolves to now: one that resolves only to
        private or reserved addresses is refused as such an address would be, when it is
        set rather than at every delivery. A name that does not resolve (yet, or in time) is
        left to delivery time, which judges every address again."""
        refusal = self.refusal(url)
        if refusal is not None or self.allow_private:
            return refusal
        # The ASCII form delivery connects to (refusal() has judged it valid), not the
        # system codec's, which can differ for some names (IDNA 2003 against 2008).
        host = _ascii_host(urlsplit(url).hostname or "")[1]
        resolver = PublicOnlyResolver()
        try:
            async with asyncio.timeout(timeout_s):
                await resolver.resolve(host, 0, socket.AF_UNSPEC)
        except NonPublicAddress:
            return f"must not point at a private or reserved address ({_short(host)} resolves only to such)"
        except (OSError, TimeoutError):
            return None
        finally:
            await resolver.close()
        return None


# The forms inet_aton and the WHATWG URL standard read as an IPv4 number: hex, octal, decimal.
_NUMERIC_LABEL = re.compile(r"0x[0-9a-f]*|[0-9]+")
_IPV4_PART = re.compile(r"0x[0-9a-f]*|0[0-7]*|[1-9][0-9]*")
# What a DNS label may hold once in ASCII form ('_' is valid DNS, and resolvers accept it).
_LABEL_CHARS = re.compile(r"[a-z0-9_-]+")


def _short(text: str, limit: int = 40) -> str:
    return text if len(text) <= limit else text[:limit] + "…"


def _ascii_host(host: str) -> tuple[str | None, str]:
    """(why not, "") or (None, the host as delivery will use it): lowercase ASCII, as yarl makes it."""
    if "" in host.rstrip(".").split(".") or host.endswith(".."):
        return f"has an empty label in its host name ({_short(host)})", ""
    if host.isascii():
        return None, host.lower()
    try:  # as yarl encodes a host: UTS 46 / IDNA 2008 first, the IDNA 2003 codec if that fails
        return None, idna.encode(host, uts46=True).decode("ascii")
    except UnicodeError as exc:
        try:
            return None, host.encode("idna").decode("ascii")
        except UnicodeError:
            return f"has a host name that is not valid IDNA ({_short(host)}: {exc})", ""


def _ipv4(name: str) -> str | None:
    """The dotted quad a numeric host denotes, read as inet_aton reads it (127.1, 0x7f000001...)."""
    parts = name.split(".")
    if not 1 <= len(parts) <= 4 or not all(_IPV4_PART.fullmatch(p) for p in parts):
        return None
    numbers = [int(p[2:] or "0", 16) if p.startswith("0x") else int(p, 8 if p.startswith("0") else 10) for p in parts]
    *head, last = numbers
    if any(n > 255 for n in head) or last >= 256 ** (5 - len(numbers)):
        return None
    value = sum(n << 8 * (3 - i) for i, n in enumerate(head)) + last
    return str(ipaddress.IPv4Address(value))


def _dns_name_refusal(name: str) -> str | None:
    """Why ``name`` (lowercase ASCII, no trailing dot) is not a valid DNS name; None if it is."""
    labels = name.split(".")
    if "" in labels:
        return f"has an empty label in its host name ({_short(name)})"
    if len(name) > 253:
        return f"has a host name longer than 253 characters ({len(name)})"
    for label in labels:
        if len(label) > 63:
            return f"has a host name label longer than 63 characters ({_short(label)})"
        if label.startswith("xn--") and not _valid_a_label(label):
            return f"has an invalid punycode label in its host name ({label})"
        if label.startswith("-") or label.endswith("-"):
            return f"has a host name label that starts or ends with '-' ({label})"
        if not _LABEL_CHARS.fullmatch(label):
            bad = next(ch for ch in label if not _LABEL_CHARS.fullmatch(ch))
            return f"has a character not allowed in a host name ({bad!r})"
    return None


def _valid_a_label(label: str) -> bool:
    """Whether an ``xn--`` label decodes, by either codec yarl decodes hosts with."""
    try:
        idna.decode(label)
        return True
    except UnicodeError:
        pass
    try:
        label.encode("ascii").decode("idna")
        return True
    except UnicodeError:
        return False


class NonPublicAddress(OSError):
    """A host name resolved only to private or reserved addresses (raised at connect time;
    aiohttp hands it on as the ``os_error`` of a ``ClientConnectorError``)."""


class PublicOnlyResolver(AbstractResolver):
    """aiohttp's resolver, minus every address that is not public."""

    def __init__(self, inner: AbstractResolver | None = None) -> None:
        self._inner = inner or DefaultResolver()

    async def resolve(self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET) -> list[ResolveResult]:
        results = [r for r in await self._inner.resolve(host, port, family) if is_public(r["host"])]
        if not results:
            raise NonPublicAddress(f"{_short(host)} resolves only to private or reserved addresses")
        return results

    async def close(self) -> None:
        await self._inner.close()


def redact_url(url: str, limit: int = 200) -> str:
    """``url`` fit for a message or a log: ``scheme://host[:port]/path``, without credentials
    (``user:pass@``), query string or fragment, printable, at most about ``limit`` characters."""
    try:
        parts = urlsplit(url)
        host, port = parts.hostname, parts.port
    except (ValueError, TypeError, AttributeError):
        return "(not a valid URL)"
    if not host:  # nothing known to be harmless to show ("user:secret@x" parses as scheme "user")
        return "(a URL without a host)"
    netloc = f"[{host}]" if ":" in host else host
    if port is not None:
        netloc += f":{port}"
    return printable(f"{parts.scheme}://{netloc}{parts.path}", limit)


def printable(text: str, limit: int = 200) -> str:
    """What an error message may quote of something it did not write: ``text`` on one line
    (runs of whitespace as one space), each other unprintable character (escape, NUL…) as '?',
    cut to ``limit`` characters."""
    cut = len(text) > 4 * limit
    text = " ".join(text[: 4 * limit].split()) if cut else " ".join(text.split())
    shown = "".join(ch if ch.isprintable() else "?" for ch in text)
    return shown if len(shown) <= limit and not cut else shown[:limit] + "…"
