"""RFC 9457 problem details and paginated lists: the one shape of every error and of every list."""

from __future__ import annotations

from typing import Generic, TypeVar

from pydantic import Field

from flowmesh.contracts.models.base import WireModel

T = TypeVar("T")


class FieldError(WireModel):
    """One problem with an input, located by a JSON pointer."""

    path: str
    message: str


class Problem(WireModel):
    """An ``application/problem+json`` body."""

    type: str = "about:blank"
    title: str
    status: int
    detail: str | None = None
    instance: str | None = None
    errors: list[FieldError] | None = None


class Page(WireModel, Generic[T]):
    """One page of a list: ``{items, total, page, pageSize, hasMore}``."""

    items: list[T]
    total: int
    page: int = Field(ge=1)
    page_size: int = Field(ge=1, le=100)
    has_more: bool


class PageQuery(WireModel):
    """Which page of a list to read (``page`` from 1, ``pageSize`` at most 100, default 20)."""

    page: int = Field(default=1, ge=1, le=1_000_000)
    page_size: int = Field(default=20, ge=1, le=100)

    @property
    def offset(self) -> int:
        """Rows to skip."""
        return (self.page - 1) * self.page_size

    def page_of(self, items: list[T], total: int) -> Page[T]:
        """The page these items make, out of ``total``."""
        return Page(
            items=items,
            total=total,
            page=self.page,
            page_size=self.page_size,
            has_more=self.offset + len(items) < total,
        )
