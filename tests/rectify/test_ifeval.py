"""IFEval grading through lm-eval's checkers, on planted answers whose strict and loose verdicts are worked
out by hand from IFEval's definitions: every one of the 25 instruction families of Google's set (all in
lm-eval's registry), one answer that follows and one that does not, and the answers where strict and
loose differ (loose also tries the answer without its first and/or last line and without '*')."""
import pytest

from megatron_spot.rectify import ifeval

END = "Any other questions?"

# (instruction id, kwargs, answer, strict verdict, loose verdict)
CASES = [
    ("punctuation:no_comma", {}, "No commas in here.", True, True),
    ("punctuation:no_comma", {}, "Yes, a comma.", False, False),
    ("change_case:english_lowercase", {}, "this is a plain english sentence written in lower case letters only.",
     True, True),
    ("change_case:english_lowercase", {}, "This Is Capitalised english text for the test.", False, False),
    ("change_case:english_capital", {}, "THIS IS A PLAIN ENGLISH SENTENCE WRITTEN IN CAPITAL LETTERS ONLY.",
     True, True),
    ("change_case:english_capital", {}, "this is a plain english sentence in lower case.", False, False),
    ("change_case:capital_word_frequency", {"capital_relation": "at least", "capital_frequency": 2},
     "The NASA and ESA teams met.", True, True),                         # NASA, ESA: 2 words in capitals
    ("change_case:capital_word_frequency", {"capital_relation": "at least", "capital_frequency": 2},
     "The Nasa team met.", False, False),
    ("combination:repeat_prompt", {"prompt_to_repeat": "Say hi"}, "Say hi. Hi!", True, True),
    ("combination:repeat_prompt", {"prompt_to_repeat": "Say hi"}, "Hi! Say hi.", False, False),
    ("combination:two_responses", {}, "First answer.\n******\nSecond answer.", True, True),
    ("combination:two_responses", {}, "Only one answer.", False, False),
    ("detectable_content:number_placeholders", {"num_placeholders": 2}, "Dear [name], at [address].", True, True),
    ("detectable_content:number_placeholders", {"num_placeholders": 2}, "Dear [name].", False, False),
    ("detectable_content:postscript", {"postscript_marker": "P.S."}, "Hello.\nP.S. See you.", True, True),
    ("detectable_content:postscript", {"postscript_marker": "P.S."}, "Hello. See you.", False, False),
    ("detectable_format:constrained_response", {}, "My answer is yes.", True, True),
    ("detectable_format:constrained_response", {}, "Yes.", False, False),
    ("detectable_format:json_format", {}, '```json\n{"a": 1}\n```', True, True),
    ("detectable_format:json_format", {}, 'Here: {"a": 1}', False, False),
    ("detectable_format:json_format", {}, 'Sure, the JSON:\n{"a": 1}', False, True),       # loose drops line 1
    ("detectable_format:multiple_sections", {"section_spliter": "Section", "num_sections": 2},
     "Section 1\nIntro.\nSection 2\nBody.", True, True),
    ("detectable_format:multiple_sections", {"section_spliter": "Section", "num_sections": 2},
     "Section 1\nOnly one.", False, False),
    ("detectable_format:number_bullet_lists", {"num_bullets": 2}, "* one\n* two", True, True),
    ("detectable_format:number_bullet_lists", {"num_bullets": 2}, "Just text.", False, False),
    ("detectable_format:number_bullet_lists", {"num_bullets": 2}, "* one\n* two\n* three", False, True),  # 2 w/o line 1
    ("detectable_format:number_highlighted_sections", {"num_highlights": 2}, "*one* and *two*", True, True),
    ("detectable_format:number_highlighted_sections", {"num_highlights": 2}, "*one* only", False, False),
    ("detectable_format:title", {}, "<<My Title>>\nText.", True, True),
    ("detectable_format:title", {}, "My Title\nText.", False, False),
    ("keywords:existence", {"keywords": ["apple", "pear"]}, "An apple and a pear.", True, True),
    ("keywords:existence", {"keywords": ["apple", "pear"]}, "An apple only.", False, False),
    ("keywords:forbidden_words", {"forbidden_words": ["cat"]}, "A dog.", True, True),
    ("keywords:forbidden_words", {"forbidden_words": ["cat"]}, "A cat.", False, False),
    ("keywords:forbidden_words", {"forbidden_words": ["cat"]}, "A cat sat.\nDogs are nice.", False, True),
    ("keywords:frequency", {"keyword": "hello", "frequency": 3, "relation": "at least"},
     "hello hello Hello", True, True),
    ("keywords:frequency", {"keyword": "hello", "frequency": 3, "relation": "at least"}, "hello hello", False, False),
    ("keywords:letter_frequency", {"letter": "z", "let_frequency": 2, "let_relation": "less than"},
     "zebra", True, True),                                                # one z
    ("keywords:letter_frequency", {"letter": "z", "let_frequency": 2, "let_relation": "less than"},
     "zizz", False, False),                                               # three
    ("language:response_language", {"language": "es"}, "Hola, me llamo Juan y vivo en Madrid con mi familia.",
     True, True),
    ("language:response_language", {"language": "es"}, "Hello, my name is John and I live in London with my family.",
     False, False),
    ("length_constraints:nth_paragraph_first_word", {"num_paragraphs": 2, "nth_paragraph": 2, "first_word": "second"},
     "First paragraph.\n\nSecond paragraph here.", True, True),
    ("length_constraints:nth_paragraph_first_word", {"num_paragraphs": 2, "nth_paragraph": 2, "first_word": "second"},
     "First paragraph.\n\nThird paragraph here.", False, False),
    ("length_constraints:number_paragraphs", {"num_paragraphs": 2}, "One.\n***\nTwo.", True, True),
    ("length_constraints:number_paragraphs", {"num_paragraphs": 2}, "One only.", False, False),
    ("length_constraints:number_sentences", {"num_sentences": 2, "relation": "less than"},
     "Just one sentence here.", True, True),
    ("length_constraints:number_sentences", {"num_sentences": 2, "relation": "less than"},
     "One. Two. Three.", False, False),                                   # NLTK's Punkt: 3 sentences
    ("length_constraints:number_words", {"num_words": 5, "relation": "at least"}, "one two three four five",
     True, True),
    ("length_constraints:number_words", {"num_words": 5, "relation": "at least"}, "one two", False, False),
    ("startend:end_checker", {"end_phrase": END}, f"Done. {END}", True, True),
    ("startend:end_checker", {"end_phrase": END}, f"{END} Done.", False, False),
    ("startend:end_checker", {"end_phrase": END}, f"Done. {END}\nBye.", False, True),      # loose drops the last line
    ("startend:end_checker", {"end_phrase": END}, f"Done. **{END}**", False, True),        # loose drops the '*'
    ("startend:quotation", {}, '"Quoted answer."', True, True),
    ("startend:quotation", {}, "Quoted answer.", False, False),
    ("startend:quotation", {}, 'My answer:\n"Quoted answer."', False, True),               # loose drops line 1
    ("punctuation:no_comma", {}, "<think>I could use a comma, here.</think>\nNo commas in here.", True, True),
    ("punctuation:no_comma", {}, "", False, False),                                       # no answer follows nothing
]


