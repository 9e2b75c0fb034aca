"""The ServerApp: secfed's coordinator (run config ``coordinator-kit``) as the workflow."""

from secfed.flower.server import make_server_app

app = make_server_app()
