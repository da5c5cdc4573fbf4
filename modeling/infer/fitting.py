"""Prompts made to fit a model's context: a prompt that does not fit with its ``max_new_tokens`` drops
its earliest shots until it does (``Generation.shots_cut``), as training does.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from ..llm import LLMError
from .generation import Generation, UserQuestions, _regroup


@dataclass
class FittedPrompts:
    """Users' prompts made to fit a context (``fit_to_context``), ready to encode once and generate.

    users: the users as they will be generated: one per (original user, number of shots kept), in
        order of first appearance, each with the questions that keep that many shots.
    ids: the token ids of every prompt of ``users``, flat, in that order.
    shots_cut: how many earliest shots each of those prompts lost (flat, same order).
    origin: for each of those prompts, its index among the original users' questions (flat).
    """

    users: list[UserQuestions]
    ids: list[list[int]]
    shots_cut: list[int]
    origin: list[int]

    def restore(self, flat: list[Generation], original: Sequence[UserQuestions]) -> list[list[Generation]]:
        """Generations in the order of ``users`` back to the original users' questions."""
        out: list[Generation | None] = [None] * len(flat)
        for i, g in zip(self.origin, flat, strict=True):
            out[i] = g
        return _regroup(original, [g for g in out if g is not None])


def fit_to_context(
    users: Sequence[UserQuestions],
    encode: Callable[[str], list[int]],
    limit: int | None,
    max_new_tokens: int,
    *,
    cot: bool = False,
) -> FittedPrompts:
    """Each prompt encoded by ``encode``; one that does not leave ``max_new_tokens`` in a context of
    ``limit`` tokens drops its user's earliest shots, one at a time, until it does (never the question:
    the latest shots are the most recent picks, as training drops them). Questions of one user that keep
    the same shots stay together, so they still share a prefix. LLMError if a question does not fit even
    with no shots left. ``limit`` None: no limit, nothing is cut."""
    groups: dict[tuple[int, int], list[tuple[int, str, list[int]]]] = {}
    flat = 0
    for u, user in enumerate(users):
        for question in user.questions:
            cut = 0
            while True:
                one = dataclasses.replace(user, shots=user.shots[cut:], questions=(question,))
                ids = encode(one.prompts(cot=cot)[0])
                if limit is None or len(ids) + max_new_tokens <= limit:
                    break
                if cut == len(user.shots):
                    raise LLMError(
                        f"a prompt of {len(ids)} tokens with every shot cut + {max_new_tokens} new tokens "
                        f"exceeds the model's context of {limit} tokens (question: {question[:60]!r})"
                    )
                cut += 1
            groups.setdefault((u, cut), []).append((flat, question, ids))
            flat += 1
    fitted = FittedPrompts([], [], [], [])
    for (u, cut), items in groups.items():
        user = users[u]
        questions = tuple(q for _, q, _ in items)
        fitted.users.append(dataclasses.replace(user, shots=user.shots[cut:], questions=questions))
        fitted.ids += [ids for _, _, ids in items]
        fitted.shots_cut += [cut] * len(items)
        fitted.origin += [i for i, _, _ in items]
    return fitted
