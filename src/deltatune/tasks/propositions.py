"""Every task as propositions to judge true or false, plus prompts and verbalisers for LM scoring.

FreeLM (Li et al. 2023, arXiv:2305.01616) rewrites every task in one *proposition format*: the
input, a candidate answer, and the claim that the answer is right. A classification example with
labels y_1..y_C becomes C propositions, exactly one of them true; the model learns to judge
propositions, and answers any task, including tasks it never saw, by building one proposition per
candidate and picking the one it judges most likely true.

Each task here has:
  - `templates`: at least three paraphrased proposition templates, each with its own answer
    phrase per label (so the words that carry the answer change too, not just the frame). Held-out
    tasks are therefore phrased in ways training never showed.
  - `prompt` and `verbalisers`: the classic LM-scoring baseline (base model zero-shot and k-shot
    in-context prompting): the prompt is followed by each verbaliser and the one the LM finds most
    likely wins. Verbalisers are short, mostly one token for SmolLM2's tokenizer.
  - `bins` for regression tasks: the score range is cut into named bins that act as the labels.
    STS-B (0..5) and movie-scores (-4..4) both use three equal-width bins (low / medium / high
    similarity; negative / mixed / positive). A prediction is either the most likely bin, or the
    expected score  sum_b p(b) * centre_b  under the softmax of the bins' scores, which is what
    Pearson and Spearman are computed on.

Templates name the task's own text fields in braces (`{premise}`, `{text}`, ...) and the answer
as `{answer}`; `str.format` fills them, so braces inside the texts themselves are harmless.
"""

from __future__ import annotations

import string
from dataclasses import dataclass
from itertools import pairwise

from deltatune.errors import DeltatuneError
from deltatune.tasks.spec import TaskSpec


@dataclass(frozen=True)
class PropositionTemplate:
    """One way to state 'this answer is right for this input'."""

    text: str
    """The proposition, with the task's text fields and {answer} as placeholders."""
    answers: tuple[str, ...]
    """The phrase put at {answer} for each label (or bin), in label order."""

    def fill(self, fields: dict[str, str], answer_index: int) -> str:
        return self.text.format(**fields, answer=self.answers[answer_index])


@dataclass(frozen=True)
class ScoreBins:
    """A regression range cut into named bins that serve as candidate answers."""

    edges: tuple[float, ...]
    """Bin boundaries from the lowest score to the highest: len(names) + 1 numbers."""
    names: tuple[str, ...]

    def __post_init__(self) -> None:
        assert len(self.edges) == len(self.names) + 1, "one more edge than bins"
        assert all(a < b for a, b in pairwise(self.edges)), "edges must increase"

    @property
    def centres(self) -> tuple[float, ...]:
        return tuple((low + high) / 2 for low, high in pairwise(self.edges))

    def bin_of(self, score: float) -> int:
        """The bin holding `score`; scores at or past the outer edges go to the outer bins."""
        for index, high in enumerate(self.edges[1:-1]):
            if score < high:
                return index
        return len(self.names) - 1


def equal_bins(low: float, high: float, names: tuple[str, ...]) -> ScoreBins:
    width = (high - low) / len(names)
    return ScoreBins(tuple(low + i * width for i in range(len(names))) + (high,), names)


@dataclass(frozen=True)
class TaskPropositions:
    """How one task reads as propositions (FreeLM) and as a prompt with verbalisers (LM scoring)."""

    task: str
    text_fields: tuple[str, ...]
    templates: tuple[PropositionTemplate, ...]
    prompt: str
    """The LM-scoring prompt; the verbaliser is appended right after it (verbalisers start with a space)."""
    verbalisers: tuple[str, ...]
    """One continuation per label (or bin), in label order."""
    bins: ScoreBins | None = None
    """For regression tasks: the bins that stand in for labels."""

    def __post_init__(self) -> None:
        problems = []
        count = len(self.verbalisers)
        if self.bins is not None and len(self.bins.names) != count:
            problems.append(f"{len(self.bins.names)} bins but {count} verbalisers")
        for index, template in enumerate(self.templates):
            if len(template.answers) != count:
                problems.append(f"template {index} has {len(template.answers)} answers for {count} labels")
            problems += _placeholder_problems(template.text, self.text_fields + ("answer",), f"template {index}")
        problems += _placeholder_problems(self.prompt, self.text_fields, "prompt")
        if problems:
            raise DeltatuneError(f"Propositions for task {self.task!r} are inconsistent: " + "; ".join(problems))

    @property
    def num_candidates(self) -> int:
        return len(self.verbalisers)

    @property
    def candidate_names(self) -> tuple[str, ...]:
        return self.bins.names if self.bins is not None else tuple(v.strip() for v in self.verbalisers)

    def fields(self, texts: tuple[str, ...]) -> dict[str, str]:
        if len(texts) != len(self.text_fields):
            raise DeltatuneError(
                f"Task {self.task!r} takes {len(self.text_fields)} text(s) per example "
                f"({', '.join(self.text_fields)}), got {len(texts)}."
            )
        return dict(zip(self.text_fields, texts, strict=True))

    def proposition(self, texts: tuple[str, ...], answer_index: int, template_index: int = 0) -> str:
        return self.templates[template_index].fill(self.fields(texts), answer_index)

    def propositions(self, texts: tuple[str, ...], template_index: int = 0) -> list[str]:
        """One proposition per candidate answer, in label (or bin) order."""
        return [self.proposition(texts, answer, template_index) for answer in range(self.num_candidates)]

    def filled_prompt(self, texts: tuple[str, ...]) -> str:
        return self.prompt.format(**self.fields(texts))

    def candidate_of(self, gold) -> int:
        """The candidate index of a gold label: the class index, or the bin a score falls in."""
        return self.bins.bin_of(float(gold)) if self.bins is not None else int(gold)


