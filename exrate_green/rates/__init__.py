"""Exchange rates: providers that fetch one day's table, and the book that caches them."""

from .table import FIRST_DAY, RateTable

__all__ = ["FIRST_DAY", "RateTable"]
