"""errors.py: a UserError is found by its type behind Ray's wrappers, and printed as one line."""

from __future__ import annotations

import pytest
from ray.exceptions import RayTaskError

from ilias_ray.errors import UserError, causes, one_line, user_error


def raised_in_a_task(e: BaseException) -> RayTaskError:
    """What the driver gets when a task raises `e`: Ray's own wrapper, as Ray builds it."""
    try:
        raise e
    except BaseException as inner:
        return RayTaskError("decode_blocks", "Traceback ...\nilias_ray.errors.UserError: ...", inner)


def test_a_user_error_is_found_by_type_behind_rays_wrappers():
    mine = UserError("--dataset_dir /x: not found")
    task = raised_in_a_task(mine)
    wrapped = task.as_instanceof_cause()  # what ray.get raises: also an instance of UserError
    assert isinstance(wrapped, UserError) and str(wrapped) != str(mine)  # its text is Ray's traceback
    assert user_error(wrapped) is mine and user_error(task) is mine  # the innermost: our own text
    try:
        raise RuntimeError("Ray Data stopped the run") from wrapped
    except RuntimeError as outer:
        assert user_error(outer) is mine
        assert [type(c) for c in causes(outer)][0] is RuntimeError
    assert user_error(raised_in_a_task(ValueError("a bug"))) is None
    assert user_error(ValueError("plain")) is None


def test_causes_visit_each_exception_once():
    a, b = UserError("a"), UserError("b")
    a.__cause__, b.__cause__ = b, a  # a loop
    assert list(causes(a)) == [a, b]


@pytest.mark.parametrize(
    "text, line", [("one", "one"), ("first\nTo change retry attempts ...", "first"), ("", ""), ("  \n x", "x")]
)
def test_one_line_is_the_first_line(text, line):
    assert one_line(UserError(text)) == line
