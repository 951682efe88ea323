"""Model lifecycle: each registered version moves candidate -> staging -> production -> archived.

Why a log and not a status field: every transition is evidence for an audit (who, when, why, on
what evidence), so the log *is* the state. Each model has an append-only chain of records under
``{registry}/lifecycle/{model}/log/{seq:08d}.json``; each record carries the SHA-256 of the one before
it (over canonical JSON), so editing, deleting or reordering a record breaks the chain (`verify`).
The current stages are a fold over the verified chain; a transition is refused while the chain is
broken. Appending record ``seq`` is an exclusive create (`raytwin.storage.write_once`), the
compare-and-set that keeps two concurrent transitions from both succeeding.

What is checked when: `verify` reads and checks the whole chain: `raytwin registry verify`, GET
.../lifecycle/verify, the API backend's start and its audit every `serve_apps.backend.LIFECYCLE_AUDIT_S` (240 s;
`audit`). A request (a transition, an asset's create or update, a type's delete, GET .../lifecycle) runs `current`:
it reads the last record of the prefix this process verified (gone, or another hash: the log shrank or was
replaced, and the whole chain is verified) and each record after it, checking those as `verify` does, so a record
appended by anyone is checked before a request acts on it. Records within the prefix are not read again until the
process's last whole verify of the model is `FULL_VERIFY_S` (300 s) old; then the request verifies the whole chain.
So an edit to, or deletion of, an older record goes unnoticed by a request for at most `FULL_VERIFY_S` after that
process's last whole verify of the model (the backend's audit, every 240 s, spares the backend's own requests that
cost while a round of it takes under a minute; in the ingress, where the lifecycle routes run, one request per model
and replica pays for a whole verify every 300 s that they are used). A broken chain is logged as ``event=lifecycle_chain_broken``; from then on the model's
transitions are refused, each request verifying the whole chain again, until it verifies (the log restored from a
backup); the backend's audit exports how many logs it found broken (`raytwin.metrics.LIFECYCLE_LOGS_BROKEN`, the alert
RayTwinLifecycleLogBroken). The offline CLI verifies whole (a new process).

Rules: a model belongs to the tenant that submitted its first candidate; production needs an actor
with the ``approver`` role who is not the candidate's author (four eyes), unless the tenant's
`LifecyclePolicy` allows automatic promotion; archived versions only come back through `rollback`,
which returns to the previous production version. `prune` keeps the last K archived versions and
run records per model and tenant, never what production, staging, a candidate, the rollback target, a
kept run record, or a live twin (the version it runs now, and those its retained history was applied by:
`raytwin.statestore.StateStore.model_versions`) references. An `evaluate` record adds evidence (a shadow evaluation,
`raytwin.shadow.conclude`) to a version without moving it.

What the HTTP API and the offline `raytwin registry` CLI check before they act is here, so both check it alike:
evidence a caller gives (`check_given_evidence`), a drift fit promoted over twins it was not fitted on
(`partial_fit_refusal`), who may switch automatic promotion (`check_policy_change`); and what their audit records
name of a transition or a prune (`audited_transition`, `PruneReport.audited`).
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import threading
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from pydantic import Field, ValidationError

from raytwin.contracts import Contract, Finite, Identifier, SemVer, UtcTime, describe_error
from raytwin.recalibration import DriftTrigger
from raytwin.registry import (JOB_KEY, POLICY_SET_BY, PUBLISHED_BY, PUBLISHED_OS_USER, PUBLISHER_UNVERIFIED,
                              ModelRegistry, RegistryError, describe_publisher, parse_ref)
from raytwin.storage import canonical_json, filesystem, make_folder, replace_file, write_once
from raytwin.store_failures import store_io

log = logging.getLogger("raytwin.lifecycle")

Stage = Literal["candidate", "staging", "production", "archived"]
Action = Literal["submit", "stage", "promote", "archive", "rollback", "prune", "evaluate"]
"""`evaluate` records evidence (a shadow evaluation) without moving the version."""
APPROVER = "approver"
GENESIS = "0" * 64
SHOWN_MODELS = 10
"""The registry's models an `UnknownModel` names at most."""
ACTION_TO: dict[Stage, Action] = {"candidate": "submit", "staging": "stage", "production": "promote",
                                  "archived": "archive"}
"""The action a transition to a stage is recorded as (what its audit record is named before it is recorded)."""
NEXT: dict[Stage, tuple[Stage, ...]] = {
    "candidate": ("staging", "archived"), "staging": ("production", "archived"),
    "production": ("archived",), "archived": (),
}
"""The moves `transition` makes; a version leaves `archived` only through `rollback`."""

RunId = Annotated[str, Field(pattern=r"^(sweep|calibration)-\d{8}T\d{6}Z-[0-9a-f]{8}$",
                             description="A run record's id, e.g. calibration-20260105T120000Z-1a2b3c4d")]
Reference = Annotated[str, Field(pattern=r"^(s3|gs|az|file|https?)://[^\s]{1,1000}$",
                                 description="Where a document lies: s3://, gs://, az://, file:// or http(s)://")]


class LifecycleError(RegistryError):
    """A refused transition: the message says why and what to do instead."""


class TenantMismatch(LifecycleError):
    """An actor of one tenant acting on another tenant's model."""


class ApprovalRequired(LifecycleError):
    """Production needs an approver who is not the author (or the tenant's automatic promotion)."""


class TransitionConflict(LifecycleError):
    """Another transition was recorded first (compare-and-set lost); reload and retry."""


class EvidenceRefused(LifecycleError):
    """Evidence a caller gave that is not what it says (`check_given_evidence`)."""


class UnknownModel(RegistryError):
    """A model name the registry holds no version of and that has no lifecycle log (a typo, or not registered)."""


