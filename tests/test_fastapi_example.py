"""The example service in process (httpx, lifespan run by the test) on real PostgreSQL:
CRUD of users and orders, the streamed export, the report, and every connection back in the
pool afterwards."""

from __future__ import annotations

from fastapi_helpers import (
    create_database,
    database_for,
    dsn_for_database,
    example_app,
    serve_in_process,
    unique_app_name,
)
from poolwarden.embedded import EmbeddedPostgres
from poolwarden.fastapi import state_of


async def test_users_and_orders_crud_in_process(pg: EmbeddedPostgres) -> None:
    """Create, read, update, list, export and delete through the example's dependencies;
    validation, conflicts and unknown ids answer 422/409/404; nothing stays checked out."""
    dsn = dsn_for_database(pg, await create_database(pg))
    app = example_app(database_for(dsn, unique_app_name()))
    async with serve_in_process(app) as client:
        ada = (await client.post("/users", json={"email": "ada@example.com", "name": "Ada"}))
        assert ada.status_code == 201
        uid = ada.json()["id"]
        bob = await client.post("/users", json={"email": "bob@example.com", "name": "Bob"})
        assert bob.status_code == 201
        clash = await client.patch(f"/users/{uid}", json={"email": "bob@example.com"})
        assert clash.status_code == 409
        assert (await client.get(f"/users/{uid}")).json()["email"] == "ada@example.com"
        assert (await client.post("/users", json={"email": "x@y.z", "name": ""})).status_code \
            == 422
        page = (await client.get("/users", params={"limit": 1})).json()
        assert [u["id"] for u in page] == [uid]
        after = (await client.get("/users", params={"after_id": uid})).json()
        assert [u["email"] for u in after] == ["bob@example.com"]

        orders = [
            (await client.post(f"/users/{uid}/orders",
                               json={"item": item, "quantity": 1, "price_cents": 500})).json()
            for item in ("tea", "cup")
        ]
        assert [o["status"] for o in orders] == ["pending", "pending"]
        assert (await client.post("/users/0/orders",
                                  json={"item": "x", "quantity": 1, "price_cents": 1})
                ).status_code == 404
        listed = (await client.get(f"/users/{uid}/orders", params={"limit": 1})).json()
        assert [o["item"] for o in listed] == ["tea"]
        paid = await client.patch(f"/orders/{orders[0]['id']}", json={"status": "paid"})
        assert paid.json()["status"] == "paid"
        assert (await client.patch(f"/orders/{orders[1]['id']}", json={"status": "shipped"})
                ).status_code == 409
        export = await client.get(f"/users/{uid}/orders.csv")
        assert export.headers["content-type"].startswith("text/csv")
        assert export.text.splitlines()[1:] == [f"{orders[0]['id']},tea,1,500,paid",
                                                f"{orders[1]['id']},cup,1,500,pending"]
        report = (await client.get("/reports/revenue")).json()
        assert sorted((r["status"], r["orders"]) for r in report) == [("paid", 1), ("pending", 1)]
        assert (await client.delete(f"/orders/{orders[1]['id']}")).status_code == 204
        assert (await client.get(f"/orders/{orders[1]['id']}")).status_code == 404
        assert (await client.get("/users/0/orders")).status_code == 404
        assert state_of(app).database.stats()["primary"].connections_in_use == 0
