"""What a webhook delivery listing shows of the URL: where it went, never its secret parts."""

from __future__ import annotations

import pytest

from services.notifier.handlers import origin_of


@pytest.mark.parametrize(("url", "shown"), [
    ("https://hooks.slack.com/services/T000/B000/XXXXSECRET", "https://hooks.slack.com"),
    ("https://user:pass@example.com/hook?token=abc#frag", "https://example.com"),
    ("http://example.com:8443/h", "http://example.com:8443"),
    ("http://[2001:db8::1]:9000/h?k=v", "http://[2001:db8::1]:9000"),
    ("user:secret@x", "(a URL without a host)"),
    ("http://[::1", "(not a valid URL)"),
])
def test_a_delivery_shows_the_origin_of_its_url_only(url, shown):
    assert origin_of(url) == shown
