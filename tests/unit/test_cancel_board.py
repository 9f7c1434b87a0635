"""The CancelBoard: marks by request id, and ids that are safe file names."""

import pytest

from hetserve.cancel import CancelBoard, check_request_id


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
