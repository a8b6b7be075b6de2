"""epq's backends: one home per broker (``memory``, ``redis``, ``rabbitmq``), the protocols they
give epq (``base``) and the factory that builds one from a URL (``factory``)."""
