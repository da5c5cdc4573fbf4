"""Takes the analyst guide's screenshots of the analysis and export pages (docs/screenshots/analysis-*.png,
export-*.png).

A throwaway site: a SQLite database and a data folder in a temporary directory, a study filled by
simulated participants with known hidden preferences (tests.factories.simulate_participant, through the
real services), the demo's synthetic dataset and `fspo eval` run when `./run demo` has made them (var/demo/),
daphne serving it, and Debian's Chromium under Playwright signed in as an analyst.

    .venv/bin/python docs/screenshots/take_analysis_screenshots.py
"""

import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
OUT = REPO / "docs" / "screenshots"
DEMO = REPO / "var" / "demo"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--no-first-run"]
PASSWORD = "a-long-screenshot-password"

ABOUT = [
    (
        "I'm a nurse on night shifts; keep it short and calm.",
        "Works nights in a hospital and wants brief, calm explanations.",
    ),
    (
        "Retired engineer. I like the maths written out.",
        "A retired engineer who prefers explanations with the equations.",
    ),
    (
        "Second-year history student, I like stories and dates.",
        "A history student who enjoys narrative explanations with dates.",
    ),
    (
        "I teach primary school and borrow explanations for class.",
        "A primary school teacher looking for explanations children can follow.",
    ),
    (
        "Software developer; skip the basics, show me the mechanism.",
        "An experienced programmer who wants the underlying mechanism, not basics.",
    ),
    (
        "I left school at 16 and learn best from everyday examples.",
        "Someone without formal schooling who prefers everyday, concrete examples.",
    ),
    (
        "Chef. Food comparisons make things click for me.",
        "A professional cook who understands best through cooking analogies.",
    ),
    (
        "PhD in biology, so don't simplify the science.",
        "A scientist with a doctorate who wants the full technical account.",
    ),
    (
        "Parent of two, reading up to answer my kids' questions.",
        "A parent who wants simple answers to pass on to young children.",
    ),
    (
        "Accountant, I like numbers and step-by-step lists.",
        "A numbers person who prefers step-by-step, itemized explanations.",
    ),
]
AGES = ["18-24", "25-34", "25-34", "35-44", "45-54", "55-64", "65+"]
EDUCATION = ["secondary", "some_college", "bachelor", "bachelor", "graduate"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def setup_environment(tmp: Path) -> dict[str, str]:
    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "studyapp.settings",
        "DATABASE_URL": f"sqlite:///{tmp / 'site.sqlite3'}",
        "STUDIO_DATA_DIR": str(tmp / "data"),
        # The last pick enqueues personalization: into a broker nobody reads (the responses are simulated).
        "CELERY_BROKER_URL": "memory://",
        "CELERY_RESULT_BACKEND": "cache+memory://",
        "HF_HUB_OFFLINE": "1",
    }
    os.environ.update(env)
    return env


def data_folder(tmp: Path) -> tuple[str | None, str | None]:
    """The demo's ELIX dataset and evaluation run copied into the data folder, when they exist."""
    import json

    data = tmp / "data"
    dataset = evaluation = None
    if (DEMO / "elix" / "dataset.json").is_file():
        shutil.copytree(DEMO / "elix", data / "datasets" / "elix-demo")
        dataset = "datasets/elix-demo"
    results = DEMO / "fspo-elix" / "eval" / "results.json"
    if results.is_file():
        run = data / "evaluations" / "elix-arms"
        run.mkdir(parents=True)
        content = json.loads(results.read_text())
        if dataset:
            content["dataset"] = str(data / dataset)
        (run / "results.json").write_text(json.dumps(content, indent=2))
        evaluation = "evaluations/elix-arms"
    return dataset, evaluation


