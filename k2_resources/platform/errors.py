"""Errors of the embedded platform (k2_resources.platform): the services of the local topology."""

from __future__ import annotations

from k2_resources.errors import K2Error


class ClusterServiceError(K2Error):
    """A service of the local topology could not start, or does not answer."""
