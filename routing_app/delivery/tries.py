"""One *try* of one claimed delivery: pick a provider, limit, breaker permit, attempt row, call,
outcome; on a transient failure the next provider at once, until one accepts or none is left.

The steps are apart so that a batch (service.py) can run the first call of every row together:
``next_call`` (choose; writes only when it refuses), the caller saves the attempt rows,
``send`` (the network call alone: no database, any thread), ``settle`` (breaker, metrics, the
attempt's fields, the kind's ``settled`` hook; writes only for a dead row and in that hook), then
the caller saves the attempts and finishes the sent rows. ``run`` is the same for one row alone
(the rows a batch could not finish at its first call).
"""

from __future__ import annotations

import logging
import random
import time
from dataclasses import dataclass, field

from ..metrics.instruments import delivery_attempts
from ..models import Channel, Delivery, Provider
from . import outcomes
from .balancer import balancer
from .breaker import BreakerConfig, BreakerUnavailable, Permit, Reads, breakers_from_settings
from .limiter import limiter
from .models import Attempt
from .transitions import on_transition
from .transports import DeliveryError, Receipt, transport_for

log = logging.getLogger(__name__)
Outcome = Attempt.Outcome
Status = Delivery.Status
ATTEMPT_RESULT_FIELDS = ["outcome", "http_status", "duration_ms", "error"]


@dataclass
class TryResult:
    """What one try of one delivery came to (for callers that count, like the bench)."""

    status: str
    calls: int = 0


@dataclass
class ChannelPlan:
    """A channel with its enabled providers and breaker settings, loaded once per batch."""

    channel: Channel
    providers: list[Provider]
    config: BreakerConfig
    timeout_s: float


@dataclass
class Call:
    """One provider call of a try: its attempt row (saved by the caller before ``send``) and
    what the provider answered."""

    provider: Provider
    permit: Permit | None  # None: called without the breaker (its store was down)
    attempt: Attempt
    receipt: Receipt | None = None
    error: DeliveryError | None = None
    duration_ms: float = 0.0


def backoff_s(tries: int, channel: Channel) -> float:
    """Exponential backoff with full jitter: uniform in [0, min(cap, base * 2**(tries-1))]
    (AWS's "full jitter": retries of many rows spread out instead of arriving together)."""
    ceiling = min(channel.retry_backoff_max_s, channel.retry_backoff_s * 2 ** (tries - 1))
    return random.uniform(0, ceiling)  # noqa: S311  (jitter, not a secret)


def count(plan: ChannelPlan, provider: Provider, outcome: str) -> None:
    delivery_attempts(plan.channel.name, provider.name, outcome).inc()


