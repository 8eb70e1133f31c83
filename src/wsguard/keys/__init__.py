"""Verification keys obtained while the node runs (an identity provider's JWKS).

Keys named by the configuration (a secret, a PEM file, a JWKS file) are loaded once by
``wsguard.config.keys``; :mod:`wsguard.keys.remote_jwks` fetches, checks and caches the
keys an identity provider publishes.
"""