def item(ids, kwargs, prompt="Follow the instructions."):
    return ifeval.parse_record({"key": 1, "prompt": prompt, "instruction_id_list": ids, "kwargs": kwargs}, "t.jsonl:1")


def test_every_family_of_the_authors_set_is_planted():
    families = {c[0] for c in CASES}
    assert families == set(ifeval.load_checkers().registry.INSTRUCTION_DICT)
    assert len(families) == 25


@pytest.mark.parametrize("iid, kwargs, text, strict, loose", CASES)
def test_planted_answers(iid, kwargs, text, strict, loose):
    g = ifeval.grade(item([iid], [kwargs]), text)
    assert (g.strict, g.loose) == ((strict,), (loose,))


def test_prompt_level_needs_every_instruction():
    it = item(["punctuation:no_comma", "startend:end_checker"], [{}, {"end_phrase": END}])
    g = ifeval.grade(it, f"Done. {END}\nBye.")
    assert g.strict == (True, False) and g.loose == (True, True)
    assert (g.prompt_strict, g.prompt_loose) == (0, 1)


def test_bad_records_are_refused_naming_the_line():
    with pytest.raises(ValueError, match=r"^t.jsonl:1: unknown instruction id 'punctuation:no_dots'"):
        item(["punctuation:no_dots"], [{}])
    with pytest.raises(ValueError, match=r"^t.jsonl:1: 'kwargs' must be a list of 2"):
        item(["punctuation:no_comma", "detectable_format:title"], [{}])
    with pytest.raises(ValueError, match=r"^t.jsonl:1: instruction 'keywords:frequency': bad kwargs"):
        item(["keywords:frequency"], [{"keyword": "a", "frequency": 2, "relation": "about"}])
    with pytest.raises(ValueError, match=r"^x:4: IFEval record needs a 'prompt'"):
        ifeval.parse_record({"instruction_id_list": ["punctuation:no_comma"], "kwargs": [{}]}, "x:4")


def test_offline_sentence_model():
    """NLTK's Punkt finds an English model without a download (ours, or one installed), and splits as Punkt."""
    import nltk

    ifeval.load_checkers()
    assert nltk.data.find("tokenizers/punkt_tab/english/")
    assert nltk.sent_tokenize("Dr. Smith arrived. He sat down.") == ["Dr. Smith arrived.", "He sat down."]