def _placeholder_problems(text: str, allowed: tuple[str, ...], where: str) -> list[str]:
    names = {name for _, name, _, _ in string.Formatter().parse(text) if name is not None}
    unknown = names - set(allowed)
    return [f"{where} uses unknown placeholder(s) {sorted(unknown)} (allowed: {', '.join(allowed)})"] if unknown else []


def _t(text: str, *answers: str) -> PropositionTemplate:
    return PropositionTemplate(text, answers)


_STSB_BINS = equal_bins(0.0, 5.0, ("low", "medium", "high"))
_MOVIE_BINS = equal_bins(-4.0, 4.0, ("negative", "mixed", "positive"))

_NLI_PROMPT = "{premise}\nQuestion: {hypothesis} True, False or Neither?\nAnswer:"
_NLI_TEMPLATES = (  # SNLI and MNLI: entailment, neutral, contradiction
    _t(
        '"{premise}" Given that, it is {answer} that "{hypothesis}"',
        "definitely true",
        "possibly true",
        "definitely false",
    ),
    _t(
        "Premise: {premise} Hypothesis: {hypothesis} The premise {answer} the hypothesis.",
        "entails",
        "neither entails nor contradicts",
        "contradicts",
    ),
    _t("{premise} Question: {hypothesis} True, false or maybe? Answer: {answer}.", "true", "maybe", "false"),
)

