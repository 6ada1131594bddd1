"""avarc.io.profiles: the shipped schedules say what the paper says, and a bad YAML fails in one line that names the
file, the stage and the field."""
from __future__ import annotations

import pytest

from avarc import AvarcError, ModelSpec, VARSpec, VQVAESpec, build_model, official_spec
from avarc.engine.profile import Stage
from avarc.io.profiles import default_profile_name, list_profiles, load_profile, shipped_names


def test_shipped_profiles_are_the_papers_schedules():
    assert {"varc", "a-varc-plus", "smooth-top10", "adaptive", "digits"} <= set(shipped_names())
    p = load_profile("a-varc-plus").resolve(10)
    assert p.sigma == 0.1
    assert p.stages == (Stage(6, 1, 10), Stage(10, 1, 3), Stage(10, 3, 1))
    assert load_profile("varc").resolve(10).stages == (Stage(10, 1, 1),)
    assert load_profile("smooth-top10").resolve(10).stages == (Stage(10, 1, 10), Stage(10, 10, 1))
    adaptive = load_profile("adaptive").resolve(10)
    assert [(s.scales, s.samples, s.keep) for s in adaptive.stages] == [(6, 1, 10), (10, 1, 3), (10, 3, 1)]
    assert all(m is not None and m > 0 for m in (s.exit_margin for s in adaptive.stages[:-1]))
    listed = {p.name: p for p in list_profiles()}
    assert set(listed) == set(shipped_names()) and all(p.description for p in listed.values())


def test_all_resolves_against_the_models_geometry(tmp_path):
    f = tmp_path / "rel.yaml"
    f.write_text("stages:\n  - {scales: all-2, keep: 4}\n  - {scales: all, samples: 2}\n")
    p = load_profile(f)
    assert p.name == "rel" and p.max_samples == 2
    assert [s.scales for s in p.resolve(7).stages] == [5, 7]
    assert [s.scales for s in load_profile("digits").resolve(5).stages] == [5, 5]
    with pytest.raises(AvarcError, match=r"stage 1: scales: 6 does not fit a model with 4 scales"):
        load_profile("a-varc-plus").resolve(4)


@pytest.mark.parametrize("body, expected", [
    ("stages:\n  - {scales: 6, keep: 10}\n  - {scales: 10, samples: 0}\n",
     "stage 2: samples: input should be greater than 0, got 0; fix the profile"),
    ("stages:\n  - {scales: 6, keep: 2}\n  - {scales: 10, keep: 3}\n  - {scales: 10}\n",
     "stage 2: keep: 3 is more than stage 1 keeps (2)"),
    ("stages:\n  - {scales: 6, keep: 3}\n", "stage 1: keep: must be 1 in the last stage"),
    ("stages:\n  - {scales: six}\n", "stage 1: scales: 'six' is not a number"),
    ("stages:\n  - {keep: 1}\n", "stage 1: scales: missing"),
    ("stages:\n  - {scales: 4, sample: 3}\n", "stage 1: sample: unknown field; use scales, samples, keep, exit_margin"),
    ("sigma: .nan\nstages:\n  - {scales: 4}\n", "sigma: input should be a finite number"),
    ("stages:\n  - {scales: true}\n", "stage 1: scales: input should be a valid integer, got True"),
    ("stages:\n  - {scales: 4, keep: 2, exit_margin: -1}\n  - {scales: 5}\n",
     "stage 1: exit_margin: input should be greater than 0, got -1"),
    ("stages:\n  - {scales: 4, exit_margin: 3}\n", "stage 1: exit_margin: the last stage has nothing left to skip"),
    ("sigma: -0.1\nstages:\n  - {scales: 4}\n", "sigma: input should be greater than or equal to 0, got -0.1"),
    ("stages: []\n", "stages: list should have at least 1 item"),
    ("- 1\n- 2\n", "a profile must be a mapping"),
    ("stages:\n  - {scales: 4\n", "invalid YAML at line"),
])
def test_invalid_profiles_fail_in_one_line_naming_file_stage_and_field(tmp_path, body, expected):
    f = tmp_path / "bad.yaml"
    f.write_text(body)
    with pytest.raises(AvarcError) as err:
        load_profile(f)
    msg = str(err.value)
    assert msg.startswith(str(f)) and expected in msg and "\n" not in msg


def test_unknown_profile_names_the_shipped_ones():
    with pytest.raises(AvarcError, match=r"unknown profile 'a-varc-pls' \(did you mean 'a-varc-plus'\?\); use one of "
                                         "a-varc-plus, adaptive"):
        load_profile("a-varc-pls")


def test_default_profile_comes_from_model_meta_or_geometry():
    d16 = build_model(official_spec("d16"), "meta")
    assert default_profile_name(d16) == "a-varc-plus"
    d16.meta["default_profile"] = "adaptive"
    assert default_profile_name(d16) == "adaptive"
    small = ModelSpec(VQVAESpec(), VARSpec(depth=1, embed_dim=64, num_heads=1, num_classes=10, patch_nums=(1, 2, 4)),
                      64)
    assert default_profile_name(build_model(small, "meta")) == "varc"


def test_a_written_profile_reads_back_with_its_temperature_and_is_not_overwritten(tmp_path):
    from dataclasses import replace

    from avarc.io.profiles import write_profile

    p = replace(load_profile("adaptive"), name="mine", temperature=2.5)
    f = write_profile(p, tmp_path / "mine.yaml", comment="tuned on x\nbudget y")
    assert f.read_text().startswith("# tuned on x\n# budget y\n")
    back = load_profile(f)
    assert (back.stages, back.sigma, back.temperature, back.description) == (p.stages, p.sigma, 2.5, p.description)
    with pytest.raises(AvarcError, match="already exists; set force=True"):
        write_profile(p, f)
    f.write_text("temperature: 0\nstages:\n  - {scales: 4}\n")
    with pytest.raises(AvarcError, match="temperature: input should be greater than 0, got 0"):
        load_profile(f)
