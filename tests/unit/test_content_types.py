from __future__ import annotations

import pytest

from content_retry.content_types import ContentType, UnknownContentTypeError, parse_content_types


def test_none_means_every_type_in_canonical_order() -> None:
    assert parse_content_types(None) == (
        ContentType.TUTORIAL,
        ContentType.RESOURCES,
        ContentType.QUIZ,
    )


def test_duplicates_and_order_do_not_change_the_result() -> None:
    assert parse_content_types(["quiz", "tutorial", "quiz"]) == (
        ContentType.TUTORIAL,
        ContentType.QUIZ,
    )


@pytest.mark.parametrize("bad", [["tutorials"], ["TUTORIAL"], ["quiz", "video"], [""]])
def test_unknown_names_are_rejected_naming_the_valid_ones(bad: list[str]) -> None:
    with pytest.raises(
        UnknownContentTypeError, match="valid content types are: tutorial, resources, quiz"
    ):
        parse_content_types(bad)


def test_an_empty_list_is_rejected() -> None:
    with pytest.raises(UnknownContentTypeError, match="empty"):
        parse_content_types([])
