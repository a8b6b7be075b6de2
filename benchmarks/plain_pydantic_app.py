"""``benchmarks.plain_app`` plus an actor whose payload a pydantic model validates, as a plain
Dramatiq application that checks its jobs would have: the baseline that shows what epq adds
besides pydantic (its actors validate into pydantic request models). ``footprint.py`` uses it."""

from __future__ import annotations

from typing import Any

import dramatiq
from pydantic import BaseModel

from benchmarks._report import report
from benchmarks.plain_app import QUEUE, broker, plain_job

__all__ = ["broker", "plain_job", "plain_validated_job"]


class PlainPayload(BaseModel):
    n: int
    sent_at: float | None = None


@dramatiq.actor(queue_name=QUEUE, actor_name="plain_validated_job", max_retries=0)
def plain_validated_job(**payload: Any) -> None:
    report(PlainPayload.model_validate(payload).sent_at)
