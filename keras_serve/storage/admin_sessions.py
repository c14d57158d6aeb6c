"""Reviewers' browser sessions, kept in the records database so every process can end them.

The session cookie carries a random session id (256 bits); the database keeps only its
SHA-256, so a copy of the database holds no live credential. A session counts while its row
exists, has not expired and was made under the admin token in force now (`token_key`, a
keyed digest of the token, never the token). Logging out deletes the row; a server started
with another admin token deletes every row made under an earlier one; expired rows are
deleted as new sessions start. Every worker and replica reads the same table, so a cookie
replayed after any of these is refused everywhere.
"""
from __future__ import annotations

import hashlib
import secrets
from datetime import timedelta
from typing import Callable

import sqlalchemy as sa

from keras_serve.storage.records import RecordStore, _utc_now, admin_sessions

SESSION_ID_BYTES = 32


def _row_id(session_id: str) -> str:
    return hashlib.sha256(session_id.encode("utf-8", "surrogatepass")).hexdigest()


class AdminSessions:
    def __init__(self, records: RecordStore, token_key: str, lifetime: timedelta,
                 clock: Callable = _utc_now) -> None:
        self.records = records
        self.token_key = token_key
        self.lifetime = lifetime
        self.clock = clock

    def start(self, reviewer: str) -> str:
        """A new session for `reviewer`; returns its id, for the cookie only."""
        session_id = secrets.token_urlsafe(SESSION_ID_BYTES)
        now = self.clock()
        with self.records._errors("record the login in"), self.records._begin() as conn:
            conn.execute(admin_sessions.delete().where(admin_sessions.c.expires <= now))
            conn.execute(admin_sessions.insert().values(id=_row_id(session_id), reviewer=reviewer,
                                                        token_key=self.token_key, created=now,
                                                        expires=now + self.lifetime))
        return session_id

    def reviewer(self, session_id: object) -> str | None:
        """Whose session this is, or None when it is unknown, ended, expired or from another token."""
        if not isinstance(session_id, str) or not session_id:
            return None
        statement = sa.select(admin_sessions.c.reviewer).where(
            admin_sessions.c.id == _row_id(session_id), admin_sessions.c.token_key == self.token_key,
            admin_sessions.c.expires > self.clock())
        with self.records._errors("read", read=True), self.records._connect() as conn:
            return conn.execute(statement).scalar()

    def end(self, session_id: object) -> None:
        if isinstance(session_id, str) and session_id:
            with self.records._errors("record the logout in"), self.records._begin() as conn:
                conn.execute(admin_sessions.delete().where(admin_sessions.c.id == _row_id(session_id)))

    def end_other_tokens(self) -> int:
        """Delete every session made under another admin token (at start); returns how many."""
        with self.records._errors("end old sessions in"), self.records._begin() as conn:
            return conn.execute(admin_sessions.delete().where(admin_sessions.c.token_key != self.token_key)).rowcount