PROPOSITIONS: dict[str, TaskPropositions] = {
    p.task: p
    for p in [
        # ------------------------------------------------------------------ the offline suite
        TaskPropositions(
            "snli",
            ("premise", "hypothesis"),
            templates=_NLI_TEMPLATES,
            prompt=_NLI_PROMPT,
            verbalisers=(" True", " Neither", " False"),
        ),
        TaskPropositions(
            "rotten-tomatoes",
            ("text",),
            templates=(
                _t('Review: "{text}" The critic {answer} the movie.', "disliked", "liked"),
                _t("{text} All in all, this review is {answer}.", "negative", "positive"),
                _t('A critic wrote: "{text}" That is a {answer} review.', "rotten, unfavourable", "fresh, favourable"),
            ),
            prompt="Review: {text}\nSentiment:",
            verbalisers=(" negative", " positive"),
        ),
        TaskPropositions(
            "movie-scores",
            ("text",),
            templates=(
                _t('Movie review: "{text}" The sentiment of this review is {answer}.', "negative", "mixed", "positive"),
                _t(
                    "{text} Overall the writer's opinion of the film is {answer}.",
                    "unfavourable",
                    "lukewarm",
                    "favourable",
                ),
                _t('"{text}" Whoever wrote this {answer} the movie.', "hated", "was unsure about", "loved"),
            ),
            prompt="Review: {text}\nSentiment (negative, mixed or positive):",
            verbalisers=(" negative", " mixed", " positive"),
            bins=_MOVIE_BINS,
        ),
        TaskPropositions(
            "trec",
            ("question",),
            templates=(
                _t(
                    'Question: "{question}" The answer to this question is {answer}.',
                    "an abbreviation or its expansion",
                    "a description or explanation",
                    "an entity or thing",
                    "a person or group",
                    "a place",
                    "a number or quantity",
                ),
                _t(
                    "{question} This question asks for {answer}.",
                    "the meaning of an abbreviation",
                    "a definition, reason or description",
                    "an object, animal, substance or other thing",
                    "a human being or organisation",
                    "a location such as a city or country",
                    "a numeric value such as a date, count or amount",
                ),
                _t(
                    'The type of answer expected for "{question}" is {answer}.',
                    "abbreviation",
                    "description",
                    "entity",
                    "human",
                    "location",
                    "number",
                ),
            ),
            prompt="Question: {question}\nAnswer type (abbreviation, description, entity, person, location or number):",
            verbalisers=(" abbreviation", " description", " entity", " person", " location", " number"),
        ),
        TaskPropositions(
            "disaster-tweets",
            ("text",),
            templates=(
                _t('Tweet: "{text}" This tweet {answer} a real disaster.', "is not about", "is about"),
                _t("{text} Does this report an actual emergency? {answer}.", "No", "Yes"),
                _t(
                    'Someone posted: "{text}" The post describes {answer}.',
                    "nothing catastrophic",
                    "a real catastrophe",
                ),
            ),
            prompt="Tweet: {text}\nIs this tweet about a real disaster? Answer yes or no.\nAnswer:",
            verbalisers=(" no", " yes"),
        ),
        TaskPropositions(
            "sms-spam",
            ("text",),
            templates=(
                _t('Text message: "{text}" This message is {answer}.', "a normal personal message", "spam"),
                _t("{text} Is this unsolicited advertising or a scam? {answer}.", "No", "Yes"),
                _t('The SMS "{text}" was sent by {answer}.', "a friend or acquaintance", "a spammer"),
            ),
            prompt="Message: {text}\nIs this message spam? Answer yes or no.\nAnswer:",
            verbalisers=(" no", " yes"),
        ),
        TaskPropositions(
            "stsb",
            ("sentence1", "sentence2"),
            templates=(
                _t(
                    'Sentence 1: "{sentence1}" Sentence 2: "{sentence2}" The two sentences are {answer} in meaning.',
                    "very different",
                    "somewhat similar",
                    "nearly identical",
                ),
                _t(
                    '"{sentence1}" and "{sentence2}" {answer}.',
                    "mean different things",
                    "partly share a meaning",
                    "mean the same thing",
                ),
                _t(
                    'How similar are "{sentence1}" and "{sentence2}"? Their similarity is {answer}.',
                    "low",
                    "medium",
                    "high",
                ),
            ),
            prompt="Sentence 1: {sentence1}\nSentence 2: {sentence2}\nHow similar are these sentences: low, medium "
            "or high?\nAnswer:",
            verbalisers=(" low", " medium", " high"),
            bins=_STSB_BINS,
        ),
        # ------------------------------------------------------------------ GLUE (STS-B above)
        TaskPropositions(
            "cola",
            ("sentence",),
            templates=(
                _t('"{sentence}" This sentence is {answer} English.', "ungrammatical", "grammatical"),
                _t("{sentence} A native speaker would find this sentence {answer}.", "unacceptable", "acceptable"),
                _t('The sentence "{sentence}" {answer}.', "contains a grammar error", "is well formed"),
            ),
            prompt="Sentence: {sentence}\nIs this sentence grammatical? Answer yes or no.\nAnswer:",
            verbalisers=(" no", " yes"),
        ),
        TaskPropositions(
            "sst2",
            ("sentence",),
            templates=(
                _t('Movie review: "{sentence}" The reviewer {answer} the film.', "disliked", "liked"),
                _t("{sentence} The sentiment of this sentence is {answer}.", "negative", "positive"),
                _t('"{sentence}" This is a {answer} opinion.', "bad", "good"),
            ),
            prompt="Review: {sentence}\nSentiment:",
            verbalisers=(" negative", " positive"),
        ),
        TaskPropositions(
            "mrpc",
            ("sentence1", "sentence2"),
            templates=(
                _t('"{sentence1}" and "{sentence2}" {answer}.', "say different things", "say the same thing"),
                _t(
                    "Sentence A: {sentence1} Sentence B: {sentence2} B is {answer} of A.",
                    "not a paraphrase",
                    "a paraphrase",
                ),
                _t('Does "{sentence2}" restate "{sentence1}"? {answer}.', "No", "Yes"),
            ),
            prompt="Sentence 1: {sentence1}\nSentence 2: {sentence2}\nDo both sentences mean the same thing? Answer yes "
            "or no.\nAnswer:",
            verbalisers=(" no", " yes"),
        ),
        TaskPropositions(
            "qqp",
            ("question1", "question2"),
            templates=(
                _t('"{question1}" and "{question2}" {answer}.', "are different questions", "ask the same thing"),
                _t(
                    "Question A: {question1} Question B: {question2} B is {answer} of A.",
                    "not a duplicate",
                    "a duplicate",
                ),
                _t('Would one answer serve both "{question1}" and "{question2}"? {answer}.', "No", "Yes"),
            ),
            prompt="Question 1: {question1}\nQuestion 2: {question2}\nDo both questions ask the same thing? Answer yes "
            "or no.\nAnswer:",
            verbalisers=(" no", " yes"),
        ),
        TaskPropositions(
            "mnli",
            ("premise", "hypothesis"),
            templates=_NLI_TEMPLATES,
            prompt=_NLI_PROMPT,
            verbalisers=(" True", " Neither", " False"),
        ),
        TaskPropositions(
            "qnli",
            ("question", "sentence"),
            templates=(
                _t(
                    'Question: "{question}" The sentence "{sentence}" {answer} the answer.',
                    "contains",
                    "does not contain",
                ),
                _t("{sentence} Does that answer {question} {answer}.", "Yes", "No"),
                _t('"{sentence}" {answer} to the question "{question}"', "is a fitting reply", "is no reply"),
            ),
            prompt="Question: {question}\nSentence: {sentence}\nDoes the sentence answer the question? Answer yes or "
            "no.\nAnswer:",
            verbalisers=(" yes", " no"),
        ),
        TaskPropositions(
            "rte",
            ("sentence1", "sentence2"),
            templates=(
                _t('"{sentence1}" Given that, it is {answer} that "{sentence2}"', "certainly true", "not certain"),
                _t("Text: {sentence1} Claim: {sentence2} The text {answer} the claim.", "implies", "does not imply"),
                _t("{sentence1} Question: {sentence2} True or false? Answer: {answer}.", "true", "false"),
            ),
            prompt="{sentence1}\nQuestion: {sentence2} True or False?\nAnswer:",
            verbalisers=(" True", " False"),
        ),
        TaskPropositions(
            "wnli",
            ("sentence1", "sentence2"),
            templates=(
                _t('"{sentence1}" Given that, it is {answer} that "{sentence2}"', "not certain", "certainly true"),
                _t("Text: {sentence1} Claim: {sentence2} The text {answer} the claim.", "does not imply", "implies"),
                _t("{sentence1} Question: {sentence2} True or false? Answer: {answer}.", "false", "true"),
            ),
            prompt="{sentence1}\nQuestion: {sentence2} True or False?\nAnswer:",
            verbalisers=(" False", " True"),
        ),
    ]
}


