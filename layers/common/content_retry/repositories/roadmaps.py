"""Roadmaps: ``roadmap_metadata`` (ownership, the concept statuses in ``framework_data``),
what the judge reads of one roadmap, and the sweep's visits (``roadmap_sweeps``)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import cache
from typing import Any

from sqlalchemy import (
    ColumnElement,
    Connection,
    Integer,
    Select,
    TableValuedAlias,
    Text,
    and_,
    bindparam,
    case,
    cast,
    exists,
    false,
    func,
    or_,
    select,
    union,
    union_all,
    update,
)
from sqlalchemy.dialects.postgresql import ARRAY, JSONB, aggregate_order_by, insert

from content_retry.content_types import STORAGE, ContentType
from content_retry.repositories.claims import live_claim, minutes_ago, waiting_for_redrive
from content_retry.statuses import ContentStatus, FrameworkStatus, ItemStatus
from content_retry.tables import (
    constant,
    content_tables,
    retry_items,
    retry_tasks,
    roadmap_metadata,
    roadmap_sweeps,
    sweep_candidate,
)


def array_or_empty(document: ColumnElement[Any]) -> ColumnElement[Any]:
    """The jsonb array ``document``, or an empty one when it is anything else.

    ``jsonb_array_elements`` fails on anything but an array: a ``framework_data``
    malformed in one place is then read (and patched) where it is well-formed.
    """
    return case(
        (func.jsonb_typeof(document) == constant("array"), document),
        else_=func.jsonb_build_array(),
    )


def member(document: ColumnElement[Any], key: ColumnElement[Any] | str) -> ColumnElement[Any]:
    """``document -> key``: a jsonb object's member (jsonb)."""
    return document.op("->", return_type=JSONB)(constant(key) if isinstance(key, str) else key)


def member_text(document: ColumnElement[Any], key: ColumnElement[Any] | str) -> ColumnElement[str]:
    """``document ->> key``: a jsonb object's member as text."""
    return document.op("->>", return_type=Text)(constant(key) if isinstance(key, str) else key)


def _elements(array: ColumnElement[Any], value: str, ordinality: str) -> TableValuedAlias:
    """``jsonb_array_elements(array) WITH ORDINALITY AS name(value, ordinality)``."""
    return (
        func.jsonb_array_elements(array)
        .table_valued(value, with_ordinality=ordinality, joins_implicitly=True)
        .render_derived(name=value)
    )


def concept_listings(
    framework_data: ColumnElement[Any],
) -> tuple[TableValuedAlias, TableValuedAlias, TableValuedAlias]:
    """The stages, modules and concepts of ``framework_data``, as lateral sources
    ``stage(stage, i)``, ``module(module, j)`` and ``concept(concept, k)``; a level
    that is not an array lists nothing (the rest is read where well-formed)."""
    stages = _elements(array_or_empty(member(framework_data, "stages")), "stage", "i")
    modules = _elements(array_or_empty(member(stages.c.stage, "modules")), "module", "j")
    concepts = _elements(array_or_empty(member(modules.c.module, "concepts")), "concept", "k")
    return stages, modules, concepts


def _is(document: ColumnElement[Any], jsonb_type: str) -> ColumnElement[bool]:
    return func.jsonb_typeof(document) == constant(jsonb_type)


def _path(*keys: str) -> ColumnElement[Any]:
    return cast(constant("{" + ",".join(keys) + "}"), ARRAY(Text))


@dataclass(frozen=True)
class RoadmapRef:
    roadmap_id: str
    user_id: str


_LOCK_ROADMAP = (
    select(roadmap_metadata.c.user_id)
    .where(roadmap_metadata.c.roadmap_id == bindparam("roadmap_id"))
    .with_for_update()
)


def lock_roadmap(connection: Connection, roadmap_id: str) -> RoadmapRef | None:
    """Fetch a roadmap's owner and lock its row until the transaction ends.

    The lock serialises the writers of one roadmap's ``framework_data`` and makes
    two concurrent retry requests for one roadmap plan one after the other, so
    the second sees the first's claims and enqueues nothing twice.
    """
    user_id = connection.execute(_LOCK_ROADMAP, {"roadmap_id": roadmap_id}).scalar_one_or_none()
    return None if user_id is None else RoadmapRef(roadmap_id=roadmap_id, user_id=user_id)


