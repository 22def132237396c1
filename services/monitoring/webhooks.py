"""Webhook subscriptions and the delivery of alert events to them.

An alert change queues one delivery per matching webhook in the transaction that makes the change
(`queue`, the outbox): the event is stored before anyone is told, and told at least once. The
deliverer (a thread) claims due deliveries by compare-and-set on their next attempt time (so two
replicas do not send the same one at once), POSTs the JSON body, and on anything but a 2xx answer
tries again after an exponential backoff (base * 2^(attempt-1), capped, with +-20 % jitter) until
`max_attempts`, then marks it failed. Redirects are not followed (a 3xx is a failed attempt).

Each POST carries:
- `X-Strata-Event`: firing, acknowledged or resolved;
- `X-Strata-Delivery`: the delivery id (the same on every attempt: receivers deduplicate on it);
- `X-Strata-Signature`: `t=<unix seconds>,v1=<hex HMAC-SHA256 of "<t>.<body>" under the secret>`
  (as Stripe signs: the time is signed too, so a receiver can refuse an old replayed request).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import math
import random
import secrets
import threading
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timedelta
from urllib.parse import urlsplit

from sqlalchemy import delete, insert, select, update
from sqlalchemy.engine import Connection, Row

from services.common.db import Database
from services.common.errors import InvalidArgument, NotFound, quote
from services.common.limits import check_text
from services.common.names import check_name
from services.common.paging import PageRequest
from services.common.timeutil import as_utc, utc_now
from services.monitoring import tables as t
from services.monitoring.alerts import Alert, AlertEvent, Rule, check_uuid

log = logging.getLogger("strata.monitoring.webhooks")

MAX_URL = 2048
MIN_SECRET = 16
MAX_SECRET = 256
MAX_RULES = 100
LEASE = timedelta(seconds=60)   # a claimed delivery is not claimed again before this (the POST's time)


class DeliveryState:
    PENDING = "pending"
    DELIVERED = "delivered"
    FAILED = "failed"


@dataclass(frozen=True)
class WebhookSpec:
    url: str
    events: tuple[AlertEvent, ...]     # empty: all
    rules: tuple[str, ...]             # empty: all
    description: str


@dataclass(frozen=True)
class Webhook:
    webhook_id: str
    spec: WebhookSpec
    created_by: str
    create_time: datetime


@dataclass(frozen=True)
class Delivery:
    delivery_id: str
    webhook_id: str
    alert_id: str
    event: AlertEvent
    state: str
    attempts: int
    last_status: int
    last_error: str
    create_time: datetime
    next_attempt_time: datetime


def sign(secret: str, timestamp: int, body: bytes) -> str:
    """The X-Strata-Signature header's value."""
    mac = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={mac}"


def check_url(url: str, field: str = "webhook.url") -> str:
    if not url:
        raise InvalidArgument(field, "is required")
    if len(url) > MAX_URL:
        raise InvalidArgument(field, f"is longer than {MAX_URL} characters")
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError as e:
        raise InvalidArgument(field, f"{quote(url)} is not a URL: {e}") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise InvalidArgument(field, f"{quote(url)} is not an http:// or https:// URL with a host")
    if not url.isprintable() or any(ch.isspace() for ch in url):
        raise InvalidArgument(field, "holds spaces or control characters")
    return url


def payload(rule: Rule, alert: Alert, event: AlertEvent) -> str:
    """The JSON body of an event (fixed when queued)."""
    def ts(d: datetime | None) -> str | None:
        return d.isoformat() if d else None

    spec = rule.spec
    return json.dumps({
        "event": event.value,
        "alert": {"alert_id": alert.alert_id, "rule": alert.rule, "target": alert.target, "state": alert.state.value,
                  "value": _number(alert.value), "threshold": _number(alert.threshold), "message": alert.message,
                  "open_time": ts(alert.open_time), "last_seen_time": ts(alert.last_seen_time),
                  "acknowledged_by": alert.acknowledged_by, "acknowledge_comment": alert.acknowledge_comment,
                  "acknowledge_time": ts(alert.acknowledge_time), "resolve_time": ts(alert.resolve_time)},
        "rule": {"name": spec.name, "description": spec.description, "endpoint": spec.endpoint,
                 "model": spec.model, "version": spec.version, "condition": spec.condition.to_dict(),
                 "window_seconds": spec.window_seconds, "training_schedule_id": spec.training_schedule_id},
    }, default=str)


def _number(v: float) -> float | None:
    return v if math.isfinite(v) else None  # (JSON has no NaN)


