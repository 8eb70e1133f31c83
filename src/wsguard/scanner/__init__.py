"""``wsguard audit``: a black-box security scanner for any WebSocket endpoint."""

from wsguard.scanner.model import REGISTRY, Check, Finding, Verdict
from wsguard.scanner.options import ScanOptions
from wsguard.scanner.runner import Report, run_scan

__all__ = ["REGISTRY", "Check", "Finding", "Report", "ScanOptions", "Verdict", "run_scan"]
