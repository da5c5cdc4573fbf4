"""`manage.py import_llmfao DATASET --study SLUG`: the LLMFAO crowd, as `fspo data import llmfao` wrote it,
loaded into a new closed study as imported judgments (studyapp.services.imports), so the analysis page and
the exports run on it. Running it again on the same files changes nothing; a dataset that is not an LLMFAO
import, or a slug another study holds, exits with status 2 and a one-line reason, having written nothing."""

from pathlib import Path
from typing import Any

from django.core.exceptions import ValidationError
from django.core.management.base import BaseCommand, CommandError, CommandParser

from modeling.llmfao import read_imported
from modeling.synth.storage import DatasetError
from studyapp.services.imports import DEFAULT_MIN_PAIR_JUDGMENTS, crowd_study_import


class Command(BaseCommand):
    help = (
        "Load an imported LLMFAO dataset (fspo data import llmfao) into a new study as imported judgments: "
        "arms = models, participants = workers, ratings = judgments (a tie is an item without a rating)."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("dataset", type=Path, help="the folder fspo data import llmfao wrote")
        parser.add_argument("--study", required=True, help="the new study's slug")
        parser.add_argument("--title", default="LLMFAO crowd (imported)")
        parser.add_argument(
            "--min-pair-judgments",
            type=int,
            default=DEFAULT_MIN_PAIR_JUDGMENTS,
            help="a comparison for every pair of models judged at least this often",
        )

    def handle(self, *args: Any, **options: Any) -> None:
        try:
            crowd = read_imported(options["dataset"])
            done = crowd_study_import(
                crowd=crowd,
                slug=options["study"],
                title=options["title"],
                min_pair_judgments=options["min_pair_judgments"],
            )
        except DatasetError as e:
            raise CommandError(f"{e}; nothing was written", returncode=2) from None
        except ValidationError as e:
            raise CommandError(" ".join(e.messages), returncode=2) from None
        if not done.created:
            self.stdout.write(f"Study '{done.study.slug}' holds this import already: nothing changed.")
            return
        self.stdout.write(
            f"Study '{done.study.slug}': {done.participants} imported participants, {done.items} judgments "
            f"({done.ratings} ratings, {done.ties} ties as items without a rating), "
            f"{done.study.arms.count()} arms, {done.study.comparisons.count()} comparisons."
        )
