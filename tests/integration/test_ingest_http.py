"""The ingest's HTTP surface on 127.0.0.1: clear 4xx JSON errors with finding ids, never a 500."""

from __future__ import annotations

from pathlib import Path

import aiohttp
from swtpm import SwtpmFactory
from test_probe_support import ADMIN, NODE, make_node, serve

from tmb.ingest.identity import IdentityPolicy


async def test_http_errors_and_admin(tmp_path: Path, swtpm_factory: SwtpmFactory) -> None:
    env = make_node(tmp_path, swtpm_factory, model=False)
    # the insecure development mode: nodes registered by AK alone post unsigned (test_enrolment.py: the rest)
    ingest = env.ingest(identity=IdentityPolicy(insecure_static_nodes=True))
    auth = {"Authorization": f"Bearer {ADMIN}"}
    async with serve(ingest) as url, aiohttp.ClientSession() as http:

        async def call(method: str, path: str, **kw: object) -> tuple[int, dict[str, object]]:
            async with http.request(method, url + path, **kw) as resp:  # type: ignore[arg-type]
                return resp.status, await resp.json()

        def fid(doc: dict[str, object]) -> list[str]:
            return [f["id"] for f in doc["findings"]]  # type: ignore[index, union-attr]

        status, doc = await call("GET", "/v1/ingest/nobody/nonce")
        assert status == 401 and fid(doc) == ["auth.not_enrolled"]
        status, doc = await call("POST", "/v1/ingest/nobody/batches", json={"batches": []})
        assert status == 401 and fid(doc) == ["auth.not_enrolled"]
        status, doc = await call("POST", f"/v1/ingest/{NODE}/batches", data=b"[" * 100_000 + b"]" * 100_000)
        assert status == 400 and fid(doc) == ["ingest.too_deep"]
        status, doc = await call("POST", f"/v1/ingest/{NODE}/batches", data=b"[" * 40 + b"]" * 40)
        assert status == 400 and fid(doc) == ["ingest.too_deep"]
        status, doc = await call("POST", f"/v1/ingest/{NODE}/batches", data=b"{not json")
        assert status == 400 and fid(doc) == ["ingest.malformed"]
        for body in ({"batches": [{"node": NODE}]}, {"batches": "x"}, [1, 2]):
            status, doc = await call("POST", f"/v1/ingest/{NODE}/batches", json=body)
            assert status == 400 and fid(doc) == ["ingest.malformed"], doc
        for what, body in (("quotes", {"message": "!!"}), ("ima", {"offset": -1}), ("bindings", {})):
            status, doc = await call("POST", f"/v1/ingest/{NODE}/{what}", json=body)
            assert status == 400 and fid(doc) == ["ingest.malformed"], (what, doc)
        status, doc = await call("GET", f"/v1/ingest/{NODE}/nonce")
        assert status == 200 and len(bytes.fromhex(doc["nonce"])) == 32  # type: ignore[arg-type]
        # admin
        status, doc = await call("PUT", "/v1/ingest/admin/nodes/n2", json={"ak": env.ak.pem.decode()})
        assert status == 401 and fid(doc) == ["ingest.unauthorized"]
        status, doc = await call("PUT", "/v1/ingest/admin/nodes/n2", json={"ak": "nope"}, headers=auth)
        assert status == 400 and fid(doc) == ["ingest.malformed"]
        status, doc = await call(
            "PUT", "/v1/ingest/admin/nodes/n2", json={"ak": env.ak.pem.decode()}, headers=auth
        )
        assert status == 201 and doc["algorithm"] == "rsa"
        status, doc = await call("POST", "/v1/ingest/admin/nodes/n2/quote", headers=auth)
        assert status == 202
        status, doc = await call("GET", "/v1/ingest/n2/nonce")
        assert status == 200 and doc["quote"] is True
        status, doc = await call("GET", "/v1/ingest/admin/nodes/n2", headers=auth)
        assert status == 200 and doc["batches"] == 0
    env.close()
