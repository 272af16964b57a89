"""Request and response bodies (pydantic), shared with ``bench/service_plain``."""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

Status = Literal["pending", "paid", "shipped", "cancelled"]
# A light check (no email-validator dependency): something@something.tld, no spaces.
EMAIL = r"^[^@\s]+@[^@\s]+\.[^@\s]+$"


class UserIn(BaseModel):
    email: str = Field(pattern=EMAIL, max_length=320)
    name: str = Field(min_length=1, max_length=200)


class UserPatch(BaseModel):
    email: str | None = Field(default=None, pattern=EMAIL, max_length=320)
    name: str | None = Field(default=None, min_length=1, max_length=200)


class UserOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: int
    email: str
    name: str
    created_at: datetime


class OrderIn(BaseModel):
    item: str = Field(min_length=1, max_length=200)
    quantity: int = Field(gt=0, le=10_000)
    price_cents: int = Field(ge=0)


class OrderPatch(BaseModel):
    status: Status


class OrderOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: int
    user_id: int
    item: str
    quantity: int
    price_cents: int
    status: Status
    created_at: datetime


class RevenueLine(BaseModel):
    status: Status
    orders: int
    revenue_cents: int
