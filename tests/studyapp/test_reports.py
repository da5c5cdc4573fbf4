from studyapp.reports import Block, report_blocks


def test_it_reads_a_reports_headings_paragraphs_tables_and_images() -> None:
    report = (
        "# FSPO evaluation\n"
        "\n"
        "Dataset `data/elix`; 100 episodes.\n"
        "\n"
        "| arm | win rate |\n"
        "|---|---:|\n"
        "| fspo | 71.2% |\n"
        "\n"
        "![win rates](win_rates.png)\n"
    )

    assert report_blocks(report) == [
        Block("heading", parts=(("FSPO evaluation", False),), level=1),
        Block("paragraph", parts=(("Dataset ", False), ("data/elix", True), ("; 100 episodes.", False))),
        Block(
            "table",
            header=(("arm", "left"), ("win rate", "right")),
            rows=((("fspo", "left"), ("71.2%", "right")),),
        ),
        Block("image", src="win_rates.png", alt="win rates"),
    ]