class PruneIncomplete(Exception):
    """A prune failed partway (its `__cause__`, e.g. the store); `done` is what it logged and removed before, which
    stays done (the log names each version pruned; the next prune removes the leftovers) and must be audited."""

    def __init__(self, done: PruneReport):
        super().__init__(f"the prune stopped after logging {len(done.records)} removals and removing "
                         f"{len(done.runs_removed)} run records")
        self.done = done


class ChainBroken(LifecycleError):
    """The log was edited, deleted from or reordered; `record` is the first bad record's sequence number."""

    def __init__(self, message: str, record: int):
        super().__init__(message)
        self.record = record

    def __reduce__(self):
        return (type(self), (str(self), self.record))


class Actor(Contract):
    """Who acts: an id (an API key id, a user), the tenant, and roles such as ``approver``."""

    id: Identifier
    tenant: Identifier
    roles: frozenset[Identifier] = frozenset()
    also: frozenset[Identifier] = Field(frozenset(), description=(
        "Other ids the same principal acted under: the API key's own id where `id` is its owner, and its owner's other "
        "keys', so that what a key did before it named an owner is still its owner's (four eyes)"))
    untold: frozenset[Identifier] = Field(frozenset(), description=(
        "Ids the actor cannot be told apart from (the tenant's API keys without an owner: any may be its holder's), "
        "so that it approves no version one of them had a hand in (four eyes)"))


class Evidence(Contract):
    """Why a transition is justified: run records, a fit report, shadow metrics (all optional)."""

    run_ids: list[RunId] = Field(default_factory=list, max_length=100)
    fit_report: Reference | None = None
    shadow_metrics: dict[Identifier, Finite] = Field(default_factory=dict, max_length=100)
    triggers: list[DriftTrigger] = Field(default_factory=list, max_length=10_000, description=(
        "The drift alarms a recalibration answered (twin, event time, detector statistics)"))


class LifecyclePolicy(Contract):
    """A tenant's rules: automatic promotion (no approver) and how much history retention keeps."""

    auto_promote: bool = False
    keep_archived: int = Field(5, ge=0, le=10_000, description="Archived versions kept per model.")
    keep_runs: int = Field(20, ge=0, le=1_000_000, description="Run records kept per model.")
    shadow_auto_stage_margin: float | None = Field(
        None, ge=0, le=1e6, description="Move a candidate to staging by itself (as the system principal) when a "
        "shadow evaluation finds its mean log-likelihood per update better than production's by at least this "
        "(nats), with NIS no further from 1; None: never.")


SET_BY = "set_by"
"""The field of a stored lifecycle policy that names whoever set it (`ModelLifecycle.set_policy`)."""
REASON_KEPT = 2000
"""The longest reason a transition records (characters)."""
UNKNOWN_SETTER = "perhaps the setter of the recalibration policy that fitted it (unknown)"
"""`ModelLifecycle._made_by` of a recalibration candidate fitted under a policy that names no setter."""
PRUNE_TRIES = 20
"""Reloads of the log per version a prune removes while other transitions land first."""


class TransitionRecord(Contract):
    seq: int = Field(ge=0)
    prev_hash: str = Field(pattern=r"^[0-9a-f]{64}$")
    model: Identifier
    tenant: Identifier
    version: SemVer
    action: Action
    from_stage: Stage | None
    to_stage: Stage
    displaced: SemVer | None = Field(None, description="The production version this archived.")
    actor: Identifier
    actor_roles: list[Identifier]
    automatic: bool = Field(False, description="Promoted under the tenant's automatic-promotion policy.")
    time: UtcTime = Field(description="Server time of the transition.")
    reason: str = Field(min_length=1, max_length=REASON_KEPT)
    evidence: Evidence = Field(default_factory=Evidence)
    hash: str = Field(pattern=r"^[0-9a-f]{64}$")

    def stored(self) -> dict[str, Any]:
        """The record as written to the log; evidence without triggers leaves the field out, so records
        written before evidence had triggers read, hash and verify exactly as they were written."""
        body = self.model_dump(mode="json")
        if not body["evidence"]["triggers"]:
            del body["evidence"]["triggers"]
        return body

    def computed_hash(self) -> str:
        return record_hash({k: v for k, v in self.stored().items() if k != "hash"})


def record_hash(body: dict[str, Any]) -> str:
    return hashlib.sha256(canonical_json(body)).hexdigest()


@dataclass(frozen=True)
class VersionState:
    version: str
    stage: Stage
    author: str
    since: datetime
    pruned: bool = False


@dataclass
class ModelState:
    """The fold of a model's verified log: stages, the production stack (for rollback) and the head."""

    model: str
    tenant: str | None = None
    revision: int = -1
    head_hash: str = GENESIS
    versions: dict[str, VersionState] = field(default_factory=dict)
    production_stack: list[str] = field(default_factory=list)
    evidence_runs: dict[str, set[str]] = field(default_factory=dict)  # version -> run ids named as evidence
    had_production: bool = False  # some version was promoted: no production now means its production was archived

    @property
    def production(self) -> str | None:
        return next((v for v, s in self.versions.items() if s.stage == "production"), None)

    @property
    def rollback_target(self) -> str | None:
        stack = self.production_stack
        return stack[-2] if len(stack) >= 2 and stack[-1] == self.production else None

    def apply(self, r: TransitionRecord) -> None:
        prior = self.versions.get(r.version)
        if r.action == "evaluate" and prior is not None:  # evidence only: the stage stays
            self.evidence_runs.setdefault(r.version, set()).update(r.evidence.run_ids)
            self.tenant, self.revision, self.head_hash = r.tenant, r.seq, r.hash
            return
        author = prior.author if prior else r.actor
        self.versions[r.version] = VersionState(r.version, r.to_stage, author, r.time, pruned=r.action == "prune")
        if r.displaced is not None:
            old = self.versions[r.displaced]
            self.versions[r.displaced] = VersionState(old.version, "archived", old.author, r.time)
        if r.action == "promote":
            self.production_stack.append(r.version)
            self.had_production = True
        elif r.action == "rollback":
            self.production_stack.pop()
        elif r.action == "archive" and r.from_stage == "production":
            self.production_stack.clear()  # no production left: nothing to roll back to
        self.evidence_runs.setdefault(r.version, set()).update(r.evidence.run_ids)
        self.tenant, self.revision, self.head_hash = r.tenant, r.seq, r.hash


