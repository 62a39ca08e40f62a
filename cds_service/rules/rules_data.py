"""What billing staff change, loaded as data: the taxonomy -> code map, payer profiles and rule settings.

House style ("Data, not code, for what billing staff change"): the facts behind three criteria of
``billing-rules.md`` §3 live in package data files, each validated by its JSON Schema at load time:

* ``data/taxonomy.json`` -- criterion ``billing-practitioner-eligible``: NUCC provider taxonomy
  (``http://nucc.org/provider-taxonomy``) -> G2010 / G2250 / not-billable / review / verify (§1, §4);
* ``data/payers.json`` -- criterion ``payer-covers-code``: payer profiles (§5) and how a Coverage maps to one
  (§6 "Payer matching");
* ``data/rules.json`` -- the configurable defaults of §3, §6 and §7 (look-back windows, tolerances, consent codes,
  self-insured markers, neighbouring codes, forbidden modifiers, global surgical days, care-management and
  remote-monitoring codes, RHC/FQHC markers);
* ``data/rates.json`` -- the population audit's money (§8): a payment rate per code, with its source and as-of
  date (the audit estimates money from this table, never from the record).

The service config may override all four under its ``rules:`` key (shape: :func:`rules_schema_for_config`);
:func:`load_rules_data` merges the overrides and validates the merged documents with the same schemas.

Pure: reads package data only; no network, no clock.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import date
from functools import cache
from importlib import resources
from types import MappingProxyType
from typing import Any, Literal

import jsonschema

from cds_service.mappings import deep_merge
from cds_service.memo import BoundedMemo

__all__ = [
    "CodeRef",
    "CodingValue",
    "ConsentSettings",
    "Coverage",
    "Outcome",
    "PayerDirectory",
    "PayerMatchRule",
    "PayerProfile",
    "PolicyRef",
    "Rate",
    "RatesTable",
    "RuleSettings",
    "RulesData",
    "RulesDataError",
    "TaxonomyMap",
    "TaxonomyMatch",
    "TaxonomyRule",
    "load_rules_data",
    "rules_schema_for_config",
]

Outcome = Literal["G2010", "G2250", "not-billable", "review", "verify"]
Coverage = Literal["covered", "not-covered", "verify"]

NUCC_SYSTEM = "http://nucc.org/provider-taxonomy"

# Precedence between the codes of one practitioner (TaxonomyMap.classify); lower wins. See classify's docstring.
_EXPLICIT_PRECEDENCE: Mapping[str, int] = {"G2010": 0, "G2250": 1, "review": 2, "verify": 3, "not-billable": 4}
_DEFAULT_RULE_PRECEDENCE = 5


class RulesDataError(ValueError):
    """A data file or a ``rules:`` override is invalid.

    ``key_path`` names the offending element: ``rules.<...>`` for the service config's ``rules:`` key (e.g.
    ``rules.settings.soonest_slot_tolerance_minutes``, ``rules.taxonomy[0].outcome``), ``<file>.json:<...>`` for a
    shipped data file (a packaging bug), ``None`` when no single element is to blame.
    """

    def __init__(self, message: str, key_path: str | None = None) -> None:
        super().__init__(f"{key_path}: {message}" if key_path else message)
        self.message = message
        self.key_path = key_path


# --- taxonomy (billing-rules.md §4) ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class TaxonomyRule:
    """One practitioner type: a NUCC code or code prefix and the code it bills (§4). ``prefix == ""`` is the default."""

    prefix: str
    outcome: Outcome
    modifiers: tuple[str, ...]
    label: str
    note: str
    source: str = ""
    as_of: date | None = None
    # A therapy assistant type (§4, §7): the modifier (CQ/CO) the supervising therapist adds when it took part.
    assistant_modifier: str | None = None

    @property
    def is_assistant(self) -> bool:
        """A therapy assistant (PTA 2252*, OTA 224Z*): may not bill in their own name (billing-rules.md §4, §7)."""
        return self.assistant_modifier is not None

    @property
    def is_default(self) -> bool:
        """The catch-all rule: "Anything else: verify" (§4)."""
        return self.prefix == ""


@dataclass(frozen=True)
class TaxonomyMatch:
    """The rule that decided, and the practitioner's code it matched; ``code`` is ``None`` when no NUCC code is known
    (the default ``verify`` rule then applies)."""

    code: str | None
    rule: TaxonomyRule

    @property
    def outcome(self) -> Outcome:
        return self.rule.outcome

    @property
    def modifiers(self) -> tuple[str, ...]:
        return self.rule.modifiers


class TaxonomyMap:
    """NUCC taxonomy -> G2010 / G2250 / not-billable / review / verify (billing-rules.md §4, criterion
    ``billing-practitioner-eligible``). For one code the longest matching prefix wins."""

    system = NUCC_SYSTEM

    def __init__(self, rules: Iterable[TaxonomyRule]) -> None:
        self.rules: tuple[TaxonomyRule, ...] = tuple(rules)
        self._by_prefix: dict[str, TaxonomyRule] = {}
        for rule in self.rules:
            if rule.prefix in self._by_prefix:
                raise RulesDataError(f"duplicate taxonomy prefix {rule.prefix!r}")
            self._by_prefix[rule.prefix] = rule
        if "" not in self._by_prefix:
            raise RulesDataError("the taxonomy map needs a default rule (prefix '')")
        self.default: TaxonomyRule = self._by_prefix[""]
        self._classified: BoundedMemo[TaxonomyMatch] = BoundedMemo(4096)  # classify() is pure: answers kept

    def rule_for(self, code: str) -> TaxonomyRule:
        """The most specific rule for one NUCC code (longest prefix; the default when none matches)."""
        code = code.strip().upper()
        for length in range(len(code), 0, -1):
            rule = self._by_prefix.get(code[:length])
            if rule is not None:
                return rule
        return self.default

    def classify(self, codes: Iterable[str]) -> TaxonomyMatch:
        """Which code the practitioner bills, from all their NUCC codes (PractitionerRole.code/specialty,
        Practitioner.qualification).

        Each code is first matched to its most specific rule (longest prefix). A practitioner with several codes
        (several roles or specialties) is then decided by the rule that leaves the most room to bill in their own
        name, in this order:

        1. ``G2010`` -- E/M capability belongs to the person: an MD who is also listed as a PT bills G2010, and
           §1 asks to warn when G2250 is proposed for an E/M-capable practitioner;
        2. ``G2250`` -- a PT also listed with an unrecognised code is a PT; an audiologist who is also an SLP
           bills as the SLP (G2250 + GN);
        3. ``review`` -- a therapy assistant code: a billing path exists through the supervising therapist (CQ/CO);
        4. ``verify`` from an explicit entry (registered dietitian, MFT, mental health counselor): eligibility is
           unsettled, so the answer must stay open rather than become a silent no;
        5. ``not-billable`` -- the audiologist exclusion decides only when no other role leaves a door open;
        6. ``verify`` from the default rule -- an unrecognised code says nothing about the practitioner, so it never
           outweighs a recognised one.

        Ties (same rank) go to the code listed first, taken as the primary role. No code at all -> the default rule
        with ``code=None``. A bare string is taken as one code.
        """
        if isinstance(codes, str):
            codes = [codes]
        key = tuple(codes)
        return self._classified.get(key, lambda: self._classify(key))

    def _classify(self, codes: tuple[str, ...]) -> TaxonomyMatch:
        seen: list[str] = []
        for raw in codes:
            code = (raw or "").strip().upper()
            if code and code not in seen:
                seen.append(code)
        if not seen:
            return TaxonomyMatch(code=None, rule=self.default)
        matches = [TaxonomyMatch(code=code, rule=self.rule_for(code)) for code in seen]
        return min(matches, key=lambda m: _precedence(m.rule))  # min() keeps the first of equals

    def __iter__(self) -> Iterator[TaxonomyRule]:
        return iter(self.rules)


def _precedence(rule: TaxonomyRule) -> int:
    return _DEFAULT_RULE_PRECEDENCE if rule.is_default else _EXPLICIT_PRECEDENCE[rule.outcome]


# --- payers (billing-rules.md §5, §6 "Payer matching") -------------------------------------------------------------


@dataclass(frozen=True)
class CodingValue:
    """A coding as read from Coverage.type / Coverage.class (class.value as ``code``, class.name as ``display``)."""

    system: str | None
    code: str | None
    display: str | None = None


@dataclass(frozen=True)
class PayerMatchRule:
    """How a Coverage maps to a profile (§6): SOPT codes, payer identifiers, payer-name substrings."""

    sopt: tuple[str, ...] = ()
    names: tuple[str, ...] = ()
    identifiers: tuple[str, ...] = ()
    exclude_names: tuple[str, ...] = ()

    def matches_name(self, name: str) -> bool:
        """Case-insensitive substring; a name containing an excluded word never matches ("Medicare" but not
        "Advantage", §6)."""
        folded = name.casefold()
        if any(word.casefold() in folded for word in self.exclude_names):
            return False
        return any(word.casefold() in folded for word in self.names)

    def matches_identifier(self, value: str) -> bool:
        """Exact, case-insensitive: a substring rule on identifiers would let a short id match unrelated ones."""
        folded = value.strip().casefold()
        return any(folded == ident.strip().casefold() for ident in self.identifiers)


@dataclass(frozen=True)
class PayerProfile:
    """One payer of billing-rules.md §5, with the source and as-of date of what it states."""

    id: str
    name: str
    source: str
    as_of: date
    codes: Mapping[str, Coverage] = field(hash=False)
    self_insured: Mapping[str, Coverage] = field(hash=False)
    note: str
    match: PayerMatchRule = field(default_factory=PayerMatchRule)
    effective_from: Mapping[str, date] = field(default_factory=lambda: MappingProxyType({}), hash=False)

    def coverage_for(self, code: str, *, self_insured: bool, on: date | None = None) -> Coverage:
        """Coverage of ``code`` (criterion ``payer-covers-code``).

        When the plan is marked self-insured, the ``self_insured`` answer wins where one is given (§6 Aetna);
        otherwise the ``codes`` answer; codes the profile does not mention are ``verify``. With ``on`` (the service
        date), a date before the code's ``effective_from`` is ``not-covered``: the code did not exist yet (§1).
        """
        start = self.effective_from.get(code)
        if on is not None and start is not None and on < start:
            return "not-covered"
        if self_insured and code in self.self_insured:
            return self.self_insured[code]
        return self.codes.get(code, "verify")


class PayerDirectory:
    """Payer profiles in matching order, and the Coverage -> profile mapping of billing-rules.md §6."""

    def __init__(self, profiles: Iterable[PayerProfile], sopt_systems: Iterable[str]) -> None:
        self.profiles: tuple[PayerProfile, ...] = tuple(profiles)
        self.sopt_systems: tuple[str, ...] = tuple(sopt_systems)
        self._by_id = {profile.id: profile for profile in self.profiles}
        if len(self._by_id) != len(self.profiles):
            raise RulesDataError("duplicate payer profile id")

    def get(self, profile_id: str) -> PayerProfile | None:
        return self._by_id.get(profile_id)

    def __iter__(self) -> Iterator[PayerProfile]:
        return iter(self.profiles)

    def match(
        self,
        *,
        type_and_class: Iterable[CodingValue],
        payer_names: Iterable[str],
        payer_identifiers: Iterable[str],
    ) -> PayerProfile | None:
        """The profile of a Coverage, first that matches (§6 "Payer matching"):

        1. Source of Payment Typology codings on Coverage.type / class (1, 12, 121, 129 -> Medicare FFS; 11,
           111-119 -> Medicare Advantage). SOPT is hierarchical (1 > 12 > 121), so when a Coverage carries several
           SOPT codes that map to profiles, the most specific (longest) code decides, then the first listed;
        2. payer Organization identifiers (exact, case-insensitive), profiles in order;
        3. payer names (case-insensitive substring, honouring ``exclude_names``), profiles in order.

        ``None`` when nothing matches (the criterion is then ``unknown``).
        """
        best: tuple[int, PayerProfile] | None = None
        for coding in type_and_class:
            code = (coding.code or "").strip()
            if not code or coding.system not in self.sopt_systems:
                continue
            profile = next((p for p in self.profiles if code in p.match.sopt), None)
            if profile is not None and (best is None or len(code) > best[0]):
                best = (len(code), profile)
        if best is not None:
            return best[1]
        identifiers = [value for value in payer_identifiers if value and value.strip()]
        for profile in self.profiles:
            if any(profile.match.matches_identifier(value) for value in identifiers):
                return profile
        names = [name for name in payer_names if name and name.strip()]
        for profile in self.profiles:
            if any(profile.match.matches_name(name) for name in names):
                return profile
        return None

    def is_self_insured(self, codings: Iterable[CodingValue], markers: Sequence[Mapping[str, str]]) -> bool:
        """Whether Coverage.type / class marks the plan self-insured (§6 Aetna: "configurable marker").

        A marker matches a coding when every key it has agrees: ``system`` equal, ``code`` equal ignoring case,
        ``display_contains`` a case-insensitive substring of the display (``RuleSettings.self_insured_markers``).
        """
        codings = list(codings)
        for marker in markers:
            code, display = marker.get("code"), marker.get("display_contains")
            if code is None and display is None:
                continue
            for coding in codings:
                if "system" in marker and coding.system != marker["system"]:
                    continue
                if code is not None and (coding.code or "").strip().casefold() != code.casefold():
                    continue
                if display is not None and display.casefold() not in (coding.display or "").casefold():
                    continue
                return True
        return False


# --- settings (billing-rules.md §3, §6) -----------------------------------------------------------------------------


@dataclass(frozen=True)
class CodeRef:
    system: str
    code: str


@dataclass(frozen=True)
class PolicyRef:
    """An accepted Consent policy: a policy URI, or a policy-rule coding."""

    uri: str | None = None
    system: str | None = None
    code: str | None = None


@dataclass(frozen=True)
class ConsentSettings:
    """Criterion ``consent-documented`` (§2.7, §6 "Consent")."""

    max_age_months: int
    scope: CodeRef
    accepted_categories: tuple[CodeRef, ...]
    accepted_policies: tuple[PolicyRef, ...]


@dataclass(frozen=True)
class RuleSettings:
    """The configurable defaults of §3/§6; each field is described, with its rule, in ``schemas/rules.schema.json``."""

    established_lookback_years: int
    related_lookback_hours: int
    follow_up_business_hours: int
    resulting_service_hours: int
    soonest_slot_tolerance_minutes: int
    possibly_resulting_business_days: int
    prior_service_scope: Literal["practitioner", "organization"]
    consent: ConsentSettings
    self_insured_markers: tuple[Mapping[str, str], ...] = field(hash=False)
    submission_grouping_hours: int
    patient_view_lookback_days: int
    e_visit_codes: tuple[str, ...]
    check_in_codes: tuple[str, ...]
    remote_assessment_codes: tuple[str, ...]
    forbidden_modifiers: tuple[str, ...]
    # billing-rules.md §7 (rules added since): global surgical period, care management / remote monitoring, RHC/FQHC.
    global_period_lookback_days: int = 90
    global_days_by_cpt: Mapping[str, int] = field(default_factory=lambda: MappingProxyType({}), hash=False)
    care_management_codes: tuple[str, ...] = ()
    remote_monitoring_codes: tuple[str, ...] = ()
    rhc_fqhc_taxonomy_codes: tuple[str, ...] = ()
    rhc_fqhc_organizations: tuple[str, ...] = ()


# --- rates (billing-rules.md §8) ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Rate:
    """The payment for one code, with where it comes from (§8: money from a rates table with source and as-of date)."""

    code: str
    amount: float
    currency: str
    setting: str  # "non-facility" | "facility"
    source: str
    as_of: date
    estimate: bool = False
    basis: str = ""


class RatesTable:
    """Payment rates by code (``data/rates.json``, overridable under ``rules.rates``)."""

    def __init__(self, rates: Iterable[Rate] = ()) -> None:
        self.rates: tuple[Rate, ...] = tuple(rates)
        self._by_code = {rate.code: rate for rate in self.rates}
        if len(self._by_code) != len(self.rates):
            raise RulesDataError("duplicate rate code")

    def rate(self, code: str | None) -> Rate | None:
        return self._by_code.get(code.strip().upper()) if code else None

    def amount(self, code: str | None) -> float | None:
        """The payment for ``code``; None when the table has no rate for it (the audit then reports no amount)."""
        rate = self.rate(code)
        return rate.amount if rate is not None else None

    def __iter__(self) -> Iterator[Rate]:
        return iter(self.rates)


@dataclass(frozen=True)
class RulesData:
    taxonomy: TaxonomyMap
    payers: PayerDirectory
    settings: RuleSettings
    rates: RatesTable = field(default_factory=RatesTable, hash=False)


# --- loading ---------------------------------------------------------------------------------------------------------

# override key -> data/schema file stem
_FILES = {"taxonomy": "taxonomy", "payers": "payers", "settings": "rules", "rates": "rates"}
# list key inside the file, identity key
_LISTS = {"taxonomy": ("rules", "prefix"), "payers": ("profiles", "id"), "rates": ("rates", "code")}


def load_rules_data(overrides: Mapping[str, Any] | None = None) -> RulesData:
    """Taxonomy map, payer directory and settings from the package data, with the config's ``rules:`` overrides.

    Overrides (shape: :func:`rules_schema_for_config`): ``taxonomy`` rules replace the rule with the same prefix or
    are added; ``payers`` profiles replace the profile with the same id or are appended (matching order, §6);
    ``rates`` replace the rate of the same code or are added (§8);
    ``settings`` is a partial ``rules.json``, merged key by key (nested objects too; lists are replaced).
    The merged documents are validated by the same schemas; any error raises :class:`RulesDataError` naming the
    key path. The load without overrides is cached.
    """
    if not overrides:
        return _default_rules_data()
    return _build(overrides)


@cache
def _default_rules_data() -> RulesData:
    return _build({})


def rules_schema_for_config() -> dict[str, Any]:
    """JSON Schema fragment for the service config's ``rules:`` key (the overrides of :func:`load_rules_data`).

    Self-contained (no ``$ref``), so the config schema can embed it under ``properties.rules``. A fresh copy each
    call.
    """
    return copy.deepcopy(_config_fragment())


@cache
def _config_fragment() -> dict[str, Any]:
    taxonomy, payers, rules, rates = (_schema(name) for name in ("taxonomy", "payers", "rules", "rates"))
    settings = _partial(_inline(_strip_meta(rules), rules.get("$defs", {})))
    settings["description"] = "Partial rules.json: " + rules["description"]
    return {
        "description": "Overrides of the shipped rule data (billing-rules.md §4, §5, §6): taxonomy, payers, settings.",
        "type": "object",
        "additionalProperties": False,
        "properties": {
            "taxonomy": {
                "description": "NUCC taxonomy rules; each replaces the shipped rule with the same prefix or is added.",
                "type": "array",
                "items": _inline(taxonomy["$defs"]["rule"], taxonomy["$defs"]),
            },
            "payers": {
                "description": "Payer profiles; each replaces the shipped profile with the same id or is appended.",
                "type": "array",
                "items": _inline(payers["$defs"]["profile"], payers["$defs"]),
            },
            "settings": settings,
            "rates": {
                "description": "Payment rates of the population audit (billing-rules.md §8); each replaces the "
                               "shipped rate of the same code or is added.",
                "type": "array",
                "items": _inline(rates["$defs"]["rate"], rates["$defs"]),
            },
        },
    }


def _build(overrides: Mapping[str, Any]) -> RulesData:
    if not isinstance(overrides, Mapping):
        raise RulesDataError("must be a mapping", "rules")
    if overrides:
        _check(_config_validator(), overrides, lambda path: "rules" + _path_str(path))

    docs: dict[str, Any] = {}
    for key, stem in _FILES.items():
        doc = _read(stem)
        _check(_validator(stem), doc, _file_locator(stem))
        docs[key] = doc

    origins: dict[str, list[str | None]] = {}
    for key, (list_key, identity) in _LISTS.items():
        merged, origin = _merge_list(docs[key][list_key], overrides.get(key, []), key, identity)
        docs[key] = {**docs[key], list_key: merged}
        origins[key] = origin
        stem = _FILES[key]
        _check(_validator(stem), docs[key], _list_locator(stem, list_key, origin))
    settings_override = overrides.get("settings", {})
    docs["settings"] = deep_merge(docs["settings"], settings_override)
    shipped_settings = _file_locator("rules")
    _check(
        _validator("rules"),
        docs["settings"],
        lambda path: (
            "rules.settings" + _path_str(path) if path and path[0] in settings_override else shipped_settings(path)
        ),
    )

    settings = _settings(docs["settings"])
    taxonomy = TaxonomyMap(_taxonomy_rule(rule) for rule in docs["taxonomy"]["rules"])
    forbidden = set(settings.forbidden_modifiers)
    locate = _list_locator("taxonomy", "rules", origins["taxonomy"])
    for index, rule in enumerate(taxonomy.rules):
        for position, modifier in enumerate(rule.modifiers):
            if modifier in forbidden:
                # §2.8/§2.9: telehealth, surgical/anesthesia modifiers and 25 never belong on G2250/G2010.
                raise RulesDataError(
                    f"modifier {modifier!r} never belongs on G2250/G2010 (forbidden_modifiers)",
                    locate(["rules", index, "modifiers", position]),
                )
    payers = PayerDirectory(
        (_payer_profile(profile) for profile in docs["payers"]["profiles"]), docs["payers"]["sopt_systems"]
    )
    rates = RatesTable(_rate(rate) for rate in docs["rates"]["rates"])
    return RulesData(taxonomy=taxonomy, payers=payers, settings=settings, rates=rates)


def _merge_list(shipped: list[Any], extra: list[Any], key: str, identity: str) -> tuple[list[Any], list[str | None]]:
    """Shipped entries with the override entries replacing those of the same identity; new taxonomy rules go first
    (order is irrelevant there: longest prefix wins), new payer profiles last (matching order, §6). Returns the
    merged list and, per entry, the override key path it came from (``None`` = shipped)."""
    merged = list(shipped)
    origin: list[str | None] = [None] * len(merged)
    added: list[Any] = []
    added_origin: list[str | None] = []
    seen: set[str] = set()
    for index, entry in enumerate(extra):
        where = f"rules.{key}[{index}]"
        value = entry[identity]
        if value in seen:
            raise RulesDataError(f"duplicate {identity} {value!r} in the overrides", f"{where}.{identity}")
        seen.add(value)
        position = next((i for i, item in enumerate(merged) if item[identity] == value), None)
        if position is None:
            added.append(entry)
            added_origin.append(where)
        else:
            merged[position] = entry
            origin[position] = where
    if key == "taxonomy":
        return added + merged, added_origin + origin  # rates: order is irrelevant (by code), appended
    return merged + added, origin + added_origin


def _settings(doc: Mapping[str, Any]) -> RuleSettings:
    consent = doc["consent"]
    return RuleSettings(
        established_lookback_years=doc["established_lookback_years"],
        related_lookback_hours=doc["related_lookback_hours"],
        follow_up_business_hours=doc["follow_up_business_hours"],
        resulting_service_hours=doc["resulting_service_hours"],
        soonest_slot_tolerance_minutes=doc["soonest_slot_tolerance_minutes"],
        possibly_resulting_business_days=doc["possibly_resulting_business_days"],
        prior_service_scope=doc["prior_service_scope"],
        consent=ConsentSettings(
            max_age_months=consent["max_age_months"],
            scope=CodeRef(**consent["scope"]),
            accepted_categories=tuple(CodeRef(**c) for c in consent["accepted_categories"]),
            accepted_policies=tuple(PolicyRef(**p) for p in consent["accepted_policies"]),
        ),
        self_insured_markers=tuple(MappingProxyType(dict(m)) for m in doc["self_insured_markers"]),
        submission_grouping_hours=doc["submission_grouping_hours"],
        patient_view_lookback_days=doc["patient_view_lookback_days"],
        e_visit_codes=tuple(doc["e_visit_codes"]),
        check_in_codes=tuple(doc["check_in_codes"]),
        remote_assessment_codes=tuple(doc["remote_assessment_codes"]),
        forbidden_modifiers=tuple(doc["forbidden_modifiers"]),
        global_period_lookback_days=doc["global_period_lookback_days"],
        global_days_by_cpt=MappingProxyType(dict(doc["global_days_by_cpt"])),
        care_management_codes=tuple(doc["care_management_codes"]),
        remote_monitoring_codes=tuple(doc["remote_monitoring_codes"]),
        rhc_fqhc_taxonomy_codes=tuple(doc["rhc_fqhc_taxonomy_codes"]),
        rhc_fqhc_organizations=tuple(doc["rhc_fqhc_organizations"]),
    )


def _taxonomy_rule(doc: Mapping[str, Any]) -> TaxonomyRule:
    return TaxonomyRule(
        prefix=doc["prefix"],
        outcome=doc["outcome"],
        modifiers=tuple(doc["modifiers"]),
        label=doc["label"],
        note=doc["note"],
        source=doc["source"],
        as_of=date.fromisoformat(doc["as_of"]) if "as_of" in doc else None,
        assistant_modifier=doc.get("assistant_modifier"),
    )


def _rate(doc: Mapping[str, Any]) -> Rate:
    return Rate(
        code=doc["code"],
        amount=float(doc["amount"]),
        currency=doc["currency"],
        setting=doc["setting"],
        source=doc["source"],
        as_of=date.fromisoformat(doc["as_of"]),
        estimate=bool(doc.get("estimate", False)),
        basis=doc.get("basis", ""),
    )


def _payer_profile(doc: Mapping[str, Any]) -> PayerProfile:
    match = doc["match"]
    return PayerProfile(
        id=doc["id"],
        name=doc["name"],
        source=doc["source"],
        as_of=date.fromisoformat(doc["as_of"]),
        codes=MappingProxyType(dict(doc["codes"])),
        self_insured=MappingProxyType(dict(doc.get("self_insured", {}))),
        note=doc["note"],
        match=PayerMatchRule(
            sopt=tuple(match["sopt"]),
            names=tuple(match["names"]),
            identifiers=tuple(match["identifiers"]),
            exclude_names=tuple(match.get("exclude_names", ())),
        ),
        effective_from=MappingProxyType(
            {code: date.fromisoformat(day) for code, day in doc.get("effective_from", {}).items()}
        ),
    )


# --- JSON and JSON Schema plumbing ----------------------------------------------------------------------------------


def _read(stem: str) -> Any:
    return json.loads(resources.files("cds_service").joinpath(f"data/{stem}.json").read_text("utf-8"))


@cache
def _schema(stem: str) -> dict[str, Any]:
    return json.loads(resources.files("cds_service").joinpath(f"schemas/{stem}.schema.json").read_text("utf-8"))


def _make_validator(schema: Mapping[str, Any]) -> jsonschema.protocols.Validator:
    cls = jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator)
    cls.check_schema(schema)
    return cls(schema, format_checker=cls.FORMAT_CHECKER)


@cache
def _validator(stem: str) -> jsonschema.protocols.Validator:
    return _make_validator(_schema(stem))


@cache
def _config_validator() -> jsonschema.protocols.Validator:
    return _make_validator({"$schema": "https://json-schema.org/draft/2020-12/schema", **_config_fragment()})


def _strip_meta(schema: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in schema.items() if k not in ("$schema", "$id", "$defs", "title")}


def _inline(node: Any, defs: Mapping[str, Any]) -> Any:
    """Replace local ``#/$defs/...`` references by their targets (the fragment is embedded elsewhere)."""
    if isinstance(node, list):
        return [_inline(item, defs) for item in node]
    if not isinstance(node, Mapping):
        return node
    if "$ref" in node:
        ref = node["$ref"]
        if not ref.startswith("#/$defs/"):
            raise ValueError(f"cannot inline {ref}")
        target = _inline(defs[ref.removeprefix("#/$defs/")], defs)
        return {**target, **{k: _inline(v, defs) for k, v in node.items() if k != "$ref"}}
    return {k: _inline(v, defs) for k, v in node.items()}


