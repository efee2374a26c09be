"""The demo's webhook receiver: what an operator's alerting endpoint does with tmb's notifications.

It serves ``POST /tmb`` on 127.0.0.1, checks every notification with
:func:`tmb.daemon.notify.verify_notification` against the keys the daemon publishes at ``GET /v1/keys``
(fetched once the daemon is up: until then it answers 503 and the daemon retries), drops duplicates by id,
and keeps the events. A notification that does not verify gets 400 (the daemon does not retry it) and is
counted in ``refused``.
"""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
from aiohttp import web

from tmb.daemon.notify import NotificationError, keys_from_document, verify_notification


class NotifyReceiver:
    def __init__(self) -> None:
        self.url = ""
        self.keys: dict[str, bytes] = {}
        self.events: list[dict[str, Any]] = []  # verified, each once, in arrival order
        self.refused: list[str] = []  # the reasons of notifications that did not verify
        self._seen: set[str] = set()
        self._runner: web.AppRunner | None = None

    async def start(self) -> str:
        app = web.Application(client_max_size=1024 * 1024)
        app.router.add_post("/tmb", self._hook)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.url = f"http://127.0.0.1:{self._runner.addresses[0][1]}/tmb"
        return self.url

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def fetch_keys(self, keys_url: str) -> None:
        async with aiohttp.ClientSession() as s, s.get(keys_url) as r:
            r.raise_for_status()
            self.keys = keys_from_document(await r.json())

    async def _hook(self, request: web.Request) -> web.Response:
        if not self.keys:
            return web.Response(status=503, headers={"Retry-After": "1"})
        body = await request.read()
        try:
            doc = verify_notification(body, request.headers, self.keys, url=self.url)
        except NotificationError as exc:
            self.refused.append(exc.reason)
            return web.Response(status=400)
        if doc["id"] not in self._seen:
            self._seen.add(doc["id"])
            self.events.append(doc["event"])
        return web.Response(status=204)

    async def wait_for(self, kind: str, subjects: set[str], timeout_s: float) -> bool:
        """Whether an event of ``kind`` arrived for each of ``subjects`` within ``timeout_s``."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while not subjects <= {e["subject"] for e in self.events if e["kind"] == kind}:
            if loop.time() > deadline:
                return False
            await asyncio.sleep(0.05)
        return True
