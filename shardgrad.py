"""`from shardgrad import Client`: the service's Python client (service/client.py)."""

from service.client import Client, ClientError, Job, Points, Sweep

__all__ = ["Client", "ClientError", "Job", "Points", "Sweep"]
