"""The Oracle's minimal-edit ("teaching assistant") prompt, versioned, and marker parsing.

The intent follows the SPoT paper / authors' release (our own wording): the Oracle solves the
problem itself, keeps every correct part of the student's solution verbatim, replaces only the
incorrect reasoning, matches the student's style, and ends with
"Therefore, the final answer is: $\\boxed{ANSWER}$." between the start/end markers.
Two variants: without the ground truth (the default, as in the released recipe) and with it.

Changing the wording of a prompt MUST bump its version: the version is part of every cache key
and of each pair's metadata, so old cached answers are never mixed with a new prompt.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

START_MARKER = "=== CORRECTED STARTED ==="
END_MARKER = "=== CORRECTED ENDED ==="
FINAL_ANSWER_FORMAT = "Therefore, the final answer is: $\\boxed{ANSWER}$."

# Delimiters around the student's solution inside the prompt; the offline oracle relies on them.
SOLUTION_BEGIN = "<student_solution>"
SOLUTION_END = "</student_solution>"

_TEMPLATE_V1 = """You are a careful teaching assistant. A student model attempted the math problem below and made at least one mistake. Revise the student's solution so that it becomes correct while still reading as the student's own work: the result should look as if the student had solved the problem correctly on the first try.

Problem:
{problem}

{ground_truth_block}Student's solution:
{solution_begin}
{solution}
{solution_end}

How to revise:
1. First solve the problem yourself.
2. Find the parts of the student's solution that are correct and keep them exactly as written.
3. Replace only the incorrect steps, and whatever depends on them, with correct reasoning.
4. Match the student's writing style: tone, vocabulary, formatting, notation and sentence structure. Do not add commentary about the revision.

Output format (strict):
- Write {start_marker} on its own line, then the full corrected solution.
- The corrected solution ends with the line: {final_format}
- Then write {end_marker} on its own line.
- Output nothing that refers to the revision itself (no "Here is the corrected version").
"""

_GT_BLOCK_V1 = (
    "The correct final answer is: {ground_truth}\n"
    "(Use it to check your work; do not mention that it was given.)\n\n"
)


@dataclass(frozen=True)
class PromptSpec:
    version: str
    template: str
    ground_truth_block: str


PROMPTS = {
    "spot-ta-v1": PromptSpec("spot-ta-v1", _TEMPLATE_V1, _GT_BLOCK_V1),
}
DEFAULT_PROMPT_VERSION = "spot-ta-v1"


def effective_version(version: str, with_ground_truth: bool) -> str:
    """The version string recorded in metadata: '+gt' marks the variant that shows the answer."""
    return version + ("+gt" if with_ground_truth else "")


def build_oracle_messages(
    problem: str,
    solution: str,
    ground_truth: Optional[str] = None,
    version: str = DEFAULT_PROMPT_VERSION,
    start_marker: str = START_MARKER,
    end_marker: str = END_MARKER,
) -> list[dict]:
    """Chat messages for one Oracle request. ``ground_truth=None`` gives the no-answer variant."""
    spec = PROMPTS[version]
    gt_block = "" if ground_truth is None else spec.ground_truth_block.format(ground_truth=ground_truth)
    text = spec.template.format(
        problem=problem.strip(),
        solution=solution.strip(),
        ground_truth_block=gt_block,
        solution_begin=SOLUTION_BEGIN,
        solution_end=SOLUTION_END,
        start_marker=start_marker,
        end_marker=end_marker,
        final_format=FINAL_ANSWER_FORMAT,
    )
    return [{"role": "user", "content": text}]


def extract_student_solution(prompt_text: str) -> Optional[str]:
    """Inverse of the template for the student's part (used by the offline oracle)."""
    i = prompt_text.find(SOLUTION_BEGIN)
    j = prompt_text.rfind(SOLUTION_END)
    if i < 0 or j < 0 or j < i:
        return None
    return prompt_text[i + len(SOLUTION_BEGIN): j].strip("\n")


def strip_think(text: str) -> str:
    """Drop a leading <think>...</think> block some OpenAI-compatible servers inline in content."""
    if "</think>" in text and text.lstrip().startswith("<think>"):
        return text.split("</think>", 1)[1]
    return text


def parse_corrected(
    text: Optional[str], start_marker: str = START_MARKER, end_marker: str = END_MARKER
) -> tuple[Optional[str], Optional[str]]:
    """Return (corrected_solution, None) or (None, reject_reason).

    Takes the text between the LAST start marker and the first end marker after it (an Oracle that
    quotes the format in its preamble and then answers still parses), strips the markers and the
    surrounding whitespace. Reasons: ``empty_response``, ``no_start_marker``, ``no_end_marker``
    (usually a truncated answer), ``empty_correction``.
    """
    if not text or not text.strip():
        return None, "empty_response"
    text = strip_think(text)
    i = text.rfind(start_marker)
    if i < 0:
        return None, "no_start_marker"
    body = text[i + len(start_marker):]
    j = body.find(end_marker)
    if j < 0:
        return None, "no_end_marker"
    corrected = body[:j].strip()
    if not corrected:
        return None, "empty_correction"
    return corrected, None
