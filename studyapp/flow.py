"""The participant's journey as data: the ordered steps, and one pure function that says which step a
participant should be on.

Every participant view asks `participant_next_step` and redirects there when it was asked for another
step, so a refresh, the back button, a second tab or coming back the next day all land on the right page,
and a replayed POST for a step already passed records nothing.
"""

from dataclasses import dataclass

from django.urls import reverse

from studyapp.models import Participant

State = Participant.State


@dataclass(frozen=True)
class Step:
    """A page of the journey. `item` is the 0-based position of the pair or rating item to show."""

    name: str
    item: int | None = None


@dataclass(frozen=True)
class StepSpec:
    name: str
    title: str  # shown in the progress indicator
    url_name: str


# The order participants go through; `done` (a code, or a goodbye) ends every path.
STEPS: tuple[StepSpec, ...] = (
    StepSpec("consent", "Consent", "participant-consent"),
    StepSpec("instructions", "Instructions", "participant-instructions"),
    StepSpec("elicitation", "Your choices", "participant-pick"),
    StepSpec("waiting", "Preparing", "participant-waiting"),
    StepSpec("rating", "Ratings", "participant-rate"),
    StepSpec("survey", "Survey", "participant-survey"),
    StepSpec("done", "Done", "participant-done"),
)
SPECS = {spec.name: spec for spec in STEPS}
# The steps counted in "step k of n": everything before the last page.
PROGRESS_STEPS = STEPS[:-1]

STEP_OF_STATE: dict[str, str] = {
    State.CONSENT: "consent",
    State.INSTRUCTIONS: "instructions",
    State.ELICITATION: "elicitation",
    State.WAITING: "waiting",
    State.RATING: "rating",
    State.SURVEY: "survey",
    State.COMPLETED: "done",
    State.WITHDRAWN: "done",
    State.DECLINED: "done",
    State.SCREENED_OUT: "done",
    # Ended from outside the journey (a coordinator, or the time limit): the last page says why, and no
    # earlier step can be reached again, so nothing more is recorded.
    State.RETURNED: "done",
    State.TIMED_OUT: "done",
}


def participant_next_step(participant: Participant) -> Step:
    """The page this participant should see now. Reads only the participant's own fields."""
    name = STEP_OF_STATE[participant.state]
    if name == "elicitation":
        return Step(name, participant.picks_done)
    if name == "rating":
        return Step(name, participant.ratings_done)
    return Step(name)


def step_url(study_slug: str, step: Step) -> str:
    """The URL of a step; item pages are numbered from 1 in the address bar."""
    spec = SPECS[step.name]
    if step.item is None:
        return reverse(spec.url_name, kwargs={"slug": study_slug})
    return reverse(spec.url_name, kwargs={"slug": study_slug, "number": step.item + 1})


@dataclass(frozen=True)
class Progress:
    """What the progress indicator shows: step k of n, and item i of m within the step."""

    steps: tuple[StepSpec, ...]
    current: int  # 1-based index into steps
    item: int | None = None  # 1-based
    items: int | None = None

    @property
    def total(self) -> int:
        return len(self.steps)

    @property
    def title(self) -> str:
        """The current step's name, as the indicator shows it."""
        return self.steps[self.current - 1].title


def participant_progress(participant: Participant, step: Step) -> Progress | None:
    """The progress indicator of a step (none on the last page)."""
    names = [spec.name for spec in PROGRESS_STEPS]
    if step.name not in names:
        return None
    current = names.index(step.name) + 1
    if step.name == "elicitation":
        return Progress(PROGRESS_STEPS, current, (step.item or 0) + 1, participant.n_picks)
    if step.name == "rating":
        return Progress(PROGRESS_STEPS, current, (step.item or 0) + 1, participant.n_ratings)
    return Progress(PROGRESS_STEPS, current)
