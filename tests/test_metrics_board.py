"""The counter board (vllm_haq/offload/board.py): what the offload engine writes and vLLM's API server reads for
/metrics (tests/test_server.py checks the whole path against a real server)."""

import os

import numpy as np

from vllm_haq.offload.board import CounterBoard, read_board
from vllm_haq.offload.routing_stats import OffloadCounters


def test_board_round_trip_totals_and_per_layer(tmp_path):
    path = str(tmp_path / "board.bin")
    assert read_board(path) is None  # no engine offloading yet
    board = CounterBoard(path, [1, 3])
    c = OffloadCounters(steps=2, hits=5, misses=3, fetches=1, cpu_experts=2, cpu_expert_tokens=7, bytes_h2d=4096)
    board.publish(c, 0, (2, 1, 1, 0))
    board.publish(c, 1, (3, 2, 0, 7))
    board.publish(c, 1, (1, 0, 0, 0))
    got = read_board(path)  # a second reader of the file, as the API server is
    assert got["pid"] == os.getpid()
    assert got["totals"] == {**{k: 0 for k in got["totals"]}, "steps": 2, "hits": 5, "misses": 3, "fetches": 1,
                             "cpu_experts": 2, "cpu_expert_tokens": 7, "bytes_h2d": 4096}
    assert got["layers"] == {1: {"hits": 2, "misses": 1, "fetches": 1, "cpu_expert_tokens": 0},
                             3: {"hits": 4, "misses": 2, "fetches": 0, "cpu_expert_tokens": 7}}
    c.hits += 10  # later steps are visible without a rewrite of the file
    board.publish(c, 0, (10, 0, 0, 0))
    assert read_board(path)["totals"]["hits"] == 15 and read_board(path)["layers"][1]["hits"] == 12
    board.close()
    assert not os.path.exists(path) and read_board(path) is None


def test_board_reader_refuses_foreign_or_truncated_files(tmp_path):
    path = tmp_path / "board.bin"
    path.write_bytes(b"not a board")
    assert read_board(str(path)) is None
    CounterBoard(str(path), [0, 1, 2]).close()
    board = CounterBoard(str(path), [0, 1, 2])
    arr = np.fromfile(str(path), dtype=np.int64)
    arr[:-1].tofile(str(path) + ".cut")  # one layer row short of what the header says
    assert read_board(str(path) + ".cut") is None
    assert read_board(str(path))["layers"].keys() == {0, 1, 2}
    board.close()
