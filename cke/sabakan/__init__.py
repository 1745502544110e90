"""The sabakan integration: generate the cluster from sabakan's machines and a template."""

from cke.sabakan.generator import (
    Generated,
    NodeMetadata,
    generate,
    machine_address,
    machine_metadata,
)
from cke.sabakan.rules import Refusal

__all__ = [
    "Generated",
    "NodeMetadata",
    "Refusal",
    "generate",
    "machine_address",
    "machine_metadata",
]
