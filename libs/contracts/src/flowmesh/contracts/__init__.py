"""Flowmesh's wire contracts: the single source of every name and shape services exchange."""

from flowmesh.contracts.headers import SCHEMA_VERSION

__all__ = ["SCHEMA_VERSION"]
