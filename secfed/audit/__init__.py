"""Privacy-budget audit reports (HTML + JSON + PNG), independently re-verified.

Front door: :func:`build_report` re-verifies ledgers (through :func:`secfed.privacy.verify_ledger`
and the accountant), cross-checks them with the coordinator's transcript and the participants'
outbound logs, and returns an :class:`AuditReport`; :func:`write_report` writes ``report.json``
(validated by :func:`load_schema`), ``report.html`` and the PNG plots.
"""

from secfed.audit.build import build_report
from secfed.audit.model import SCHEMA_VERSION, AuditReport, Check, CheckStatus, load_schema
from secfed.audit.writer import write_report

__all__ = [
    "SCHEMA_VERSION",
    "AuditReport",
    "Check",
    "CheckStatus",
    "build_report",
    "load_schema",
    "write_report",
]