class WebhookStore:
    def __init__(self, db: Database, clock: Callable[[], datetime] = utc_now) -> None:
        self.db = db
        self.clock = clock

    def create(self, spec: WebhookSpec, secret: str, principal: str) -> tuple[Webhook, str]:
        check_url(spec.url)
        check_text(spec.description, "webhook.description", 1000)
        if len(spec.rules) > MAX_RULES:
            raise InvalidArgument("webhook.rules", f"names more than {MAX_RULES} rules")
        for i, rule in enumerate(spec.rules):
            check_name(rule, f"webhook.rules[{i}]")
        check_text(secret, "secret", MAX_SECRET)
        if secret and not MIN_SECRET <= len(secret.encode()) <= MAX_SECRET:
            raise InvalidArgument("secret", f"must be {MIN_SECRET} to {MAX_SECRET} bytes (empty: one is generated)")
        secret = secret or secrets.token_urlsafe(32)
        hook = Webhook(str(uuid.uuid4()), spec, principal, self.clock())
        with self.db.session() as c:
            c.execute(insert(t.webhooks).values(
                webhook_id=hook.webhook_id, url=spec.url, secret=secret, events=[e.value for e in spec.events],
                rules=list(spec.rules), description=spec.description, created_by=principal,
                create_time=hook.create_time))
        return hook, secret

    def list(self, page_size: int, page_token: str) -> tuple[list[Webhook], str]:
        page = PageRequest.parse("ListWebhooks", page_size, page_token, key=int)
        w = t.webhooks.c
        q = select(t.webhooks).order_by(w.seq).limit(page.limit)
        if page.after is not None:
            q = q.where(w.seq > page.after)
        with self.db.read() as c:
            rows = c.execute(q).all()
        items, token = page.cut(rows, lambda r: r.seq)
        return [_webhook(r) for r in items], token

    def delete(self, webhook_id: str) -> None:
        _check_id(webhook_id, "webhook_id")
        with self.db.session() as c:
            if not c.execute(delete(t.webhooks).where(t.webhooks.c.webhook_id == webhook_id)).rowcount:
                raise NotFound(f"monitoring/webhooks/{quote(webhook_id, bare=True)} not found")
            c.execute(delete(t.webhook_deliveries).where(t.webhook_deliveries.c.webhook_id == webhook_id,
                                                         t.webhook_deliveries.c.state == DeliveryState.PENDING))

    def deliveries(self, webhook_id: str, page_size: int, page_token: str) -> tuple[list[Delivery], str]:
        _check_id(webhook_id, "webhook_id")
        page = PageRequest.parse("ListWebhookDeliveries", page_size, page_token, {"webhook": webhook_id}, key=int)
        d = t.webhook_deliveries.c
        with self.db.read() as c:
            if c.execute(select(t.webhooks.c.seq).where(t.webhooks.c.webhook_id == webhook_id)).first() is None:
                raise NotFound(f"monitoring/webhooks/{quote(webhook_id, bare=True)} not found")
            q = select(t.webhook_deliveries).where(d.webhook_id == webhook_id).order_by(d.seq.desc()).limit(page.limit)
            if page.after is not None:
                q = q.where(d.seq < page.after)
            rows = c.execute(q).all()
        items, token = page.cut(rows, lambda r: r.seq)
        return [_delivery(r) for r in items], token

    def queue(self, c: Connection, rule: Rule, alert: Alert, event: AlertEvent) -> None:
        """Queue the event for every webhook that wants it (inside the caller's transaction)."""
        hooks = c.execute(select(t.webhooks.c.webhook_id, t.webhooks.c.events, t.webhooks.c.rules)).all()
        now = self.clock()
        body = payload(rule, alert, event)
        rows = [{"delivery_id": str(uuid.uuid4()), "webhook_id": h.webhook_id, "alert_id": alert.alert_id,
                 "event": event.value, "payload": body, "state": DeliveryState.PENDING, "attempts": 0,
                 "last_status": 0, "last_error": "", "create_time": now, "next_attempt_time": now}
                for h in hooks if (not h.events or event.value in h.events) and (not h.rules or alert.rule in h.rules)]
        if rows:
            c.execute(insert(t.webhook_deliveries), rows)


