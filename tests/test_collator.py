"""The collator: dynamic padding, unique docs, RET→doc indices, deterministic negatives, modes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from onegen.roles import CTX, GEN, IGNORE_INDEX, RET, check_row_invariants
from pipeline.collator import CollatorConfig, OneGenCollator, doc_id_hash
from pipeline.negatives import pick_negatives

PAD, EOS, RQ, RD, P_OPEN, P_CLOSE = 0, 1, 90, 91, 92, 93


def make_doc(doc_id: str, n: int) -> dict:
    body = [10 + int(doc_id[1:]) % 7 + i % 5 for i in range(n)]
    ids = body + [RD]
    return {"doc_id": doc_id, "input_ids": ids, "roles": [CTX] * n + [RET]}


DOCS = {f"d{i}": make_doc(f"d{i}", 3 + i) for i in range(20)}


def make_query(example_id: str, prompt: int, hops: list[tuple[str, list[str]]], answer: int) -> dict:
    """prompt (CTX) · per hop: 2 GEN, [RQ] (RET), <paragraph> doc </paragraph> (CTX) · answer GEN · EOS."""
    ids, roles = list(range(40, 40 + prompt)), [CTX] * prompt
    for _ in hops:
        ids += [50, 51, RQ, P_OPEN, 60, 61, P_CLOSE]
        roles += [GEN, GEN, RET, CTX, CTX, CTX, CTX]
    ids += list(range(70, 70 + answer)) + [EOS]
    roles += [GEN] * (answer + 1)
    ret = [i for i, r in enumerate(roles) if r == RET]
    row = {
        "example_id": example_id,
        "input_ids": np.asarray(ids, dtype=np.int32),
        "roles": np.asarray(roles, dtype=np.int8),
        "ret_positions": np.asarray(ret, dtype=np.int32),
        "positives": [p for p, _ in hops],
        "negatives": [n for _, n in hops],
    }
    assert check_row_invariants(row["roles"], is_query=True) == []
    return row


Q0 = make_query("e0", 5, [("d1", ["d3", "d4", "d5", "d1", "d2"]), ("d2", ["d6", "d7", "d2", "d1", "d8"])], 4)
Q1 = make_query("e1", 3, [("d1", ["d2", "d9", "d10", "d11"])], 2)
Q2 = make_query("e2", 2, [], 30)  # no retrieval, long answer


class Lookup:
    def __init__(self) -> None:
        self.calls: list[list[str]] = []

    def __call__(self, doc_ids: list[str]) -> list[dict]:
        self.calls.append(list(doc_ids))
        return [DOCS[d] for d in doc_ids]


def collate(rows, epoch=0, **kw):
    lookup = Lookup()
    batch = OneGenCollator(lookup, PAD, CollatorConfig(**kw))(rows, epoch)
    return batch, lookup


def ret_positions(row) -> list[int]:
    return [int(p) for p in np.flatnonzero(np.asarray(row["roles"]) == RET)]


# --------------------------------------------------------------------------------------- negatives


def test_pick_negatives_pure_without_replacement():
    mined = [f"n{i}" for i in range(10)]
    a = pick_negatives(mined, 3, "ex", 0, 0, 0)
    assert len(a) == 3 == len(set(a)) and set(a) <= set(mined)
    assert a == pick_negatives(mined, 3, "ex", 0, 0, 0)
    assert a == pick_negatives(list(reversed(mined)), 3, "ex", 0, 0, 0)[::-1]  # a function of the set
    assert pick_negatives(["x", "y", "x"], 5, "ex", 0, 0, 0) == ["x", "y"]
    assert pick_negatives(mined, 0, "ex", 0, 0, 0) == []
    # Each of example, hop, epoch, seed changes the draw (for some value).
    base = {"example_id": "ex", "hop": 0, "epoch": 0, "seed": 0}
    for key in base:
        values = [f"ex{i}" for i in range(8)] if key == "example_id" else list(range(8))
        draws = {tuple(pick_negatives(mined, 3, **{**base, key: v})) for v in values}
        assert len(draws) > 1, key


# ------------------------------------------------------------------------------------------ padding


def test_dynamic_padding_to_batch_longest_rounded():
    lens = [len(Q0["input_ids"]), len(Q1["input_ids"])]
    batch, _ = collate([Q0, Q1], pad_to_multiple_of=8)
    width = -(-max(lens) // 8) * 8
    assert batch.input_ids.shape == (2, width)
    assert batch.attention_mask.sum(1).tolist() == lens
    assert (batch.input_ids[batch.attention_mask == 0] == PAD).all()
    assert batch.input_ids.dtype == torch.int64 and batch.gen_targets.dtype == torch.int64
    # A batch with only the short row is padded to *its* length, not to the longest row seen so far.
    small, _ = collate([Q1], pad_to_multiple_of=None)
    assert small.input_ids.shape == (1, len(Q1["input_ids"]))
    # Docs too: padded to the longest doc of this batch.
    dlens = [len(DOCS[d]["input_ids"]) for d in batch.doc_ids]
    assert batch.doc_input_ids.shape[1] == -(-max(dlens) // 8) * 8
    assert batch.doc_attention_mask.sum(1).tolist() == dlens


def test_num_tokens_and_to():
    batch, _ = collate([Q0, Q1])
    real = len(Q0["input_ids"]) + len(Q1["input_ids"]) + sum(len(DOCS[d]["input_ids"]) for d in batch.doc_ids)
    assert batch.num_tokens() == real
    moved = batch.to("cpu")
    assert torch.equal(moved.q_neg_doc, batch.q_neg_doc) and moved.doc_ids == batch.doc_ids


# ------------------------------------------------------------------------------------------- docs


def test_docs_unique_and_every_ret_maps_to_its_positive():
    batch, lookup = collate([Q0, Q1], num_negatives=3)
    assert len(lookup.calls) == 1 and lookup.calls[0] == batch.doc_ids
    assert len(set(batch.doc_ids)) == len(batch.doc_ids)
    needed = {"d1", "d2"} | {n for negs in batch.q_neg_ids for n in negs}
    assert set(batch.doc_ids) == needed
    expected = [(0, p, pos) for p, pos in zip(ret_positions(Q0), Q0["positives"])]
    expected += [(1, p, pos) for p, pos in zip(ret_positions(Q1), Q1["positives"])]
    assert batch.num_ret == len(expected) == 3
    for j, (row, pos, pos_id) in enumerate(expected):
        assert (batch.q_ret_row[j].item(), batch.q_ret_pos[j].item()) == (row, pos)
        assert batch.input_ids[row, pos].item() == RQ
        assert batch.doc_ids[batch.q_pos_doc[j]] == pos_id == batch.q_pos_ids[j]
        assert batch.q_pos_hash[j].item() == doc_id_hash(pos_id)
        negs = [batch.doc_ids[i] for i, m in zip(batch.q_neg_doc[j].tolist(), batch.q_neg_mask[j].tolist()) if m]
        assert negs == batch.q_neg_ids[j]
        assert (batch.q_neg_doc[j][~batch.q_neg_mask[j]] == -1).all()
    for i, d in enumerate(batch.doc_ids):
        ids = DOCS[d]["input_ids"]
        assert batch.doc_ret_pos[i].item() == len(ids) - 1
        assert batch.doc_input_ids[i, : len(ids)].tolist() == ids
        assert batch.doc_input_ids[i, batch.doc_ret_pos[i]].item() == RD
        assert batch.doc_hash[i].item() == doc_id_hash(d)
    assert batch.q_neg_mask.dtype == torch.bool and batch.doc_hash.dtype == torch.int64


def test_no_negative_is_a_positive_of_its_example():
    for epoch in range(15):
        batch, _ = collate([Q0, Q1], epoch=epoch, num_negatives=4)
        for j, negs in enumerate(batch.q_neg_ids):
            row = batch.q_ret_row[j].item()
            own = set([Q0, Q1][row]["positives"])
            assert not own & set(negs), (epoch, j, negs)
            pos = batch.q_pos_doc[j]
            assert not (batch.q_neg_doc[j][batch.q_neg_mask[j]] == pos).any()


def test_ragged_negatives_padded_with_minus_one():
    q = make_query("e9", 2, [("d1", ["d3"]), ("d2", ["d4", "d5", "d6"])], 1)
    batch, _ = collate([q], num_negatives=3)
    assert batch.q_neg_doc.shape == (2, 3)
    assert batch.q_neg_mask.tolist() == [[True, False, False], [True, True, True]]
    assert batch.q_neg_doc[0, 1:].tolist() == [-1, -1]


def test_negatives_deterministic_independent_of_batch_and_change_with_epoch():
    a, _ = collate([Q0, Q1], epoch=3, num_negatives=2, seed=7)
    b, _ = collate([Q0], epoch=3, num_negatives=2, seed=7)
    c, _ = collate([Q1, Q0], epoch=3, num_negatives=2, seed=7)
    assert a.q_neg_ids[:2] == b.q_neg_ids == c.q_neg_ids[1:]
    per_epoch = {tuple(map(tuple, collate([Q0], epoch=e, num_negatives=2, seed=7)[0].q_neg_ids)) for e in range(8)}
    assert len(per_epoch) > 1
    per_seed = {tuple(map(tuple, collate([Q0], epoch=3, num_negatives=2, seed=s)[0].q_neg_ids)) for s in range(8)}
    assert len(per_seed) > 1


def test_max_docs_per_batch_drops_negatives_never_positives():
    batch, _ = collate([Q0, Q1], num_negatives=3, max_docs_per_batch=4)
    assert batch.num_docs == 4
    assert {"d1", "d2"} <= set(batch.doc_ids)
    assert all(set(n) <= set(batch.doc_ids) for n in batch.q_neg_ids)
    assert sum(len(n) for n in batch.q_neg_ids) >= 2  # round-robin: first negatives kept
    with pytest.raises(ValueError, match="max_docs_per_batch"):
        collate([Q0, Q1], max_docs_per_batch=1)


def test_mismatched_positives_rejected():
    bad = dict(Q1, positives=["d1", "d2"])
    with pytest.raises(ValueError, match="RET tokens"):
        collate([bad])


# -------------------------------------------------------------------------------------- targets


def test_targets_from_roles_and_no_target_at_ret_position():
    batch, _ = collate([Q0, Q1, Q2])
    assert batch.gen_targets.shape[0] == 3  # only query rows carry targets; docs have none
    for b, row in enumerate([Q0, Q1, Q2]):
        ids, roles = np.asarray(row["input_ids"]), np.asarray(row["roles"])
        tg = batch.gen_targets[b]
        learned = [t for t in range(1, len(ids)) if roles[t] in (GEN, RET)]
        assert sorted(np.flatnonzero(tg.numpy() != IGNORE_INDEX).tolist()) == [t - 1 for t in learned]
        for t in learned:
            assert tg[t - 1].item() == ids[t]
        for p in ret_positions(row):
            assert tg[p].item() == IGNORE_INDEX  # a RET position never predicts the next token
            assert tg[p - 1].item() == RQ  # but emitting [RQ] is learned
        assert (tg[len(ids) - 1 :] == IGNORE_INDEX).all()
    assert batch.num_gen_targets() == sum(int(((np.asarray(r["roles"])[1:]) != CTX).sum()) for r in [Q0, Q1, Q2])


# ---------------------------------------------------------------------------------------- modes


def test_mode_git_has_no_docs_but_learns_ret_emission():
    batch, lookup = collate([Q0, Q1], mode="git")
    assert batch.num_docs == 0 and batch.num_ret == 0 and lookup.calls == []
    assert batch.doc_input_ids.shape[0] == 0
    p = ret_positions(Q0)[0]
    assert batch.gen_targets[0, p - 1].item() == RQ
    assert batch.num_gen_targets() == collate([Q0, Q1])[0].num_gen_targets()


def test_mode_rit_has_no_targets():
    batch, _ = collate([Q0, Q1], mode="rit")
    assert (batch.gen_targets == IGNORE_INDEX).all()
    assert batch.num_ret == 3 and batch.num_docs > 0


def test_mode_grit_separates_generation_and_retrieval_rows():
    one, _ = collate([Q0, Q1], mode="onegen", num_negatives=2)
    batch, _ = collate([Q0, Q1], mode="grit", num_negatives=2)
    rows = [Q0, Q1]
    n_ret = sum(len(ret_positions(r)) for r in rows)
    assert batch.input_ids.shape[0] == len(rows) + n_ret
    assert torch.equal(batch.gen_targets[: len(rows)], one.gen_targets[:, : batch.gen_targets.shape[1]])
    assert (batch.gen_targets[len(rows) :] == IGNORE_INDEX).all()
    srcs = [(b, p) for b, r in enumerate(rows) for p in ret_positions(r)]
    for j, (src, p) in enumerate(srcs):
        row = batch.q_ret_row[j].item()
        assert row == len(rows) + j  # retrieval vectors never come from a generation row
        length = int(batch.attention_mask[row].sum())
        assert batch.q_ret_pos[j].item() == p == length - 1  # the RET token ends the retrieval row
        assert batch.input_ids[row, length - 1].item() == RQ
        assert batch.input_ids[row, :length].tolist() == list(map(int, rows[src]["input_ids"][: p + 1]))
    assert batch.q_pos_ids == one.q_pos_ids and batch.q_neg_ids == one.q_neg_ids


def test_unknown_mode_rejected():
    with pytest.raises(ValueError, match="mode"):
        CollatorConfig(mode="sft")
