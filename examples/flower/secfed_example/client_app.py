"""The ClientApp: one secfed site per node.

Simulation: the participant of the node's kit (run config ``kits-dir``, by ``partition-id``)
runs in this process. Deployment: the node's ``kit`` is served by the site's own
``secfed flower site --kit KIT`` process, and this app relays each message to it.
"""

from secfed.flower.client import make_client_app

app = make_client_app(new_ledger=True)
