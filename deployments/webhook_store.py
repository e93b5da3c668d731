"""Webhook endpoints (`client.webhooks.create(...)`), as the batch store keeps them: each its creating API key's,
with its signing secrets (the current one, and an old one a rotation keeps valid for a day). MemoryBatchStore
holds one EndpointBook and answers for it under its lock (`webhook` calls), so every ingress replica sees the
same endpoints, and with the store's file they outlive a restart."""

from __future__ import annotations

import base64
import secrets
import time
from dataclasses import asdict, dataclass, field
from typing import Optional

from .api_common import new_id, now

EVENT_TYPES = ("batch.completed", "batch.failed", "batch.expired", "batch.cancelled",
               "response.completed", "response.failed", "response.cancelled", "response.incomplete")
PER_KEY = 100  # endpoints one API key may have
KEEP_OLD_S = 24 * 3600


def new_secret() -> str:
    return "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()


@dataclass
class Endpoint:
    id: str
    name: str
    url: str
    event_types: list[str]
    principal: Optional[str]
    created_at: int = field(default_factory=now)
    updated_at: int = field(default_factory=now)
    secret: str = field(default_factory=new_secret)
    old_secret: Optional[str] = None  # still valid until old_until (a rotation that keeps it)
    old_until: float = 0.0

    def object(self, with_secret: bool = False) -> dict:
        out = {"id": self.id, "object": "webhook_endpoint", "created_at": self.created_at,
               "updated_at": self.updated_at, "name": self.name, "url": self.url,
               "event_types": list(self.event_types), "signing_secret_hint": f"whsec_...{self.secret[-4:]}"}
        return {**out, "signing_secret": self.secret} if with_secret else out

    def secrets(self) -> list[str]:
        """What deliveries are signed with: the current secret, and an old one while it is kept."""
        return [self.secret] + ([self.old_secret] if self.old_secret and time.time() < self.old_until else [])


class EndpointBook:
    """Not thread-safe on its own: MemoryBatchStore calls it under its lock. file: a BatchFile (or None)."""

    def __init__(self, file=None):
        self._file = file
        self.items: dict[str, Endpoint] = {}
        if file is not None:
            self.items = {e.id: e for e in (Endpoint(**r) for r in file.load_endpoints())}

    def _save(self, e: Endpoint) -> None:
        if self._file is not None:
            self._file.save_endpoint(e.id, asdict(e))

    def _mine(self, eid: str, who: Optional[str]) -> Optional[Endpoint]:
        e = self.items.get(eid)
        return e if e is not None and e.principal == who else None

    def create(self, who: Optional[str], name: str, url: str, event_types: list[str]) -> Optional[dict]:
        """The new endpoint with its secret; None when `who` has PER_KEY already."""
        if sum(e.principal == who for e in self.items.values()) >= PER_KEY:
            return None
        e = Endpoint(new_id("whep_"), name, url, list(event_types), who)
        self.items[e.id] = e
        self._save(e)
        return e.object(with_secret=True)

    def get(self, eid: str, who: Optional[str]) -> Optional[dict]:
        e = self._mine(eid, who)
        return e.object() if e is not None else None

    def list(self, who: Optional[str]) -> list[dict]:
        """Newest first."""
        return [e.object() for e in reversed(self.items.values()) if e.principal == who]

    def update(self, eid: str, who: Optional[str], fields: dict) -> Optional[dict]:
        e = self._mine(eid, who)
        if e is None:
            return None
        changed = {k: v for k, v in fields.items() if v is not None and getattr(e, k) != v}
        for k, v in changed.items():
            setattr(e, k, list(v) if k == "event_types" else v)
        if changed:
            e.updated_at = now()
            self._save(e)
        return e.object()

    def delete(self, eid: str, who: Optional[str]) -> bool:
        if self._mine(eid, who) is None:
            return False
        del self.items[eid]
        if self._file is not None:
            self._file.drop_endpoint(eid)
        return True

    def rotate(self, eid: str, who: Optional[str], keep_old: bool) -> Optional[dict]:
        e = self._mine(eid, who)
        if e is None:
            return None
        e.old_secret, e.old_until = (e.secret, time.time() + KEEP_OLD_S) if keep_old else (None, 0.0)
        e.secret, e.updated_at = new_secret(), now()
        self._save(e)
        return e.object(with_secret=True)

    def targets(self, who: Optional[str], event_type: str) -> list[tuple[str, str, list[str]]]:
        """(endpoint id, url, secrets) of `who`'s endpoints that take `event_type`."""
        return [(e.id, e.url, e.secrets()) for e in self.items.values()
                if e.principal == who and event_type in e.event_types]

    def target(self, eid: str, who: Optional[str]) -> Optional[tuple[str, str, list[str]]]:
        e = self._mine(eid, who)
        return (e.id, e.url, e.secrets()) if e is not None else None
