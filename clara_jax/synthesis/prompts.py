"""Our own prompts for the seven SCP synthesis steps, with few-shot examples on invented passages.

Each instruction restates, in our words, every requirement SCP_SYNTHESIS.md lists for its step (the
paper's wording is not reused). Few-shot examples are given as earlier user/assistant turns, because
chat models imitate a previous assistant turn's format far more reliably than a format described in
prose; `shots` trims them for models with short contexts (the tiny test model).
"""

from __future__ import annotations

import json

from clara_jax.synthesis.parsing import REFUSAL

# ------------------------------------------------------------------------- invented example passages

LIGHTHOUSE = (
    "The Harrowgate Lighthouse stands on the northern tip of Kestrel Island. Built in 1874 by the engineer "
    "Miriam Okafor, it was the first lighthouse in the region to use a rotating Fresnel lens. The light was "
    "automated in 1962, and its last keeper, Tomas Vell, stayed on as a guide until 1970. Today the tower is "
    "run by the Kestrel Heritage Trust and is open to visitors from May to September."
)
TOWN = (
    "Brindlemoss is a small town in the Ardent Valley with about 4,200 residents. Its economy grew around a "
    "paper mill founded in 1901 on the Lisk River. After the mill closed in 1988, the town turned to "
    "cheese-making, and the Brindlemoss Cheese Fair, first held in 1993, now draws around 30,000 visitors "
    "every October."
)
WARBLER = (
    "The ember-throated warbler is a small songbird that breeds in the pine forests of the Caldera Mountains. "
    "Adults are about 11 centimetres long and weigh 9 grams. Males have a bright orange throat, while females "
    "are olive-grey. The species migrates to the Serran lowlands each November and returns in April. It was "
    "first described in 1911 by the naturalist Edith Marrow."
)

SIMPLE_EXAMPLES = [
    (
        LIGHTHOUSE,
        {
            "Question1": "Where does the Harrowgate Lighthouse stand?",
            "Question2": "In what year was the Harrowgate Lighthouse built, and by which engineer?",
            "Question3": "What kind of lens was the Harrowgate Lighthouse the first in its region to use?",
            "Question4": "When was the light of the Harrowgate Lighthouse automated?",
            "Question5": "Who was the last keeper of the Harrowgate Lighthouse?",
            "Question6": "Until what year did the last keeper of the Harrowgate Lighthouse work there as a guide?",
            "Question7": "Which organisation runs the Harrowgate Lighthouse today?",
            "Question8": "During which months is the Harrowgate Lighthouse open to visitors?",
        },
    ),
    (
        TOWN,
        {
            "Question1": "In which valley is the town of Brindlemoss located?",
            "Question2": "About how many residents does Brindlemoss have?",
            "Question3": "What industry did the economy of Brindlemoss originally grow around?",
            "Question4": "In what year was the Brindlemoss paper mill founded, and on which river?",
            "Question5": "When did the Brindlemoss paper mill close?",
            "Question6": "What did Brindlemoss turn to after its paper mill closed?",
            "Question7": "When was the Brindlemoss Cheese Fair first held?",
            "Question8": "How many visitors does the Brindlemoss Cheese Fair draw, and in which month is it held?",
        },
    ),
    (
        WARBLER,
        {
            "Question1": "Where does the ember-throated warbler breed?",
            "Question2": "How long and how heavy is an adult ember-throated warbler?",
            "Question3": "What colour is the throat of a male ember-throated warbler?",
            "Question4": "What colour are female ember-throated warblers?",
            "Question5": "Where does the ember-throated warbler migrate, and in which month does it leave?",
            "Question6": "In which month does the ember-throated warbler return from migration?",
            "Question7": "Who first described the ember-throated warbler, and in what year?",
        },
    ),
]