@dataclass
class Try:
    """The state of one try of ``row`` (claimed: ``sending``); ``result`` once it has ended."""

    row: Delivery
    plan: ChannelPlan
    number: int  # attempt rows the delivery has so far
    tried: set[int] = field(default_factory=set)
    errors: list[str] = field(default_factory=list)
    retry_after_s: float = 0.0
    calls: int = 0
    result: TryResult | None = None
    reads: Reads | None = None  # breaker reads shared by a batch's first choices (breaker.Reads)

    def __post_init__(self) -> None:
        self.breakers = breakers_from_settings()

    # --- choose ---------------------------------------------------------------------------

    def pick(self) -> Provider | None:
        """The provider the balancer chooses for the next call (None: none may be called)."""
        return balancer.pick(
            p for p in self.plan.providers if p.pk not in self.tried and self.callable(p)
        )

    def next_call(self, picked: tuple[Provider, float] | None = None) -> Call | None:
        """The next call of this try, its attempt row built (unsaved); None once the try has
        ended, with ``result`` set (rescheduled, dead, failed over or waiting). ``picked``: the
        provider ``pick`` chose and the limiter's wait for it, when the caller asked for both
        (a batch asks the limiter for all its rows at once)."""
        while True:
            provider, wait = picked if picked is not None else (self.pick(), None)
            picked = None
            if provider is None:
                self.result = self._no_call_left()
                return None
            self.tried.add(provider.pk)
            if wait is None:
                wait = self._wait_s(provider)
            if wait:
                self._refusal(
                    provider, Outcome.RATE_LIMITED, f"over the rate limit; next try in {wait:.2f} s"
                )
                outcomes.reschedule(self.row, Status.PENDING, wait)
                self.result = TryResult(Status.PENDING, self.calls)
                return None
            granted, permit = self._acquire(provider)
            if not granted:
                self._refusal(provider, Outcome.BREAKER_OPEN)
                continue
            self.number += 1
            self.calls += 1
            attempt = Attempt(delivery=self.row, number=self.number, provider=provider)
            return Call(provider=provider, permit=permit, attempt=attempt)

    def callable(self, provider: Provider) -> bool:
        if not provider.healthy:
            return False
        try:
            return self.breakers.permits(provider.pk, self.plan.config, reads=self.reads)
        except BreakerUnavailable as exc:
            log.warning("breaker state unavailable, calling %s anyway: %s", provider.name, exc)
            return True

    def _wait_s(self, provider: Provider) -> float:
        try:
            return limiter().call_wait_s(self.plan.channel, provider)
        except Exception as exc:  # noqa: BLE001  (degrade: a limiter outage must not stop sends)
            log.warning("rate limiter unavailable, sending without it: %s", exc)
            return 0.0

    def _acquire(self, provider: Provider) -> tuple[bool, Permit | None]:
        try:
            permit, transition = self.breakers.acquire(
                provider.pk, self.plan.config, reads=self.reads
            )
        except BreakerUnavailable as exc:
            log.warning("breaker state unavailable, calling %s anyway: %s", provider.name, exc)
            return True, None
        if transition:
            on_transition(transition, provider, self.plan.channel)
        return permit is not None, permit

    def _refusal(self, provider: Provider, outcome: str, error: str = "") -> None:
        self.number += 1
        count(self.plan, provider, outcome)
        Attempt.objects.create(
            delivery=self.row, number=self.number, provider=provider, outcome=outcome, error=error
        )

    # --- call -----------------------------------------------------------------------------

    def send(self, call: Call) -> None:
        """Hand the delivery to ``call.provider`` within the call timeout. No database work:
        safe on any thread."""
        started = time.monotonic()
        transport = transport_for(self.plan.channel.kind)
        try:
            call.receipt = transport.send(self.row, call.provider, timeout_s=self.plan.timeout_s)
        except DeliveryError as exc:
            call.error = exc
        except Exception as exc:  # noqa: BLE001  (a transport bug is this provider's failure)
            log.exception(
                "transport %s raised for delivery %s", self.plan.channel.kind, self.row.pk
            )
            call.error = DeliveryError(f"unexpected {type(exc).__name__}: {exc}")
        call.duration_ms = (time.monotonic() - started) * 1000

    # --- outcome --------------------------------------------------------------------------

    def settle(self, call: Call, *, recorded: bool = False) -> bool:
        """Tell the breaker (unless the caller did: ``recorded``, see ``record_batch``) and the
        metrics, fill in the attempt (the caller saves it). Returns
        True when the try goes on (a transient failure: another provider may take it). Sent:
        ``result`` is set and the caller finishes the row (``outcomes.finish_sent``); permanent:
        the row is dead (and failed over) here."""
        error, attempt = call.error, call.attempt
        if not recorded:
            self._record_breaker(call)
        settled = getattr(transport_for(self.plan.channel.kind), "settled", None)
        if settled is not None:
            settled(self.row, error)
        attempt.duration_ms = round(call.duration_ms)
        if error is None:
            attempt.outcome = Outcome.SENT
            attempt.http_status = call.receipt.http_status
            count(self.plan, call.provider, Outcome.SENT)
            self.result = TryResult(Status.SENT, self.calls)
            return False
        if error.permanent:
            attempt.outcome = Outcome.PERMANENT
        else:
            attempt.outcome = Outcome.TIMEOUT if error.timeout else Outcome.TRANSIENT
        attempt.http_status = error.http_status
        attempt.error = str(error)[: outcomes.ERROR_TEXT_MAX]
        count(self.plan, call.provider, attempt.outcome)
        if error.permanent:
            if error.disable_provider:
                outcomes.disable(call.provider, str(error))
            self.row.attempts += 1
            outcomes.finish_dead(self.row, f"{call.provider.name}: {error}")
            self.result = TryResult(Status.DEAD, self.calls)
            return False
        self.errors.append(f"{call.provider.name}: {error}")
        self.retry_after_s = max(self.retry_after_s, error.retry_after_s or 0.0)
        return True

    def _record_breaker(self, call: Call) -> None:
        if call.permit is None:
            return
        try:
            transition = self.breakers.record(
                call.permit,
                self.plan.config,
                success=call.error is None,
                duration_ms=call.duration_ms,
            )
        except BreakerUnavailable as exc:
            log.warning("breaker state unavailable, %s not counted: %s", call.provider.name, exc)
            return
        if transition:
            on_transition(transition, call.provider, self.plan.channel)

    def _no_call_left(self) -> TryResult:
        """Every provider was tried (or none may be called): the try counts, or waits."""
        if self.calls == 0:
            return outcomes.no_provider(self)
        row = self.row
        row.attempts += 1
        text = "; ".join(self.errors)
        if row.attempts >= self.plan.channel.max_attempts:
            outcomes.finish_dead(row, f"{row.attempts} tries failed; last: {text}")
            return TryResult(Status.DEAD, self.calls)
        delay = max(self.retry_after_s, backoff_s(row.attempts, self.plan.channel))
        outcomes.reschedule(row, Status.FAILED, delay, error=text)
        return TryResult(Status.FAILED, self.calls)

    # --- one row alone --------------------------------------------------------------------

    def run(self) -> TryResult:
        """The rest of this try, one call at a time, writing as it goes."""
        while self.result is None:
            call = self.next_call()
            if call is None:
                break
            call.attempt.save()
            self.send(call)
            goes_on = self.settle(call)
            call.attempt.save(update_fields=ATTEMPT_RESULT_FIELDS)
            if self.result is not None and self.result.status == Status.SENT:
                outcomes.finish_sent([(self.row, call)])
            if not goes_on:
                break
        return self.result


