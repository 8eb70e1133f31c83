"""Observability fed by decisions: the audit log (metrics and alerts come later)."""
