from megatron_spot.rectify import prompts as P


def test_prompt_variants_and_versions():
    no_gt = P.build_oracle_messages("What is 2+2?", "2+2=5. \\boxed{5}")
    gt = P.build_oracle_messages("What is 2+2?", "2+2=5. \\boxed{5}", ground_truth="4")
    assert no_gt[0]["role"] == "user"
    assert "correct final answer is: 4" in gt[0]["content"]
    assert "correct final answer" not in no_gt[0]["content"]
    for m in (no_gt, gt):
        c = m[0]["content"]
        assert P.START_MARKER in c and P.END_MARKER in c and "\\boxed{ANSWER}" in c
        assert P.extract_student_solution(c) == "2+2=5. \\boxed{5}"
    assert P.effective_version("spot-ta-v1", True) == "spot-ta-v1+gt"
    assert P.effective_version("spot-ta-v1", False) == "spot-ta-v1"


def test_parse_corrected():
    S, E = P.START_MARKER, P.END_MARKER
    assert P.parse_corrected(f"{S}\nfixed text\n{E}") == ("fixed text", None)
    # a preamble quoting the markers, then the real answer: the last start marker wins
    assert P.parse_corrected(f"I will write {S} ... {E}.\n{S}\nreal\n{E}\ntrailing") == ("real", None)
    assert P.parse_corrected("<think>hmm " + S + "</think>" + f"{S}\nok\n{E}") == ("ok", None)
    assert P.parse_corrected("no markers at all") == (None, "no_start_marker")
    assert P.parse_corrected(f"{S}\ncut off") == (None, "no_end_marker")
    assert P.parse_corrected(f"{S}\n  \n{E}") == (None, "empty_correction")
    assert P.parse_corrected("") == (None, "empty_response")
    assert P.parse_corrected(None) == (None, "empty_response")
