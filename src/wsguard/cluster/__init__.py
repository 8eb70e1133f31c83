"""Cluster mode: what a node does with a shared store beyond single checks.

Per-subject message quota taken in batches (:mod:`quota`) and the events every
node reacts to: revocations and broadcasts (:mod:`events`).
"""
