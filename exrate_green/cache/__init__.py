"""Rate tables below the rate book's memory: disk (always), then Redis (``REDIS_URL``).

``open_cache(settings)`` builds the ``TieredCache`` the rate book holds; ``disk`` is the
diskcache tier, ``redis`` the Redis tier, ``flight`` single-flight across processes,
``commands`` serves ``exrate-service cache ...``.
"""

from .commands import run_cache_command
from .disk import TableCache, table_key
from .flight import Flights
from .jsondisk import JsonDisk
from .redis import RedisTier, check_redis_url, redacted_url, redis_password
from .tiers import TieredCache, open_cache

__all__ = ["Flights", "JsonDisk", "RedisTier", "TableCache", "TieredCache", "check_redis_url",
           "open_cache", "redacted_url", "redis_password", "run_cache_command", "table_key"]
