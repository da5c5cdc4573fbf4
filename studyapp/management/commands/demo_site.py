"""`manage.py demo_site`: the whole platform on this machine with the demo's tiny models (studyapp.demo_site).
`./run demo` calls it after training, on SQLite and the embedded broker under var/demo/site/."""

from pathlib import Path
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from studyapp.demo_site import DemoSiteFailed, DemoStudy, demo_site_run


class Command(BaseCommand):
    help = (
        "Migrate, make sure the demo study and a coordinator account exist, start a Celery worker and daphne, "
        "and serve until Ctrl-C (or, with --check, walk one scripted participant through the study and stop)."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--dataset", type=Path, default=Path("var/demo/elix"), help="the question pool's dataset"
        )
        parser.add_argument(
            "--fspo", type=Path, default=Path("var/demo/fspo-elix/fspo"), help="the FSPO arm's model"
        )
        parser.add_argument(
            "--base", type=Path, default=Path("var/demo/fspo-elix/base"), help="the base arm's model"
        )
        parser.add_argument("--slug", default="elix-demo")
        parser.add_argument("--picks", type=int, default=4, help="pairwise picks per participant (N shots)")
        parser.add_argument(
            "--eval-questions", type=int, default=4, help="evaluation questions per participant"
        )
        parser.add_argument("--max-new-tokens", type=int, default=120)
        parser.add_argument(
            "--site-dir", type=Path, default=Path("var/demo/site"), help="logs, coordinator password"
        )
        parser.add_argument("--host", default="127.0.0.1")
        parser.add_argument("--port", type=int, default=8000, help="0, or a port in use: any free port")
        parser.add_argument(
            "--check", action="store_true", help="walk one scripted participant through, then stop"
        )
        parser.add_argument("--check-timeout", type=float, default=120, help="seconds to wait for the worker")

    def handle(self, *args: Any, **options: Any) -> None:
        spec = DemoStudy(
            slug=options["slug"],
            dataset=options["dataset"],
            fspo=options["fspo"],
            base=options["base"],
            n_pairs=options["picks"],
            n_eval_questions=options["eval_questions"],
            max_new_tokens=options["max_new_tokens"],
        )
        try:
            demo_site_run(
                spec,
                site_dir=options["site_dir"],
                host=options["host"],
                port=options["port"],
                check=options["check"],
                check_timeout_s=options["check_timeout"],
                say=lambda line: self.stdout.write(line),
            )
        except DemoSiteFailed as exc:
            raise CommandError(str(exc)) from None
