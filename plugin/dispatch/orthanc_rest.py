"""Orthanc REST: POST each file to /instances on one HTTP session per batch."""

from __future__ import annotations

from collections.abc import Sequence

import requests

from plugin.config import (
    OrthancDestination,
)
from plugin.dispatch.base import (
    Outcomes,
    Outgoing,
    describe_network_error,
    fail_all,
    http_status,
    http_where,
    missing_file,
)


class OrthancSender:
    """Orthanc REST: POST {url}/instances with each file's bytes, on one HTTP session per batch."""

    def __init__(self, destination: OrthancDestination, timeout_s: float) -> None:
        self.destination = destination
        self.timeout_s = timeout_s
        self.where = http_where(destination.url)

    def _session(self) -> requests.Session:
        session = requests.Session()
        if self.destination.username is not None and self.destination.password is not None:
            session.auth = (self.destination.username, self.destination.password.get_secret_value())
        return session

    def check(self) -> str | None:
        """An HTTP check: GET {url}/system must answer 200 with these credentials; None when it does."""
        try:
            with self._session() as session:
                response = session.get(f"{self.destination.url}/system", timeout=self.timeout_s)
        except requests.RequestException as err:
            return describe_network_error(err, self.where)
        return None if response.ok else http_status(response, self.where)

    def send(self, items: Sequence[Outgoing]) -> Outcomes:
        outcomes: Outcomes = {}
        with self._session() as session:
            for index, item in enumerate(items):
                if (reason := missing_file(item)) is not None:
                    outcomes[item.delivery_id] = reason
                    continue
                try:
                    response = session.post(
                        f"{self.destination.url}/instances",
                        data=item.path.read_bytes(),
                        headers={"Content-Type": "application/dicom"},
                        timeout=self.timeout_s,
                    )
                except requests.RequestException as err:  # the server is unreachable: stop this batch
                    return outcomes | fail_all(items[index:], describe_network_error(err, self.where))
                outcomes[item.delivery_id] = None if response.ok else http_status(response, self.where)
        return outcomes