class Deliverer:
    """Sends due deliveries (a thread calls `run`)."""

    def __init__(self, db: Database, *, max_attempts: int = 8, backoff: float = 5.0, max_backoff: float = 3600.0,
                 timeout: float = 10.0, senders: int = 4, clock: Callable[[], datetime] = utc_now) -> None:
        self.db = db
        self.max_attempts = max_attempts
        self.backoff = backoff
        self.max_backoff = max_backoff
        self.timeout = timeout
        self.clock = clock
        self.wake = threading.Event()     # set when something was queued: deliver now
        self._pool = ThreadPoolExecutor(senders, thread_name_prefix="monitoring-webhook")
        self._opener = urllib.request.build_opener(_NoRedirect)

    def delay(self, attempts: int) -> float:
        """Seconds before the next attempt after `attempts` failed ones."""
        base = min(self.backoff * 2 ** (attempts - 1), self.max_backoff)
        return base * random.uniform(0.8, 1.2)

    def deliver_due(self) -> int:
        """Claim and send the due deliveries; returns how many were sent (whatever the answer)."""
        now = self.clock()
        d = t.webhook_deliveries.c
        with self.db.read() as c:
            due = c.execute(select(d.delivery_id, d.next_attempt_time).where(
                d.state == DeliveryState.PENDING, d.next_attempt_time <= now).order_by(d.seq).limit(100)).all()
        claimed = []
        for delivery_id, when in due:
            with self.db.session() as c:
                if c.execute(update(t.webhook_deliveries).where(d.delivery_id == delivery_id, d.next_attempt_time == when,
                                                                d.state == DeliveryState.PENDING).values(
                        next_attempt_time=now + LEASE)).rowcount:
                    claimed.append(delivery_id)
        list(self._pool.map(self._send, claimed))
        return len(claimed)

    def _send(self, delivery_id: str) -> None:
        d, w = t.webhook_deliveries.c, t.webhooks.c
        with self.db.read() as c:
            row = c.execute(select(d.event, d.payload, d.attempts, w.url, w.secret).join_from(
                t.webhook_deliveries, t.webhooks, d.webhook_id == w.webhook_id).where(d.delivery_id == delivery_id)).first()
        if row is None:  # its webhook was deleted
            return
        body = row.payload.encode()
        now = self.clock()
        request = urllib.request.Request(row.url, data=body, method="POST", headers={
            "Content-Type": "application/json", "User-Agent": "strata-monitoring",
            "X-Strata-Event": row.event, "X-Strata-Delivery": delivery_id,
            "X-Strata-Signature": sign(row.secret, int(now.timestamp()), body)})
        status, error = 0, ""
        try:
            with self._opener.open(request, timeout=self.timeout) as answer:
                status = answer.status
        except urllib.error.HTTPError as e:
            status, error = e.code, f"HTTP {e.code} {e.reason}"
        except Exception as e:  # refused, timed out, DNS: the next attempt may get through
            error = f"{type(e).__name__}: {e}"
        attempts = row.attempts + 1
        ok = 200 <= status < 300
        state = DeliveryState.DELIVERED if ok else (
            DeliveryState.FAILED if attempts >= self.max_attempts else DeliveryState.PENDING)
        after = now if ok or state == DeliveryState.FAILED else now + timedelta(seconds=self.delay(attempts))
        with self.db.session() as c:
            c.execute(update(t.webhook_deliveries).where(d.delivery_id == delivery_id).values(
                state=state, attempts=attempts, last_status=status, last_error=error[:1000], next_attempt_time=after))
        if not ok:
            log.warning("webhook delivery failed", extra={"fields": {
                "delivery": delivery_id, "attempt": attempts, "status": status, "error": error[:200], "state": state}})

    def run(self, stop: threading.Event, every: float) -> None:
        while not stop.is_set():
            try:
                self.deliver_due()
            except Exception:  # the database is down: again at the next tick
                log.exception("webhook delivery round failed")
            self.wake.wait(every)
            self.wake.clear()

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args, **kwargs):  # noqa: ANN002, ANN003, ANN201
        return None  # a 3xx answer is an HTTPError: a failed attempt


def _check_id(value: str, field: str) -> None:
    check_uuid(value, field)


def _webhook(r: Row) -> Webhook:
    return Webhook(r.webhook_id, WebhookSpec(r.url, tuple(AlertEvent(e) for e in r.events), tuple(r.rules),
                                             r.description), r.created_by, as_utc(r.create_time))


def _delivery(r: Row) -> Delivery:
    return Delivery(r.delivery_id, r.webhook_id, r.alert_id, AlertEvent(r.event), r.state, r.attempts, r.last_status,
                    r.last_error, as_utc(r.create_time), as_utc(r.next_attempt_time))

