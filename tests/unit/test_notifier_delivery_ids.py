"""The notifier's requests about deliveries and notifications, without a database: a
delivery is named by its public id (a UUID) and paged by a cursor that does not carry the
bigserial; ``unread`` is a filter both ways."""

from __future__ import annotations

import uuid
from datetime import datetime, timezone

import pytest
from pydantic import ValidationError

from services.notifier.schemas import (DeliveryRef, ListDeliveries, ListNotifications, decode_delivery_cursor,
                                       encode_cursor)


def test_a_delivery_is_named_by_a_uuid_and_anything_else_names_none():
    public_id = uuid.uuid4()
    assert DeliveryRef(tenant_id="t", delivery_id=str(public_id)).public_id() == public_id
    for other in ("1", "9223372036854775807", "x", "-1", " "):
        assert DeliveryRef(tenant_id="t", delivery_id=other).public_id() is None, other
    with pytest.raises(ValidationError):
        DeliveryRef(tenant_id="t", delivery_id="a" * 201)


def test_a_delivery_cursor_is_a_position_of_public_values_only():
    at, public_id = datetime(2026, 3, 1, 12, 0, tzinfo=timezone.utc), uuid.uuid4()
    cursor = encode_cursor(at, str(public_id))
    assert decode_delivery_cursor(cursor) == (at, public_id)
    assert ListDeliveries(tenant_id="t", cursor=cursor).cursor == cursor
    for forged in ("12", "9223372036854775807", encode_cursor(at, "12"), "garbage"):
        with pytest.raises(ValidationError):
            ListDeliveries(tenant_id="t", cursor=forged)


@pytest.mark.parametrize(("given", "unread"), [({}, None), ({"unread_only": False}, False),
                                               ({"unread_only": True}, True), ({"unread": False}, False)])
def test_unread_is_unset_true_or_false(given, unread):
    assert ListNotifications(tenant_id="t", **given).unread is unread
