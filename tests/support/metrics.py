"""Reading /metrics as Prometheus does: HTTP, then prometheus_client's own text parser."""

import time
import urllib.error
import urllib.request
from collections.abc import Callable

from prometheus_client.parser import text_string_to_metric_families


class Scrape:
    """One scrape's samples: (name, labels) -> value."""

    def __init__(self, text: str) -> None:
        self.samples = [
            (sample.name, sample.labels, sample.value)
            for family in text_string_to_metric_families(text)
            for sample in family.samples
        ]

    def value(self, name: str, **labels: str) -> float:
        """The sum of the samples of `name` whose labels include `labels` (0: none)."""
        return sum(
            value
            for sample_name, sample_labels, value in self.samples
            if sample_name == name and labels.items() <= sample_labels.items()
        )

    def has(self, name: str) -> bool:
        return any(sample_name == name for sample_name, _, _ in self.samples)


def http_get(url: str, *, token: str | None = None, cookie: str | None = None) -> tuple[int, str]:
    request = urllib.request.Request(url)
    if token is not None:
        request.add_header("Authorization", f"Bearer {token}")
    if cookie is not None:
        request.add_header("Cookie", cookie)
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


def scrape(url: str, *, token: str | None = None) -> Scrape:
    status, body = http_get(url, token=token)
    assert status == 200, f"{url} answered {status}: {body[:500]}"
    return Scrape(body)


def scrape_until(
    url: str, condition: Callable[[Scrape], bool], *, token: str | None = None, timeout: float = 15
) -> Scrape:
    """The first scrape that meets the condition, polled until the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        got = scrape(url, token=token)
        if condition(got):
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"{url} never met the condition; last scrape: {got.samples}")
        time.sleep(0.05)
