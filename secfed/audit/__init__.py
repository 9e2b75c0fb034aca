"""Privacy-budget audit reports (HTML + JSON + PNG), independently re-verified."""
