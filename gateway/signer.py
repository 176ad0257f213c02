"""The gateway's signing key, from SANDFLEET_SIGNING_KEY."""

from __future__ import annotations

import logging

from sandfleet.common.settings import Settings
from sandfleet.common.signing import JobSigner

log = logging.getLogger(__name__)


def job_signer(settings: Settings) -> JobSigner | None:
    """The signer of every job and cancellation this gateway publishes; None without a
    key, when only workers that allow unsigned jobs will run them (see `say_how_signed`)."""
    if settings.signing_key is None:
        return None
    return JobSigner.from_file(settings.signing_key)


def say_how_signed(signer: JobSigner | None) -> None:
    """Logged once the gateway is connected (an unreachable broker is the one line then)."""
    if signer is None:
        log.warning(
            "SANDFLEET_SIGNING_KEY is not set: jobs go out unsigned, and workers refuse "
            "them unless SANDFLEET_ALLOW_UNSIGNED_JOBS=1"
        )
    else:
        log.info("signing jobs with key %s", signer.key_id)
