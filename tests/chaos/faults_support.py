"""Publishers and checks shared by the fault tests (Postgres, Redis): posters that keep posting
through a fault and remember every answer, and the comparison of what was answered, what the
database holds and what each client received.

Clients (plain socket and SSE, reconnecting with ``since`` / ``Last-Event-ID``) are those of
tests/test_cross_process.py, reused as they are.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter
from dataclasses import dataclass, field

import httpx
from prometheus_client.parser import text_string_to_metric_families

from tests.test_cross_process import Received

METRICS_TOKEN = "chaos-metrics-token"  # the servers' METRICS_TOKEN: /metrics answers with it
POSTER_PACE_S = 0.05  # a publisher's pause between two posts: load, not a flood, on 2 cores
POST_TIMEOUT_S = 30  # far above any deadline: a post that gets no answer at all fails the test


@dataclass
class Answer:
    """One post and what came back: ``status`` None for a transport error (no HTTP answer)."""

    key: str
    started: float  # time.monotonic()
    answered: float
    status: int | None
    seq: int | None = None
    retry_after: str | None = None
    replayed: bool = False  # a 202 answering with a notification stored before


@dataclass
class Posters:
    """``count`` publishers posting to ``topic`` on ``bases`` (round robin) with idempotency keys
    ``<topic>-<poster>-<n>`` while ``posting()`` runs. ``answers`` holds every post's answer."""

    http: httpx.AsyncClient
    bases: list[str]
    api_key: str
    topic: str
    count: int = 4
    answers: list[Answer] = field(default_factory=list)
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    _changed: asyncio.Condition = field(default_factory=asyncio.Condition)

    async def repost(self, answer: Answer) -> tuple[Answer, bool]:
        """Post ``answer``'s notification again under its idempotency key (what a client does
        after a 504); the new answer, and whether it was a replay of a stored one."""
        n = int(answer.key.rsplit("-", 1)[1])
        again = await self._post(self.bases[0], answer.key, n)
        return again, again.status == 202 and again.replayed

    async def _post(self, base: str, key: str, n: int) -> Answer:
        body = {
            "topic": self.topic,
            "event": "fault.tick",
            "data": {"n": n},
            "idempotency_key": key,
        }
        headers = {"Authorization": f"Bearer {self.api_key}"}
        started = time.monotonic()
        try:
            response = await self.http.post(
                f"{base}/api/v1/notifications", json=body, headers=headers, timeout=POST_TIMEOUT_S
            )
        except httpx.TransportError:
            return Answer(key, started, time.monotonic(), None)
        answer = Answer(key, started, time.monotonic(), response.status_code)
        answer.retry_after = response.headers.get("Retry-After")
        if response.status_code == 202:
            answer.seq = response.json()["seq"]
            answer.replayed = response.headers.get("Idempotent-Replayed") == "true"
        else:
            assert response.status_code in (503, 504), response.text
        return answer

    async def _poster(self, index: int) -> None:
        n = 0
        while not self.stop.is_set():
            base = self.bases[(index + n) % len(self.bases)]
            answer = await self._post(base, f"{self.topic}-{index}-{n}", n)
            async with self._changed:
                self.answers.append(answer)
                self._changed.notify_all()
            n += 1
            await asyncio.sleep(POSTER_PACE_S)  # a publisher's pace, not a wait for an event

    @contextlib.asynccontextmanager
    async def posting(self):
        """Post while the block runs; on leaving it, stop and wait for the posts in flight (a
        post cut off unanswered could still be stored, and then no answer would account for
        it)."""
        posting = asyncio.gather(*(self._poster(i) for i in range(self.count)))
        try:
            yield self
        finally:
            self.stop.set()
            await posting

    async def wait_for(self, what: str, wanted, timeout_s: float = 30) -> None:
        """Until ``wanted(answers)`` is true; AssertionError naming ``what`` after ``timeout_s``."""
        async with self._changed:
            try:
                await asyncio.wait_for(
                    self._changed.wait_for(lambda: wanted(self.answers)), timeout_s
                )
            except TimeoutError:
                counts = Counter(a.status for a in self.answers)
                raise AssertionError(f"never {what}; answers so far: {dict(counts)}") from None

    async def each_answered(self, status: int, since: float, timeout_s: float = 30) -> None:
        """Until every poster got an answer ``status`` to a post it started after ``since``."""

        def done(answers: list[Answer]) -> bool:
            posters = {
                a.key.rsplit("-", 2)[-2]
                for a in answers
                if a.started > since and a.status == status
            }
            return len(posters) == self.count

        await self.wait_for(f"a {status} for every poster", done, timeout_s)


def delivery_figures(
    answers: list[Answer], committed: dict[str, int], clients: list[Received]
) -> dict[str, object]:
    """Compare the answers with the database (idempotency key -> seq of the topic's rows) and
    with what each client received; assert the guarantees and return the figures:
    every 202 is stored with its seq, no 503 is stored, the topic's seqs are gap-free, every
    client has every stored seq exactly once and in order."""
    by_status = Counter(a.status for a in answers)
    accepted = {a.key: a.seq for a in answers if a.status == 202}
    refused = {a.key for a in answers if a.status == 503}
    in_doubt = {a.key for a in answers if a.status == 504}
    lost = {key for key, seq in accepted.items() if committed.get(key) != seq}
    refused_stored = refused & set(committed)
    seqs = sorted(committed.values())
    assert not lost, f"202 answered but not stored with that seq: {sorted(lost)[:10]}"
    assert not refused_stored, f"503 answered but stored: {sorted(refused_stored)[:10]}"
    assert seqs == list(range(1, len(seqs) + 1)), "the topic's seqs have a gap"
    figures: dict[str, object] = {
        "published": len(answers),
        "answered_202": by_status[202],
        "answered_503": by_status[503],
        "answered_504": by_status[504],
        "no_answer": by_status[None],
        "committed": len(committed),
        "stored_of_504": len(in_doubt & set(committed)),
        "stored_of_503": len(refused_stored),
    }
    lost_total = duplicated = out_of_order = 0
    for client in clients:
        got = client.seqs
        counted = Counter(got)
        lost_total += len(set(seqs) - set(got))
        duplicated += sum(n - 1 for n in counted.values())
        out_of_order += sum(1 for a, b in zip(got, got[1:], strict=False) if b <= a)
        figures[f"received_{client.name.replace(' ', '_')}"] = len(got)
    figures.update(lost=len(lost) + lost_total, duplicated=duplicated, out_of_order=out_of_order)
    for client in clients:
        assert client.seqs == seqs, f"{client.name} got {client.seqs[-10:]}, stored {seqs[-10:]}"
    return figures


def metric(base: str, name: str, **labels: str) -> float:
    """The value of the sample ``name`` with ``labels`` on the server's ``/metrics`` (summed over
    the host's processes; 0 when absent)."""
    answer = httpx.get(
        f"{base}/metrics", headers={"Authorization": f"Bearer {METRICS_TOKEN}"}, timeout=10
    )
    assert answer.status_code == 200, answer.text
    return sum(
        sample.value
        for family in text_string_to_metric_families(answer.text)
        for sample in family.samples
        if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items())
    )
