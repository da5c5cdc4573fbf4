"""Items shown to participants and their judgments.

A study's pool: `Question` rows (for elicitation or evaluation) and, for elicitation questions, the
`CandidatePair` responses a participant chooses between. Per participant: the `ElicitationItem`s they were
assigned (order and sides recorded) and their `ElicitationPick` on each; the `GeneratedResponse` of every
arm to each of their evaluation questions; the blind A/B `RatingItem`s (order and sides recorded, repeats,
attention checks) and their `Rating` on each; one `SurveyResponse`.

A judgment is one-to-one with its item, so a replayed POST can never record a second one.
Pool rows (questions, pairs, arms) that a participant's data points at are RESTRICTed: deleting the
whole study removes both, deleting only a question someone was shown is refused.
"""

from django.core.validators import MaxValueValidator, MinValueValidator
from django.db import models
from django.db.models import Q

from studyapp.models import Arm, Participant, Study

# What an attention-check item shows. The text says which side to pick, so only someone reading fails it.
ATTENTION_CHECK_QUESTION = "Attention check: please read both responses before choosing."
ATTENTION_CHECK_PICK_ME = "This is an attention check. Please choose this response to show you are reading."
ATTENTION_CHECK_OTHER = (
    "This is an attention check. Please do not choose this response; choose the other one."
)


class Side(models.TextChoices):
    """Where a response was shown; a judgment records the side the participant chose."""

    LEFT = "left", "Response A"
    RIGHT = "right", "Response B"


class Question(models.Model):
    class Use(models.TextChoices):
        ELICITATION = "elicitation"
        EVALUATION = "evaluation"

    study = models.ForeignKey(Study, on_delete=models.CASCADE, related_name="questions")
    use = models.CharField(max_length=16, choices=Use.choices)
    text = models.TextField()
    topic = models.CharField(max_length=200, blank=True)
    source_id = models.CharField(
        max_length=200, blank=True, help_text="The question's id in the dataset or file it came from."
    )

    class Meta:
        ordering = ["study", "use", "id"]

    def __str__(self) -> str:
        return self.text[:80]


class CandidatePair(models.Model):
    """Two candidate responses to an elicitation question: the participant picks the one that suits them."""

    question = models.ForeignKey(Question, on_delete=models.CASCADE, related_name="candidate_pairs")
    response_a = models.TextField()
    response_b = models.TextField()

    def __str__(self) -> str:
        return f"pair {self.pk} on {self.question}"


class ShownSideBySide:
    """An item shown as two texts side by side; ``text_on(side)`` says which text is on which side."""

    def text_on(self, side: str) -> str:
        raise NotImplementedError

    @property
    def left_text(self) -> str:
        return self.text_on(Side.LEFT)

    @property
    def right_text(self) -> str:
        return self.text_on(Side.RIGHT)


class ElicitationItem(ShownSideBySide, models.Model):
    """A candidate pair as shown to one participant: its position in their sequence and its sides."""

    participant = models.ForeignKey(Participant, on_delete=models.CASCADE, related_name="elicitation_items")
    pair = models.ForeignKey(CandidatePair, on_delete=models.RESTRICT, related_name="+")
    position = models.PositiveSmallIntegerField()
    a_on_left = models.BooleanField()
    shown_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["participant", "position"], name="elicitation_position_unique"),
            models.UniqueConstraint(fields=["participant", "pair"], name="elicitation_pair_once"),
        ]
        ordering = ["participant", "position"]

    def text_on(self, side: str) -> str:
        a_side = Side.LEFT if self.a_on_left else Side.RIGHT
        return self.pair.response_a if side == a_side else self.pair.response_b


class ElicitationPick(models.Model):
    """Which side of an elicitation item the participant preferred."""

    item = models.OneToOneField(ElicitationItem, on_delete=models.CASCADE, related_name="pick")
    choice = models.CharField(max_length=8, choices=Side.choices)
    answered_at = models.DateTimeField()
    elapsed_ms = models.PositiveIntegerField(
        null=True, blank=True, help_text="From the page first being shown to the answer (server clock)."
    )

    class Meta:
        constraints = [models.CheckConstraint(condition=Q(choice__in=Side.values), name="pick_choice_valid")]

    @property
    def chosen(self) -> str:
        return self.item.text_on(self.choice)

    @property
    def rejected(self) -> str:
        return self.item.text_on(Side.RIGHT if self.choice == Side.LEFT else Side.LEFT)


class GeneratedResponse(models.Model):
    """One arm's response to one of a participant's evaluation questions, personalized from their picks."""

    participant = models.ForeignKey(Participant, on_delete=models.CASCADE, related_name="responses")
    arm = models.ForeignKey(Arm, on_delete=models.RESTRICT, related_name="responses")
    question = models.ForeignKey(Question, on_delete=models.RESTRICT, related_name="+")
    text = models.TextField()
    user_description = models.TextField(blank=True, help_text="What a CoT arm wrote about the user first.")
    prompt_tokens = models.PositiveIntegerField(default=0)
    new_tokens = models.PositiveIntegerField(default=0)
    finish_reason = models.CharField(max_length=16, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["participant", "arm", "question"], name="one_response_per_arm"),
        ]


