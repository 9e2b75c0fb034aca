"""secfed on Flower's engines (optional extra ``secfed[flower]``: flwr 1.42, ray).

* :mod:`secfed.flower.server` -- the coordinator as a ServerApp workflow.
* :mod:`secfed.flower.client` -- each site's participant as a ClientApp.
* :mod:`secfed.flower.simulate` -- ``secfed flower simulate``: synthetic sites on the Ray engine.

Nothing here changes the protocol, the ledgers or the audit: Flower carries the same bytes the
HTTPS transport does (:mod:`secfed.flower.wire`).
"""
