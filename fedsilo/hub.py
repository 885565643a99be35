"""Whether a model must come from the Hugging Face hub, and whether the hub answers at all.

Without a network, transformers takes its time to find out that a hub id (a typo of a local path,
say) cannot be fetched: name lookups and connection attempts, each with its timeout and retries.
One short probe of the hub first turns that into a failure in seconds: when the hub does not
answer, a name is looked up in the local cache only (``local_files_only``), as ``HF_HUB_OFFLINE=1``
would, and a miss says so in one line. The probe is an HTTPS request, not a TCP connect: a
transparent proxy accepts every connect whatever lies behind it.
"""

from __future__ import annotations

import functools
import os
import threading
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

# The hub answers in well under a second where there is a network; the name lookup before the
# request has no timeout of its own, so the probe runs in a thread given this long.
PROBE_SECONDS = 3.0
# Answers that come from a proxy refusing the way, not from the hub.
_REFUSALS = (403, 407)
DEFAULT_ENDPOINT = "https://huggingface.co"
# Set once this process found the hub unreachable (go_offline): later loads say why they read
# only the cache, as the first did.
_went_offline = False


def is_local(name: str) -> bool:
    return Path(name).expanduser().exists()


def offline() -> bool:
    """``HF_HUB_OFFLINE`` is set: transformers itself then reads only the cache, at once."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


@functools.lru_cache(maxsize=8)
def reachable(endpoint: str) -> bool:
    """Whether the hub answers a HEAD request within PROBE_SECONDS (asked once per process)."""
    opened: list[bool] = []

    def probe() -> None:
        try:
            with urllib.request.urlopen(urllib.request.Request(endpoint, method="HEAD"), timeout=PROBE_SECONDS):
                opened.append(True)
        except urllib.error.HTTPError as exc:  # an answer all the same, unless a proxy's refusal
            opened.append(exc.code < 500 and exc.code not in _REFUSALS)
        except (OSError, ValueError):  # no route, no name, refused, TLS failure, a bad HF_ENDPOINT
            opened.append(False)

    thread = threading.Thread(target=probe, name="hub-probe", daemon=True)
    thread.start()
    thread.join(PROBE_SECONDS)
    return opened == [True]


def load_options(name: str) -> dict[str, Any]:
    """Extra ``from_pretrained`` arguments for ``name``: the cache only when it must come from an
    unreachable hub, and then the hub library offline for the rest of the process."""
    if is_local(name):
        return {}
    if not _went_offline and (offline() or reachable(os.environ.get("HF_ENDPOINT", DEFAULT_ENDPOINT))):
        return {}
    go_offline()
    return {"local_files_only": True}


def go_offline() -> None:
    """``HF_HUB_OFFLINE=1`` from now on. ``local_files_only`` alone is not enough: transformers 5
    still asks the hub for some files (an adapter config) and huggingface_hub retries with backoff,
    23 s of sleeping per model. The library reads the variable once, at import, so its constant
    is set too."""
    import huggingface_hub.constants

    global _went_offline
    _went_offline = True
    os.environ["HF_HUB_OFFLINE"] = "1"
    huggingface_hub.constants.HF_HUB_OFFLINE = True


def why_not(name: str, options: dict[str, Any]) -> str:
    """What a failed load of ``name`` with ``options`` most likely means, for the error line."""
    if Path(name).expanduser().is_dir():
        return "from local directory"
    if options.get("local_files_only"):
        return (
            "(not a local path; the Hugging Face hub is unreachable from here and the local cache has no such "
            "model: give a local directory, or set HF_HUB_OFFLINE=1 to load from the cache without probing)"
        )
    return "(not a local directory and not reachable on the hub)"
