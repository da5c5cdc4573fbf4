"""Pairwise judges and win rates.

A judge compares two responses to a question for one user and returns a score for the first:
1 (first wins), 0.5 (tie), 0 (second wins).
- ``OracleJudge``: the procedural world's exact oracle, reading the user's true preferences.
- ``LLMJudge``: an AlpacaEval-style pairwise prompt that shows the user's description, asked in both
  orders. Where the back end gives the answers' probabilities (``ask_choices``), P(first is better) is
  read from the probabilities of "a" and "b" and averaged over the two orders, so a judge's position
  bias cancels; the first wins when that average is more than ``margin`` above 1/2, loses when it is
  more than ``margin`` below, and ties otherwise. Elsewhere each order's sampled letter counts as
  probability 1, so a judge that always picks the first position scores a tie. Identical responses tie
  without a request, and a judge that answers none of its prompts with "a" or "b" is an error rather
  than a run of ties.

Their per-comparison scores become a win rate in ``modeling.winrate`` (``over="comparisons"``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from .llm import ChatBackend, ChatRequest, ChoiceReply, LLMError, ask_choices


@dataclass(frozen=True)
class Comparison:
    question: str
    first: str
    second: str
    user_id: int | str
    topic: str = ""
    description: str | None = None


class Judge(Protocol):
    name: str

    def score(self, comparisons: Sequence[Comparison]) -> list[float]: ...


class OracleJudge:
    """Exact: the procedural oracle's score of each text for the user's stated preferences, under the
    user's preference structure (a topical user's liking depends on the comparison's question)."""

    name = "oracle"

    def __init__(self, dataset: Any) -> None:
        from .synth import load_dataset, load_domain
        from .synth.world import user_preferences

        ds = load_dataset(dataset) if not hasattr(dataset, "manifest") else dataset
        self.domain = load_domain(ds.manifest.get("domain_source", ds.domain))
        users = ds.table("users").to_pandas().set_index("user_id")
        try:  # validates once that the dataset matches the domain file
            self.prefs = user_preferences(self.domain, users)
        except ValueError as e:
            raise ValueError(f"{ds.path}: {e}") from None

    def text_score(self, user_id: int, topic: str, text: str, question: str = "") -> float:
        return self.prefs[int(user_id)].score(self.domain, question, topic, text)

    def score(self, comparisons: Sequence[Comparison]) -> list[float]:
        out = []
        for c in comparisons:
            a, b = (
                self.text_score(int(c.user_id), c.topic, c.first, c.question),
                self.text_score(int(c.user_id), c.topic, c.second, c.question),
            )
            out.append(1.0 if a > b + 1e-9 else 0.0 if b > a + 1e-9 else 0.5)
        return out


JUDGE_SYSTEM = "You are a careful evaluator of AI assistants, judging on behalf of one specific user."
JUDGE_PROMPT = """I want you to create a leaderboard of AI models by how well their answers suit one particular user.
Here is what that user says about themselves:
{description}

The user asked:
{question}

Output (a):
{first}

Output (b):
{second}

Which output would this user prefer? Judge only by fit to this user's stated preferences. Do not let the
length of the outputs or the order in which they are shown influence you. Answer with "a" or "b" only."""


class LLMJudge:
    """AlpacaEval-style pairwise judge that sees the user's description, asked in both orders.

    ``margin``: how far from 1/2 the averaged P(first is better) must be for a win or a loss (a tie
    otherwise); ``temperature``: how the letter is picked where no probabilities come back."""

    def __init__(self, backend: ChatBackend, *, temperature: float = 0.0, margin: float = 0.1) -> None:
        if not 0 <= margin < 0.5:
            raise ValueError(f"margin must be from 0 to below 0.5, got {margin!r}")
        self.backend = backend
        self.temperature = temperature
        self.margin = margin
        self.name = f"llm:{backend.name}"

    def _request(self, c: Comparison, first: str, second: str) -> ChatRequest:
        msg = JUDGE_PROMPT.format(
            description=c.description or "(no description)", question=c.question, first=first, second=second
        )
        return ChatRequest(
            [{"role": "system", "content": JUDGE_SYSTEM}, {"role": "user", "content": msg}],
            max_tokens=2,
            temperature=self.temperature,
            choices=("a", "b"),
        )

    def score(self, comparisons: Sequence[Comparison]) -> list[float]:
        # Identical responses are a tie by definition: asking could only add the judge's sampling noise.
        asked = [i for i, c in enumerate(comparisons) if c.first != c.second]
        reqs = [
            r
            for c in (comparisons[i] for i in asked)
            for r in (self._request(c, c.first, c.second), self._request(c, c.second, c.first))
        ]
        replies = ask_choices(self.backend, reqs)
        # P(the letter names the response shown first); None: an unreadable reply, half a vote.
        shown_first = [_p_shown_first(r) for r in replies]
        # An unreadable verdict counts as half a vote, so a judge that never answers in the format (a
        # server that ignores guided_choice) would report every arm at exactly 50%: fail instead.
        if shown_first and all(p is None for p in shown_first):
            raise LLMError(
                f"LLM judge {self.backend.name} answered none of its {len(replies)} prompts with 'a' or 'b' "
                f"(first reply: {replies[0].text[:60]!r}); it must follow guided_choice or the prompt's format"
            )
        out = [0.5] * len(comparisons)
        for k, i in enumerate(asked):
            forward, swapped = shown_first[2 * k], shown_first[2 * k + 1]
            # Order 1 shows the comparison's first response first; order 2 shows it second.
            p = ((0.5 if forward is None else forward) + (0.5 if swapped is None else 1 - swapped)) / 2
            if replies[2 * k].probs is None or replies[2 * k + 1].probs is None:
                out[i] = p  # sampled letters: the two votes averaged (1, 0.5 for unreadable, 0)
            else:
                out[i] = 1.0 if p > 0.5 + self.margin else 0.0 if p < 0.5 - self.margin else 0.5
        return out


def _p_shown_first(reply: ChoiceReply) -> float | None:
    """P(the response shown first is better): the probability of "a" where the back end gave
    probabilities, else 1 or 0 by the reply's letter (None: it names neither)."""
    if reply.probs is not None:
        return reply.probs["a"]
    verdict = _verdict(reply.text)
    return None if verdict is None else float(verdict == "a")


def _verdict(reply: str) -> str | None:
    r = reply.strip().strip("().'\"").lower()[:3]
    return r[0] if r[:1] in ("a", "b") and (len(r) == 1 or not r[1].isalpha()) else None
