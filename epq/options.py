"""The options epq puts on a Dramatiq message (``message.options``), each named here once.

All but ``ARGS_JSON`` travel with the message (they are encoded with it, and a retried or
promoted message keeps them); the Redis scripts read ``PRIORITY`` (``lua/lib/lane_of.lua`` gets
the name from here).
"""

#: The job's priority, 1 (highest) to 4: the lane it waits in on every broker (``epq.priority``).
PRIORITY = "epq_priority"
#: The uniqueness lock the job holds: its retries and promotions pass ``Uniqueness`` with it, and
#: it is freed when the job dies.
UNIQUE_KEY = "epq_unique_key"
#: The job has a record: it was inserted by epq (``epq.insert``), not enqueued by hand.
RECORDED = "epq_recorded"
#: When a message that waited in the schedule was due (set as it goes in).
DUE_MS = "epq_due_ms"
#: The payload as JSON, from the actor to the record of a message enqueued by hand (so the record
#: does not encode the payload again); taken off before the message is encoded.
ARGS_JSON = "epq_args_json"
#: How many times the job has snoozed (``epq.Snooze``); its record shows it as ``snoozes``.
SNOOZES = "epq_snoozes"
#: The OpenTelemetry context of the enqueue that made the job (W3C ``traceparent``, ``tracestate``):
#: each attempt's consumer span continues it (``epq.tracing``).
TRACE_CONTEXT = "epq_trace"
#: The schedule and tick a periodic job was enqueued for (``<name>@<tick ms>``): its uniqueness
#: lock is made from them instead of its unique fields (``epq.periodic_jobs``).
PERIODIC = "epq_periodic"
#: The serial key of a job whose kind has serial keys on (``epq.serial``): jobs with the same key
#: start one at a time, in the order they were enqueued.
SERIAL_KEY = "epq_serial_key"
#: The uniqueness mode of a job inserted in a mode other than ``keep_first`` (``replace`` or
#: ``debounce``; ``epq.middleware.modes``): its worker reads its record as it starts it, for a payload a
#: duplicate put in its place, or for the job it follows and must wait for.
UNIQUE_MODE = "epq_unique_mode"
