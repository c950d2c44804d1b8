"""Connect4 grading (the authors' two winning-move questions) on planted answers, each verdict worked out by
hand from the protocol: first tag wins, "None" for an empty list, a multiset of (r,c) coordinates."""
import pytest

from megatron_spot.rectify import connect4

OWN_TWO_OPP_ONE = [[[3, 2], [0, 3]], [[5, 4]]]
EMPTY = [[], []]


def answer(one: str, two: str) -> str:
    return (f"Observations...\n[Intermediate Thinking Results 1: {one}]\n"
            f"[Intermediate Thinking Results 2: {two}]\nChosen Move: (0,3)")


@pytest.mark.parametrize("text, expected, acc1, acc2", [
    (answer("(3,2), (0,3)", "(5,4)"), OWN_TWO_OPP_ONE, 1, 1),            # all right
    (answer("(0,3), (3,2)", "(5,4)"), OWN_TWO_OPP_ONE, 1, 1),            # order does not matter
    (answer("(3,2)", "(5,4)"), OWN_TWO_OPP_ONE, 0, 1),                   # some of the own moves only
    (answer("(3,2), (0,3), (1,1)", "(5,4)"), OWN_TWO_OPP_ONE, 0, 1),     # one too many
    (answer("(3,2), (3,2), (0,3)", "(5,4)"), OWN_TWO_OPP_ONE, 0, 1),     # a multiset: a repeat is wrong
    (answer("(1,1), (2,2)", "(4,5)"), OWN_TWO_OPP_ONE, 0, 0),            # wrong moves
    (answer("None", "None"), OWN_TWO_OPP_ONE, 0, 0),                     # none where there are some
    (answer("None", "None"), EMPTY, 1, 1),                               # none where there are none
    (answer("NONE", "none"), EMPTY, 1, 1),                               # case does not matter
    (answer("(0,3)", "None"), EMPTY, 0, 1),                              # a move where there is none
    (answer("(3, 2), (0, 3)", "(5, 4)"), OWN_TWO_OPP_ONE, 0, 0),         # badly formatted: no (r,c) is read
    ("I would play (0,3).", OWN_TWO_OPP_ONE, 0, 0),                      # no tags at all
    ("[Intermediate Thinking Results 1: (3,2), (0,3)\n[Intermediate Thinking Results 2: (5,4)]",
     OWN_TWO_OPP_ONE, 0, 1),                                             # question 1's bracket never closes
    (answer("(9,9)", "None") + "\n" + answer("(3,2), (0,3)", "(5,4)"), OWN_TWO_OPP_ONE, 0, 0),  # the first tag counts
    ("<think>[Intermediate Thinking Results 1: (9,9)]</think>\n" + answer("(3,2), (0,3)", "(5,4)"),
     OWN_TWO_OPP_ONE, 1, 1),                                             # a thinking block is not graded
    (answer("None.", "no winning move"), EMPTY, 1, 1),                   # theirs too: no coordinate == empty list
])
def test_planted_answers(text, expected, acc1, acc2):
    g = connect4.grade(text, expected)
    assert (g.acc1, g.acc2) == (acc1, acc2)
    assert g.score == (acc1 + acc2) / 2


def test_missing_tags_are_format_errors():
    assert connect4.grade("no tags", EMPTY).format_error
    assert connect4.grade(None, EMPTY).format_error
    assert not connect4.grade(answer("None", "None"), EMPTY).format_error


def test_board_text_in_the_authors_format():
    # X to move, X X X _ on the bottom row: the authors' text, written out by hand
    state = connect4.format_state(["_______", "_______", "_______", "_______", "O______", "XXX_OO_"], "X")
    assert state == (
        "\nCurrent Game Board: \n"
        "(5,0):_ (5,1):_ (5,2):_ (5,3):_ (5,4):_ (5,5):_ (5,6):_ \n"
        "(4,0):_ (4,1):_ (4,2):_ (4,3):_ (4,4):_ (4,5):_ (4,6):_ \n"
        "(3,0):_ (3,1):_ (3,2):_ (3,3):_ (3,4):_ (3,5):_ (3,6):_ \n"
        "(2,0):_ (2,1):_ (2,2):_ (2,3):_ (2,4):_ (2,5):_ (2,6):_ \n"
        "(1,0):O (1,1):_ (1,2):_ (1,3):_ (1,4):_ (1,5):_ (1,6):_ \n"
        "(0,0):X (0,1):X (0,2):X (0,3):_ (0,4):O (0,5):O (0,6):_ \n"
        "\nCurrent valid moves for player X: ['(2,0)', '(1,1)', '(1,2)', '(0,3)', '(1,4)', '(1,5)', '(0,6)']\n"
        "You are player X, please choose the best move considering the current board state.\n")
    with pytest.raises(ValueError):
        connect4.format_state(["_______"] * 5, "X")


@pytest.mark.parametrize("bad", [None, [[]], [[[0, 7]], []], [[[1]], []], [[["0", "1"]], []], [[[True, 1]], []]])
def test_bad_answers_are_refused_naming_the_row(bad):
    with pytest.raises(ValueError, match="^f.jsonl:3: 'answer'"):
        connect4.parse_answer(bad, "f.jsonl:3")