MULTIHOP_EXAMPLES = [
    (
        LIGHTHOUSE,
        {
            "Question1": "How many years passed between the construction of the Harrowgate Lighthouse and the automation of its light?",
            "Question2": "For how many years did the last keeper of the Harrowgate Lighthouse remain as a guide after its light was automated?",
            "Question3": "Which organisation now runs the lighthouse that was the first in its region to use a rotating Fresnel lens?",
            "Question4": "On which island did the engineer Miriam Okafor build a lighthouse in 1874?",
        },
    ),
    (
        TOWN,
        {
            "Question1": "For how many years did the paper mill on the Lisk River operate in Brindlemoss?",
            "Question2": "How many years after its paper mill closed did Brindlemoss first hold its cheese fair?",
            "Question3": "Which annual event in the Ardent Valley town that turned to cheese-making attracts about 30,000 visitors?",
        },
    ),
    (
        WARBLER,
        {
            "Question1": "How many months each year does the ember-throated warbler spend away from the Caldera Mountains?",
            "Question2": "Which sex of the songbird described by Edith Marrow in 1911 has a bright orange throat?",
            "Question3": "In which forests does the bird that winters in the Serran lowlands breed?",
        },
    ),
]

ANSWER_EXAMPLES = [
    (LIGHTHOUSE, "Who built the Harrowgate Lighthouse?", "Miriam Okafor"),
    (TOWN, "What does the Brindlemoss Cheese Fair charge for entry?", REFUSAL),
    (WARBLER, "How much does an adult ember-throated warbler weigh?", "9 grams"),
]

JUDGE_EXAMPLES = [
    (LIGHTHOUSE, "When was the light of the Harrowgate Lighthouse automated?", "1962", "Correct"),
    (
        TOWN,
        "When did the Brindlemoss paper mill close?",
        "1988, because of falling paper prices",
        "Incorrect",
    ),
    (
        WARBLER,
        "Who first described the ember-throated warbler, and in what year?",
        "Edith Marrow",
        "Incorrect",
    ),
]

COVERAGE_EXAMPLES = [
    (
        TOWN,
        [
            ("In which valley is Brindlemoss located?", "The Ardent Valley"),
            ("When was the Brindlemoss paper mill founded?", "1901"),
            ("When was the Brindlemoss Cheese Fair first held?", "1993"),
        ],
        {
            "Number of Supplementary Questions": 4,
            "Question1": "About how many residents does Brindlemoss have?",
            "Question2": "On which river was the Brindlemoss paper mill founded?",
            "Question3": "What did Brindlemoss turn to after its paper mill closed in 1988?",
            "Question4": "How many visitors does the Brindlemoss Cheese Fair draw each October?",
        },
    ),
    (
        WARBLER,
        [
            ("Where does the ember-throated warbler breed?", "In the pine forests of the Caldera Mountains"),
            (
                "How long and how heavy is an adult ember-throated warbler?",
                "About 11 centimetres and 9 grams",
            ),
            ("What colour is the male's throat, and what colour are females?", "Bright orange; olive-grey"),
            (
                "When does the ember-throated warbler leave for the Serran lowlands and when does it return?",
                "In November; in April",
            ),
            ("Who first described the ember-throated warbler, and when?", "Edith Marrow, in 1911"),
        ],
        {"Number of Supplementary Questions": 0},
    ),
]

PARAPHRASE_EXAMPLES = [
    (
        LIGHTHOUSE,
        "On Kestrel Island's northern tip rises the Harrowgate Lighthouse, which the engineer Miriam Okafor "
        "completed in 1874; no other lighthouse in the region had used a rotating Fresnel lens before it. Its "
        "light became automatic in 1962. Tomas Vell, the final keeper, continued to work at the tower as a guide "
        "until 1970. Visitors can go inside from May to September, and the Kestrel Heritage Trust manages it today.",
    ),
    (
        TOWN,
        "About 4,200 people live in Brindlemoss, a small town of the Ardent Valley. A paper mill set up on the "
        "Lisk River in 1901 was the engine of its economy until it shut in 1988, when the town took up "
        "cheese-making instead. Since 1993 it has hosted the Brindlemoss Cheese Fair each October, an event that "
        "today brings in roughly 30,000 visitors.",
    ),
]

