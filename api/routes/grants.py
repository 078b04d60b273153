"""`/v1/me/grants`: tokens the person gives other applications, scoped, expiring and revocable."""

from __future__ import annotations

from datetime import timedelta

from fastapi import APIRouter, Request

from stylestream.api.auth import ACCOUNT, new_grant
from stylestream.api.errors import ApiError
from stylestream.api.models import GrantRequest
from stylestream.api.services import ERRORS, Caller, services_of

router = APIRouter(tags=["grants"])


@router.get("/v1/me/grants", responses=ERRORS)
def my_grants(request: Request, principal: Caller) -> dict:
    principal.require(ACCOUNT)
    return {"grants": [g.public() for g in services_of(request).store.grants_of(principal.user_id)]}


@router.post("/v1/me/grants", status_code=201, responses=ERRORS)
def create_grant(body: GrantRequest, request: Request, principal: Caller) -> dict:
    """A token for another application with these scopes until it expires or is revoked; shown once."""
    principal.require(ACCOUNT)
    grant, token = new_grant(principal.user_id, body.name, list(body.scopes), timedelta(seconds=body.expires_in_s))
    services_of(request).store.add_grant(grant)
    return {**grant.public(), "token": token}


@router.delete("/v1/me/grants/{grant_id}", responses=ERRORS)
def revoke_grant(grant_id: str, request: Request, principal: Caller) -> dict:
    principal.require(ACCOUNT)
    if not services_of(request).store.revoke_grant(principal.user_id, grant_id):
        raise ApiError(404, "not_found", f"no grant {grant_id} of yours")
    return {"id": grant_id, "revoked": True}