def fill_study() -> None:
    import django

    django.setup()
    from django.contrib.auth.models import Group, User
    from django.core.management import call_command

    from studyapp.coordinators import ANALYSTS_GROUP
    from studyapp.models import Arm, Comparison
    from tests.factories import Persona, make_simulated_study, simulate_participant

    call_command("migrate", verbosity=0)
    study = make_simulated_study(
        n_pairs=3, pool_pairs=9, n_eval_questions=4, domain="elix", slug="elix-pilot",
        title="ELIX pilot: explain at my level",
    )  # fmt: skip
    Arm.objects.filter(study=study, name="fspo").update(checkpoint="var/demo/fspo-elix/fspo")
    Arm.objects.filter(study=study, name="base").update(checkpoint="var/demo/fspo-elix/base")
    Arm.objects.filter(study=study, name="cot").update(name="fspo-cot", checkpoint="var/demo/fspo-elix/fspo")
    fewshot = Arm.objects.create(
        study=study, name="few-shot", method=Arm.Method.FEWSHOT, checkpoint="var/demo/fspo-elix/base"
    )
    Comparison.objects.create(study=study, arm=fewshot, baseline=study.arms.get(name="base"))
    rng = random.Random(4)
    personas = []
    for i in range(24):
        about, description = ABOUT[i] if i < len(ABOUT) else ("", "")
        survey = {
            "age_range": rng.choice(AGES),
            "education": rng.choice(EDUCATION),
            "self_description": about,
        }
        if i % 9 == 8:
            survey["education"] = ""
        personas.append(
            Persona(
                prefers_arm=min(0.95, max(0.35, rng.gauss(0.72, 0.15))),
                repeat_agreement=rng.choice([1.0, 1.0, 1.0, 0.5]),
                prefers_a=rng.random(),
                answer_ms=rng.randint(4000, 20000),
                shots=(3, 5, 8)[i % 3],
                survey=survey,
                description=description,
            )
        )
    personas += [
        Persona(0.5, 0.5, shots=5, passes_attention=False, survey={"age_range": "25-34"}),
        Persona(0.5, 0.5, shots=8, answer_ms=900, survey={"age_range": "18-24"}),
        Persona(0.3, 1.0, shots=3, returned=True),
    ]
    for i, persona in enumerate(personas):
        simulate_participant(study, persona, seed=i)
    study.refresh_from_db()
    study.is_open = False  # recruitment over, everyone finished: the data is final
    study.save(update_fields=["is_open"])
    analyst = User.objects.create_user("ana", password=PASSWORD)
    analyst.groups.add(Group.objects.get_or_create(name=ANALYSTS_GROUP)[0])


def serve(env: dict[str, str], port: int, log: Path) -> subprocess.Popen:
    argv = [
        sys.executable,
        "-m",
        "daphne",
        "-b",
        "127.0.0.1",
        "-p",
        str(port),
        "studyapp.asgi:application",
    ]
    proc = subprocess.Popen(argv, cwd=REPO, env=env, stdout=log.open("wb"), stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 60
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5):
                return proc
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"daphne did not start:\n{log.read_text()}") from None
            time.sleep(0.3)


def palette_copy(source: Path, target: Path, colors: int = 128) -> None:
    """A copy in a palette: a third of the size, text and plot lines stay crisp."""
    from PIL import Image

    with Image.open(source) as image:
        image.convert("RGB").quantize(colors, Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE).save(
            target, optimize=True
        )


def photograph(base: str, query: str, raw: Path) -> list[Path]:
    from playwright.sync_api import sync_playwright

    taken = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=shutil.which("chromium"), args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.goto(f"{base}/studio/login/")
        page.fill("#id_username", "ana")
        page.fill("#id_password", PASSWORD)
        page.click("button[type=submit]")
        page.wait_for_url(f"{base}/studio/")

        def shot(name: str, **options: object) -> None:
            path = raw / f"{name}.png"
            (options.pop("element") if "element" in options else page).screenshot(path=str(path), **options)
            taken.append(path)

        page.goto(f"{base}/studio/studies/elix-pilot/analysis/{query}")
        shot("analysis-overview")
        page.locator("#counted details").evaluate("d => d.open = true")
        shot("analysis-options", element=page.locator("#counted"))
        page.locator("#counted details").evaluate("d => d.open = false")
        for section in ("win-rates", "transfer", "consistency", "shots", "shift", "descriptions"):
            shot(f"analysis-{section}", element=page.locator(f"#{section}"))
        page.goto(f"{base}/studio/studies/elix-pilot/export/")
        shot("export-page", full_page=True)
        browser.close()
    return taken


def main() -> None:
    sys.path.insert(0, str(REPO))
    os.chdir(REPO)
    tmp = Path(tempfile.mkdtemp(prefix="fspo-analysis-shots-"))
    try:
        env = setup_environment(tmp)
        dataset, evaluation = data_folder(tmp)
        fill_study()
        query = "?" + "&".join(f"{k}={v}" for k, v in (("evaluation", evaluation), ("dataset", dataset)) if v)
        port = free_port()
        server = serve(env, port, tmp / "server.log")
        try:
            raw = tmp / "raw"
            raw.mkdir()
            for path in photograph(f"http://127.0.0.1:{port}", query if len(query) > 1 else "", raw):
                palette_copy(path, OUT / path.name)
                print(f"wrote {OUT / path.name}")
        finally:
            server.terminate()
            server.wait(timeout=20)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