def _rebuilt(
    array: ColumnElement[Any],
    value: str,
    ordinality: str,
    each: Callable[[ColumnElement[Any]], ColumnElement[Any]],
) -> ColumnElement[Any]:
    """The jsonb array ``array`` with each element ``e`` replaced by ``each(e)``, in order."""
    elements = _elements(array, value, ordinality)
    return (
        select(
            func.coalesce(
                func.jsonb_agg(aggregate_order_by(each(elements.c[value]), elements.c[ordinality])),
                func.jsonb_build_array(),
            )
        )
        .select_from(elements)
        .scalar_subquery()
    )


def _patched_concept(concept: ColumnElement[Any]) -> ColumnElement[Any]:
    patch = member(bindparam("patches", type_=JSONB), member_text(concept, "concept_id"))
    return case(
        (
            _is(concept, "object"),
            concept.op("||", return_type=JSONB)(func.coalesce(patch, func.jsonb_build_object())),
        ),
        else_=concept,
    )


def _patched_module(module: ColumnElement[Any]) -> ColumnElement[Any]:
    concepts = member(module, "concepts")
    rebuilt = _rebuilt(array_or_empty(concepts), "concept", "k", _patched_concept)
    return case(
        (_is(concepts, "array"), func.jsonb_set(module, _path("concepts"), rebuilt)),
        else_=module,
    )


def _patched_stage(stage: ColumnElement[Any]) -> ColumnElement[Any]:
    modules = member(stage, "modules")
    rebuilt = _rebuilt(array_or_empty(modules), "module", "j", _patched_module)
    return case(
        (_is(modules, "array"), func.jsonb_set(stage, _path("modules"), rebuilt)),
        else_=stage,
    )


# One UPDATE rebuilds stages -> modules -> concepts, merging each concept's
# patch (bound as ``patches``, a JSON object) by concept_id. Being a single
# UPDATE, it is computed on the newest row version after any lock wait, so
# concurrent writers of other concepts' statuses are never overwritten (no
# read-modify-write in Python).
_stages = member(roadmap_metadata.c.framework_data, "stages")
_PATCH_CONCEPTS = (
    update(roadmap_metadata)
    # "roadmap_id" is taken by the UPDATE's own column parameters
    .where(roadmap_metadata.c.roadmap_id == bindparam("the_roadmap_id"), _is(_stages, "array"))
    .values(
        framework_data=func.jsonb_set(
            roadmap_metadata.c.framework_data,
            _path("stages"),
            _rebuilt(_stages, "stage", "i", _patched_stage),
        )
    )
)


def patch_concept_statuses(
    connection: Connection, roadmap_id: str, patches: Mapping[str, Mapping[str, str]]
) -> bool:
    """Set framework statuses of concepts, in one statement.

    It serves repairs and permanent failures, several concepts at once (a save
    sets one status with ``jsonb_set`` instead).

    Args:
        patches: ``{concept_id: {status_key: status}}``, e.g.
            ``{"c7": {"content_status": "completed"}}``.

    Returns:
        Whether the roadmap was found with a well-formed ``stages`` array.
    """
    if not patches:
        return True
    result = connection.execute(_PATCH_CONCEPTS, {"the_roadmap_id": roadmap_id, "patches": patches})
    return bool(result.rowcount)


