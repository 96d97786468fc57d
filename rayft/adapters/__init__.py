"""The multi-adapter layer: one frozen base linear, many adapters, each on its own rows' tokens."""

from rayft.adapters.layer import MultiAdapterLinear
from rayft.adapters.model import AdapterError, AdapterModel
from rayft.adapters.peft_format import load_adapter, read_adapter_config, save_adapter
from rayft.adapters.routing import Router, RoutingError, Segment

__all__ = [
    "AdapterError",
    "AdapterModel",
    "MultiAdapterLinear",
    "Router",
    "RoutingError",
    "Segment",
    "load_adapter",
    "read_adapter_config",
    "save_adapter",
]