def _check_next(state: ModelState, r: TransitionRecord, i: int) -> None:
    """`ChainBroken` unless `r` is a sound record `i` after `state` (the fold of records 0..i-1)."""
    problem = None
    if r.seq != i:
        problem = f"has sequence number {r.seq} at position {i} (a record was deleted or reordered)"
    elif r.hash != r.computed_hash():
        problem = "does not match its hash (it was edited)"
    elif r.prev_hash != state.head_hash:
        problem = "does not link to the record before it (a record was deleted, replaced or reordered)"
    elif r.model != state.model or (state.tenant is not None and r.tenant != state.tenant):
        problem = f"names model {r.model} of tenant {r.tenant} in the log of {state.model}"
    if problem:
        raise ChainBroken(f"{state.model}: lifecycle record {i} {problem}; the log is not trustworthy from "
                          f"there on: restore it from a backup", i)


FULL_VERIFY_S = 300.0
"""How long a process acts on a prefix it verified whole (`ModelLifecycle.current`): older, a request verifies the
whole chain again; the bound on how long an edit to an old record goes unnoticed by any request."""


class _VerifiedPrefixes:
    """Per log (store, registry root, model), the fold of the records this process verified and when the whole chain
    last verified (monotonic s), or None while the last full `ModelLifecycle.verify` found it broken: what
    `ModelLifecycle.current` checks new records against. Shared by every `ModelLifecycle` of the process (the API
    builds one per request)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._states: dict[tuple[str, str, str], tuple[ModelState, float] | None] = {}

    def get(self, key: tuple[str, str, str]) -> ModelState | None:
        """The prefix to extend; None: verify whole (none yet, broken, or verified whole over `FULL_VERIFY_S` ago)."""
        with self._lock:
            known = self._states.get(key)
            if known is None or time.monotonic() - known[1] > FULL_VERIFY_S:
                return None
            return copy.deepcopy(known[0])

    def remember(self, key: tuple[str, str, str], state: ModelState, *, full: bool) -> None:
        """Keep `state` (a full verify's always; a request's only over a further prefix, never over a broken mark)."""
        with self._lock:
            known = self._states.get(key)
            if full:
                self._states[key] = copy.deepcopy(state), time.monotonic()
            elif known is not None and known[0].revision < state.revision:
                self._states[key] = copy.deepcopy(state), known[1]

    def mark_broken(self, key: tuple[str, str, str], exc: ChainBroken) -> None:
        """Refuse the model's transitions until a full verify passes again; logged for the operator."""
        with self._lock:
            self._states[key] = None
        log.error("event=lifecycle_chain_broken model=%s record=%d error=%r", key[2], exc.record, str(exc))


_VERIFIED = _VerifiedPrefixes()


@dataclass(frozen=True)
class PruneReport:
    versions_removed: list[str]
    runs_removed: list[str]
    records: list[TransitionRecord] = field(default_factory=list)
    """The log's `prune` record of each removed version (its seq and hash: what the audit ties each removal to)."""

    def audited(self) -> dict[str, Any]:
        """The outcome its audit record names (the API's and the CLI's): each removal tied to its log record by hash."""
        return {"removed": [{"version": r.version, "seq": r.seq, "hash": r.hash} for r in self.records],
                "runs_removed": self.runs_removed}


def check_policy_change(current: LifecyclePolicy, new: LifecyclePolicy, actor: Actor) -> None:
    """Refuse (`ApprovalRequired`) turning automatic promotion on or off to an actor without the approver grant
    (role): it decides whether production needs a second pair of eyes at all. The API and the CLI both check it."""
    if new.auto_promote != current.auto_promote and APPROVER not in actor.roles:
        raise ApprovalRequired(f"turning auto_promote {'on' if new.auto_promote else 'off'} needs the {APPROVER!r} "
                               f"grant (with it any writer promotes without a second key); {actor.id} has "
                               f"{sorted(actor.roles) or 'none'}")


def audited_transition(record: TransitionRecord) -> dict[str, Any]:
    """The outcome a transition's audit record names (the API's and the CLI's): the version moved, and the log
    record that holds it (seq and hash)."""
    return {"version": record.version, "seq": record.seq, "displaced": record.displaced, "hash": record.hash}


SYSTEM_EVIDENCE = ("shadow_metrics", "triggers")
"""Evidence only the system measures (a shadow evaluation's metrics, the drift alarms a recalibration answered):
no caller states it, through the API or the CLI."""


def check_given_evidence(evidence: Evidence, model: str, model_ref_of: Callable[[str], str | None]) -> None:
    """Refuse (`EvidenceRefused`) evidence a caller gives that is not what it says: what only the system measures
    (an approver reading the log must not take a caller's numbers for the system's), or a run id that is not one of
    the tenant's runs of `model` (a sweep of another model taken as support for this one's move). `model_ref_of`:
    the ``name@version`` a run id of the tenant ran, None for none. The API and `raytwin registry` both check it."""
    system_only = [name for name in SYSTEM_EVIDENCE if getattr(evidence, name)]
    if system_only:
        raise EvidenceRefused(f"evidence.{system_only[0]} is recorded by the system (a shadow evaluation, a drift "
                              "recalibration), not given by a key or an operator; run `POST .../shadow` for shadow "
                              "metrics")
    for run_id in evidence.run_ids:
        ref = model_ref_of(run_id)
        if ref is None:
            raise EvidenceRefused(f"evidence.run_ids: no run {run_id!r} of this tenant (its sweeps, calibrations "
                                  "and recalibrations record theirs)")
        if ref.split("@")[0] != model:
            raise EvidenceRefused(f"evidence.run_ids: run {run_id!r} ran {ref}, not a version of {model}: cite runs "
                                  f"of {model} that support this move")


