"""Media URLs: a request may make an engine fetch only from its model's ``allowed_media_domains``.

A multimodal model's engine downloads every image, audio or video URL a request names, from inside the cluster:
unchecked, any client could make a GPU pod fetch ``http://169.254.169.254/`` (cloud credentials) or any internal
service. Before any engine is asked, :func:`check_media_urls` refuses (400 ``invalid_request_error``, code
``media_url_not_allowed``, ``param`` naming the URL as the client wrote it, e.g.
``messages[0].content[1].image_url.url``) a request with a media URL that

- is not ``http(s)`` (``file:``, ``ftp:``, none); ``data:`` URLs are always accepted: nothing is fetched for them;
- names an IP address as its host, in any form (``127.0.0.1``, ``[::1]``, ``2130706433``);
- names a host not in the model's ``allowed_media_domains``: exactly, case-insensitively, as vLLM itself compares
  (``example.com`` does not admit ``cdn.example.com``); a model that is not multimodal has none, so every media URL
  is refused for it;
- names a host that does not resolve, within :data:`MEDIA_RESOLVE_TIMEOUT_S`, only to public addresses (none
  private, loopback, link-local, multicast, reserved or unspecified, including IPv4 ones inside IPv6 addresses).

Each distinct host is resolved once per request, all at once; only hosts in the list are resolved, so a request
costs at most as many lookups as the list has names, and at most :data:`MAX_MEDIA_URLS` URLs are looked at. URLs
are parsed by urllib3's ``parse_url``, the parser vLLM uses, so both see the same host.

The engine checks again: vLLM gets the list as its own ``allowed_media_domains`` and follows no redirect
(``deployments/model_config.py``), so a redirect from an allowed host leads nowhere. What is left: an allowed host's DNS
answering the engine differently from the router a moment before (rebinding), which only the owner of an allowed
domain can do.

Where media URLs are: chat ``messages[i].content[j]`` (any role: a tool message's parts are fetched too) and
embeddings' ``messages`` (vLLM embeds chat conversations), in the ``image_url``, ``audio_url`` and ``video_url``
keys, each a string or ``{"url": ...}``, whatever the part's ``type`` says (vLLM reads typeless parts by these keys);
Responses ``input[k].content[j]`` and a tool output's ``input[k].output[j]`` (``input_image`` names its URL
``image_url``).
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import Iterator
from typing import Any

from urllib3.exceptions import LocationParseError
from urllib3.util import parse_url

from deployments.config import RoutedModel
from deployments.constants import MAX_MEDIA_URLS, MEDIA_RESOLVE_TIMEOUT_S
from deployments.names import looks_like_ip
from deployments.replies import ErrorReply
from router.errors import OpenAIError
from router.protocol import ChatCompletionBody, EmbeddingBody, RequestBody, ResponsesBody

NOT_ALLOWED = "media_url_not_allowed"
TOO_MANY = "too_many_media_urls"
# The keys of a content part that hold a URL vLLM fetches (a string, or an object with `url`).
URL_KEYS = ("image_url", "audio_url", "video_url")


def media_urls(body: RequestBody) -> Iterator[tuple[str, str]]:
    """Every media URL in the request that an engine would fetch, as (param, url); ``data:`` URLs are left out."""
    for where, part in _parts(body):
        for key in URL_KEYS:
            value = part.get(key)
            param = f"{where}.{key}"
            if isinstance(value, dict):
                value, param = value.get("url"), f"{param}.url"
            if isinstance(value, str) and value[:5].lower() != "data:":  # vLLM's own test for a data URL
                yield param, value


def _parts(body: RequestBody) -> Iterator[tuple[str, dict[str, Any]]]:
    """The request's content parts, each with where the client wrote it."""
    if isinstance(body, ChatCompletionBody):
        for i, message in enumerate(body.messages):
            yield from _listed(f"messages[{i}].content", message.content)
    elif isinstance(body, EmbeddingBody):
        messages = (body.model_extra or {}).get("messages")
        for i, message in enumerate(messages if isinstance(messages, list) else ()):
            if isinstance(message, list):  # a batch of conversations
                for j, inner in enumerate(message):
                    if isinstance(inner, dict):
                        yield from _listed(f"messages[{i}][{j}].content", inner.get("content"))
            elif isinstance(message, dict):
                yield from _listed(f"messages[{i}].content", message.get("content"))
    elif isinstance(body, ResponsesBody) and isinstance(body.input, list):
        for k, item in enumerate(body.input):
            for field in ("content", "output"):
                value = item.get(field)
                if isinstance(value, dict):  # a computer call's screenshot
                    yield f"input[{k}].{field}", value
                else:
                    yield from _listed(f"input[{k}].{field}", value)


