"""`manage.py expire_participants`: time out the participants inactive past their study's time limit, as
the beat task worker.tasks.expire_participants does (for a cron job, or a site run without Celery beat)."""

from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from studyapp.models import Study
from studyapp.services import participants_expire


class Command(BaseCommand):
    help = (
        "Time out every participant who has not finished and has been inactive for longer than their "
        "study's time limit: they cannot go on, their judgments are kept but left out, their place is freed."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--study", metavar="SLUG", help="only this study's participants")

    def handle(self, *args: Any, study: str | None = None, **options: Any) -> None:
        only = None
        if study is not None:
            only = Study.objects.filter(slug=study).first()
            if only is None:
                raise CommandError(f"There is no study '{study}'.")
        n = participants_expire(study=only)
        self.stdout.write(f"Timed out {n} participant{'' if n == 1 else 's'}.")
