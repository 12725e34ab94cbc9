"""Pure credit rules: how a charge splits, how a refund goes back, what a month is."""

from __future__ import annotations

from datetime import datetime, timezone


def split_charge(amount: int, monthly_remaining: int, purchased_remaining: int) -> tuple[int, int] | None:
    """(from_monthly, from_purchased), monthly first; None if the balance is short."""
    if amount > monthly_remaining + purchased_remaining:
        return None
    from_monthly = min(amount, monthly_remaining)
    return from_monthly, amount - from_monthly


def split_refund(amount: int, charged_monthly: int, charged_purchased: int, refunded_monthly: int,
                 refunded_purchased: int) -> tuple[int, int]:
    """(to_monthly, to_purchased): purchased credits go back first (they do not expire),
    never more of either part than the charge took minus earlier refunds of it."""
    left_purchased = max(0, charged_purchased - refunded_purchased)
    left_monthly = max(0, charged_monthly - refunded_monthly)
    amount = max(0, min(amount, left_purchased + left_monthly))
    to_purchased = min(amount, left_purchased)
    return amount - to_purchased, to_purchased


def month_bounds(now: datetime) -> tuple[datetime, datetime]:
    start = datetime(now.year, now.month, 1, tzinfo=timezone.utc)
    end = datetime(now.year + (now.month == 12), now.month % 12 + 1, 1, tzinfo=timezone.utc)
    return start, end
