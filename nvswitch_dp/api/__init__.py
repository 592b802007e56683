"""The REST control API (Quart-Trio on Hypercorn), described by ``openapi.yaml``."""

from nvswitch_dp.api.app import create_app

__all__ = ["create_app"]