class RatingItem(ShownSideBySide, models.Model):
    """A blind A/B pair shown to one participant: position and sides are recorded; the arm never shows.

    A repeat shows an earlier item's responses again with sides swapped (`repeat_of`); an attention check
    has no responses and expects `expected_choice`."""

    participant = models.ForeignKey(Participant, on_delete=models.CASCADE, related_name="rating_items")
    position = models.PositiveSmallIntegerField()
    question = models.ForeignKey(Question, null=True, blank=True, on_delete=models.RESTRICT, related_name="+")
    left = models.ForeignKey(
        GeneratedResponse, null=True, blank=True, on_delete=models.CASCADE, related_name="+"
    )
    right = models.ForeignKey(
        GeneratedResponse, null=True, blank=True, on_delete=models.CASCADE, related_name="+"
    )
    is_repeat = models.BooleanField(default=False)
    repeat_of = models.ForeignKey("self", null=True, blank=True, on_delete=models.CASCADE, related_name="+")
    is_attention_check = models.BooleanField(default=False)
    expected_choice = models.CharField(max_length=8, choices=Side.choices, blank=True)
    shown_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["participant", "position"], name="rating_position_unique"),
            models.CheckConstraint(
                condition=(
                    Q(
                        is_attention_check=True,
                        left__isnull=True,
                        right__isnull=True,
                        question__isnull=True,
                        expected_choice__in=Side.values,
                    )
                    | Q(
                        is_attention_check=False,
                        left__isnull=False,
                        right__isnull=False,
                        question__isnull=False,
                        expected_choice="",
                    )
                ),
                name="rating_item_is_a_pair_or_an_attention_check",
            ),
            models.CheckConstraint(
                condition=Q(is_repeat=False, repeat_of__isnull=True)
                | Q(is_repeat=True, repeat_of__isnull=False),
                name="rating_repeat_has_original",
            ),
        ]
        ordering = ["participant", "position"]

    @property
    def question_text(self) -> str:
        if self.is_attention_check:
            return ATTENTION_CHECK_QUESTION
        assert self.question is not None, (
            "a pair always has its question (rating_item_is_a_pair_or_an_attention_check)"
        )
        return self.question.text

    def text_on(self, side: str) -> str:
        if self.is_attention_check:
            return ATTENTION_CHECK_PICK_ME if side == self.expected_choice else ATTENTION_CHECK_OTHER
        shown = self.left if side == Side.LEFT else self.right
        assert shown is not None, (
            "a pair always has both responses (rating_item_is_a_pair_or_an_attention_check)"
        )
        return shown.text


class Rating(models.Model):
    """A participant's judgment of one A/B item: which side suits them, how strongly, and why."""

    item = models.OneToOneField(RatingItem, on_delete=models.CASCADE, related_name="rating")
    choice = models.CharField(max_length=8, choices=Side.choices)
    strength = models.PositiveSmallIntegerField(validators=[MinValueValidator(1), MaxValueValidator(5)])
    reason = models.CharField(max_length=500, blank=True)
    answered_at = models.DateTimeField()
    elapsed_ms = models.PositiveIntegerField(null=True, blank=True)

    class Meta:
        constraints = [
            models.CheckConstraint(condition=Q(choice__in=Side.values), name="rating_choice_valid"),
            models.CheckConstraint(condition=Q(strength__gte=1, strength__lte=5), name="rating_strength_1_5"),
        ]


class SurveyResponse(models.Model):
    """The closing survey. Every answer is optional; demographics serve the distribution-shift study
    (real participants against synthetic personas)."""

    class AgeRange(models.TextChoices):
        # Labels spelled out: the ones Django derives from the member names ("From 25") misread the ranges.
        FROM_18 = "18-24", "18–24"
        FROM_25 = "25-34", "25–34"
        FROM_35 = "35-44", "35–44"
        FROM_45 = "45-54", "45–54"
        FROM_55 = "55-64", "55–64"
        FROM_65 = "65+", "65 or older"

    class Education(models.TextChoices):
        SECONDARY = "secondary", "Secondary school or less"
        SOME_COLLEGE = "some_college", "Some college or vocational training"
        BACHELOR = "bachelor", "Bachelor's degree"
        GRADUATE = "graduate", "Master's degree or higher"

    participant = models.OneToOneField(Participant, on_delete=models.CASCADE, related_name="survey")
    self_description = models.TextField(blank=True, max_length=2000)
    age_range = models.CharField(max_length=8, choices=AgeRange.choices, blank=True)
    gender = models.CharField(max_length=64, blank=True)
    education = models.CharField(max_length=16, choices=Education.choices, blank=True)
    occupation = models.CharField(max_length=100, blank=True)
    comments = models.TextField(blank=True, max_length=2000)
    submitted_at = models.DateTimeField()