def call_waits(picks: list[tuple[Try, Provider]]) -> list[float]:
    """The limiter's wait for each try's picked provider, asked for the whole batch at once
    (``Limiter.call_waits``); all 0 when the limiter cannot be reached, as ``Try._wait_s``."""
    try:
        return limiter().call_waits([(t.plan.channel, provider) for t, provider in picks])
    except Exception as exc:  # noqa: BLE001  (degrade: a limiter outage must not stop sends)
        log.warning("rate limiter unavailable, sending without it: %s", exc)
        return [0.0] * len(picks)


def record_batch(calls: list[tuple[Try, Call]]) -> None:
    """Tell the breakers the results of a batch's calls, in one count per provider
    (``Breakers.record_batch``); then ``settle`` each with ``recorded=True``. A breaker store
    that cannot be reached leaves the results uncounted, with one warning, as ``settle``."""
    by_config: dict[BreakerConfig, list[tuple[Try, Call]]] = {}
    for t, call in calls:
        if call.permit is not None:
            by_config.setdefault(t.plan.config, []).append((t, call))
    where = {call.provider.pk: (call.provider, t.plan.channel) for t, call in calls}
    breakers = breakers_from_settings()
    for config, group in by_config.items():
        results = [(c.permit, c.error is None, c.duration_ms) for _, c in group]
        try:
            transitions = breakers.record_batch(results, config)
        except BreakerUnavailable as exc:
            names = sorted({c.provider.name for _, c in group})
            log.warning("breaker state unavailable, %s not counted: %s", ", ".join(names), exc)
            continue
        for transition in transitions:
            on_transition(transition, *where[transition.provider_id])
