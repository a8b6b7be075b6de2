"""The five epq actors, bound to the broker ``epq.setup()`` builds from the settings.

Importing this module sets epq up (``EPQ_BROKER_URL``, ``EPQ_STATE_URL``), so
``dramatiq epq.actors`` runs a worker with nothing else to write.
"""

from __future__ import annotations

from ._actor import EpqActor
from ._runtime import actor_for, setup

setup()

index_endpoint: EpqActor = actor_for("index_endpoint")
register_job: EpqActor = actor_for("register_job")
register_source: EpqActor = actor_for("register_source")
register_dynamic_trigger: EpqActor = actor_for("register_dynamic_trigger")
register_dynamic_schedule: EpqActor = actor_for("register_dynamic_schedule")

__all__ = [
    "index_endpoint",
    "register_dynamic_schedule",
    "register_dynamic_trigger",
    "register_job",
    "register_source",
]
