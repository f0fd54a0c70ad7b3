"""The unit of fetching and caching: one provider's whole rate table for one day."""

import dataclasses
import datetime
import json
from decimal import Decimal, InvalidOperation
from typing import Self

from ..errors import UnsupportedCurrency

#: The first ECB publication; no provider has a rate before it.
FIRST_DAY = datetime.date(1999, 1, 4)


@dataclasses.dataclass(frozen=True)
class RateTable:
    """Rates of one day: ``rates[code]`` is units of ``code`` per 1 EUR (ECB convention).

    ``day`` is the UTC day asked for; ``published`` the day of the publication that is valid
    on it (the same or the latest earlier business day). ``fetched_at`` is epoch seconds.
    """

    provider: str
    day: datetime.date
    published: datetime.date
    rates: dict  # str -> Decimal, always with "EUR": Decimal(1)
    fetched_at: float

    def rate(self, currency: str) -> Decimal:
        """Units of ``currency`` per EUR, or ``UnsupportedCurrency``."""
        try:
            return self.rates[currency]
        except KeyError:
            raise UnsupportedCurrency(currency) from None

    def to_json(self) -> str:
        """JSON text (never a pickle): rates as decimal strings so nothing is rounded."""
        return json.dumps({
            "provider": self.provider,
            "day": self.day.isoformat(),
            "published": self.published.isoformat(),
            "fetched_at": self.fetched_at,
            "rates": {code: str(rate) for code, rate in sorted(self.rates.items())},
        }, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str | bytes) -> Self:
        """Inverse of ``to_json``; ``ValueError`` for anything malformed."""
        try:
            data = json.loads(text)
            rates = {str(code): Decimal(str(rate)) for code, rate in data["rates"].items()}
            if any(not r.is_finite() or r <= 0 for r in rates.values()):
                raise ValueError("non-positive or non-finite rate")
            rates["EUR"] = Decimal(1)
            return cls(
                provider=str(data["provider"]),
                day=datetime.date.fromisoformat(data["day"]),
                published=datetime.date.fromisoformat(data["published"]),
                rates=rates,
                fetched_at=float(data["fetched_at"]),
            )
        except (KeyError, TypeError, AttributeError, InvalidOperation) as e:
            raise ValueError(f"malformed rate table: {e!r}") from e
