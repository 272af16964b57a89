"""The example service the way the seed documents write it: a plain SQLAlchemy
``create_async_engine`` (``AsyncAdaptedQueuePool``) and a ``Depends(get_db)`` session.

Same endpoints, schema, SQL and pool sizes as ``examples/service`` — only the connection
layer differs: no request deadline, no bounded wait queue (``pool_timeout=30``, the seeds'
value), exceptions left to FastAPI's default 500, the session released after the response.
This is the baseline of ``bench/service_load.py``, not an example to follow.

Environment: ``DATABASE_URL``, ``DB_POOL_SIZE``, ``DB_MAX_OVERFLOW``, ``DB_POOL_TIMEOUT``,
``DB_APPLICATION_NAME``.
"""

# B008: `db: AsyncSession = Depends(get_db)` is the seeds' idiom, kept on purpose here.
# ruff: noqa: B008

from __future__ import annotations

import os
from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from examples.service.models import DDL, NEXT_STATUSES, SCHEMA_LOCK_KEY, Order, User
from examples.service.schemas import OrderIn, OrderOut, OrderPatch, RevenueLine, UserIn, UserOut
from fastapi import Depends, FastAPI, HTTPException, Query
from sqlalchemy import select, text
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker, create_async_engine

url = os.environ["DATABASE_URL"].replace("postgresql://", "postgresql+asyncpg://", 1)
engine = create_async_engine(
    url,
    pool_size=int(os.environ.get("DB_POOL_SIZE", "5")),
    max_overflow=int(os.environ.get("DB_MAX_OVERFLOW", "10")),
    pool_timeout=float(os.environ.get("DB_POOL_TIMEOUT", "30")),
    pool_recycle=1800,
    pool_pre_ping=True,
    connect_args={"server_settings": {
        "application_name": os.environ.get("DB_APPLICATION_NAME", "plain-service")}},
)
async_session_maker = async_sessionmaker(
    engine, class_=AsyncSession, expire_on_commit=False, autoflush=False
)


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    async with engine.begin() as conn:
        await conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": SCHEMA_LOCK_KEY})
        for statement in DDL:
            await conn.execute(text(statement))
    yield
    await engine.dispose()


app = FastAPI(lifespan=lifespan)


async def get_db() -> AsyncGenerator[AsyncSession, None]:
    async with async_session_maker() as session:
        try:
            yield session
            await session.commit()
        except Exception:
            await session.rollback()
            raise


@app.get("/health/db")
async def db_health() -> dict[str, Any]:
    async with engine.connect() as conn:
        await conn.execute(text("SELECT 1"))
    return {"status": "healthy", "checked_out": engine.pool.checkedout()}  # type: ignore[attr-defined]


@app.post("/users", status_code=201, response_model=UserOut)
async def create_user(body: UserIn, db: AsyncSession = Depends(get_db)) -> User:
    user = User(email=body.email, name=body.name)
    db.add(user)
    try:
        await db.flush()
    except IntegrityError:
        raise HTTPException(409, "email already registered") from None
    return user


@app.get("/users/{user_id}", response_model=UserOut)
async def get_user(user_id: int, db: AsyncSession = Depends(get_db)) -> User:
    user = await db.get(User, user_id)
    if user is None:
        raise HTTPException(404, "user not found")
    return user


@app.post("/users/{user_id}/orders", status_code=201, response_model=OrderOut)
async def create_order(user_id: int, body: OrderIn, db: AsyncSession = Depends(get_db)) -> Order:
    if await db.get(User, user_id) is None:
        raise HTTPException(404, "user not found")
    order = Order(user_id=user_id, **body.model_dump())
    db.add(order)
    await db.flush()
    return order


@app.get("/users/{user_id}/orders", response_model=list[OrderOut])
async def list_orders(
    user_id: int, after_id: int = 0, limit: int = Query(50, ge=1, le=500),
    db: AsyncSession = Depends(get_db),
) -> list[Order]:
    found = await db.scalars(
        select(Order).where(Order.user_id == user_id, Order.id > after_id)
        .order_by(Order.id).limit(limit)
    )
    return list(found.all())


@app.patch("/orders/{order_id}", response_model=OrderOut)
async def update_order(
    order_id: int, body: OrderPatch, db: AsyncSession = Depends(get_db)
) -> Order:
    order = await db.get(Order, order_id, with_for_update=True)
    if order is None:
        raise HTTPException(404, "order not found")
    if body.status != order.status and body.status not in NEXT_STATUSES[order.status]:
        raise HTTPException(409, f"an order that is {order.status} cannot become {body.status}")
    order.status = body.status
    return order


_REVENUE_SQL = text("""
SELECT status, count(*) AS orders, coalesce(sum(quantity::bigint * price_cents), 0)::bigint
       AS revenue_cents
FROM orders WHERE created_at > now() - make_interval(days => :days)
GROUP BY status ORDER BY status
""")


@app.get("/reports/revenue", response_model=list[RevenueLine])
async def revenue(
    days: int = Query(30, ge=1, le=3650), simulate_ms: int = Query(0, ge=0, le=60_000),
    db: AsyncSession = Depends(get_db),
) -> list[dict[str, Any]]:
    if simulate_ms:
        await db.execute(text("SELECT pg_sleep(:s)"), {"s": simulate_ms / 1000.0})
    rows = await db.execute(_REVENUE_SQL, {"days": days})
    return [dict(row._mapping) for row in rows]