def _listed(where: str, parts: Any) -> Iterator[tuple[str, dict[str, Any]]]:
    if isinstance(parts, list):
        for j, part in enumerate(parts):
            if isinstance(part, dict):
                yield f"{where}[{j}]", part


def _refusal(url: str, model: RoutedModel) -> tuple[str | None, str]:
    """(why the URL may not be fetched for this model, else None; its host as vLLM sees it)."""
    try:
        parsed = parse_url(url)
    except LocationParseError:
        return "is not a valid URL", ""
    if parsed.scheme not in ("http", "https"):
        scheme = f"`{parsed.scheme}:`" if parsed.scheme else "no scheme"
        return f"has {scheme}: only http(s) and data: URLs are accepted", ""
    host = parsed.hostname or ""
    if not host:
        return "names no host", ""
    if looks_like_ip(host):
        return f"names the IP address `{host}`: media is fetched only from the model's allowed domains", host
    if host not in model.allowed_media_domains:
        if not model.allowed_media_domains:
            return "cannot be fetched: the model is not multimodal and fetches no media URLs", host
        return f"names the host `{host}`, which is not one of the domains the model fetches media from", host
    return None, host


def media_urls_allowed(body: RequestBody, model: RoutedModel) -> bool:
    """Whether every media URL of a request that :func:`check_media_urls` accepted for another model (whose hosts
    it resolved) names a host this model fetches from: a fallback's test."""
    return all(_refusal(url, model)[0] is None for _, url in media_urls(body))


async def check_media_urls(body: RequestBody, model: RoutedModel) -> None:
    """Raise the 400 for the request's first media URL that may not be fetched for ``model`` (see the module
    docstring); return when every one may."""
    hosts: dict[str, str] = {}  # host → the param of its first URL
    for count, (param, url) in enumerate(media_urls(body), start=1):
        if count > MAX_MEDIA_URLS:
            raise OpenAIError(ErrorReply.invalid_request(
                f"The request names more than {MAX_MEDIA_URLS} media URLs; send fewer, or send media inline as "
                "data: URLs.", param=param, code=TOO_MANY))
        why, host = _refusal(url, model)
        if why is not None:
            raise _not_allowed(param, why)
        hosts.setdefault(host, param)
    if not hosts:
        return
    try:
        async with asyncio.timeout(MEDIA_RESOLVE_TIMEOUT_S):
            resolved = await asyncio.gather(*(resolve_host(host) for host in hosts), return_exceptions=True)
    except TimeoutError:
        names = ", ".join(f"`{host}`" for host in hosts)
        raise _not_allowed(next(iter(hosts.values())), f"names a host that did not resolve within "
                           f"{MEDIA_RESOLVE_TIMEOUT_S:g}s ({names})") from None
    for (host, param), addresses in zip(hosts.items(), resolved, strict=True):
        if isinstance(addresses, BaseException) or not addresses:
            raise _not_allowed(param, f"names the host `{host}`, which does not resolve")
        if not all(public_address(address) for address in addresses):
            raise _not_allowed(param, f"names the host `{host}`, which resolves to a non-public address (private, "
                               "loopback, link-local or reserved)")


def _not_allowed(param: str, why: str) -> OpenAIError:
    return OpenAIError(ErrorReply.invalid_request(f"The media URL at `{param}` {why}.", param=param,
                                                  code=NOT_ALLOWED))


async def resolve_host(host: str) -> list[str]:
    """The addresses ``host`` resolves to, as an engine's fetch would look it up (the tests replace this)."""
    infos = await asyncio.get_running_loop().getaddrinfo(host, None, type=socket.SOCK_STREAM)
    return [info[4][0] for info in infos]


def public_address(address: str) -> bool:
    """Whether an address is one the internet routes to: not private, loopback, link-local, multicast, reserved or
    unspecified, and, for an IPv6 address that carries an IPv4 one (mapped, 6to4, NAT64), neither is that."""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])  # an IPv6 scope (`fe80::1%eth0`) is not the address
    except ValueError:
        return False
    if ip.version == 6:
        embedded = ip.ipv4_mapped if ip.ipv4_mapped is not None else ip.sixtofour
        if embedded is None and ip in _NAT64:
            embedded = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
        if embedded is not None:
            return public_address(str(embedded))
    # is_global is false for every private, loopback, link-local, reserved and unspecified range (and for shared
    # address space, 100.64.0.0/10), but true for some multicast ones.
    return ip.is_global and not ip.is_multicast


# NAT64's well-known prefix (RFC 6052): the last 32 bits are the IPv4 address a DNS64 resolver translated.
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
