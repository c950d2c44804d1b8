"""Connect4: the SPoT paper's out-of-domain reasoning benchmark, graded the way its authors grade it.

The set (the authors' `eval/connect4_eval_500.jsonl`, built with GAMEBoT) is one JSON object per board:
`state` is the board and the valid moves as text (`(row,col):X|O|_` cells, row 0 at the bottom, then
"Current valid moves for player P: [...]" and "You are player P, ..."), `answer` is two lists of
`[row, col]` moves: the player's winning moves and the opponent's winning moves (either may be empty).

Protocol (the authors' `eval/eval_connect4.py`): the board is the user message under a fixed system
prompt (`SYSTEM_PROMPT`: the rules and the required output format). The model must write
"[Intermediate Thinking Results 1: (r,c), ...]" for its own winning moves and
"[Intermediate Thinking Results 2: ...]" for the opponent's, "None" for an empty list. Grading, as
theirs: the answer is lower-cased, the FIRST "intermediate thinking results 1: ...]" is taken (up to
the first `]`, on one line); "none" is right exactly when the expected list is empty; anything else is
read as the multiset of its `(r,c)` coordinates (digits, no spaces) and compared with the expected
multiset. A missing tag is a format error and scores 0 for that question. Each answer so earns two 0/1
accuracies: acc1 (own winning moves) and acc2 (the opponent's).

The one Connect4 number of the paper's table is `score` = (acc1 + acc2) / 2: every board asks the two
questions, the authors report the two accuracies over the same answers and state no weighting, so the
benchmark's single accuracy counts both questions equally. acc1 and acc2 are reported beside it.

One deliberate addition: a closed `<think>...</think>` block is removed before grading (as for IFEval),
so a thinking model is graded on its answer, not on candidates it tried while thinking; under the
paper's protocol (thinking off) there is no such block and this changes nothing.
"""
from __future__ import annotations

import dataclasses
import re
from collections import Counter
from typing import Optional, Sequence

from .ifeval import remove_thinking

ROWS, COLS = 6, 7

# The authors' system prompt, verbatim (the model's output format and what is graded depend on it).
SYSTEM_PROMPT = '''
You are an expert player of the game Connect Four.

**Game Rules**
1. The game is played on a 6x7 grid by two players, X and O.
2. X typically plays first, then players alternate turns to drop their pieces.
3. The pieces can only be dropped at the lowest available space within the column.
4. The first player to connect four of their pieces in a row wins the game.
5. The connection can be horizontal, vertical, or diagonal.

**Input**
You will receive a state matrix representing the current game board:
* Empty space: _
* Player 1's piece: X
* Player 2's piece: O
The coordinates are zero-based indexing. For example, "(0,4):X" represents Player 1 has a piece on Row 0, Column 4. Row 0 is the lowest and Row 5 is the highest.

**Output**
Provide your chosen move. Your performance will be assessed on both the intermediate thinking results and the final decision. Follow the thinking process:

1. **Observations**
Based on the current game state, provide the following observations:
    * Where are your pieces located?
    * Where are your opponent's pieces located?
    * Check for all horizontal, vertical, or diagonal lines: are there any potential winning moves to form 4 in a row for you or your opponent? 
    Output all of the winning moves for you in the format "[Intermediate Thinking Results 1: (X,X), (X,X), ...]". If none, output "[Intermediate Thinking Results 1: None]". 
    Output all of the winning moves for your opponent in the format "[Intermediate Thinking Results 2: (X,X), (X,X), ...]". If none, output "[Intermediate Thinking Results 2: None]". 

2. **Strategic Analysis**
From your previous observations, if you have a winning move after checking, directly choose it. Otherwise if your opponent have a winning move, block it. If these are not the case, choose the best move based on the following strategy:
    * Look for opportunities to create multiple winning lines (for) simultaneously. If you have two discs in a row horizontally and two discs in a row diagonally, placing your next disc in the right position could lead to a win in multiple ways. For example, you have discs at [(0,1), (1,2), (2,2), (2,1)], then place your next disc at (2,3) would connect two lines: [(0,1), (1,2), (2,3)] and [(2,1), (2,2), (2,3)]
    * If your opponent has two consecutive discs in a row horizontally, block them from getting a third disc in that row. For example, if your opponent has discs at [(0,1), (0,2)], then place your next disc at (0,3) or (0,0) to block them.
    * Consider the center column as a strategic starting point. Placing your disc in the center column can give you more opportunities to create winning lines in different directions. Make the most of your opening moves by playing in the central columns.
    * Plan Ahead: Think one or two moves ahead. Try to anticipate where your opponent might be aiming to connect their discs and plan your strategy accordingly. For example, if your opponent has a winning move on (3,3), while (2,3) is not your winning move, you should not take (2,3) as your move, avoiding (3,3) to be a valid move for your opponent.
    * Try to get your 3 discs in a row with open spaces on either end.

3. **Conclusion**
In this section, based on your previous analysis, clearly state your decision for the position to place your next disc and give explanation.

4. **Chosen Move**
    * In this section, only output the chosen move. Do not include any other words.
    * The format is: "Chosen Move: (a,b)", where a is the row number (0-5), and b is the column number (0-6) where you want to place your disc.

'''

