"""Routing: which pipeline runs on a series and where its results go, from ordered YAML rules.

Rules are tried in file order and the first enabled rule whose matchers all hold wins. A series
no rule matches goes to `default_rule` when there is one and otherwise gets no job (it stays in
the spool). Every decision carries the reasons the rules tried before the winner did not match
(`radgate rules check` shows them for files on disk).

Attributes: a rule sees the header of one instance of the series (study- and series-level
attributes alike). A multi-valued attribute (ImageType) passes a test when one of its values does.
An empty value counts as absent: a Type 2 attribute sent empty carries no information.

Scope: `series` runs the pipeline once for every series the rule wins. `study` runs it once per
study, on the series the pipeline prefers among those the rule won (`plugin.route.selection`: its
declared requirements reject series with a reason, its preference ranks the rest); when it
rejects them all, the study gets no job for that rule. The shipped rules are study-scope, so a
study as a PACS sends it (scout, several reconstructions, dose report) gets one result set per
pipeline. Scope changes how often and on what the pipeline runs, never which attributes a rule sees.

Paused: an operator may pause a rule in the web console (the store's ``paused`` table, read each
time a study is routed); it is then skipped with the reason "paused", as a disabled rule is,
until it is resumed.

Requires: a rule's `requires` names a series it needs (study scope: the job runs on the one the
pipeline prefers among those that have it, when any does) or the patient's prior study; its job
then waits (`plugin.route.requires`).

Destinations: a rule without `destinations` sends to every configured destination; `[]`, or no
destinations configured at all, keeps results locally (in data_dir) only. The sending source is
not a destination: where a study came from is not part of the configuration.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import pydicom
from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataset import Dataset

from dicom_io.selection import ANY_SERIES, SeriesWanted
from plugin.config import (
    DEFAULT_RULE_NAME,
    Config,
    ConfigError,
    Matcher,
    MatchGroup,
    RequiredSeries,
    Requirements,
    Rule,
    RuleAction,
)
from plugin.route.selection import Header, Ranked, SeriesInfo, chosen, number, rank_series, values

SeriesLookup = Callable[[str], SeriesWanted]
"""A pipeline name -> the series it wants (its `series` declaration)."""

Scope = Literal["series", "study"]

_CHEST_WORDS = "CHEST|THORAX|LUNG|THX"
_BRAIN_WORDS = "BRAIN|HEAD|NEURO|SKULL|MPRAGE"  # MPRAGE: the neuro T1 sequence, often without body part


def _anatomy_rule(name: str, modality: str, body_parts: str, words: str, pipeline: str) -> Rule:
    """A default rule: the modality, and the anatomy in BodyPartExamined or a description; study
    scope, so the pipeline runs once per study on the series it prefers."""
    return Rule.model_validate(
        {
            "name": name,
            "scope": "study",
            "match": {"Modality": {"equals": modality}},
            "any_of": [
                {"BodyPartExamined": {"regex": body_parts, "ignore_case": True}},
                {"StudyDescription": {"regex": words, "ignore_case": True}},
                {"SeriesDescription": {"regex": words, "ignore_case": True}},
            ],
            "pipeline": pipeline,
        }
    )


DEFAULT_RULES: tuple[Rule, ...] = (
    _anatomy_rule("chest-ct", "CT", "CHEST|THORAX|LUNG", _CHEST_WORDS, "ct-lung"),
    _anatomy_rule("brain-mr", "MR", "BRAIN|HEAD|SKULL", _BRAIN_WORDS, "mr-brain"),
)
"""The rules used when the configuration has no `rules` key (which series, minimum slices etc. is
the pipeline's `series` declaration). A default rule whose pipeline is not installed is left out,
with a note."""

# Attributes whose values are never shown in an explanation (who the patient is, or when/where).
_IDENTIFYING_PREFIXES = ("Patient", "OtherPatient", "IssuerOfPatient", "Institution")
_TECHNICAL_PATIENT_KEYWORDS = frozenset({"PatientPosition", "PatientOrientation"})
_IDENTIFYING_VRS = frozenset({"PN", "DA", "DT"})


@dataclass(frozen=True)
class RuleSet:
    """The rules in force: validated against the installed pipelines, defaults resolved."""

    rules: tuple[Rule, ...]
    default: RuleAction | None
    all_destinations: tuple[str, ...]
    override: tuple[str, ...] | None = None
    notes: tuple[str, ...] = ()
    series_lookup: SeriesLookup | None = None
    paused: frozenset[str] = frozenset()  # rules an operator paused (the store's, at routing time)

    def series_wanted(self, pipeline: str) -> SeriesWanted:
        """The series `pipeline` wants; the common order (`ANY_SERIES`) when it is not known here."""
        return ANY_SERIES if self.series_lookup is None else self.series_lookup(pipeline)

    def destinations_for(self, action: RuleAction) -> tuple[str, ...]:
        """The override when given, else the action's own list, else every configured destination."""
        if self.override is not None:
            return self.override
        return tuple(action.destinations) if action.destinations is not None else self.all_destinations

    def requirements(self, rule: str | None) -> Requirements | None:
        """What the rule named ``rule`` requires before its job runs; None for none (or no such rule)."""
        return next((r.requires for r in self.rules if r.name == rule), None)

    def default_action(self) -> Action | None:
        """What happens to a series no rule matches; None: it gets no job."""
        if self.default is None:
            return None
        return Action(DEFAULT_RULE_NAME, self.default.pipeline, self.destinations_for(self.default), "series")


@dataclass(frozen=True)
class Action:
    """What to do with a series: run `pipeline` and send its results to `destinations` (empty: keep)."""

    rule: str
    pipeline: str
    destinations: tuple[str, ...]
    scope: Scope


@dataclass(frozen=True)
class RuleOutcome:
    """A rule that did not match a series, with every test that failed and the value it saw."""

    rule: str
    reasons: tuple[str, ...]


@dataclass(frozen=True)
class RouteDecision:
    """The winning action (None: no rule and no default, so no job) and why earlier rules lost."""

    action: Action | None
    not_matched: tuple[RuleOutcome, ...]

    @property
    def rule(self) -> str | None:
        return None if self.action is None else self.action.rule

    @property
    def pipeline(self) -> str | None:
        return None if self.action is None else self.action.pipeline

    @property
    def destinations(self) -> tuple[str, ...]:
        return () if self.action is None else self.action.destinations


@dataclass(frozen=True)
class PlannedJob:
    """One pipeline run: the action and the series it runs on."""

    action: Action
    series_uid: str


@dataclass(frozen=True)
class Selection:
    """A study-scope rule's choice: the series it won, ranked by its pipeline (`plugin.route.selection`)."""

    rule: str
    pipeline: str
    ranking: tuple[Ranked, ...]

    @property
    def series_uid(self) -> str | None:
        return chosen(self.ranking)


@dataclass(frozen=True)
class StudyPlan:
    """Per-series decisions (by SeriesInstanceUID), each study-scope rule's selection, and the jobs
    they add up to for the study."""

    decisions: Mapping[str, RouteDecision]
    selections: tuple[Selection, ...]
    jobs: tuple[PlannedJob, ...]


def usable_pipelines(config: Config, available_pipelines: Collection[str]) -> set[str]:
    """The pipelines installed (``available_pipelines``, from the registry) and the names the config's
    `pipelines` gives those (their `kind` installed): what a rule, or a person, may name."""
    return set(available_pipelines) | {
        name for name, configured in config.pipelines.items() if configured.kind in available_pipelines
    }


def validate_rules(
    config: Config,
    available_pipelines: Collection[str],
    destinations: Sequence[str] | None = None,
    series_lookup: SeriesLookup | None = None,
) -> RuleSet:
    """The rules in force, or `ConfigError` naming the rule whose pipeline is not installed.

    Called at start by the node and by `radgate rules check`: the config model cannot know the
    installed pipelines. The names in the config's `pipelines` are available when the pipeline
    they are built on (their `kind`) is. Disabled rules are not checked, so a rule can wait for its
    pipeline. `destinations` (names from the config) replaces every rule's destinations, e.g. for a
    test run. `series_lookup` gives each pipeline's series declaration (study-scope rules choose
    with it); it is asked here for every pipeline a study-scope rule names, so a declaration that
    cannot be had fails at start. None: the common order for every pipeline (`ANY_SERIES`).
    """
    available = usable_pipelines(config, available_pipelines)
    notes: list[str] = []
    if config.rules is None:
        rules = tuple(r for r in DEFAULT_RULES if r.pipeline in available)
        notes = [
            f"default rule {r.name} left out: pipeline {r.pipeline!r} is not installed"
            for r in DEFAULT_RULES
            if r.pipeline not in available
        ]
    else:
        rules = tuple(config.rules)
    installed = ", ".join(sorted(available)) or "none"
    named: list[tuple[str, RuleAction]] = [(r.name, r) for r in rules if r.enabled]
    if config.default_rule is not None:
        named.append((DEFAULT_RULE_NAME, config.default_rule))
    for owner, action in named:
        if action.pipeline not in available:
            raise ConfigError(
                f"rule {owner!r}: unknown pipeline {action.pipeline!r} (installed: {installed})"
            )
    override = None if destinations is None else tuple(destinations)
    for name in override or ():
        if name not in config.destinations:
            known = ", ".join(config.destinations) or "none are configured"
            raise ConfigError(f"destination override {name!r} is not configured (known: {known})")
    if series_lookup is not None:
        for rule in rules:
            if rule.enabled and rule.scope == "study":
                series_lookup(rule.pipeline)
    return RuleSet(
        rules=rules,
        default=config.default_rule,
        all_destinations=tuple(config.destinations),
        override=override,
        notes=tuple(notes),
        series_lookup=series_lookup,
    )


def _is_identifying(keyword: str) -> bool:
    if keyword in _TECHNICAL_PATIENT_KEYWORDS:
        return False
    tag = tag_for_keyword(keyword)
    return keyword.startswith(_IDENTIFYING_PREFIXES) or (
        tag is not None and dictionary_VR(tag) in _IDENTIFYING_VRS
    )


def _same(value: Any, wanted: str | int | float, ignore_case: bool) -> bool:
    if not isinstance(wanted, str):
        return number(value) == wanted
    text = str(value).strip()
    return text.casefold() == wanted.casefold() if ignore_case else text == wanted


def _holds(matcher: Matcher, value: Any) -> bool:
    """One value against a value test (not present/absent, which look at the attribute as a whole)."""
    if matcher.range is not None:
        x = number(value)
        low, high = matcher.range.min, matcher.range.max
        return x is not None and (low is None or x >= low) and (high is None or x <= high)
    if matcher.pattern is not None:
        return matcher.pattern.search(str(value)) is not None
    wanted = [matcher.equals] if matcher.equals is not None else matcher.one_of or []
    return any(_same(value, w, matcher.ignore_case) for w in wanted)


def _describe(matcher: Matcher) -> str:
    case = " (ignore case)" if matcher.ignore_case else ""
    if matcher.equals is not None:
        return f"equals {matcher.equals!r}{case}"
    if matcher.one_of is not None:
        return f"one of {matcher.one_of!r}{case}"
    if matcher.regex is not None:
        return f"regex {matcher.regex!r}{case}"
    if matcher.range is not None:
        low, high = matcher.range.min, matcher.range.max
        return f"range [{'-inf' if low is None else low}, {'inf' if high is None else high}]"
    return "present" if matcher.present else "absent"


def describe_tests(group: MatchGroup) -> list[str]:
    """A match group's tests in words, one per attribute, e.g. ``Modality equals 'CT'``."""
    return [f"{keyword} {_describe(matcher)}" for keyword, matcher in group.items()]


def _shown(keyword: str, values: list[Any]) -> str:
    if not values:
        return "absent"
    if _is_identifying(keyword):
        return "a value (not shown: identifying attribute)"
    text = "\\".join(str(v) for v in values)
    return repr(text if len(text) <= 64 else text[:61] + "...")


def _miss(keyword: str, matcher: Matcher, header: Header) -> str | None:
    """None when the test holds, else why not: the test and the value seen."""
    seen = values(header.get(keyword))
    if matcher.present:
        ok = bool(seen)
    elif matcher.absent:
        ok = not seen
    else:
        ok = any(_holds(matcher, v) for v in seen)
    return None if ok else f"{keyword}: wanted {_describe(matcher)}, got {_shown(keyword, seen)}"


def _group_misses(group: MatchGroup, header: Header) -> list[str]:
    return [reason for keyword, m in group.items() if (reason := _miss(keyword, m, header)) is not None]


def meets(header: Header, required: RequiredSeries, only: Collection[str] | None = None) -> bool:
    """Whether a series (its header) is the one a rule requires; ``only``: test these keywords only
    (what a C-FIND answer carries), the others pass."""
    group = {k: m for k, m in required.match.items() if only is None or k in only}
    return not _group_misses(group, header)


def describe_required(required: RequiredSeries) -> str:
    """The required series in words, e.g. ``a series with SliceThickness range [-inf, 1.5]``."""
    return "a series with " + ", ".join(describe_tests(required.match))


def describe_requirements(requires: Requirements | None) -> list[str]:
    """What a rule requires before its job runs, in words, one line per requirement."""
    if requires is None:
        return []
    lines = []
    if (series := requires.series) is not None:
        pulled = f", pulled from {series.pull_from}" if series.pull_from else ""
        after = "runs on the series there are" if series.after_wait == "run" else "skipped"
        lines.append(
            f"{describe_required(series)}{pulled}: waits up to {series.wait_minutes:g} min, then {after}"
        )
    if (prior := requires.prior) is not None:
        results = "delivered" if prior.deliver else "kept locally"
        lines.append(
            f"the prior study from {prior.source} (same {', '.join(prior.same)}, within {prior.max_age_days}"
            f" days; its results {results}): waits up to {prior.wait_minutes:g} min, then runs without"
        )
    return lines


def _why_not(rule: Rule, header: Header, paused: Collection[str]) -> tuple[str, ...]:
    """Every reason the rule does not match the header; empty when it matches.

    The any_of groups are detailed only when `match` held, so the first thing to fix comes first.
    """
    if not rule.enabled:
        return ("disabled",)
    if rule.name in paused:
        return ("paused",)
    reasons = _group_misses(rule.match, header)
    groups = [_group_misses(group, header) for group in rule.any_of]
    if groups and all(groups):
        if reasons:
            reasons.append(f"any_of: none of its {len(groups)} groups held")
        else:
            reasons += [f"any_of[{i}] {r}" for i, misses in enumerate(groups, 1) for r in misses]
    return tuple(reasons)


def route_series(header: Header, rules: RuleSet) -> RouteDecision:
    """The first rule that matches the series header wins; else the default rule; else no job."""
    lost: list[RuleOutcome] = []
    for rule in rules.rules:
        reasons = _why_not(rule, header, rules.paused)
        if not reasons:
            action = Action(rule.name, rule.pipeline, rules.destinations_for(rule), rule.scope)
            return RouteDecision(action, tuple(lost))
        lost.append(RuleOutcome(rule.name, reasons))
    return RouteDecision(rules.default_action(), tuple(lost))


def plan_study(series: Sequence[SeriesInfo], rules: RuleSet) -> StudyPlan:
    """Route every series of a study and turn the decisions into jobs (see Scope in the module doc)."""
    decisions = {s.series_uid: route_series(s.header, rules) for s in series}
    jobs: list[PlannedJob] = []
    won: dict[str, tuple[Action, list[SeriesInfo]]] = {}  # study-scope rule -> the series it won
    for s in series:
        action = decisions[s.series_uid].action
        if action is None:
            continue
        if action.scope == "series":
            jobs.append(PlannedJob(action, s.series_uid))
        else:
            won.setdefault(action.rule, (action, []))[1].append(s)
    selections = []
    for rule, (action, members) in won.items():
        requires = rules.requirements(rule)
        if requires is not None and requires.series is not None:  # the required series when there
            members = [s for s in members if meets(s.header, requires.series)] or members
        ranking = rank_series(members, rules.series_wanted(action.pipeline))
        selection = Selection(rule, action.pipeline, ranking)
        selections.append(selection)
        if selection.series_uid is not None:
            jobs.append(PlannedJob(action, selection.series_uid))
    return StudyPlan(decisions, tuple(selections), tuple(jobs))


# --- the dry run: `radgate rules check` ------------------------------------------------------------


def _files(paths: Sequence[Path]) -> Iterator[Path]:
    for path in paths:
        if path.is_dir():
            yield from sorted(f for f in path.rglob("*") if f.is_file())
        else:
            yield path


def _series_number(header: Header) -> int | None:
    found = number(header.get("SeriesNumber"))
    return None if found is None else int(found)


def read_series(paths: Sequence[Path]) -> tuple[dict[str, list[SeriesInfo]], int]:
    """Series under `paths` by StudyInstanceUID (headers only, in SeriesNumber order), and how many
    files were skipped (not DICOM, unreadable, or without study/series UID, e.g. a DICOMDIR)."""
    first: dict[tuple[str, str], Dataset] = {}
    counts: dict[tuple[str, str], int] = {}
    skipped = 0
    for file in _files(paths):
        try:
            ds = pydicom.dcmread(file, stop_before_pixels=True)
        except Exception:  # a broken or foreign file is counted, it never stops the dry run
            skipped += 1
            continue
        study, series = ds.get("StudyInstanceUID"), ds.get("SeriesInstanceUID")
        if not study or not series:
            skipped += 1
            continue
        key = (str(study), str(series))
        first.setdefault(key, ds)
        counts[key] = counts.get(key, 0) + 1

    def order(key: tuple[str, str]) -> tuple[str, bool, int, str]:
        found = _series_number(first[key])
        return key[0], found is None, found or 0, key[1]

    studies: dict[str, list[SeriesInfo]] = {}
    for key in sorted(first, key=order):
        studies.setdefault(key[0], []).append(SeriesInfo(key[1], first[key], counts[key]))
    return studies, skipped


def _action_json(action: Action | None) -> dict[str, Any] | None:
    return None if action is None else asdict(action)


def study_report(study_uid: str, series: Sequence[SeriesInfo], rules: RuleSet) -> dict[str, Any]:
    """How the rules route one study's series, JSON-ready: per series the winning action and why
    the rules before it did not match, each study-scope rule's ranking, the jobs they add up to.
    UIDs, technical attributes and descriptions only, never patient data."""
    plan = plan_study(series, rules)
    return {
        "study_uid": study_uid,
        "series": [
            {
                "series_uid": s.series_uid,
                "series_number": _series_number(s.header),
                "modality": str(s.header.get("Modality") or ""),
                "series_description": str(s.header.get("SeriesDescription") or ""),
                "instances": s.instances,
                "action": _action_json(plan.decisions[s.series_uid].action),
                "not_matched": [asdict(o) for o in plan.decisions[s.series_uid].not_matched],
            }
            for s in series
        ],
        "selections": [
            {
                "rule": selection.rule,
                "pipeline": selection.pipeline,
                "ranking": [asdict(r) for r in selection.ranking],
            }
            for selection in plan.selections
        ],
        "jobs": [
            {
                **asdict(job.action),
                "series_uid": job.series_uid,
                "requires": describe_requirements(rules.requirements(job.action.rule)),
            }
            for job in plan.jobs
        ],
    }


def dry_run(paths: Sequence[Path], rules: RuleSet) -> dict[str, Any]:
    """Route every series found under `paths` without running anything; a JSON-ready report
    (`study_report` per study) holding UIDs, technical attributes and descriptions only."""
    studies, skipped = read_series(paths)
    return {
        "rules": [r.name for r in rules.rules],
        "default_rule": _action_json(rules.default_action()),
        "notes": list(rules.notes),
        "skipped_files": skipped,
        "studies": [study_report(study_uid, series, rules) for study_uid, series in studies.items()],
    }


def _where(destinations: Sequence[str]) -> str:
    return f"results to {', '.join(destinations)}" if destinations else "results kept locally"


def format_report(report: Mapping[str, Any]) -> str:
    """The dry-run report as text for a terminal: per series the winner, and why the others lost."""
    default = report["default_rule"]
    lines = [
        f"rules, in order: {', '.join(report['rules']) or 'none'}",
        "default_rule: "
        + (f"pipeline {default['pipeline']}, {_where(default['destinations'])}" if default else "none"),
        *(f"note: {note}" for note in report["notes"]),
    ]
    if report["skipped_files"]:
        lines.append(f"{report['skipped_files']} file(s) skipped: not DICOM, unreadable or no series UID")
    for study in report["studies"]:
        lines += ["", f"study {study['study_uid']}"]
        for s in study["series"]:
            number = "" if s["series_number"] is None else f" #{s['series_number']}"
            lines.append(
                f"  series {s['series_uid']}{number} {s['modality']} {s['series_description']!r}"
                f" ({s['instances']} instances)"
            )
            action = s["action"]
            lines.append(
                f"    -> {action['rule']}: pipeline {action['pipeline']}, {_where(action['destinations'])}"
                if action
                else "    -> no job: no rule matched"
            )
            lines += [
                f"       {o['rule']} did not match: {'; '.join(o['reasons'])}" for o in s["not_matched"]
            ]
        for selection in study["selections"]:
            lines.append(f"  {selection['pipeline']} (rule {selection['rule']}) ranks the series it won:")
            lines += [
                f"    {r['place']}. series {r['series_uid']}: "
                + ("chosen" if r["place"] == 1 else f"lost: {'; '.join(r['reasons'])}")
                if r["place"] is not None
                else f"    -  series {r['series_uid']}: rejected: {'; '.join(r['reasons'])}"
                for r in selection["ranking"]
            ]
        lines += [
            line
            for job in study["jobs"]
            for line in (
                f"  job: {job['pipeline']} on series {job['series_uid']}"
                f" (rule {job['rule']}, {job['scope']} scope), {_where(job['destinations'])}",
                *(f"    requires {r}" for r in job["requires"]),
            )
        ] or ["  no jobs"]
    return "\n".join(lines)