def generic_propositions(task: TaskSpec) -> TaskPropositions:
    """Plain templates for a task without hand-written ones (a user's own data): the label names as
    answers, regression in three equal bins. Usable, but phrased far less naturally."""
    fields = task.text_fields
    shown = " ".join(f'{name.replace("_", " ")}: "{{{name}}}"' for name in fields)
    if task.is_regression:
        assert task.score_range is not None  # TaskSpec demands a score_range when it has no labels
        low, high = task.score_range
        bins = equal_bins(low, high, ("low", "medium", "high"))
        names: tuple[str, ...] = bins.names
    else:
        bins, names = None, tuple(label.replace("_", " ") for label in task.labels)
    templates = (
        PropositionTemplate(shown + " The answer is {answer}.", names),
        PropositionTemplate(shown + " This example is labelled {answer}.", names),
        PropositionTemplate(shown + " The correct category is {answer}.", names),
    )
    prompt = "\n".join(f"{name.replace('_', ' ')}: {{{name}}}" for name in fields) + "\nAnswer:"
    return TaskPropositions(task.name, fields, templates, prompt, tuple(f" {name}" for name in names), bins)


def propositions_for(task: TaskSpec) -> TaskPropositions:
    """The hand-written propositions of a catalog task, else generic ones built from its label names."""
    known = PROPOSITIONS.get(task.name)
    if known is None:
        return generic_propositions(task)
    if (
        known.text_fields != task.text_fields
        or (known.bins is not None) != task.is_regression
        or (not task.is_regression and len(task.labels) != known.num_candidates)
    ):
        raise DeltatuneError(
            f"The propositions written for task {task.name!r} expect fields {known.text_fields} and "
            f"{known.num_candidates} answers, but this {task.name!r} has fields {task.text_fields} and "
            f"{task.num_labels} label(s). Rename your task so it does not clash with the catalog's."
        )
    return known


__all__ = [
    "PROPOSITIONS",
    "PropositionTemplate",
    "ScoreBins",
    "TaskPropositions",
    "equal_bins",
    "generic_propositions",
    "propositions_for",
]
