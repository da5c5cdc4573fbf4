"""Episodes and the FSPO prompt format: the one data contract between the study site and the models.

An episode is one user's few-shot preference pairs plus one held-out question of the same user (with
its chosen and rejected responses when known). The same ``build_prompt`` renders synthetic users'
episodes for training and evaluation and real participants' picks in a study, so a model always sees
exactly the format it was trained on.

The format is the paper's plain Markdown (no chat template); ``PROMPT_FORMAT_VERSION`` is saved with
every checkpoint and checked when one is loaded:

    # Example 1
    ## Question
    <question>
    ## Preferred Response
    <chosen>
    ## Dispreferred Response
    <rejected>

    # Example 2
    ...

    # Task
    <instruction>
    ## Question
    <question>
    ## User Description          (only with user-description chain-of-thought)
    <description>
    ## Preferred Response
    <response>                   (the model's continuation; the target)

How this differs from the paper's format (FSPO, arXiv 2502.19312, as issue 21 reads it; the FSPO
reference code's prompt builder was not among the stored sources, so these are the issue's four points).
The format is kept as it is: changing any of them changes ``PROMPT_FORMAT_VERSION`` and every trained
checkpoint.

1. Headers. The paper writes a space before each header's newline (``"## Question \n"``); here a header
   ends at its last word (``"## Question\n"``). Same for every ``#``/``##`` line. A tokenizer may merge
   the space differently, but the header is in the prompt, not scored, so it changes no loss.
2. The task line. The paper's task section has its own instruction sentence; here it is ``TASK_LEAD``
   followed by the domain's ``task`` (only the task when there are no shots). Prompt text only: no loss
   term scores it.
3. Where ``## Preferred Response`` sits. The paper ends the prompt with the target question and starts
   *both* completions (chosen and rejected) with ``## Preferred Response``; here the prompt ends with
   it (``RESPONSE_HEADER``) and the completions are the bare responses. With summed log-probs
   (FSPO/IPO as the reference code sums them) the header's log-prob is the same in chosen and rejected
   and cancels in the margin, but not (a) with averaged log-probs (``average=True`` in
   ``modeling.losses``, TRL's IPO): there the header's tokens are in both means with different
   denominators (the two responses' lengths), which shrinks the margin and weights it by length; nor
   (b) in Pref-FT (the SFT stage), where the paper's model is also trained to write the header, and a
   model trained here never is (at generation the prompt supplies it). This is the difference that can
   change training; to measure it, train the same recipe twice, once with the header moved into the
   completions' scored tokens, and compare the shot sweep and win rates over the same seeds (one
   training per seed is not enough: two trainings of one recipe differ by as much as the arms, issue 21).
4. Ends. The paper's prompt ends with a trailing newline after the question and is tokenized without a
   BOS; here the document BOS of ``modeling.llm.document_bos_id`` is prepended (or the chat template's)
   and each completion ends with EOS (``modeling.train.examples``). A BOS changes what the first tokens
   are conditioned on, not which tokens are scored.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

PROMPT_FORMAT_VERSION = "fspo-markdown-1"
EPISODE_FORMAT = "fspo-episode"
EPISODE_VERSION = 1
TASK_LEAD = "The examples above show this user's preferences between pairs of responses."
RESPONSE_HEADER = "## Preferred Response\n"
DESCRIPTION_HEADER = "## User Description\n"


class EpisodeError(ValueError):
    """An episode (e.g. a participant's picks exported from the study) does not fit the schema."""


class CheckpointError(ValueError):
    """A checkpoint is missing, incomplete or of another prompt format (one-line message)."""


@dataclass(frozen=True)
class Pair:
    question: str
    chosen: str
    rejected: str


@dataclass(frozen=True)
class Episode:
    """N preference pairs of one user (``shots``) and a target question of the same user.

    ``chosen``/``rejected`` of the target are known for synthetic users (training, evaluation) and
    unknown (None) when personalizing for a participant. ``description`` is the user's persona text
    (used as the chain-of-thought target, and by the oracle-persona baseline)."""

    instruction: str
    shots: tuple[Pair, ...]
    question: str
    chosen: str | None = None
    rejected: str | None = None
    description: str | None = None
    user_id: int | str | None = None
    domain: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["shots"] = [asdict(p) for p in self.shots]
        return {"format": EPISODE_FORMAT, "version": EPISODE_VERSION, **d}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Episode:
        """Parse the episode schema (what the study exports); raises EpisodeError with the field at fault."""
        if not isinstance(data, dict):
            raise EpisodeError("an episode must be a JSON object")
        if data.get("format") != EPISODE_FORMAT:
            raise EpisodeError(f"format must be {EPISODE_FORMAT!r}, got {data.get('format')!r}")
        if data.get("version") != EPISODE_VERSION:
            raise EpisodeError(
                f"episode version {data.get('version')!r} is not supported (this code reads {EPISODE_VERSION})"
            )

        def text(obj: dict[str, Any], key: str, where: str, optional: bool = False) -> str | None:
            v = obj.get(key)
            if v is None and optional:
                return None
            if not isinstance(v, str) or not v.strip():
                raise EpisodeError(f"{where}{key} must be a non-empty string")
            return v

        shots = data.get("shots")
        if not isinstance(shots, list):
            raise EpisodeError("shots must be a list of {question, chosen, rejected}")
        pairs = []
        for i, s in enumerate(shots):
            if not isinstance(s, dict):
                raise EpisodeError(f"shots[{i}] must be an object")
            pairs.append(Pair(*(text(s, k, f"shots[{i}].") for k in ("question", "chosen", "rejected"))))  # type: ignore[arg-type]
        return cls(
            instruction=text(data, "instruction", "") or "",
            shots=tuple(pairs),
            question=text(data, "question", "") or "",
            chosen=text(data, "chosen", "", optional=True),
            rejected=text(data, "rejected", "", optional=True),
            description=text(data, "description", "", optional=True),
            user_id=data.get("user_id"),
            domain=data.get("domain"),
            meta=dict(data.get("meta") or {}),
        )


def build_prompt(
    shots: Sequence[Pair], question: str, *, instruction: str, description: str | None = None
) -> str:
    """The few-shot prompt, ending where the response begins (after ``## Preferred Response``).

    With ``description`` (the user-description chain-of-thought given, e.g. teacher-forced in training
    or the oracle persona), the ``## User Description`` section comes before the response header. For a
    CoT model that writes the description itself, use ``build_cot_prompt``."""
    body = _body(shots, question, instruction)
    if description is None:
        return body + RESPONSE_HEADER
    return f"{body}{DESCRIPTION_HEADER}{description.strip()}\n{RESPONSE_HEADER}"


def build_cot_prompt(shots: Sequence[Pair], question: str, *, instruction: str) -> str:
    """The prompt for a CoT model: it ends with the ``## User Description`` header, so the model first
    writes the description, then ``## Preferred Response`` and the response."""
    return _body(shots, question, instruction) + DESCRIPTION_HEADER


def cot_target(description: str, response: str) -> str:
    """What a CoT model is trained to write after ``build_cot_prompt``."""
    return f"{description.strip()}\n{RESPONSE_HEADER}{response.strip()}"


def split_cot_output(text: str) -> tuple[str, str]:
    """A CoT model's output → (predicted user description, response)."""
    head, sep, tail = text.partition(RESPONSE_HEADER.strip())
    if not sep:
        return text.strip(), ""
    return head.strip(), tail.strip()


_SHOT_PREFERRED = re.compile(
    r"# Example \d+\n## Question\n.*?\n## Preferred Response\n(.*?)\n## Dispreferred Response\n", re.DOTALL
)


def shot_response_spans(prompt: str) -> list[tuple[int, int]]:
    """Character spans of the shots' preferred responses in a prompt made by ``build_prompt``.

    Pref-FT with ``shot_targets`` supervises them too: shot i's preferred response given shots 1..i-1 is
    the same task as the final target with i-1 shots."""
    return [m.span(1) for m in _SHOT_PREFERRED.finditer(prompt)]


def _body(shots: Sequence[Pair], question: str, instruction: str) -> str:
    parts = []
    for i, p in enumerate(shots, 1):
        parts.append(
            f"# Example {i}\n## Question\n{p.question.strip()}\n## Preferred Response\n{p.chosen.strip()}\n"
            f"## Dispreferred Response\n{p.rejected.strip()}\n\n"
        )
    lead = f"{TASK_LEAD} {instruction.strip()}" if shots else instruction.strip()
    parts.append(f"# Task\n{lead}\n## Question\n{question.strip()}\n")
    return "".join(parts)


# ---------------------------------------------------------------------------------------------------
# Episodes from a synthetic dataset


def _domain_instruction(ds: Any, instruction: str | None) -> str:
    """The given instruction, else the dataset's domain's task (or a generic one when a custom domain
    file has moved: the dataset still works)."""
    from .synth import load_domain

    try:
        return instruction or load_domain(ds.manifest.get("domain_source", ds.domain)).spec.task
    except Exception:  # noqa: BLE001 - a custom domain file may have moved; the dataset still works
        return instruction or f"Answer in the way this user prefers ({ds.domain})."


class EpisodeSource:
    """Samples episodes of one split of a synthetic dataset, on the fly.

    Training (``split="train"``): users of the train split; shots and target are that user's pairs on
    train-split questions. Evaluation (``split="test"``): held-out users; shots come from their pairs on
    train-split questions and the target from a held-out (test-split) question, so neither the user nor
    the target question was seen in training. ``all_questions`` lifts the question split for data whose
    labels are not used (pretraining the base model on the domain's language)."""

    def __init__(
        self,
        dataset: Any,
        *,
        split: str = "train",
        instruction: str | None = None,
        all_questions: bool = False,
    ) -> None:
        from .synth import DatasetError, load_dataset

        ds = load_dataset(dataset) if not hasattr(dataset, "manifest") else dataset
        if split not in ("train", "test"):
            raise ValueError(f"split must be 'train' or 'test', not {split!r}")
        self.domain = ds.domain
        self.instruction = _domain_instruction(ds, instruction)
        prefs = ds.table(
            "preferences",
            ["user_id", "question_id", "chosen_id", "rejected_id", "user_split", "question_split"],
        )
        p = prefs.to_pandas()
        p = p[p.user_split == split]
        if p.empty:
            raise DatasetError(f"{ds.path}: no preference pairs of {split} users")
        self._read_texts(ds)
        users = ds.table("users", ["user_id", "description"]).to_pandas().set_index("user_id")
        self.descriptions = users["description"].to_dict()
        self.by_user: dict[int, dict[str, np.ndarray]] = {}
        for uid, g in p.groupby("user_id", sort=True):
            rows = g[["question_id", "chosen_id", "rejected_id"]].to_numpy()
            # all_questions: for unlabeled use (the base model's pretraining), held-out topics are fair text.
            is_train_q = (g.question_split == "train").to_numpy() | all_questions
            self.by_user[int(uid)] = {
                "shots": rows[is_train_q],
                "targets": rows[is_train_q] if split == "train" else rows[~is_train_q],
            }
        self.split = split
        self.user_ids = np.asarray(
            sorted(u for u, d in self.by_user.items() if len(d["targets"]) > 0 and len(d["shots"]) > 0)
        )
        if not len(self.user_ids):
            raise DatasetError(f"{ds.path}: no {split} user has both shot pairs and a target pair")

    def _read_texts(self, ds: Any) -> None:
        """The questions and every response written for each (the unlabeled answers the base model
        learns from), with the style each was written in where the dataset records it."""
        self.questions = ds.table("questions", ["text", "topic"]).to_pandas()
        resp = ds.table("responses").to_pandas()
        self.responses = resp.text.tolist()
        self.answers: dict[int, list[str]] = {
            int(q): g.tolist() for q, g in resp.groupby("question_id", sort=True).text
        }
        # The style each answer was written in (its trait values), where the dataset records them (the
        # procedural engine does): the base model's consistent-author documents draw on it.
        traits = [c for c in resp.columns if c.startswith("trait_")]
        self.styled_answers: dict[int, list[tuple[str, tuple[str, ...]]]] | None = None
        if traits and not resp[traits].isna().any().any():
            self.styled_answers = {
                int(q): list(
                    zip(g.text, map(tuple, g[traits].itertuples(index=False, name=None)), strict=True)
                )
                for q, g in resp.groupby("question_id", sort=True)
            }
        self.question_ids = {text: i for i, text in enumerate(self.questions.text)}

    def _pair(self, row: np.ndarray) -> Pair:
        q, c, r = (int(x) for x in row)
        return Pair(self.questions.text[q], self.responses[c], self.responses[r])

    def episode(self, user_id: int, n_shots: int, rng: np.random.Generator) -> Episode:
        d = self.by_user[user_id]
        t = int(rng.integers(len(d["targets"])))
        target = d["targets"][t]
        pool = d["shots"]
        if self.split == "train":  # never show the target pair (or its question) as a shot
            pool = pool[pool[:, 0] != target[0]]
        take = rng.permutation(len(pool))[: min(n_shots, len(pool))]
        return self._target_episode(user_id, tuple(self._pair(pool[i]) for i in take), target)

    def _target_episode(self, user_id: int, shots: tuple[Pair, ...], target: np.ndarray) -> Episode:
        q, c, r = (int(x) for x in target)
        return Episode(
            instruction=self.instruction,
            shots=shots,
            question=self.questions.text[q],
            chosen=self.responses[c],
            rejected=self.responses[r],
            description=self.descriptions.get(user_id),
            user_id=int(user_id),
            domain=self.domain,
            meta={"question_id": q, "topic": self.questions.topic[q], "chosen_id": c, "rejected_id": r},
        )

    def episode_group(
        self, user_id: int, n_shots: int, n_targets: int, rng: np.random.Generator
    ) -> list[Episode]:
        """Up to ``n_targets`` episodes of one user that share the same shots: each a different target
        question of the user, none of them among the shots (training's several-targets episodes).

        The shots come first: a user with fewer than ``n_shots + n_targets`` usable pairs gets fewer
        targets (at least one), so the shot count the caller asked for is what the prompts show."""
        if n_targets < 1:
            raise ValueError(f"n_targets must be >= 1, got {n_targets}")
        d = self.by_user[user_id]
        picked: list[np.ndarray] = []
        pool = d["shots"]
        # Distinct questions, as many as leave n_shots pairs (or one target at least). The shots never
        # include a target's question (in the test split they are other questions anyway).
        for t in rng.permutation(len(d["targets"])):
            row = d["targets"][t]
            if any(row[0] == p[0] for p in picked):
                continue
            rest = pool[pool[:, 0] != row[0]]
            if picked and len(rest) < n_shots:
                break
            picked.append(row)
            pool = rest
            if len(picked) == n_targets:
                break
        take = rng.permutation(len(pool))[: min(n_shots, len(pool))]
        shots = tuple(self._pair(pool[i]) for i in take)
        return [self._target_episode(user_id, shots, row) for row in picked]

    def sample_groups(
        self, n: int, *, shots: tuple[int, int] | int, targets: int, seed: int
    ) -> list[list[Episode]]:
        """n groups of episodes (``episode_group``): one user each, up to ``targets`` targets sharing
        the group's shots; the shot count is drawn uniformly from the range ``shots`` per group."""
        return [self.episode_group(u, k, targets, rng) for u, k, rng in self._draws(n, shots, seed)]

    def _draws(
        self, n: int, shots: tuple[int, int] | int, seed: int
    ) -> Iterator[tuple[int, int, np.random.Generator]]:
        """n (user, shot count, rng) draws; the caller draws the user's pairs from the rng before the
        next one is made (the order ``sample`` has always used)."""
        lo, hi = (shots, shots) if isinstance(shots, int) else shots
        rng = np.random.default_rng(seed)
        users = rng.choice(self.user_ids, size=n, replace=n > len(self.user_ids))
        for u in users:
            yield int(u), int(rng.integers(lo, hi + 1)), rng

    def sample(self, n: int, *, shots: tuple[int, int] | int, seed: int) -> list[Episode]:
        """n episodes; the shot count is drawn uniformly from the range ``shots`` (inclusive)."""
        return [self.episode(u, k, rng) for u, k, rng in self._draws(n, shots, seed)]

    def iter_epoch(self, *, shots: tuple[int, int] | int, seed: int) -> Iterator[Episode]:
        """One episode per user, in a seeded order."""
        lo, hi = (shots, shots) if isinstance(shots, int) else shots
        rng = np.random.default_rng(seed)
        for u in rng.permutation(self.user_ids):
            yield self.episode(int(u), int(rng.integers(lo, hi + 1)), rng)


def dumps_episodes(episodes: Sequence[Episode]) -> str:
    """JSON lines of episodes (the export format of the study's picks)."""
    return "".join(json.dumps(e.to_json()) + "\n" for e in episodes)
