"""`GET /v1/admission`: would this device's next session be admitted now, and if not, why.

A browser cannot read the HTTP status or body of a refused WebSocket upgrade
(the socket just closes with 1006), so the talk page asks here after a
refusal to tell its user the reason. It checks credentials as `/v1/stream`
does (`Authorization: Bearer` or `?token=`) and answers from admission's
cached view; it opens nothing and is not counted as a refusal.

    200 {"admitted": true}
    401/429/503 {"admitted": false, "reason": ..., "message": ...} (+ Retry-After)
"""

from __future__ import annotations

from aiohttp import web

from schemas.device import REASON_HEADER
from services.edge.admission import Admission
from services.edge.auth import Authenticator, AuthError


def routes(
    auth_key: web.AppKey[Authenticator], admission_key: web.AppKey[Admission]
) -> list[web.RouteDef]:
    async def admission(request: web.Request) -> web.Response:
        try:
            principal = request.app[auth_key].authenticate(request.headers, request.query)
        except AuthError as exc:
            return _refused(exc.status, exc.reason, exc.message, None)
        gate = request.app.get(admission_key)
        if gate is None:
            return _refused(503, "nats_unavailable", "the edge is still starting", 2.0)
        refusal = gate.check(principal.tenant)
        if refusal is not None:
            return _refused(refusal.status, refusal.reason, refusal.message, refusal.retry_after)
        return web.json_response({"admitted": True})

    return [web.get("/v1/admission", admission)]


def _refused(status: int, reason: str, message: str, retry_after: float | None) -> web.Response:
    headers = {REASON_HEADER: reason}
    body: dict[str, object] = {"admitted": False, "reason": reason, "message": message}
    if retry_after is not None:
        headers["Retry-After"] = str(max(1, round(retry_after)))
        body["retry_after"] = max(1, round(retry_after))
    return web.json_response(body, status=status, headers=headers)