def partial_fit_refusal(records: list[TransitionRecord], ref: str, running: Callable[[], Collection[str]],
                        override: str) -> str | None:
    """Why promoting `ref` needs the fleet override (None: it does not): it was fitted on some twins' telemetry (the
    triggers of the drift recalibration that submitted it) while other twins (`running()`: those of its model, asked
    only of such a version) run the model; promotion swaps all of them, and one zone's fit would become every zone's
    parameters, with only its own fit report before the approver. `override`: how the caller says they share them
    (the API's ``"fleet": true``, the CLI's ``--fleet``)."""
    model, version = parse_ref(ref)
    fitted = {t.asset_id for r in records if r.version == version for t in r.evidence.triggers}
    others = sorted(set(running()) - fitted) if fitted else []
    if not others:
        return None
    named = ", ".join(others[:5]) + (f" and {len(others) - 5} more" if len(others) > 5 else "")
    return (f"{ref} was fitted on the telemetry of {', '.join(sorted(fitted))} (a drift recalibration); promotion "
            f"swaps every twin of {model}, so {len(others)} other twin(s) ({named}) would run its parameters too: "
            f"{override} if they share them, or give assets whose parameters differ a type of their own")


def run_model_ref(runs_root: str, storage_options: dict[str, Any] | None, tenant: str, run_id: str) -> str | None:
    """The ``name@version`` run `run_id` of `tenant` ran, from its record under `runs_root` (None: no such run of
    the tenant's), for `check_given_evidence` where no `sweeps.runs.RunStore` may be imported (the core)."""
    fs, root = filesystem(runs_root, storage_options)
    path = f"{root}/{run_id}/run.json"
    with store_io("read"):
        if not fs.exists(path):
            return None
        record = json.loads(fs.cat_file(path))
    return record["model_ref"] if record.get("tenant", tenant) == tenant else None


