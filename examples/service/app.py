"""The example service: users and orders on poolwarden's FastAPI integration.

Run it (see README.md)::

    DATABASE_URL=postgresql://... uvicorn examples.service.app:app --workers 2

Configuration: ``DATABASE_URL`` and the ``DB_*`` variables (poolwarden's settings), plus
``SERVICE_DEADLINE_S`` (default budget of a request, 2 s), ``SERVICE_REPORT_DEADLINE_S``
(the reports' own, 10 s), ``SERVICE_DRAIN_TIMEOUT_S`` (10 s) and
``SERVICE_HEALTH_INTERVAL_S`` (5 s). A caller may shorten a request's budget with the
``X-Request-Timeout`` header (seconds, or ``500ms``).

Writes use :data:`WriteSession` (commit on success, rollback on error), reads
:data:`ReadSession`, the list of a user's orders and the revenue report the raw asyncpg
:data:`Connection`. Every connection goes back to the pool when the endpoint returns.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Any

from fastapi import APIRouter, FastAPI, HTTPException, Query, Response
from fastapi.responses import StreamingResponse
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from poolwarden import Database
from poolwarden.fastapi import (
    Connection,
    ReadSession,
    WriteSession,
    install,
    lifespan,
    route_deadline,
    state_of,
)

from .models import DDL, NEXT_STATUSES, SCHEMA_LOCK_KEY, Order, User
from .schemas import OrderIn, OrderOut, OrderPatch, RevenueLine, UserIn, UserOut, UserPatch


def env_seconds(name: str, default: float) -> float:
    """A positive number of seconds from the environment variable ``name``."""
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    value = float(raw)
    if not value > 0:
        raise ValueError(f"{name} must be > 0 seconds, got {raw!r}")
    return value


DEADLINE_S = env_seconds("SERVICE_DEADLINE_S", 2.0)
REPORT_DEADLINE_S = env_seconds("SERVICE_REPORT_DEADLINE_S", 10.0)
MAX_PAGE = 500

router = APIRouter()


# ---------------------------------------------------------------------- users


@router.post("/users", status_code=201, response_model=UserOut)
async def create_user(body: UserIn, session: WriteSession) -> User:
    user = User(email=body.email, name=body.name)
    session.add(user)
    try:
        await session.flush()
    except IntegrityError:
        raise HTTPException(409, "email already registered") from None
    return user


@router.get("/users", response_model=list[UserOut])
async def list_users(
    session: ReadSession, after_id: int = 0, limit: int = Query(50, ge=1, le=MAX_PAGE)
) -> Sequence[User]:
    """Users by id, a page at a time (keyset: pass the last id seen as ``after_id``)."""
    found = await session.scalars(
        select(User).where(User.id > after_id).order_by(User.id).limit(limit)
    )
    return found.all()


@router.get("/users/{user_id}", response_model=UserOut)
async def get_user(user_id: int, session: ReadSession) -> User:
    user = await session.get(User, user_id)
    if user is None:
        raise HTTPException(404, "user not found")
    return user


@router.patch("/users/{user_id}", response_model=UserOut)
async def update_user(user_id: int, body: UserPatch, session: WriteSession) -> User:
    user = await session.get(User, user_id, with_for_update=True)
    if user is None:
        raise HTTPException(404, "user not found")
    for field, value in body.model_dump(exclude_none=True).items():
        setattr(user, field, value)
    try:
        await session.flush()
    except IntegrityError:
        raise HTTPException(409, "email already registered") from None
    return user


# ---------------------------------------------------------------------- orders


@router.post("/users/{user_id}/orders", status_code=201, response_model=OrderOut)
async def create_order(user_id: int, body: OrderIn, session: WriteSession) -> Order:
    if await session.get(User, user_id) is None:
        raise HTTPException(404, "user not found")
    order = Order(user_id=user_id, **body.model_dump())
    session.add(order)
    await session.flush()
    return order


_ORDERS_SQL = """
SELECT id, user_id, item, quantity, price_cents, status, created_at
FROM orders WHERE user_id = $1 AND id > $2 ORDER BY id LIMIT $3
"""


@router.get("/users/{user_id}/orders", response_model=list[OrderOut])
async def list_orders(
    user_id: int, conn: Connection, after_id: int = 0,
    limit: int = Query(50, ge=1, le=MAX_PAGE),
) -> list[dict[str, Any]]:
    """A user's orders, on the raw asyncpg path (one round trip when there are some)."""
    rows = await conn.fetch(_ORDERS_SQL, user_id, after_id, limit)
    if not rows and not await conn.fetchval(
        "SELECT EXISTS (SELECT 1 FROM users WHERE id = $1)", user_id
    ):
        raise HTTPException(404, "user not found")
    return [dict(row) for row in rows]


