"""Rule data: NUCC taxonomy map (billing-rules.md §4), payer profiles and matching (§5, §6), settings (§3, §6).

The fact-sheet traps of §1 ("the seed material gets them wrong") are asserted one by one.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import date
from importlib import resources
from typing import Any

import jsonschema
import pytest

from cds_service.rules.rules_data import (
    CodingValue,
    PayerDirectory,
    RulesData,
    RulesDataError,
    TaxonomyMap,
    load_rules_data,
    rules_schema_for_config,
)

SOPT = "https://nahdo.org/sopt"


def _json(path: str) -> Any:
    return json.loads(resources.files("cds_service").joinpath(path).read_text("utf-8"))


@pytest.fixture(scope="module")
def data() -> RulesData:
    return load_rules_data()


@pytest.fixture(scope="module")
def taxonomy(data: RulesData) -> TaxonomyMap:
    return data.taxonomy


@pytest.fixture(scope="module")
def payers(data: RulesData) -> PayerDirectory:
    return data.payers


def _match(
    payers: PayerDirectory, *, sopt: Sequence[str] = (), names: Sequence[str] = (), ids: Sequence[str] = ()
) -> str | None:
    profile = payers.match(
        type_and_class=[CodingValue(SOPT, code, None) for code in sopt], payer_names=names, payer_identifiers=ids
    )
    return profile.id if profile else None


# --- data files -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("stem", ["taxonomy", "payers", "rules"])
def test_every_data_file_validates_against_its_schema(stem: str) -> None:
    schema = _json(f"schemas/{stem}.schema.json")
    jsonschema.Draft202012Validator.check_schema(schema)
    validator = jsonschema.Draft202012Validator(schema, format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER)
    assert list(validator.iter_errors(_json(f"data/{stem}.json"))) == []


def test_every_payer_profile_has_source_and_as_of(payers: PayerDirectory) -> None:
    ids = [p.id for p in payers]
    assert ids == ["medicare-ffs", "medicare-advantage", "aetna", "unitedhealthcare", "cigna", "bcbs"]
    for profile in payers:
        assert profile.source.strip() and profile.note.strip()
        assert isinstance(profile.as_of, date)


def test_every_taxonomy_rule_cites_a_source_and_dates_cms_facts(taxonomy: TaxonomyMap) -> None:
    for rule in taxonomy:
        assert rule.source.strip() and rule.note.strip() and rule.label.strip()
        if rule.outcome != "verify":
            assert isinstance(rule.as_of, date), rule.prefix


def test_default_load_is_cached() -> None:
    assert load_rules_data() is load_rules_data()
    assert load_rules_data({}) is load_rules_data()


# --- taxonomy: the fact-sheet traps (§1, §4) -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("code", "outcome", "modifiers"),
    [
        ("207N00000X", "G2010", ()),  # dermatologist: G2010, not G2250
        ("207Q00000X", "G2010", ()),  # family physician
        ("207R00000X", "G2010", ()),  # internist
        ("208000000X", "G2010", ()),  # pediatrician
        ("363L00000X", "G2010", ()),  # nurse practitioner
        ("363LF0000X", "G2010", ()),
        ("363A00000X", "G2010", ()),  # physician assistant
        ("364S00000X", "G2010", ()),  # clinical nurse specialist
        ("367A00000X", "G2010", ()),  # certified nurse-midwife
        ("213E00000X", "G2010", ()),  # podiatrist
        ("152W00000X", "G2010", ()),  # optometrist
        ("225100000X", "G2250", ("GP",)),  # physical therapist
        ("2251X0800X", "G2250", ("GP",)),
        ("225X00000X", "G2250", ("GO",)),  # occupational therapist
        ("235Z00000X", "G2250", ("GN",)),  # speech-language pathologist
        ("103TC0700X", "G2250", ()),  # clinical psychologist: no modifier
        ("1041C0700X", "G2250", ()),  # clinical social worker
        ("231H00000X", "not-billable", ()),  # audiologist: excluded by CMS
        ("225200000X", "review", ("GP", "CQ")),  # physical therapy assistant: supervising PT bills with CQ
        ("2252P0000X", "review", ("GP", "CQ")),
        ("224Z00000X", "review", ("GO", "CO")),  # occupational therapy assistant: supervising OT bills with CO
        ("133V00000X", "verify", ()),  # registered dietitian
        ("133N00000X", "verify", ()),  # nutritionist
        ("106H00000X", "verify", ()),  # marriage and family therapist
        ("101YM0800X", "verify", ()),  # mental health counselor
        ("104100000X", "verify", ()),  # social worker, not clinical
        ("367500000X", "verify", ()),  # CRNA: not listed
        ("ZZZZZZZZZX", "verify", ()),  # unknown code
    ],
)
def test_taxonomy_outcome(taxonomy: TaxonomyMap, code: str, outcome: str, modifiers: tuple[str, ...]) -> None:
    match = taxonomy.classify([code])
    assert (match.code, match.outcome, match.modifiers) == (code, outcome, modifiers)


def test_unknown_code_falls_to_the_default_verify_rule(taxonomy: TaxonomyMap) -> None:
    match = taxonomy.classify(["174400000X"])
    assert match.rule.is_default and match.outcome == "verify"


def test_no_code_is_verify_with_code_none(taxonomy: TaxonomyMap) -> None:
    for codes in ([], ["", "  "]):
        match = taxonomy.classify(codes)
        assert match.code is None and match.outcome == "verify" and match.rule.is_default


def test_codes_are_normalised_and_a_bare_string_is_one_code(taxonomy: TaxonomyMap) -> None:
    assert taxonomy.classify([" 225100000x "]).outcome == "G2250"
    assert taxonomy.classify("207Q00000X").code == "207Q00000X"


def test_longest_prefix_wins(taxonomy: TaxonomyMap) -> None:
    assert taxonomy.rule_for("1041C0700X").prefix == "1041C0700X"
    assert taxonomy.rule_for("101YM0800X").prefix == "101YM"


@pytest.mark.parametrize(
    ("codes", "code", "outcome"),
    [
        (["ZZZZZZZZZX", "225100000X"], "225100000X", "G2250"),  # PT also listed with an unknown code: G2250
        (["231H00000X", "235Z00000X"], "235Z00000X", "G2250"),  # audiologist + SLP bills as SLP (GN)
        (["225100000X", "207Q00000X"], "207Q00000X", "G2010"),  # E/M-capable person bills G2010
        (["231H00000X", "225200000X"], "225200000X", "review"),
        (["225200000X", "133V00000X"], "225200000X", "review"),
        (["231H00000X", "133V00000X"], "133V00000X", "verify"),  # unsettled role keeps the answer open
        (["ZZZZZZZZZX", "231H00000X"], "231H00000X", "not-billable"),  # an unknown code outweighs nothing
        (["225100000X", "225X00000X"], "225100000X", "G2250"),  # tie: first listed (primary role)
    ],
)
def test_several_codes_precedence(taxonomy: TaxonomyMap, codes: list[str], code: str, outcome: str) -> None:
    match = taxonomy.classify(codes)
    assert (match.code, match.outcome) == (code, outcome)


def test_no_forbidden_modifier_anywhere_in_the_taxonomy(data: RulesData) -> None:
    forbidden = {"95", "93", "GT", "GQ", "FQ", "G0", "22", "23", "62", "78", "80", "82", "AS", "QK", "QX", "25", "CR"}
    assert forbidden <= set(data.settings.forbidden_modifiers)
    for rule in data.taxonomy:
        assert not forbidden & set(rule.modifiers), rule.prefix


def test_co_appears_only_as_the_ota_modifier(taxonomy: TaxonomyMap) -> None:
    with_co = [rule for rule in taxonomy if "CO" in rule.modifiers]
    assert [rule.prefix for rule in with_co] == ["224Z"]
    note = with_co[0].note
    assert "CO is the occupational therapy assistant modifier" in note
    assert "not a catastrophe modifier" in note
    for rule in taxonomy:
        if "catastrophe" in rule.note.lower():
            assert "not a catastrophe" in rule.note.lower()


# --- payers (§5, §6) -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("sopt", "names", "expected"),
    [
        (["121"], [], "medicare-ffs"),
        (["1"], [], "medicare-ffs"),
        (["12"], [], "medicare-ffs"),
        (["129"], [], "medicare-ffs"),
        (["111"], [], "medicare-advantage"),
        (["11"], [], "medicare-advantage"),
        (["119"], [], "medicare-advantage"),
        (["1", "111"], [], "medicare-advantage"),  # the most specific SOPT code decides
        (["111"], ["Medicare"], "medicare-advantage"),  # SOPT before names
        (["121"], ["Aetna"], "medicare-ffs"),
        (["5"], ["Cigna"], "cigna"),  # SOPT code without a profile: names decide
        ([], ["Medicare"], "medicare-ffs"),
        ([], ["CMS MEDICARE PART B"], "medicare-ffs"),
        ([], ["Humana Medicare Advantage"], "medicare-advantage"),
        ([], ["Acme Advantage Medicare Plan"], None),  # 'Advantage' never matches FFS
        ([], ["AETNA Better Health"], "aetna"),
        ([], ["UHC"], "unitedhealthcare"),
        ([], ["United Healthcare Community Plan"], "unitedhealthcare"),
        ([], ["UnitedHealthcare"], "unitedhealthcare"),
        ([], ["Cigna Healthcare"], "cigna"),
        ([], ["Anthem Blue Cross"], "bcbs"),
        ([], ["Blue Shield of California"], "bcbs"),
        ([], ["BCBS of Texas"], "bcbs"),
        ([], ["Kaiser Permanente"], None),
        ([], [], None),
    ],
)
def test_payer_matching(payers: PayerDirectory, sopt: list[str], names: list[str], expected: str | None) -> None:
    assert _match(payers, sopt=sopt, names=names) == expected


def test_sopt_codes_in_another_system_are_ignored(payers: PayerDirectory) -> None:
    coding = CodingValue("http://terminology.hl7.org/CodeSystem/v3-ActCode", "121", None)
    assert payers.match(type_and_class=[coding], payer_names=[], payer_identifiers=[]) is None


def test_verify_is_never_covered_and_only_medicare_ffs_is_covered(payers: PayerDirectory) -> None:
    for profile in payers:
        for code in ("G2250", "G2010"):
            for self_insured in (False, True):
                coverage = profile.coverage_for(code, self_insured=self_insured)
                assert coverage in ("covered", "not-covered", "verify")
                if profile.id == "medicare-ffs":
                    assert coverage == "covered"
                else:
                    assert coverage != "covered", (profile.id, code, self_insured)


def test_aetna_self_insured_is_not_covered_fully_insured_is_verify(payers: PayerDirectory) -> None:
    aetna = payers.get("aetna")
    assert aetna is not None
    for code in ("G2250", "G2010"):
        assert aetna.coverage_for(code, self_insured=True) == "not-covered"
        assert aetna.coverage_for(code, self_insured=False) == "verify"


def test_unitedhealthcare_is_verify_for_both_codes(payers: PayerDirectory) -> None:
    uhc = payers.get("unitedhealthcare")
    assert uhc is not None
    assert {uhc.coverage_for(code, self_insured=False) for code in ("G2250", "G2010")} == {"verify"}


def test_unlisted_code_is_verify(payers: PayerDirectory) -> None:
    ffs = payers.get("medicare-ffs")
    assert ffs is not None and ffs.coverage_for("G2012", self_insured=False) == "verify"


def test_code_before_its_creation_is_not_covered(payers: PayerDirectory) -> None:
    ffs = payers.get("medicare-ffs")
    assert ffs is not None
    assert ffs.coverage_for("G2250", self_insured=False, on=date(2020, 12, 31)) == "not-covered"
    assert ffs.coverage_for("G2250", self_insured=False, on=date(2021, 1, 1)) == "covered"
    assert ffs.coverage_for("G2010", self_insured=False, on=date(2019, 1, 1)) == "covered"


@pytest.mark.parametrize(
    ("coding", "expected"),
    [
        (CodingValue("http://example.org/plan", "self-insured", None), True),
        (CodingValue(None, "aso", None), True),
        (CodingValue(None, "PLAN-7", "Acme Self-Insured Employer Plan"), True),
        (CodingValue(None, "PLAN-7", "Acme self insured plan"), True),
        (CodingValue(None, "PLAN-7", "Fully insured group"), False),
        (CodingValue(None, "ASOX", None), False),
        (CodingValue(None, None, None), False),
    ],
)
def test_self_insured_markers(data: RulesData, coding: CodingValue, expected: bool) -> None:
    assert data.payers.is_self_insured([coding], data.settings.self_insured_markers) is expected


def test_self_insured_marker_with_system(payers: PayerDirectory) -> None:
    markers = [{"system": "http://example.org/funding", "code": "SI"}]
    assert payers.is_self_insured([CodingValue("http://example.org/funding", "si", None)], markers)
    assert not payers.is_self_insured([CodingValue("http://example.org/other", "SI", None)], markers)


# --- settings (§3, §6) -----------------------------------------------------------------------------------------------


def test_settings_defaults(data: RulesData) -> None:
    settings = data.settings
    assert settings.established_lookback_years == 3
    assert settings.related_lookback_hours == 168
    assert settings.follow_up_business_hours == 24
    assert settings.resulting_service_hours == 24
    assert settings.soonest_slot_tolerance_minutes == 60
    assert settings.possibly_resulting_business_days == 2
    assert settings.prior_service_scope == "practitioner"
    assert settings.consent.max_age_months == 12
    assert (settings.consent.scope.system, settings.consent.scope.code) == (
        "http://terminology.hl7.org/CodeSystem/consentscope",
        "treatment",
    )
    assert [(c.system, c.code) for c in settings.consent.accepted_categories] == [("http://loinc.org", "59284-0")]
    assert settings.consent.accepted_policies == ()
    assert settings.remote_assessment_codes == ("G2250", "G2010")
    assert set(settings.e_visit_codes) == {"99421", "99422", "99423", "98970", "98971", "98972"}
    assert set(settings.check_in_codes) == {"G2251", "G2252", "98016", "G2012"}


# --- overrides -------------------------------------------------------------------------------------------------------

HUMANA = {
    "id": "humana",
    "name": "Humana",
    "source": "local contract 2026",
    "as_of": "2026-01-01",
    "match": {"sopt": [], "names": ["Humana"], "identifiers": ["61101"]},
    "codes": {"G2250": "verify", "G2010": "covered"},
    "note": "Negotiated locally.",
}


def test_override_replaces_a_taxonomy_prefix() -> None:
    rule = {
        "prefix": "133V",
        "outcome": "G2250",
        "modifiers": [],
        "label": "Dietitian, Registered",
        "note": "MAC confirmed for our practice.",
        "source": "MAC letter",
        "as_of": "2026-02-01",
    }
    data = load_rules_data({"taxonomy": [rule]})
    assert data.taxonomy.classify(["133V00000X"]).outcome == "G2250"
    assert sum(1 for r in data.taxonomy if r.prefix == "133V") == 1
    assert load_rules_data().taxonomy.classify(["133V00000X"]).outcome == "verify"  # default untouched


def test_override_adds_a_more_specific_taxonomy_rule() -> None:
    rule = {"prefix": "207ND0900X", "outcome": "verify", "modifiers": [], "label": "x", "note": "x", "source": "x"}
    data = load_rules_data({"taxonomy": [rule]})
    assert data.taxonomy.classify(["207ND0900X"]).outcome == "verify"
    assert data.taxonomy.classify(["207N00000X"]).outcome == "G2010"


def test_override_adds_a_payer_after_the_shipped_ones() -> None:
    data = load_rules_data({"payers": [HUMANA]})
    assert [p.id for p in data.payers][-1] == "humana"
    assert _match(data.payers, names=["Humana Gold Plus"]) == "humana"
    assert _match(data.payers, names=["Humana Medicare Advantage"]) == "medicare-advantage"  # profile order
    assert _match(data.payers, names=["Somebody"], ids=["61101"]) == "humana"  # identifiers before names
    assert _match(data.payers, names=["Somebody"], ids=["611010"]) is None  # identifiers are exact


def test_override_replaces_a_payer_in_place() -> None:
    aetna = {
        **HUMANA,
        "id": "aetna",
        "name": "Aetna (contract)",
        "match": {"sopt": [], "names": ["Aetna"], "identifiers": []},
    }
    data = load_rules_data({"payers": [aetna]})
    ids = [p.id for p in data.payers]
    assert ids.index("aetna") == 2 and ids.count("aetna") == 1
    assert data.payers.get("aetna").coverage_for("G2010", self_insured=True) == "covered"


def test_override_changes_settings_and_merges_nested_consent() -> None:
    data = load_rules_data(
        {
            "settings": {
                "soonest_slot_tolerance_minutes": 30,
                "prior_service_scope": "organization",
                "consent": {"max_age_months": 6},
            }
        }
    )
    assert data.settings.soonest_slot_tolerance_minutes == 30
    assert data.settings.prior_service_scope == "organization"
    assert data.settings.consent.max_age_months == 6
    assert data.settings.consent.scope.code == "treatment"  # untouched nested keys stay
    assert data.settings.established_lookback_years == 3


@pytest.mark.parametrize(
    ("overrides", "key_path"),
    [
        ({"settings": {"soonest_slot_tolerance_minutes": -5}}, "rules.settings.soonest_slot_tolerance_minutes"),
        ({"settings": {"soonest_slot_tolerance_minutes": "60"}}, "rules.settings.soonest_slot_tolerance_minutes"),
        ({"settings": {"established_lookback_yrs": 3}}, "rules.settings.established_lookback_yrs"),
        ({"settings": {"prior_service_scope": "group"}}, "rules.settings.prior_service_scope"),
        ({"settings": {"consent": {"max_age_months": 0}}}, "rules.settings.consent.max_age_months"),
        ({"settings": {"self_insured_markers": [{}]}}, "rules.settings.self_insured_markers[0].code"),
        ({"settings": {"remote_assessment_codes": ["G2251"]}}, "rules.settings.remote_assessment_codes[0]"),
        ({"typo": {}}, "rules.typo"),
        (
            {
                "taxonomy": [
                    {"prefix": "133V", "outcome": "maybe", "modifiers": [], "label": "x", "note": "x", "source": "x"}
                ]
            },
            "rules.taxonomy[0].outcome",
        ),
        (
            {
                "taxonomy": [
                    {
                        "prefix": "2251",
                        "outcome": "G2250",
                        "modifiers": ["GP"],
                        "label": "x",
                        "note": "x",
                        "source": "x",
                    }
                ]
            },
            "rules.taxonomy[0].as_of",
        ),
        (
            {
                "taxonomy": [
                    {
                        "prefix": "",
                        "outcome": "G2250",
                        "modifiers": [],
                        "label": "x",
                        "note": "x",
                        "source": "x",
                        "as_of": "2021-01-01",
                    }
                ]
            },
            "rules.taxonomy[0].outcome",
        ),
        (
            {
                "taxonomy": [
                    {
                        "prefix": "2251",
                        "outcome": "G2250",
                        "modifiers": ["GP", "95"],
                        "label": "x",
                        "note": "x",
                        "source": "x",
                        "as_of": "2021-01-01",
                    }
                ]
            },
            "rules.taxonomy[0].modifiers[1]",
        ),
        ({"payers": [{k: v for k, v in HUMANA.items() if k != "source"}]}, "rules.payers[0].source"),
        ({"payers": [{**HUMANA, "as_of": "2026-13-01"}]}, "rules.payers[0].as_of"),
        ({"payers": [{**HUMANA, "codes": {"G2250": "yes", "G2010": "covered"}}]}, "rules.payers[0].codes.G2250"),
        ({"payers": [HUMANA, HUMANA]}, "rules.payers[1].id"),
    ],
)
def test_bad_overrides_name_the_key_path(overrides: dict[str, Any], key_path: str) -> None:
    with pytest.raises(RulesDataError) as caught:
        load_rules_data(overrides)
    assert caught.value.key_path == key_path
    assert str(caught.value).startswith(key_path)


def test_non_mapping_overrides() -> None:
    with pytest.raises(RulesDataError) as caught:
        load_rules_data(["taxonomy"])  # type: ignore[arg-type]
    assert caught.value.key_path == "rules"


def test_a_changed_forbidden_list_is_checked_against_shipped_modifiers() -> None:
    with pytest.raises(RulesDataError) as caught:
        load_rules_data({"settings": {"forbidden_modifiers": ["GP"]}})
    index = [rule["prefix"] for rule in _json("data/taxonomy.json")["rules"]].index("2251")
    assert caught.value.key_path == f"taxonomy.json:rules[{index}].modifiers[0]"


# --- the config fragment ---------------------------------------------------------------------------------------------


def test_config_fragment_is_a_self_contained_schema() -> None:
    fragment = rules_schema_for_config()
    assert "$ref" not in json.dumps(fragment)
    config_schema = {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "type": "object",
        "properties": {"rules": fragment},
    }
    jsonschema.Draft202012Validator.check_schema(config_schema)
    validator = jsonschema.Draft202012Validator(config_schema)
    good = {"rules": {"payers": [HUMANA], "settings": {"consent": {"max_age_months": 6}}}}
    assert list(validator.iter_errors(good)) == []
    assert list(validator.iter_errors({"rules": {"settings": {"nope": 1}}}))
    fragment["properties"].clear()  # a fresh copy each call
    assert rules_schema_for_config()["properties"]
