import pytest
from django.core.exceptions import ValidationError

from annotation.models import Question
from annotation.pool import PoolRow
from annotation.writers import question_pool_import
from tests.factories import make_study, participant_waiting


@pytest.mark.django_db
def test_it_refuses_to_replace_a_pool_that_participants_have_seen() -> None:
    study = make_study()
    participant_waiting(study)
    before = sorted(Question.objects.filter(study=study).values_list("text", flat=True))

    with pytest.raises(ValidationError, match="1 participant"):
        question_pool_import(study=study, rows=[PoolRow("evaluation", "A new question?")], replace=True)

    assert sorted(Question.objects.filter(study=study).values_list("text", flat=True)) == before


@pytest.mark.django_db
def test_it_adds_pairs_to_an_elicitation_question_the_pool_already_holds() -> None:
    study = make_study(n_pairs=1)
    text = Question.objects.filter(study=study, use="elicitation").first().text
    rows = [
        PoolRow("elicitation", text, "One more.", "And another."),
        PoolRow("evaluation", "Evaluation question 0?"),
    ]

    added = question_pool_import(study=study, rows=rows)

    assert (added.elicitation_pairs, added.evaluation_questions, added.skipped_duplicates) == (1, 0, 1)
    assert Question.objects.get(study=study, text=text).candidate_pairs.count() == 2
