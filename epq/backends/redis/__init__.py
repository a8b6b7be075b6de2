"""The Redis backend: the broker (``broker``), epq's state and records (``store``), every key
(``keys``), the Lua scripts (``lua/``, read by ``scripts``) and the connection helpers
(``connections``)."""
