"""epq's Dramatiq middleware, one module each:

- ``retries``: ``EpqRetries`` replaces Dramatiq's ``Retries``: it counts attempts the River way
  (``max_attempts`` includes the first run), follows each kind's backoff schedule with ±25 %
  jitter, and dead-letters at once the errors named in the actor's ``throws``;
- ``uniqueness``: ``Uniqueness`` gives each kind its uniqueness window through the state store;
- ``job_records``: ``JobRecords`` writes each job's state transitions to its record;
- ``boot``: ``EpqMiddleware`` loads the handler modules when a worker boots and warns about kinds
  without a handler;
- ``common``: what they share.

``Priority`` (``epq.priority``) and ``Scheduling`` (``epq.schedule``) live with their semantics.
A new job is inserted by ``epq.insert``, which takes its lock and writes its record itself:
``Uniqueness`` and ``JobRecords`` act on what arrives unplanned (retries, promotions from the
schedule, messages enqueued by hand). None holds per-message state on ``self``: one instance
serves every worker thread.
"""
