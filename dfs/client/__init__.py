"""The dfs client library (docs/protocol.md): `Client` for the CLI and the mount."""

from dfs.client.attr import Attr
from dfs.client.client import Client

__all__ = ["Attr", "Client"]
