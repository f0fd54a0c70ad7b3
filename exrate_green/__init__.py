"""exrate-green: answers currency-assignment's stakes in EUR over one WebSocket."""

__version__ = "0.1.0"

from .config import Settings
from .errors import (
    ConfigError,
    ExrateError,
    ProtocolError,
    RateError,
    RateUnavailable,
    UnsupportedCurrency,
)

__all__ = ["Settings", "ConfigError", "ExrateError", "ProtocolError", "RateError",
           "RateUnavailable", "UnsupportedCurrency", "__version__"]