def _partial(schema: Mapping[str, Any]) -> dict[str, Any]:
    """The same object schema with no required keys, recursively for nested objects (not inside arrays)."""
    result = {k: v for k, v in schema.items() if k != "required"}
    if "properties" in result:
        result["properties"] = {
            name: _partial(sub) if isinstance(sub, Mapping) and "properties" in sub else sub
            for name, sub in result["properties"].items()
        }
    return result


def _path_str(path: Iterable[Any]) -> str:
    return "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in path)


def _file_locator(stem: str) -> Callable[[Sequence[Any]], str]:
    return lambda path: f"{stem}.json:" + (_path_str(path).lstrip(".") or "(root)")


def _list_locator(stem: str, list_key: str, origin: Sequence[str | None]) -> Callable[[Sequence[Any]], str]:
    """Map a path in a merged document back to the override entry it came from, or to the shipped file."""

    def locate(path: Sequence[Any]) -> str:
        if len(path) >= 2 and path[0] == list_key and isinstance(path[1], int) and path[1] < len(origin):
            where = origin[path[1]]
            if where is not None:
                return where + _path_str(path[2:])
        return f"{stem}.json:" + (_path_str(path).lstrip(".") or "(root)")

    return locate


def _leaf(error: jsonschema.ValidationError) -> jsonschema.ValidationError:
    # anyOf/oneOf/allOf report on the parent; the deepest sub-error names the element to fix.
    while error.context:
        error = max(error.context, key=lambda e: len(e.absolute_path))
    return error


def _error_path(error: jsonschema.ValidationError) -> list[Any]:
    path = list(error.absolute_path)
    if error.validator == "required" and isinstance(error.instance, Mapping):
        missing = [name for name in error.validator_value if name not in error.instance]
        if missing:
            path.append(missing[0])
    elif error.validator == "additionalProperties" and isinstance(error.instance, Mapping):
        known = error.schema.get("properties", {})
        extra = sorted(name for name in error.instance if name not in known)
        if extra:
            path.append(extra[0])
    return path


def _check(validator: jsonschema.protocols.Validator, document: Any, locate: Callable[[Sequence[Any]], str]) -> None:
    errors = [_leaf(error) for error in validator.iter_errors(document)]
    if not errors:
        return
    error = min(errors, key=lambda e: (-len(_error_path(e)), _path_str(_error_path(e))))
    message = error.message
    if error.validator == "additionalProperties":
        message = "unknown key"
    elif error.validator == "required":
        message = "is required"
    raise RulesDataError(message, locate(_error_path(error)))