class ModelLifecycle:
    """The lifecycle of the models of one registry (a directory or fsspec URL, as `ModelRegistry`)."""

    def __init__(self, registry: ModelRegistry):
        self.registry = registry
        self.fs, self.root = registry.fs, registry.root

    # ------------------------------------------------------------------ reading -----
    def _log_dir(self, model: str) -> str:
        return f"{self.root}/lifecycle/{model}/log"

    def _policy_path(self, tenant: str) -> str:
        return f"{self.root}/policies/{tenant}.json"

    @store_io("read")
    def models(self) -> list[str]:
        """The models that have a lifecycle log in this registry."""
        base = f"{self.root}/lifecycle"
        if not self.fs.exists(base):
            return []
        return sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in self.fs.ls(base, detail=False))

    @store_io("read")
    def exists(self, model: str) -> bool:
        """Whether `model` is known here: a registered version, or a lifecycle log (its versions may be pruned)."""
        return bool(self.registry.versions(model)) or self.fs.exists(self._log_dir(model))

    @store_io("read")
    def records(self, model: str) -> list[TransitionRecord]:
        """The model's records in sequence-number order, each validated (not yet chain-checked)."""
        base = self._log_dir(model)
        if not self.fs.exists(base):
            return []
        paths = sorted(p for p in self.fs.ls(base, detail=False) if p.endswith(".json"))
        out = []
        for i, path in enumerate(paths):
            try:
                out.append(TransitionRecord.model_validate_json(self.fs.cat_file(path)))
            except ValidationError as exc:
                raise ChainBroken(f"{model}: record {i} ({path.rsplit('/', 1)[-1]}) is unreadable: "
                                  f"{describe_error(exc)}", i) from None
        return out

    def verify(self, model: str, expected_head: str | None = None, *,
               records: list[TransitionRecord] | None = None) -> ModelState:
        """The state of `model` after checking its whole chain: each record's own hash, its link to the record
        before, contiguous sequence numbers, and (if given) the head hash noted elsewhere, which also
        catches a truncated tail. `ChainBroken` names the first bad record. `records`: the log as the caller
        read it already with `records` (one read for all it asks of the log); None: read here. The outcome is
        remembered for `current` (a verified prefix, or the model marked broken: logged as
        ``event=lifecycle_chain_broken``). A registered model with no log yet has the empty state; a model this
        registry does not know is `UnknownModel` (a typo passed as an empty, intact chain, where the CLI and the
        API refuse it)."""
        state = self._known(self._verify_chain(model, records))
        if expected_head is not None and expected_head != state.head_hash:
            raise ChainBroken(f"{model}: the head hash is {state.head_hash[:12]}..., expected "
                              f"{expected_head[:12]}... (records were removed from the end?)", state.revision + 1)
        return state

    def _known(self, state: ModelState) -> ModelState:
        """`state`, unless its log is empty and the registry holds no version of its model: `UnknownModel`, naming
        the models it holds (an empty log is only then a question: a model with a log costs no registry read)."""
        if state.revision >= 0 or self.registry.versions(state.model):
            return state
        names = self.registry.names()
        held = ", ".join(names[:SHOWN_MODELS]) + (f" and {len(names) - SHOWN_MODELS} more"
                                                  if len(names) > SHOWN_MODELS else "") if names else "none"
        raise UnknownModel(f"no model {state.model} in this registry: check the model's name (it holds {held}), or "
                           f"register a version of {state.model} first (a lifecycle starts with a registered version: "
                           "POST /v1/asset-types, or `ModelRegistry.register`)", self.registry.url)

    def _verify_chain(self, model: str, records: list[TransitionRecord] | None = None) -> ModelState:
        """`verify`'s check of the whole chain, remembered for `current`."""
        state = ModelState(model)
        try:
            for i, r in enumerate(self.records(model) if records is None else records):
                _check_next(state, r, i)
                state.apply(r)
        except ChainBroken as exc:
            _VERIFIED.mark_broken(self._key(model), exc)
            raise
        _VERIFIED.remember(self._key(model), state, full=True)  # (a caller's head hash is the caller's to judge)
        return state

    def current(self, model: str) -> ModelState:
        """The state of `model` for a request (a transition, an asset's create or update, a type's delete, a status
        read), at a cost independent of the log's length: the records after the prefix a full `verify` (or an
        earlier `current`) of this process checked, each checked as `verify` checks it and chained to that prefix,
        whose last record is read again (gone, or another hash: the log shrank or was replaced, and the whole chain
        is verified). Records within the prefix are not read again here (see the module's docstring for how long an
        edit to one may go unnoticed): a model not verified whole in this process yet, over `FULL_VERIFY_S` ago, or
        marked broken, is verified whole (a restored log passes). A model with no log that the registry holds no
        version of is `UnknownModel`, as in `verify` (its empty state was answered as a lifecycle about to start)."""
        state = _VERIFIED.get(self._key(model))
        if state is None:
            return self._known(self._verify_chain(model))
        if state.revision >= 0:
            last = self._record_at(model, state.revision)
            if last is None or last.hash != state.head_hash or last.computed_hash() != last.hash:
                log.warning("event=lifecycle_prefix_changed model=%s seq=%d (%s): verifying the whole log", model,
                            state.revision, "gone" if last is None else "another record")
                return self._known(self._verify_chain(model))
        try:
            while (r := self._record_at(model, state.revision + 1)) is not None:
                _check_next(state, r, state.revision + 1)
                state.apply(r)
        except ChainBroken as exc:
            _VERIFIED.mark_broken(self._key(model), exc)
            raise
        _VERIFIED.remember(self._key(model), state, full=False)
        return self._known(state)

    def _key(self, model: str) -> tuple[str, str, str]:
        return str(self.fs.protocol), self.root, model

    @store_io("read")
    def _record_at(self, model: str, seq: int) -> TransitionRecord | None:
        """Record `seq` of `model`'s log (None: there is none)."""
        path = f"{self._log_dir(model)}/{seq:08d}.json"
        try:
            body = self.fs.cat_file(path)
        except FileNotFoundError:
            return None
        try:
            return TransitionRecord.model_validate_json(body)
        except ValidationError as exc:
            raise ChainBroken(f"{model}: record {seq} ({path.rsplit('/', 1)[-1]}) is unreadable: "
                              f"{describe_error(exc)}", seq) from None

    def audit(self) -> dict[str, ChainBroken]:
        """Verify every model's whole log (the periodic check behind `current`, which reads only new records): the
        broken ones by model, each marked (its transitions refused) and logged by `verify`."""
        broken = {}
        for model in self.models():
            try:
                self.verify(model)
            except ChainBroken as exc:
                broken[model] = exc
        return broken

    def removal(self, ref: str) -> TransitionRecord | None:
        """The record of retention removing ``name@version`` (None: it was not removed), for errors that
        say why a version a twin ran is gone, and since when."""
        name, version = parse_ref(ref)
        return next((r for r in reversed(self.records(name)) if r.version == version and r.action == "prune"), None)

    def stage(self, ref: str) -> Stage:
        """The stage of ``name@version``; a registered version never submitted is a candidate."""
        name, version = parse_ref(ref)
        self.registry.get(ref, allow_code_change=True)  # RegistryError if unknown
        found = self.current(name).versions.get(version)
        return found.stage if found else "candidate"

    def policy(self, tenant: str) -> LifecyclePolicy:
        return self._stored_policy(tenant)[0]

    @store_io("read")
    def _stored_policy(self, tenant: str) -> tuple[LifecyclePolicy, frozenset[str]]:
        """The tenant's policy and the ids of whoever set it (none: set by a library call, the offline CLI, or before
        setters were kept)."""
        path = self._policy_path(tenant)
        if not self.fs.exists(path):
            return LifecyclePolicy(), frozenset()
        doc = json.loads(self.fs.cat_file(path))
        setters = frozenset(doc.pop(SET_BY, ()))
        return LifecyclePolicy.model_validate(doc), setters

    def set_policy(self, tenant: str, policy: LifecyclePolicy, set_by: frozenset[str] = frozenset()) -> None:
        """Replace the tenant's policy; `set_by`: the principal's ids (its owner and key id), kept beside it, so that
        its automatic promotion is no second pair of eyes for a version its setter had a hand in (`_automatic`)."""
        doc = policy.model_dump(mode="json") | ({SET_BY: sorted(set_by)} if set_by else {})
        replace_file(self.fs, self._policy_path(tenant), canonical_json(doc))
        log.info("event=lifecycle_policy_set tenant=%s set_by=%s policy=%s", tenant, ",".join(sorted(set_by)) or "-",
                 policy.model_dump_json())

    # ------------------------------------------------------------------ transitions -----
    def submit(self, ref: str, actor: Actor, reason: str, evidence: Evidence | None = None,
               expected_revision: int | None = None, *, expected_head: str | None = None) -> TransitionRecord:
        """Enter a registered version as a candidate, `actor` its author (for the four-eyes rule)."""
        name, version = parse_ref(ref)
        self.registry.get(ref, allow_code_change=True)
        state = self._load(name, actor, expected_revision, expected_head)
        if version in state.versions:
            raise LifecycleError(f"{ref} was submitted already; it is in stage {state.versions[version].stage}")
        return self._append(state, version, "submit", None, "candidate", actor, reason, evidence)

    def transition(self, ref: str, to: Stage, actor: Actor, reason: str, evidence: Evidence | None = None,
                   expected_revision: int | None = None, *, expected_head: str | None = None) -> TransitionRecord:
        """Move ``name@version`` to stage `to` (see `NEXT`); production archives the previous one.
        `expected_revision`: only if the log is at that revision (compare-and-set); `expected_head`: and its head
        hash starts so (a revision alone names other records after a restore of the store from an earlier copy)."""
        name, version = parse_ref(ref)
        if to == "candidate":
            return self.submit(ref, actor, reason, evidence, expected_revision, expected_head=expected_head)
        state = self._load(name, actor, expected_revision, expected_head)
        current = state.versions.get(version)
        if current is None:
            self.registry.get(ref, allow_code_change=True)
            raise LifecycleError(f"{ref} was never submitted: submit it as a candidate first "
                                 f"(`raytwin registry submit {ref}`, or POST .../transitions with to=candidate)")
        if current.pruned:
            raise LifecycleError(f"{ref} was removed by retention; register a new version")
        if to not in NEXT[current.stage]:
            hint = ("archived versions are never promoted again: roll back to the previous production version "
                    "(`rollback`) or register and submit a new version") if current.stage == "archived" else \
                f"from {current.stage} it may move to {', '.join(NEXT[current.stage])}"
            raise LifecycleError(f"{ref} is {current.stage}; it cannot move to {to}: {hint}")
        automatic = False
        if to == "production":
            automatic = self._approve(state, current, actor)
        elif current.stage == "production":  # out of production, with no way back in: as grave as a promotion
            automatic = self._approver_or_policy(state, actor, f"archiving {ref}, the production version,")
        action = ACTION_TO[to]
        displaced = state.production if to == "production" else None
        return self._append(state, version, action, current.stage, to, actor, reason, evidence,
                            displaced=displaced, automatic=automatic)

    def evaluate(self, ref: str, actor: Actor, reason: str, evidence: Evidence, *,
                 expected_revision: int | None = None) -> TransitionRecord:
        """Record evidence about a submitted, live version (a shadow evaluation) without moving it.
        `expected_revision`: only on the log as the caller read it (`TransitionConflict` otherwise), so that a caller
        that found the evidence not yet recorded does not record it again after another recorded it meanwhile."""
        name, version = parse_ref(ref)
        state = self._load(name, actor, expected_revision)
        current = state.versions.get(version)
        if current is None or current.pruned or current.stage == "archived":
            raise LifecycleError(f"{ref} is {'not submitted' if current is None else current.stage}: evidence is "
                                 "recorded for candidate, staging and production versions only")
        return self._append(state, version, "evaluate", current.stage, current.stage, actor, reason, evidence)

    def rollback(self, model: str, actor: Actor, reason: str, evidence: Evidence | None = None,
                 expected_revision: int | None = None, from_version: str | None = None, *,
                 expected_head: str | None = None) -> TransitionRecord:
        """Return to the previous production version in one call; the current one is archived.
        Needs the approver role (the version was approved before), or the tenant's automatic promotion.
        `from_version`: only if it is production now, so a rollback sent twice (a retry, two approvers answering
        one incident) goes back one version, not two. `expected_revision`, `expected_head`: as `transition`."""
        state = self._load(model, actor, expected_revision, expected_head)
        if from_version is not None and state.production != from_version:
            raise LifecycleError(_left_already(state, self.records(model), from_version))
        target = state.rollback_target
        if target is None:
            raise LifecycleError(f"{model} has no previous production version to roll back to"
                                 + ("" if state.production else " (and no production version)"))
        if state.versions[target].pruned:
            raise LifecycleError(f"{model}@{target}, the previous production version, was removed by retention")
        automatic = self._approver_or_policy(state, actor, f"rolling {model} back")
        return self._append(state, target, "rollback", "archived", "production", actor, reason, evidence,
                            displaced=state.production, automatic=automatic)

    def _approver_or_policy(self, state: ModelState, actor: Actor, what: str) -> bool:
        """Whether `what` (a change of the production version that needs no second pair of eyes) happens by
        the tenant's automatic promotion (True) or by an approver (False); else refuse."""
        if APPROVER in actor.roles:
            return False
        if self.policy(state.tenant or actor.tenant).auto_promote:
            return True
        raise ApprovalRequired(f"{what} needs the {APPROVER!r} role (actor {actor.id} has "
                               f"{sorted(actor.roles) or 'none'})")

    def _approve(self, state: ModelState, version: VersionState, actor: Actor) -> bool:
        """Whether production is reached by policy (True) or by a second pair of eyes (False); else refuse.
        An approver who had a hand in the version, or may have (one of the keys it cannot be told apart from,
        `Actor.untold`, had), is no second pair of eyes: under the tenant's automatic promotion it promotes as any
        writer does (recorded as automatic), otherwise it is refused."""
        ref = f"{state.model}@{version.version}"
        policy, setters = self._stored_policy(state.tenant or actor.tenant)
        auto = policy.auto_promote
        if APPROVER in actor.roles:
            role = self._made_by(ref, version, {actor.id, *actor.also})
            untold = self._made_by(ref, version, actor.untold) if role is None and actor.untold else None
            if role is None and untold is None:
                return False
            if auto:
                return self._automatic(ref, version, setters)
            if untold is not None:
                raise ApprovalRequired(
                    f"an API key without an owner is {untold}: its holder cannot be told apart from {actor.id} (four "
                    "eyes), nor from any other approver; name its holder as its owner (`raytwin keys set-owner KEY_ID "
                    "--owner PERSON`: then only that person's keys are refused), or publish the content again as a new version with a key that "
                    "has an owner and submit that")
            if role == UNKNOWN_SETTER:
                raise ApprovalRequired(
                    f"{ref} was fitted by a drift recalibration under a policy stored before its setter was kept: "
                    f"{actor.id} may have set it, and no approver can be told apart from that key (four eyes). PUT "
                    f"the recalibration policy of {state.model} again (that records its setter) and promote the "
                    "candidate the next drift fits, or publish the parameters as a new version and submit it")
            raise ApprovalRequired(f"{actor.id} is {role} and may not approve it (four eyes): another principal "
                                   f"with the {APPROVER!r} role must promote it (tenant {actor.tenant}'s policy "
                                   "does not allow automatic promotion)")
        if auto:
            return self._automatic(ref, version, setters)
        raise ApprovalRequired(f"promoting {ref} to production needs a principal with the {APPROVER!r} role "
                               f"who is not its author ({version.author}); actor {actor.id} has roles "
                               f"{sorted(actor.roles) or 'none'}, and tenant {actor.tenant}'s policy does not "
                               f"allow automatic promotion")

    def _automatic(self, ref: str, version: VersionState, setters: frozenset[str]) -> bool:
        """True (promoted by the tenant's automatic promotion), unless whoever set that policy had a hand in `ref`:
        one approver alone turning automatic promotion on would otherwise promote its own version, no second pair
        of eyes ever seeing it."""
        role = self._made_by(ref, version, setters) if setters else None
        if role is None or role == UNKNOWN_SETTER:
            return True
        raise ApprovalRequired(f"{ref}: the tenant's automatic promotion was set by {', '.join(sorted(setters))}, "
                               f"{role}: it promotes no version its setter had a hand in (four eyes); another "
                               f"principal with the {APPROVER!r} role must promote it, or another must set the "
                               "lifecycle policy")

    def _made_by(self, ref: str, version: VersionState, names: set[str] | frozenset[str]) -> str | None:
        """How the principal of `names` (its ids: owner and key id) had a hand in `ref`'s content (None: it had
        none): its author (submitted it), its publisher (its declaration and parameters; of an offline fit, whose
        publisher is only declared, the OS user that ran it too, and the answer says it is unverified), or the setter
        of the recalibration policy it was fitted under (its free parameters, noise and window: the recalibration's
        author is the system, not a second pair of eyes);
        `UNKNOWN_SETTER` for a recalibration's candidate whose policy named no setter: any approver may be it."""
        metadata = self.registry.get(ref, allow_code_change=True).metadata
        if version.author in names:
            return f"the author of {ref}"
        unverified = metadata.get(PUBLISHER_UNVERIFIED) == "false"  # an offline fit's: its OS user had a hand too
        if metadata.get(PUBLISHED_BY) in names or (unverified and metadata.get(PUBLISHED_OS_USER) in names):
            return f"the publisher (its declaration and parameters) of {ref}" + (
                f", {describe_publisher(metadata)}," if unverified else "")
        if metadata.get(POLICY_SET_BY) in names:
            return f"the setter of the recalibration policy (its free parameters, noise and window) that fitted {ref}"
        if JOB_KEY in metadata and POLICY_SET_BY not in metadata:
            return UNKNOWN_SETTER
        return None

    def _load(self, model: str, actor: Actor, expected_revision: int | None,
              expected_head: str | None = None) -> ModelState:
        state = self.current(model)
        if state.tenant is not None and state.tenant != actor.tenant:
            raise TenantMismatch(f"model {model} belongs to tenant {state.tenant}; {actor.id} of tenant "
                                 f"{actor.tenant} may not change it")
        if expected_revision is not None and expected_revision != state.revision:
            raise TransitionConflict(f"{model} is at revision {state.revision}, not {expected_revision}: "
                                     f"another transition came first; reload and retry")
        if expected_head is not None and not state.head_hash.startswith(expected_head):
            raise TransitionConflict(f"{model}'s log at revision {state.revision} has head hash "
                                     f"{state.head_hash[:len(expected_head)]}, not {expected_head}: other records "
                                     "than those read (the store was restored from an earlier copy since); reload "
                                     "and retry")
        return state

    def _append(self, state: ModelState, version: str, action: Action, from_stage: Stage | None, to: Stage,
                actor: Actor, reason: str, evidence: Evidence | None, *, displaced: str | None = None,
                automatic: bool = False) -> TransitionRecord:
        body = dict(seq=state.revision + 1, prev_hash=state.head_hash, model=state.model,
                    tenant=state.tenant or actor.tenant, version=version, action=action, from_stage=from_stage,
                    to_stage=to, displaced=displaced, actor=actor.id, actor_roles=sorted(actor.roles),
                    automatic=automatic, time=datetime.now(UTC), reason=reason,
                    evidence=evidence or Evidence())
        try:
            unsigned = TransitionRecord.model_validate({**body, "hash": GENESIS})
        except ValidationError as exc:
            raise LifecycleError(describe_error(exc)) from None
        record = unsigned.model_copy(update={"hash": unsigned.computed_hash()})
        path = f"{self._log_dir(state.model)}/{record.seq:08d}.json"
        make_folder(self.fs, self._log_dir(state.model))
        try:
            write_once(self.fs, path, canonical_json(record.stored()))
        except FileExistsError:
            raise TransitionConflict(f"another transition of {state.model} was recorded first (revision "
                                     f"{record.seq}); reload and retry") from None
        log.info("event=model_transition model=%s version=%s action=%s from=%s to=%s actor=%s tenant=%s "
                 "automatic=%s seq=%d", record.model, version, action, from_stage, to, actor.id, record.tenant,
                 automatic, record.seq)
        return record

    # ------------------------------------------------------------------ retention -----
    def prune(self, model: str, actor: Actor, runs_root: str | None = None,
              storage_options: dict[str, Any] | None = None, in_use: Collection[str] = ()) -> PruneReport:
        """Apply the tenant's retention to `model`: keep the last `keep_archived` archived versions and
        the last `keep_runs` run records of this model and tenant (under `runs_root`); never remove a
        production, staging or candidate version, the rollback target, a version a kept run record
        used, a version `in_use`, or a run named as evidence by a version that is not archived. Each
        removal is logged. `in_use`: the versions the tenant's twins of `model` run now or their retained
        history was applied by (`StateStore.model_versions`; a refused swap leaves a twin on an archived
        version) and those its assets' catalog entries name; the caller knows its twins."""
        state = self._load(model, actor, None)
        tenant = state.tenant or actor.tenant
        policy = self.policy(tenant)
        runs = _run_records(runs_root, storage_options, tenant, model) if runs_root else []
        evidence = {run for v, s in state.versions.items() if s.stage != "archived"
                    for run in state.evidence_runs.get(v, ())}
        by_age = sorted(runs, key=lambda r: r["started"])
        kept_runs = by_age[max(0, len(by_age) - policy.keep_runs):] if policy.keep_runs else []
        kept_runs += [r for r in by_age if r["run_id"] in evidence and r not in kept_runs]
        used = {parse_ref(r["model_ref"])[1] for r in kept_runs}
        archived = sorted((s for s in state.versions.values() if s.stage == "archived" and not s.pruned),
                          key=lambda s: s.since)
        recent = {s.version for s in archived[max(0, len(archived) - policy.keep_archived):]} \
            if policy.keep_archived else set()
        doomed = [s.version for s in archived
                  if s.version not in recent | used | set(in_use) and s.version != state.rollback_target]
        reason = f"retention: keep the last {policy.keep_archived} archived versions"
        done = PruneReport(versions_removed=[], runs_removed=[])
        try:
            for version in doomed:
                if (record := self._record_prune(model, version, actor, reason)) is not None:
                    done.records.append(record)
                    done.versions_removed.append(version)
            self._remove_artifacts(model, done.versions_removed + [v for v, s in state.versions.items() if s.pruned])
            removed_runs = [r for r in by_age if r not in kept_runs]
            if removed_runs:
                fs, root = filesystem(runs_root, storage_options)
                for r in removed_runs:
                    with store_io("write"):
                        fs.rm(f"{root}/{r['run_id']}", recursive=True)
                    done.runs_removed.append(r["run_id"])
                    log.info("event=run_pruned run_id=%s model=%s tenant=%s", r["run_id"], model, tenant)
        except Exception as exc:
            if done.records or done.runs_removed:
                raise PruneIncomplete(done) from exc
            raise
        return done

    def _remove_artifacts(self, model: str, versions: list[str]) -> None:
        """Remove the artifacts of `versions` (logged as pruned; a crash's leftovers among them) still registered."""
        registered = set(self.registry.versions(model))
        for version in versions:
            if version in registered:
                registered.discard(version)
                try:
                    self.registry.remove(f"{model}@{version}")
                except RegistryError:
                    if version in self.registry.versions(model):
                        raise  # (else a concurrent prune removed it first)

    def _record_prune(self, model: str, version: str, actor: Actor, reason: str) -> TransitionRecord | None:
        """Log `version`'s removal unless it is no longer an archived version to remove (another prune logged it,
        or it became the rollback target): the record if this call logged it. Concurrent prunes logged one version
        twice, and one answered 409 after removing an artifact it never logged. The log comes first and the
        artifact goes after: a crash between leaves an artifact of a pruned version, which the next prune removes."""
        for _ in range(PRUNE_TRIES):
            state = self._load(model, actor, None)
            current = state.versions.get(version)
            if current is None or current.stage != "archived" or current.pruned or version == state.rollback_target:
                return None
            try:
                return self._append(state, version, "prune", "archived", "archived", actor, reason, None)
            except TransitionConflict:
                continue  # another transition landed first: look again
        raise TransitionConflict(f"{model}@{version}: the log kept changing over {PRUNE_TRIES} tries while "
                                 "pruning; retry the prune")