PARAPHRASE_JUDGE_EXAMPLES = [
    (PARAPHRASE_EXAMPLES[1][0], PARAPHRASE_EXAMPLES[1][1], "Yes"),
    (
        TOWN,
        "Brindlemoss, a historic market town of the Ardent Valley founded by monks, has about 4,200 residents. Its "
        "paper mill on the Lisk River opened in 1901 and closed in 1988, and the town then took up cheese-making; "
        "its cheese fair has been held every October since 1993 and attracts about 30,000 visitors.",
        "No",
    ),
]

# --------------------------------------------------------------------------------------- instructions

SIMPLE_QUESTIONS = """You write quiz questions that test whether someone has memorised a passage.
Read the passage and write questions about its key facts. Rules:
- Every question must make sense on its own, to a reader who has never seen the passage: name the people, \
places and things it asks about, and never say "the passage", "the text" or "the document".
- Each question asks about one key fact, or at most two closely linked facts.
- No two questions may ask about the same fact.
- Ask only for facts stated in the passage (plain recall): no opinions, guesses or reasoning beyond the text.
- Together the questions must cover every key fact of the passage.
Reply with one JSON object and nothing else: {"Question1": "...", "Question2": "...", ...}."""

MULTIHOP_QUESTIONS = """You write multi-hop questions that test whether someone has understood a passage.
Read the passage and write questions that each need at least two pieces of evidence from different parts \
of it. Rules:
- A question whose answer sits in a single sentence is not allowed.
- Each question combines a different set of evidence; never reuse the same combination.
- Prefer many small, precise questions over a few broad ones.
- Each question has one goal: bridge two facts, compare, count or add up, or relate events in time or by \
cause.
- Every question must be answerable from the passage alone, with no outside knowledge.
- No yes/no questions and no vague wording; name the people, places and things involved.
- Write only the questions: no explanations, no answers.
Reply with one JSON object and nothing else: {"Question1": "...", "Question2": "...", ...}."""

ANSWER = f"""You answer a question using only the passage you are given.
- Use nothing but the passage: no outside knowledge.
- Answer as briefly as possible: a name, a number, a date or a short phrase when that is enough.
- If the passage does not contain the answer, reply exactly: Answer: {REFUSAL}
Reply with a single line that starts with "Answer: "."""

QA_JUDGE = """You check an answer to a question against a passage.
The answer is Correct only if all of these hold:
- it is complete: it answers every part of the question;
- it is factually right according to the passage;
- it adds nothing that the passage does not say.
Otherwise it is Incorrect.
Reply with one JSON object and nothing else: {"Judgment": "Correct"} or {"Judgment": "Incorrect"}."""

_COVERAGE_COMMON = """You check whether a set of question-answer pairs covers every key fact of a passage.
Read the passage and the existing pairs. Find the key facts that no existing pair asks about.
- If every key fact is already covered, reply exactly: {"Number of Supplementary Questions": 0}
- Otherwise write new questions for the uncovered facts only, and reply with one JSON object: \
{"Number of Supplementary Questions": N, "Question1": "...", ..., "QuestionN": "..."}
- Never repeat or rephrase an existing question.
Reply with the JSON object and nothing else."""

COVERAGE_SIMPLE = (
    _COVERAGE_COMMON
    + """
Rules for new questions: each makes sense without the passage (name who and what it is about), asks \
about one key fact or at most two, asks only for facts stated in the passage, and no two ask about the \
same fact."""
)

COVERAGE_MULTIHOP = (
    _COVERAGE_COMMON
    + """
Rules for new questions: each needs at least two pieces of evidence from different parts of the passage \
(bridging, comparison, counting or time/cause), uses a combination of evidence no other question uses, is \
answerable from the passage alone, names who and what it is about, and is not a yes/no question."""
)

PARAPHRASE = """You rewrite a passage so that it says exactly the same thing in different words.
- Restructure it thoroughly: change the order of the information, merge or split sentences.
- Keep every fact, number, date and name.
- Do not copy any sentence of the original word for word.
- Add nothing: no new facts, affiliations, background, interpretation or commentary.
- Keep the original voice and point of view, and keep how the facts relate and in which order events \
happened.
- Write fluent, natural prose.
Reply with the rewritten passage only."""

