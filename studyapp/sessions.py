"""Which participants a browser session is: one token per study, kept in the Django session.

Participant pages and the participant's socket accept only the participants bound here, so nobody can
reach another participant's pages by guessing a URL or a token.
"""

from typing import Any

SESSION_KEY = "participants"


def session_bind(session: Any, *, study_slug: str, token: str) -> None:
    bound = dict(session.get(SESSION_KEY, {}))
    bound[study_slug] = token
    session[SESSION_KEY] = bound


def session_token(session: Any, *, study_slug: str) -> str | None:
    return session.get(SESSION_KEY, {}).get(study_slug)


def session_tokens(session: Any) -> set[str]:
    return set(session.get(SESSION_KEY, {}).values())
