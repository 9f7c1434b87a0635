"""The CancelBoard: marks by request id, and ids that are safe file names."""

import pytest

from hetserve.cancel import CancelBoard, attempt_id, check_request_id


def test_mark_read_clear(tmp_path):
    board = CancelBoard(str(tmp_path / "board"))
    assert board.cancelled() == set()
    board.cancel("abc123")
    board.cancel("x-y_z.1")
    assert CancelBoard(str(tmp_path / "board")).cancelled() == {"abc123", "x-y_z.1"}  # another process's view
    board.clear("abc123")
    board.clear("never-marked")
    assert board.cancelled() == {"x-y_z.1"}


@pytest.mark.parametrize("bad", ["", "..", "a/b", "../../etc/passwd", "x" * 129, "sp ace"])
def test_unsafe_ids_are_refused(bad):
    with pytest.raises(ValueError, match="request_id"):
        check_request_id(bad)


@pytest.mark.parametrize("request_id", ["abc123", "x" * 120, "y" * 128])
def test_each_prefill_attempt_has_its_own_valid_id(request_id):
    ids = [attempt_id(request_id, n) for n in range(3)]
    assert len(set(ids)) == 3 and all(check_request_id(i) == i for i in ids)
    assert all(i.startswith(request_id[:100]) for i in ids)


def test_long_ids_stay_distinct_when_cut():
    a, b = "x" * 127 + "a", "x" * 127 + "b"
    assert attempt_id(a, 0) != attempt_id(b, 0)


def test_a_given_up_attempts_mark_does_not_cancel_the_next(tmp_path):
    board = CancelBoard(str(tmp_path / "board"))
    board.cancel(attempt_id("req", 0))  # llm gave up on the first tier
    assert attempt_id("req", 1) not in board.cancelled()