def _concepts(content_types: tuple[ContentType, ...]) -> Any:
    """Every concept object of ``:roadmap_id``'s ``framework_data``: its id, texts,
    place, and its framework status for each of ``content_types`` (by status key)."""
    roadmaps = roadmap_metadata.alias("r")
    stages, modules, concepts = concept_listings(roadmaps.c.framework_data)
    concept = concepts.c.concept
    concept_id = member_text(concept, "concept_id")
    return (
        select(
            concept_id.label("concept_id"),
            member_text(concept, "name").label("name"),
            member_text(concept, "description").label("description"),
            member_text(stages.c.stage, "name").label("stage"),
            member_text(modules.c.module, "name").label("module"),
            *(
                member_text(concept, STORAGE[content_type].status_key).label(
                    STORAGE[content_type].status_key
                )
                for content_type in content_types
            ),
            stages.c.i,
            modules.c.j,
            concepts.c.k,
        )
        .select_from(roadmaps, stages, modules, concepts)
        .where(
            roadmaps.c.roadmap_id == bindparam("roadmap_id"),
            _is(concept, "object"),
            concept_id.is_not(None),
        )
        .cte("c")
    )


@cache
def item_states_query(content_types: tuple[ContentType, ...]) -> Select[Any]:
    """The judge's view of one roadmap (``:roadmap_id``), in one statement.

    One row per item (concept, content type) the judge can act on, in the
    order of ``framework_data`` then of ``content_types``: items without a
    completed latest row, and completed ones whose framework status may need
    repair (a healthy roadmap returns no rows however large it is). Columns,
    in order: content_type, concept_id, name, description, stage, module,
    framework_status, latest_status, claimed, waiting (the claim is content
    waiting in the dead-letter queue). An item with several live claims comes
    back once per claim, a waiting one first (no GROUP BY: one is the rule).

    Binds ``lease_minutes`` and ``retention_minutes`` (the claim's terms).
    """
    concepts = _concepts(content_types)
    items = retry_items.alias("i")
    claims = (
        select(
            items.c.concept_id,
            items.c.content_type,
            waiting_for_redrive(items).label("waiting"),
        )
        .where(items.c.roadmap_id == bindparam("roadmap_id"), live_claim(items))
        .cte("cl")
    )
    # One SELECT per content type, joined straight to its table's latest row
    # (the unique partial index *_one_latest_per_concept finds it).
    states = union_all(
        *(
            _item_states(concepts, claims, content_type, position)
            for position, content_type in enumerate(content_types)
        )
    ).subquery("s")
    return select(*(states.c[name] for name in _STATE_COLUMNS)).order_by(
        states.c.i, states.c.j, states.c.k, states.c.position, states.c.waiting.desc()
    )


_STATE_COLUMNS = (
    *("content_type", "concept_id", "name", "description", "stage", "module"),
    *("framework_status", "latest_status", "claimed", "waiting"),
)


def _item_states(
    concepts: Any, claims: Any, content_type: ContentType, position: int
) -> Select[Any]:
    """The states of ``content_type``'s items, with the concept's place and ``position``."""
    latest = content_tables[content_type].alias("t")
    framework_status = concepts.c[STORAGE[content_type].status_key]
    return (
        select(
            constant(content_type.value).label("content_type"),
            concepts.c.concept_id,
            concepts.c.name,
            concepts.c.description,
            concepts.c.stage,
            concepts.c.module,
            framework_status.label("framework_status"),
            latest.c.content_status.label("latest_status"),
            claims.c.concept_id.is_not(None).label("claimed"),
            func.coalesce(claims.c.waiting, false()).label("waiting"),
            concepts.c.i,
            concepts.c.j,
            concepts.c.k,
            constant(position).label("position"),
        )
        .select_from(
            concepts.outerjoin(
                latest,
                and_(
                    latest.c.roadmap_id == bindparam("roadmap_id"),
                    latest.c.is_latest,
                    latest.c.concept_id == concepts.c.concept_id,
                ),
            ).outerjoin(
                claims,
                and_(
                    claims.c.content_type == constant(content_type.value),
                    claims.c.concept_id == concepts.c.concept_id,
                ),
            )
        )
        .where(
            or_(
                latest.c.content_status.is_distinct_from(constant(ContentStatus.COMPLETED)),
                framework_status.is_(None),
                framework_status == constant(FrameworkStatus.FAILED),
            )
        )
    )