_RESULT_RE = {q: re.compile(rf"intermediate thinking results {q}+: (.*?)]") for q in (1, 2)}
_COORD_RE = re.compile(r"\((\d+),(\d+)\)")


@dataclasses.dataclass(frozen=True)
class Connect4Grade:
    acc1: int                     # own winning moves right (0/1)
    acc2: int                     # opponent's winning moves right (0/1)
    given1: Optional[str]         # what the answer said, None when the tag is missing (format error)
    given2: Optional[str]

    @property
    def score(self) -> float:
        return (self.acc1 + self.acc2) / 2

    @property
    def format_error(self) -> bool:
        return self.given1 is None or self.given2 is None


def _judge(given: Optional[str], expected: Sequence[Sequence[int]]) -> int:
    if given is None:
        return 0
    if given == "none":
        return int(len(expected) == 0)
    moves = Counter((int(r), int(c)) for r, c in _COORD_RE.findall(given))
    return int(moves == Counter((int(r), int(c)) for r, c in expected))


def grade(text: Optional[str], answer: Sequence[Sequence[Sequence[int]]]) -> Connect4Grade:
    """acc1 / acc2 of one answer against `answer` = [own winning moves, opponent's winning moves]."""
    response = remove_thinking(text or "").lower()
    given = []
    for q in (1, 2):
        m = _RESULT_RE[q].search(response)
        given.append(m.group(1).strip() if m else None)
    return Connect4Grade(_judge(given[0], answer[0]), _judge(given[1], answer[1]), given[0], given[1])


def parse_answer(value, where: str) -> list:
    """The record's `answer` as [[[r, c], ...], [[r, c], ...]]; ValueError naming `where` otherwise."""
    if not isinstance(value, (list, tuple)) or len(value) != 2:
        raise ValueError(f"{where}: 'answer' must be two lists of [row, col] moves (own, opponent's), got {value!r}")
    out = []
    for moves in value:
        if not isinstance(moves, (list, tuple)):
            raise ValueError(f"{where}: 'answer' must be two lists of [row, col] moves, got {value!r}")
        cleaned = []
        for mv in moves:
            ok = (isinstance(mv, (list, tuple)) and len(mv) == 2
                  and all(isinstance(x, int) and not isinstance(x, bool) for x in mv)
                  and 0 <= mv[0] < ROWS and 0 <= mv[1] < COLS)
            if not ok:
                raise ValueError(f"{where}: 'answer' move {mv!r} is not [row 0-5, col 0-6]")
            cleaned.append([int(mv[0]), int(mv[1])])
        out.append(cleaned)
    return out


def format_state(rows_top_down: Sequence[str], player: str) -> str:
    """A board in the authors' text format, from 6 strings of 7 cells ('X', 'O', '_'), top row first.

    For writing small sets of one's own (tests, the demo): the valid moves are the lowest empty cell of
    every column that is not full, in column order."""
    if len(rows_top_down) != ROWS or any(len(r) != COLS or set(r) - set("XO_") for r in rows_top_down):
        raise ValueError("a board is 6 rows of 7 cells, each X, O or _")
    if player not in ("X", "O"):
        raise ValueError("player is X or O")
    grid = {(ROWS - 1 - i, c): cell for i, row in enumerate(rows_top_down) for c, cell in enumerate(row)}
    lines = ["", "Current Game Board: "]
    for r in range(ROWS - 1, -1, -1):
        lines.append(" ".join(f"({r},{c}):{grid[(r, c)]}" for c in range(COLS)) + " ")
    valid = []
    for c in range(COLS):
        free = [r for r in range(ROWS) if grid[(r, c)] == "_"]
        if free:
            valid.append(f"'({min(free)},{c})'")
    lines += ["", f"Current valid moves for player {player}: [{', '.join(valid)}]",
              f"You are player {player}, please choose the best move considering the current board state.", ""]
    return "\n".join(lines)


__all__ = ["SYSTEM_PROMPT", "Connect4Grade", "format_state", "grade", "parse_answer"]