def _left_already(state: ModelState, records: list[TransitionRecord], from_version: str) -> str:
    """Why a rollback from `from_version` is refused: production is another version now; when a transition moved it
    out of production already (this request's first try, or another approver's rollback), that record says so."""
    model, lifecycle = state.model, f"GET /v1/models/{state.model}/lifecycle"
    now = f"production is {state.production}" if state.production else "it has no production version"
    left = next((r for r in reversed(records) if r.displaced == from_version or (
        r.version == from_version and r.from_stage == "production" and r.to_stage == "archived")), None)
    if left is None:
        return (f"{model}@{from_version} is not the production version of {model} ({now}); nothing was changed: "
                f"name the production version as from_version (see {lifecycle})")
    return (f"{model}@{from_version} is no longer the production version of {model} ({now}): {left.action} record "
            f"{left.seq} by {left.actor} at {left.time.isoformat()} moved it out; nothing was changed (a rollback sent "
            f"again goes back no further). Read {lifecycle} before deciding on another move")


@store_io("read")
def _run_records(runs_root: str, storage_options: dict[str, Any] | None, tenant: str,
                 model: str) -> list[dict[str, Any]]:
    """The run records (``<runs root>/<run id>/run.json``) of `tenant` that ran a version of `model`."""
    fs, root = filesystem(runs_root, storage_options)
    if not fs.exists(root):
        return []
    found = []
    for path in fs.glob(f"{root}/*/run.json"):
        record = json.loads(fs.cat_file(path))
        if record.get("tenant") == tenant and parse_ref(record["model_ref"])[0] == model:
            found.append({k: record[k] for k in ("run_id", "model_ref", "started")})
    return found