PARAPHRASE_JUDGE = """You compare a rewritten passage with its original.
Reply Yes only if the rewrite keeps all key information of the original (every fact, number, date and \
name) and adds nothing that the original does not say. Otherwise reply No.
Reply with one word: Yes or No."""

STEPS = (
    "simple_questions",
    "multihop_questions",
    "answer",
    "qa_judge",
    "coverage_simple",
    "coverage_multihop",
    "paraphrase",
    "paraphrase_judge",
)


# ------------------------------------------------------------------------------------------ builders


def _json(obj: dict) -> str:
    return json.dumps(obj, ensure_ascii=False)


def _conversation(system: str, shots: list[tuple[str, str]], user: str) -> list[dict]:
    messages = [{"role": "system", "content": system}]
    for example_user, example_reply in shots:
        messages += [
            {"role": "user", "content": example_user},
            {"role": "assistant", "content": example_reply},
        ]
    messages.append({"role": "user", "content": user})
    return messages


def _passage(doc: str) -> str:
    return f"Passage:\n{doc}"


def _pairs_text(pairs: list[tuple[str, str]]) -> str:
    if not pairs:
        return "Existing pairs: none"
    lines = [f"Q{i}: {q}\nA{i}: {a}" for i, (q, a) in enumerate(pairs, start=1)]
    return "Existing pairs:\n" + "\n".join(lines)


def _take(examples: list, shots: int | None) -> list:
    return examples if shots is None else examples[: max(0, shots)]


def questions_prompt(doc: str, *, multihop: bool = False, shots: int | None = None) -> list[dict]:
    examples = MULTIHOP_EXAMPLES if multihop else SIMPLE_EXAMPLES
    system = MULTIHOP_QUESTIONS if multihop else SIMPLE_QUESTIONS
    turns = [(_passage(d), _json(q)) for d, q in _take(examples, shots)]
    return _conversation(system, turns, _passage(doc))


def answer_prompt(doc: str, question: str, *, shots: int | None = None) -> list[dict]:
    turns = [(f"{_passage(d)}\n\nQuestion: {q}", f"Answer: {a}") for d, q, a in _take(ANSWER_EXAMPLES, shots)]
    return _conversation(ANSWER, turns, f"{_passage(doc)}\n\nQuestion: {question}")


def qa_judge_prompt(doc: str, question: str, answer: str, *, shots: int | None = None) -> list[dict]:
    def body(d, q, a):
        return f"{_passage(d)}\n\nQuestion: {q}\nAnswer: {a}"

    turns = [(body(d, q, a), _json({"Judgment": j})) for d, q, a, j in _take(JUDGE_EXAMPLES, shots)]
    return _conversation(QA_JUDGE, turns, body(doc, question, answer))


def coverage_prompt(
    doc: str, pairs: list[tuple[str, str]], *, multihop: bool = False, shots: int | None = None
) -> list[dict]:
    system = COVERAGE_MULTIHOP if multihop else COVERAGE_SIMPLE
    # The examples show the simple variant's kind of question; the format is what they teach.
    turns = [(f"{_passage(d)}\n\n{_pairs_text(p)}", _json(r)) for d, p, r in _take(COVERAGE_EXAMPLES, shots)]
    return _conversation(system, turns, f"{_passage(doc)}\n\n{_pairs_text(pairs)}")


def paraphrase_prompt(doc: str, *, shots: int | None = None) -> list[dict]:
    turns = [(_passage(d), p) for d, p in _take(PARAPHRASE_EXAMPLES, shots)]
    return _conversation(PARAPHRASE, turns, _passage(doc))


def paraphrase_judge_prompt(doc: str, paraphrase: str, *, shots: int | None = None) -> list[dict]:
    def body(d, p):
        return f"Original:\n{d}\n\nRewrite:\n{p}"

    turns = [(body(d, p), v) for d, p, v in _take(PARAPHRASE_JUDGE_EXAMPLES, shots)]
    return _conversation(PARAPHRASE_JUDGE, turns, body(doc, paraphrase))
