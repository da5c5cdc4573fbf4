"""Domain files: the built-ins load, malformed files get one clear line and no dataset is written."""

from __future__ import annotations

import pytest
import yaml

from modeling.synth import DomainError, generate_dataset, load_domain


@pytest.fixture
def roleplay_spec():
    return load_domain("roleplay").spec.model_dump()


def write(tmp_path, data, name="custom.yaml"):
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data, sort_keys=False))
    return path


def test_it_loads_a_custom_domain_from_a_path(tmp_path, roleplay_spec):
    roleplay_spec["name"] = "my-roleplay"
    dom = load_domain(write(tmp_path, roleplay_spec))
    assert dom.name == "my-roleplay"
    info = generate_dataset(
        out_dir=tmp_path / "out", domain=str(tmp_path / "custom.yaml"), users=20, pairs_per_user=3
    )
    assert info.manifest["domain"] == "my-roleplay"
    assert info.manifest["domain_sha256"] == dom.sha256


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda s: s.pop("traits"), r"traits: Field required"),
        (
            lambda s: s["traits"][0].update(kind="sparkly"),
            r"traits\.0\.kind: Input should be 'lexical', 'length' or 'layout'",
        ),
        (
            lambda s: s["traits"][0]["values"][1]["phrases"].append("Plot twist, you've got this."),
            r"also contains a marker of tone=warm",
        ),
        (
            lambda s: s["traits"][0]["values"][0]["phrases"].append("Two sentences. In one phrase."),
            r"must be exactly one sentence",
        ),
        (
            lambda s: s["response"]["filler"].append("Bottom line: it is fine."),
            r"response\.filler\[\d+\]: .* contains a trait marker",
        ),
        (lambda s: s["traits"][0]["prior"]["table"].pop("cheerful"), r"prior\.table rows must match"),
        (lambda s: s["persona"]["intro"].append("I am {shoe_size}."), r"unknown field \{shoe_size\}"),
        (lambda s: s["traits"][3]["values"][0].update(sentences=[3, 8]), r"sentence ranges overlap"),
        (lambda s: s.update(format_version=2), r"format_version: Input should be 1"),
    ],
)
def test_a_malformed_domain_file_gets_one_clear_line(tmp_path, roleplay_spec, mutate, message):
    mutate(roleplay_spec)
    path = write(tmp_path, roleplay_spec)
    with pytest.raises(DomainError, match=message) as err:
        load_domain(path)
    assert "\n" not in str(err.value)
    assert str(path) in str(err.value)
    with pytest.raises(DomainError):
        generate_dataset(out_dir=tmp_path / "out", domain=str(path), users=5, pairs_per_user=1)
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()


def test_a_file_that_is_not_yaml_gets_a_clear_error(tmp_path):
    path = write(tmp_path, "name: x\ntraits: [unclosed\n")
    with pytest.raises(DomainError, match=r"not valid YAML at line \d+"):
        load_domain(path)
    with pytest.raises(DomainError, match="expected a mapping"):
        load_domain(write(tmp_path, "- just\n- a list\n", "list.yaml"))
    with pytest.raises(DomainError, match="no such built-in domain"):
        load_domain("cooking-show")
