import pytest

from megatron_spot.rectify.change_ratio import change_ratio, lcs_length


@pytest.mark.parametrize("rejected,chosen,R", [
    ("a b c d", "a b c d", 0.0),                 # identical
    ("a b c d", "a b x d", 0.25),                # one word replaced: LCS 3 of 4
    ("a b c d", "a b c d e f g h", 0.5),         # chosen appends 4 words: LCS 4 of 8
    ("a b c d e f g h", "a b c d", 0.0),         # only deletions: chosen is a subsequence
    ("p q r s", "a b c d", 1.0),                 # nothing in common
    ("x a y b z c", "a b c w", 0.25),            # subsequence, not substring: LCS = a b c
    ("a b c", "", 1.0),                          # empty chosen
    ("2 + 3 = 6 so 6 apples", "2 + 3 = 5 so 5 apples", 2 / 8),  # 8 tokens, 2 changed
])
def test_known_ratios(rejected, chosen, R):
    assert change_ratio(rejected, chosen) == pytest.approx(R)


def test_whitespace_is_the_default_token():
    # newlines/multiple spaces do not count as changes
    assert change_ratio("a  b\n\nc", "a b c") == 0.0


def test_custom_tokenizer_and_lcs_on_ids():
    chars = list
    assert change_ratio("abcd", "abxd", tokenize=chars) == pytest.approx(0.25)
    assert lcs_length([1, 2, 3, 4, 5], [1, 9, 3, 5]) == 3
