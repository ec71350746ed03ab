"""Run the shard builders of ``data_prep.prepare``: in this process, or in a pool of forked workers.

Workers read the parent's state (set before the fork, copy-on-write, never pickled); each shard is a
pure function of its index, so the shards are the same for any number of processes.
"""

from __future__ import annotations

import functools
import multiprocessing as mp
import os
from typing import Any

from tqdm import tqdm


def _worker_init() -> None:
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    try:
        # torch only to cap a worker's threads; imported here so the pool itself need not load it
        import torch

        torch.set_num_threads(1)
    except ImportError:
        pass


def run_shards(fn, todo: list[int], num_proc: int, desc: str) -> list[dict]:
    results = []
    if not todo:
        return results
    # Closed before an error propagates, so the CLI's `error: ...` line is the last thing on stderr.
    with tqdm(total=len(todo), desc=desc, unit="shard", disable=len(todo) < 2) as bar:
        if num_proc <= 1:
            for i in todo:
                results.append(fn(i))
                bar.update()
        else:
            # A worker's error comes back as a value and is raised once every task has finished:
            # an exception raised through imap while workers were still busy made the pool's
            # teardown hang now and then (seen in CI).
            errors = []
            with mp.get_context("fork").Pool(num_proc, initializer=_worker_init) as pool:
                for ok, r in pool.imap_unordered(functools.partial(_call_safely, fn), todo):
                    (results if ok else errors).append(r)
                    bar.update()
            if errors:
                raise errors[0]
    return results


def _call_safely(fn, i: int) -> tuple[bool, Any]:
    try:
        return True, fn(i)
    except Exception as e:  # noqa: BLE001 - handed to the parent, which raises it
        return False, e
