import numpy as np

from onegen.roles import CTX, GEN, IGNORE_INDEX, RET, check_row_invariants, next_token_targets, ret_positions


def test_query_targets_follow_roles():
    ids = [10, 11, 12, 13, 14, 15, 16, 17]
    roles = [CTX, CTX, GEN, RET, CTX, CTX, GEN, GEN]
    t = next_token_targets(ids, roles, is_query=True)
    # target at t-1 is token t iff token t is GEN, or RET in a query row
    assert t.tolist() == [IGNORE_INDEX, 12, 13, IGNORE_INDEX, IGNORE_INDEX, 16, 17, IGNORE_INDEX]
    # the RET position itself (index 3) never predicts anything: the next token is CTX
    assert t[3] == IGNORE_INDEX
    assert ret_positions(roles).tolist() == [3]
    assert check_row_invariants(roles, is_query=True) == []


def test_document_rows_have_no_targets():
    roles = [CTX, CTX, CTX, RET]
    assert (next_token_targets([1, 2, 3, 4], roles, is_query=False) == IGNORE_INDEX).all()
    assert check_row_invariants(roles, is_query=False) == []
    assert check_row_invariants([CTX, RET, CTX], is_query=False)  # does not end with RET


def test_invariant_catches_prediction_after_ret():
    problems = check_row_invariants([CTX, RET, GEN], is_query=True)
    assert problems and "after RET" in problems[0]


def test_length_mismatch_is_an_error():
    try:
        next_token_targets([1, 2], [CTX], is_query=True)
    except ValueError as e:
        assert "differ in length" in str(e)
    else:
        raise AssertionError("expected ValueError")