@router.get("/users/{user_id}/orders.csv")
async def export_orders(user_id: int, session: ReadSession) -> StreamingResponse:
    """The user's orders as CSV. The rows are read *before* the stream starts: the session
    is released when this function returns, not when a slow client has read it all."""
    if await session.get(User, user_id) is None:
        raise HTTPException(404, "user not found")
    orders = (await session.scalars(
        select(Order).where(Order.user_id == user_id).order_by(Order.id)
    )).all()
    lines = [
        f"{o.id},{o.item.replace(',', ' ')},{o.quantity},{o.price_cents},{o.status}\n"
        for o in orders
    ]

    async def body() -> AsyncIterator[str]:
        yield "id,item,quantity,price_cents,status\n"
        for line in lines:
            yield line

    return StreamingResponse(body(), media_type="text/csv")


@router.get("/orders/{order_id}", response_model=OrderOut)
async def get_order(order_id: int, session: ReadSession) -> Order:
    order = await session.get(Order, order_id)
    if order is None:
        raise HTTPException(404, "order not found")
    return order


@router.patch("/orders/{order_id}", response_model=OrderOut)
async def update_order(order_id: int, body: OrderPatch, session: WriteSession) -> Order:
    order = await session.get(Order, order_id, with_for_update=True)
    if order is None:
        raise HTTPException(404, "order not found")
    if body.status != order.status and body.status not in NEXT_STATUSES[order.status]:
        raise HTTPException(409, f"an order that is {order.status} cannot become {body.status}")
    order.status = body.status
    return order


@router.delete("/orders/{order_id}", status_code=204)
async def delete_order(order_id: int, session: WriteSession) -> Response:
    order = await session.get(Order, order_id)
    if order is None:
        raise HTTPException(404, "order not found")
    await session.delete(order)
    return Response(status_code=204)


# ---------------------------------------------------------------------- reports

_REVENUE_SQL = """
SELECT status, count(*) AS orders, coalesce(sum(quantity::bigint * price_cents), 0)::bigint
       AS revenue_cents
FROM orders WHERE created_at > now() - make_interval(days => $1)
GROUP BY status ORDER BY status
"""


@router.get(
    "/reports/revenue", response_model=list[RevenueLine],
    dependencies=[route_deadline(REPORT_DEADLINE_S)],
)
async def revenue(
    conn: Connection, days: int = Query(30, ge=1, le=3650),
    simulate_ms: int = Query(0, ge=0, le=60_000),
) -> list[dict[str, Any]]:
    """Orders and revenue by status over the last ``days``. ``simulate_ms`` adds that much
    server time first (``pg_sleep``), to try the service under slow queries. Reports have
    their own, longer budget (``SERVICE_REPORT_DEADLINE_S``)."""
    if simulate_ms:
        await conn.execute("SELECT pg_sleep($1)", simulate_ms / 1000.0)
    return [dict(row) for row in await conn.fetch(_REVENUE_SQL, days)]


# ---------------------------------------------------------------------- the app


@asynccontextmanager
async def create_schema(app: FastAPI) -> AsyncIterator[None]:
    """The application's own lifespan: create the tables (once, whichever worker is first)."""
    async with state_of(app).database.transaction() as conn:
        await conn.execute("SELECT pg_advisory_xact_lock($1)", SCHEMA_LOCK_KEY)
        for statement in DDL:
            await conn.execute(statement)
    yield


def create_app(database: Database | Callable[[], Database] | None = None) -> FastAPI:
    """The service; ``database`` defaults to ``Database.from_env`` (called at start-up)."""
    app = FastAPI(
        title="poolwarden example: users and orders",
        lifespan=lifespan(
            database or Database.from_env,
            then=create_schema,
            drain_timeout_s=env_seconds("SERVICE_DRAIN_TIMEOUT_S", 10.0),
            health_interval_s=env_seconds("SERVICE_HEALTH_INTERVAL_S", 5.0),
        ),
    )
    install(app, default_deadline_s=DEADLINE_S)
    app.include_router(router)
    return app


app = create_app()
