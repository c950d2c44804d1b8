"""Tiny IFEval and Connect4 sets in the public formats, written for the demo's evaluation stage (offline).

They are our own: three IFEval prompts in Google's `input_data.jsonl` format and three Connect4 boards in
the authors' `connect4_eval_500.jsonl` format, each board's winning moves worked out by hand (below).
"""
from __future__ import annotations

from megatron_spot.rectify.connect4 import format_state
from megatron_spot.rectify.jsonl import write_jsonl_atomic

IFEVAL = [
    {"key": 1, "prompt": "Write a short note about the sea. Do not use any commas in your response.",
     "instruction_id_list": ["punctuation:no_comma"], "kwargs": [{}]},
    {"key": 2, "prompt": "Describe a cat using only lowercase letters, and end your response with the exact phrase "
                         "'Is there anything else I can help with?'.",
     "instruction_id_list": ["change_case:english_lowercase", "startend:end_checker"],
     "kwargs": [{}, {"end_phrase": "Is there anything else I can help with?"}]},
    {"key": 3, "prompt": "List two fruits as exactly 2 markdown bullet points such as:\n* one\n* two\n"
                         "Give your answer a title wrapped in double angular brackets, such as <<title>>.",
     "instruction_id_list": ["detectable_format:number_bullet_lists", "detectable_format:title"],
     "kwargs": [{"num_bullets": 2}, {}]},
]

# (board, top row first; player to move; [own winning moves, opponent's winning moves])
CONNECT4 = [
    # X X X _ on the bottom row: X wins at (0,3); O's pieces make no three in a line
    (["_______", "_______", "_______", "_______", "O______", "XXX_OO_"], "X", [[[0, 3]], []]),
    # one piece each: nobody can win next move
    (["_______", "_______", "_______", "_______", "_______", "X__O___"], "X", [[], []]),
    # X wins at (0,2) on the bottom row; O has three up column 6 and wins at (3,6)
    (["_______", "_______", "_______", "______O", "______O", "XX_X__O"], "X", [[[0, 2]], [[3, 6]]]),
]


def write_ifeval_smoke(path: str) -> str:
    write_jsonl_atomic(path, IFEVAL)
    return path


def write_connect4_smoke(path: str) -> str:
    write_jsonl_atomic(path, ({"state": format_state(board, player), "answer": answer}
                              for board, player, answer in CONNECT4))
    return path
