"""Scan one TLS server with sslyze and check it against Mozilla's "modern" profile.

Runs inside sslyze's own virtual environment (see ``tests/e2e/test_tls_profile.py``), never in
the project's: ``python sslyze_modern.py HOST PORT CLIENT_CERT CLIENT_KEY CA_FILE``. The federation
CA is handed to sslyze as its custom trust store, which is the only allowance made: the server is
trusted through the federation's private CA instead of a public root. Prints one JSON object:
the profile's issues (empty when compliant) and what was accepted.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from sslyze import (
    CertificateInfoExtraArgument,
    ClientAuthenticationCredentials,
    ScanCommandsExtraArguments,
    Scanner,
    ServerNetworkConfiguration,
    ServerNetworkLocation,
    ServerScanRequest,
    ServerScanStatusEnum,
)
from sslyze.mozilla_tls_profile.tls_config_checker import (
    SCAN_COMMANDS_NEEDED_BY_MOZILLA_CHECKER,
    MozillaTlsConfiguration,
    ServerNotCompliantWithTlsConfiguration,
    TlsConfigurationEnum,
    check_server_against_tls_configuration,
)


def main(host: str, port: int, cert: Path, key: Path, ca: Path) -> dict:
    location = ServerNetworkLocation(hostname=host, port=port, ip_address=host)
    network = ServerNetworkConfiguration(
        tls_server_name_indication=host,
        tls_client_auth_credentials=ClientAuthenticationCredentials(
            certificate_chain_path=cert, key_path=key),
        network_timeout=30, network_max_retries=5,  # a loaded 2-core machine answers slowly
    )
    request = ServerScanRequest(
        server_location=location, network_configuration=network,
        scan_commands=SCAN_COMMANDS_NEEDED_BY_MOZILLA_CHECKER,
        scan_commands_extra_arguments=ScanCommandsExtraArguments(
            certificate_info=CertificateInfoExtraArgument(custom_ca_file=ca)),
    )
    scanner = Scanner(per_server_concurrent_connections_limit=4)
    scanner.queue_scans([request])
    (result,) = list(scanner.get_results())
    if result.scan_status != ServerScanStatusEnum.COMPLETED:
        return {"error": f"scan not completed: {result.connectivity_error_trace}"}
    scans = result.scan_result
    failed = {c.value: getattr(scans, c.value).error_trace
              for c in SCAN_COMMANDS_NEEDED_BY_MOZILLA_CHECKER
              if getattr(scans, c.value).result is None}
    if failed:
        return {"error": "scan commands failed", "failed": {k: str(v)[-800:] for k, v in failed.items()}}
    accepted = {}
    for name in ("ssl_2_0", "ssl_3_0", "tls_1_0", "tls_1_1", "tls_1_2", "tls_1_3"):
        attempt = getattr(scans, f"{name}_cipher_suites")
        accepted[name] = sorted(s.cipher_suite.name for s in attempt.result.accepted_cipher_suites)
    curves = scans.elliptic_curves.result
    issues: dict[str, str] = {}
    try:
        check_server_against_tls_configuration(
            result, MozillaTlsConfiguration.get(TlsConfigurationEnum("modern")))
    except ServerNotCompliantWithTlsConfiguration as exc:
        issues = dict(exc.issues)
    deployments = scans.certificate_info.result.certificate_deployments
    leaf = deployments[0].received_certificate_chain[0]
    return {
        "issues": issues,
        "accepted_cipher_suites": accepted,
        "curves": sorted(c.name for c in curves.supported_curves or []),
        "leaf_lifespan_days": (leaf.not_valid_after_utc - leaf.not_valid_before_utc).days,
        "trusted_via_federation_ca": deployments[0].verified_certificate_chain is not None,
    }


if __name__ == "__main__":
    host, port, cert, key, ca = sys.argv[1:6]
    print(json.dumps(main(host, int(port), Path(cert), Path(key), Path(ca)), sort_keys=True))
