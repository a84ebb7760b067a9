"""The names a config file holds, and what they may look like: model names (what clients send), the Serve deployment
name a model id becomes, media hostnames.

Their own module because they are rules of their own, and not only the config applies them: the router checks a media
URL's host by the same rule as the config checks its list (:func:`looks_like_ip`).
"""

from __future__ import annotations

import ipaddress
import re
from typing import Annotated

from pydantic import AfterValidator

# Model ids are what clients type, so allow the usual hub spellings ("Qwen/Qwen2.5-7B-Instruct", "gemma3:27b")
# but no whitespace or control characters, which would not survive a URL path or a log line intact.
MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:/@+-]{0,199}$")
# A media domain: a DNS name of two or more letter-digit-hyphen labels, lower case (internationalized names in their
# xn-- form, as urllib3 gives them to vLLM's check). A last label that is a number (in decimal or hex) makes a URL
# parser or resolver read the name as an IPv4 address (`127.1`, `2130706433`).
_HOSTNAME = re.compile(r"^(?!-)[a-z0-9-]{1,63}(?<!-)(\.(?!-)[a-z0-9-]{1,63}(?<!-))+$")
_NUMERIC_LABEL = re.compile(r"^(0x[0-9a-f]*|[0-9]+)$")


def check_model_name(value: str) -> str:
    if not MODEL_NAME.match(value):
        raise ValueError(
            f"{value!r} is not a valid model name (letters, digits and . _ : / @ + -, starting with a letter or digit)"
        )
    return value


def engine_deployment_name(model_id: str) -> str:
    """The Serve deployment's name: Serve names may not hold every character a model id can (``/``, ``:``)."""
    return "engine-" + "".join(c if c.isalnum() or c in "-_." else "_" for c in model_id)


def check_media_domain(value: str) -> str:
    """A hostname as vLLM compares it (urllib3's parse, lower-cased, IDNA-encoded), or ValueError."""
    host = value.lower()
    if looks_like_ip(host):
        raise ValueError(f"{value!r} is an IP address: list hostnames only (media is never fetched from an IP address)")
    if host.startswith("*."):
        raise ValueError(f"{value!r}: wildcards are not supported (vLLM matches hostnames exactly); list each host")
    if not _HOSTNAME.fullmatch(host) or len(host) > 253:
        raise ValueError(f"{value!r} is not a hostname: give the name only (`images.example.com`), without scheme, "
                         "port, path or trailing dot, with at least one dot, internationalized names in their xn-- "
                         "form")
    return host


def looks_like_ip(host: str) -> bool:
    """An IP address in any form a URL parser or resolver may take as one: ``[::1]``, ``10.0.0.1``, and the
    shortened and numeric IPv4 forms ``127.1``, ``2130706433``, ``0x7f.1`` (a name whose last label is a number)."""
    host = host.strip("[]").split("%", 1)[0]
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        return bool(_NUMERIC_LABEL.fullmatch(host.rstrip(".").rsplit(".", 1)[-1]))


# One entry of `allowed_media_domains`: checked, and lower-cased.
MediaDomain = Annotated[str, AfterValidator(check_media_domain)]