@cache
def sweep_candidates_statement() -> Select[Any]:
    """The sweep's candidates query. Binds grace_minutes (only roadmaps untouched
    this long), lease_minutes, retention_minutes (the claim's terms) and limit;
    its predicate repeats the sweep index's, so PostgreSQL uses it."""
    roadmaps = roadmap_metadata
    untouched = roadmaps.c.updated_at < minutes_ago("grace_minutes")
    # Two sources, each reading roadmap_metadata through an index (the partial
    # one, or the primary key from the few unfinished latest rows), never the
    # whole table: what framework_data shows, and latest rows not completed.
    candidates = union(
        select(roadmaps.c.roadmap_id, roadmaps.c.updated_at).where(
            sweep_candidate(roadmaps.c.framework_data), untouched
        ),
        *(
            select(roadmaps.c.roadmap_id, roadmaps.c.updated_at)
            .select_from(table.join(roadmaps, table.c.roadmap_id == roadmaps.c.roadmap_id))
            .where(
                table.c.is_latest,
                table.c.content_status != constant(ContentStatus.COMPLETED),
                untouched,
            )
            for table in content_tables.values()
        ),
    ).cte("candidates")
    items = retry_items.alias("i")
    tasks = retry_tasks.alias("t")
    recent_items = retry_items.alias("ti")
    swept_at = roadmap_sweeps.c.swept_at
    return (
        select(candidates.c.roadmap_id, func.count().over().label("candidates"))
        .select_from(
            candidates.outerjoin(
                roadmap_sweeps, roadmap_sweeps.c.roadmap_id == candidates.c.roadmap_id
            )
        )
        .where(
            # Judged at most once a claim lease, least recently judged first.
            or_(swept_at.is_(None), swept_at < minutes_ago("lease_minutes")),
            # A roadmap with items waiting in the queue waits too: however deep
            # the backlog, its claims hold, and judging it again finds nothing.
            ~exists().where(items.c.roadmap_id == candidates.c.roadmap_id, live_claim(items)),
            # A roadmap whose recent task (younger than a claim lease) finished
            # with failures waits: an item that keeps failing is not paid for
            # again every run.
            ~exists()
            .select_from(tasks.join(recent_items, recent_items.c.task_id == tasks.c.task_id))
            .where(
                tasks.c.roadmap_id == candidates.c.roadmap_id,
                tasks.c.created_at > minutes_ago("lease_minutes"),
                recent_items.c.status != constant(ItemStatus.SUCCEEDED),
            ),
        )
        .order_by(swept_at.asc().nulls_first(), candidates.c.updated_at)
        .limit(bindparam("limit", type_=Integer))
    )


def sweep_candidates(
    connection: Connection,
    *,
    grace_minutes: int,
    lease_minutes: int,
    retention_minutes: int,
    limit: int,
) -> list[Any]:
    """Roadmaps the sweep should judge, least recently swept first.

    Each row holds ``roadmap_id`` and ``candidates`` (how many there are in
    all, beyond ``limit`` too).
    """
    return list(
        connection.execute(
            sweep_candidates_statement(),
            {
                "grace_minutes": grace_minutes,
                "lease_minutes": lease_minutes,
                "retention_minutes": retention_minutes,
                "limit": limit,
            },
        ).all()
    )


# Bound as swept_roadmap_id: a parameter named like a column the INSERT writes
# would become a value of its own.
_existing = select(roadmap_metadata.c.roadmap_id).where(
    roadmap_metadata.c.roadmap_id == bindparam("swept_roadmap_id")
)
_insert_sweep = insert(roadmap_sweeps).from_select(
    ["roadmap_id", "swept_at"],
    select(bindparam("swept_roadmap_id", type_=Text), func.now()).where(exists(_existing)),
)
_RECORD_SWEPT = _insert_sweep.on_conflict_do_update(
    index_elements=[roadmap_sweeps.c.roadmap_id],
    set_={"swept_at": _insert_sweep.excluded.swept_at},
)


def record_swept(connection: Connection, roadmap_id: str) -> None:
    """Record that the sweep judges ``roadmap_id`` now (nothing if it was deleted)."""
    connection.execute(_RECORD_SWEPT, {"swept_roadmap_id": roadmap_id})
