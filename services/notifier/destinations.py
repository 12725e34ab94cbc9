"""Where webhooks may be sent: public addresses only, unless ``REDRIVE_WEBHOOK_ALLOW_PRIVATE=true``
(a single-tenant install posting to its own network).

The judgement itself (literal addresses, ``localhost``, numeric IPv4 forms, IPv6 forms that
carry an IPv4 address, host-name validity, and the resolver that drops non-public addresses
at connect time) lives in :mod:`shared.destinations`: the executor's ``download`` and
``http_call`` handlers use the same one.
"""

from shared.destinations import Destinations, NonPublicAddress, PublicOnlyResolver, is_public

__all__ = ["Destinations", "NonPublicAddress", "PublicOnlyResolver", "is_public"]
