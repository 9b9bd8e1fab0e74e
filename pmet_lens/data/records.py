"""Typed fact / edit-request records and loaders for ROME known facts, CounterFact and zsRE.

The files the default run and the tests need ship inside the package (``pmet_lens/data/files``,
provenance and licences in its README). Every loader also takes a user's path to a full file in
the ROME/MEMIT JSON format. Bad records fail loudly with :class:`DataError`, naming the record.
"""

from __future__ import annotations

import json
import string
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Iterable, Literal, Mapping, Sequence

__all__ = [
    "DataError",
    "Fact",
    "KnownFact",
    "ZsreRecord",
    "as_facts",
    "data_path",
    "load_counterfact",
    "load_known_facts",
    "load_zsre",
    "load_zsre_train",
    "read_records",
    "wikitext_path",
]


class DataError(ValueError):
    """A malformed record or data file; the message names the record and what is wrong."""


def data_path(name: str) -> Path:
    """Path of a data file shipped with the package (see ``pmet_lens/data/files/README.md``)."""
    path = Path(str(resources.files("pmet_lens.data") / "files" / name))
    if not path.is_file():
        raise FileNotFoundError(f"shipped data file {name!r} not found at {path}")
    return path


def wikitext_path() -> list[Path]:
    """The shipped WikiText-2 raw text (validation + test splits), the default covariance corpus."""
    return [data_path("wiki.valid.raw"), data_path("wiki.test.raw")]


def _nonblank(value: Any, what: str, where: str) -> str:
    if not isinstance(value, str):
        raise DataError(f"{where}: {what} must be a string, got {type(value).__name__}")
    if not value.strip():
        raise DataError(f"{where}: {what} is empty or whitespace")
    return value


def _prompts(value: Any, what: str, where: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str) or not isinstance(value, Iterable):
        raise DataError(f"{where}: {what} must be a list of strings")
    return tuple(_nonblank(p, f"{what} entry", where) for p in value)


@dataclass(frozen=True)
class Fact:
    """One fact, and optionally a request to rewrite it (CounterFact / MEMIT format).

    Attributes:
        subject: the subject s, e.g. "Danielle Darrieux".
        prompt: the template p with exactly one ``{}`` where the subject goes.
        target_new: the new object o* of an edit request (``None`` for a plain fact).
        target_true: the true object o^c (``None`` when unknown).
        case_id: the record's id in its data set (for messages and result tables).
        relation_id: Wikidata relation id, e.g. "P103".
        paraphrase_prompts, neighborhood_prompts, attribute_prompts, generation_prompts:
            CounterFact's evaluation prompts (full texts, no ``{}``).
    """

    subject: str
    prompt: str
    target_new: str | None = None
    target_true: str | None = None
    case_id: int | str | None = None
    relation_id: str | None = None
    paraphrase_prompts: tuple[str, ...] = ()
    neighborhood_prompts: tuple[str, ...] = ()
    attribute_prompts: tuple[str, ...] = ()
    generation_prompts: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        where = self.where
        _nonblank(self.subject, "subject", where)
        _nonblank(self.prompt, "prompt", where)
        _check_template(self.prompt, where)
        for name in ("target_new", "target_true"):
            value = getattr(self, name)
            if value is not None:
                _nonblank(value, name, where)
        for name in ("paraphrase_prompts", "neighborhood_prompts", "attribute_prompts", "generation_prompts"):
            object.__setattr__(self, name, _prompts(getattr(self, name), name, where))

    @property
    def where(self) -> str:
        """A short description naming the record, for error messages."""
        ident = f"case_id={self.case_id!r}" if self.case_id is not None else f"subject={self.subject!r}"
        return f"fact ({ident})"

    @property
    def text(self) -> str:
        """The prompt with the subject filled in: p(s)."""
        return self.prompt.format(self.subject)

    @classmethod
    def from_counterfact(cls, record: Mapping[str, Any]) -> "Fact":
        """Build a fact from a CounterFact / MEMIT record (a dict with ``requested_rewrite``)."""
        where = f"CounterFact record (case_id={record.get('case_id')!r})" if isinstance(record, Mapping) else "record"
        if not isinstance(record, Mapping):
            raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
        rw = record.get("requested_rewrite")
        if not isinstance(rw, Mapping):
            raise DataError(f"{where}: missing field 'requested_rewrite'")
        for key in ("prompt", "subject", "target_new"):
            if key not in rw:
                raise DataError(f"{where}: missing field 'requested_rewrite.{key}'")
        return cls(
            subject=rw["subject"],
            prompt=rw["prompt"],
            target_new=_target_str(rw["target_new"], "target_new", where),
            target_true=_target_str(rw["target_true"], "target_true", where) if "target_true" in rw else None,
            case_id=record.get("case_id"),
            relation_id=rw.get("relation_id"),
            paraphrase_prompts=record.get("paraphrase_prompts", ()),
            neighborhood_prompts=record.get("neighborhood_prompts", ()),
            attribute_prompts=record.get("attribute_prompts", ()),
            generation_prompts=record.get("generation_prompts", ()),
        )

    def to_counterfact(self) -> dict[str, Any]:
        """The record in CounterFact JSON format (inverse of :meth:`from_counterfact`)."""
        rw: dict[str, Any] = {"prompt": self.prompt, "subject": self.subject}
        if self.target_new is not None:
            rw["target_new"] = {"str": self.target_new}
        if self.target_true is not None:
            rw["target_true"] = {"str": self.target_true}
        if self.relation_id is not None:
            rw["relation_id"] = self.relation_id
        return {
            "case_id": self.case_id,
            "requested_rewrite": rw,
            "paraphrase_prompts": list(self.paraphrase_prompts),
            "neighborhood_prompts": list(self.neighborhood_prompts),
            "attribute_prompts": list(self.attribute_prompts),
            "generation_prompts": list(self.generation_prompts),
        }


def _target_str(value: Any, what: str, where: str) -> str:
    if isinstance(value, Mapping):
        if "str" not in value:
            raise DataError(f"{where}: missing field '{what}.str'")
        value = value["str"]
    return _nonblank(value, what, where)


@dataclass(frozen=True)
class KnownFact:
    """A ROME ``known_1000.json`` record: a prompt whose answer the model should know.

    Attributes:
        known_id: record id (0..1208).
        subject: the subject s, a substring of ``prompt``.
        prompt: the full prompt text p(s).
        attribute: the true object (ROME's ``attribute``).
        template: the prompt with ``{}`` in place of the subject.
        relation_id: Wikidata relation id.
        prediction: GPT-2-XL's continuation recorded by ROME (not used for other models).
    """

    known_id: int
    subject: str
    prompt: str
    attribute: str
    template: str
    relation_id: str
    prediction: str = ""

    def __post_init__(self) -> None:
        where = f"known fact (known_id={self.known_id!r})"
        _nonblank(self.subject, "subject", where)
        _nonblank(self.prompt, "prompt", where)
        _nonblank(self.attribute, "attribute", where)
        if self.subject not in self.prompt:
            raise DataError(f"{where}: subject {self.subject!r} does not occur in its prompt {self.prompt!r}")
        if self.template.count("{}") != 1:
            raise DataError(f"{where}: template {self.template!r} must contain exactly one '{{}}'")

    def to_fact(self) -> Fact:
        """The record as a :class:`Fact` with the true object as ``target_true``."""
        return Fact(subject=self.subject, prompt=self.prompt.replace(self.subject, "{}", 1), target_true=self.attribute,
                    case_id=self.known_id, relation_id=self.relation_id)


@dataclass(frozen=True)
class ZsreRecord:
    """A zsRE record in the ROME/MEMIT format (``zsre_mend_eval.json``).

    Attributes:
        subject: the subject, a substring of ``src``.
        src: the question (edit prompt).
        rephrase: a paraphrase of the question.
        target_new: the answer the edit writes in: the file's ``alt`` by default (as EasyEdit reads
            zsRE), or ``answers[0]`` with ``load_zsre(target="answer")`` (as ROME's, MEMIT's, PMET's and
            AlphaEdit's released loaders do).
        answers: the true answers.
        loc: an unrelated Natural Questions prompt ("nq question: ...").
        loc_ans: the model-independent answer to ``loc``.
        case_id: position in the file.
    """

    subject: str
    src: str
    rephrase: str
    target_new: str
    answers: tuple[str, ...]
    loc: str
    loc_ans: str
    case_id: int

    def __post_init__(self) -> None:
        where = f"zsRE record (case_id={self.case_id})"
        for name in ("subject", "src", "rephrase", "target_new", "loc", "loc_ans"):
            _nonblank(getattr(self, name), name, where)
        if self.subject not in self.src:
            raise DataError(f"{where}: subject {self.subject!r} does not occur in its prompt {self.src!r}")
        if not self.loc.startswith("nq question: "):
            raise DataError(f"{where}: loc must start with 'nq question: ', got {self.loc[:40]!r}")

    def to_fact(self) -> Fact:
        """The record as an edit request (MEMIT's zsRE loader: template = src with ``{}``).

        ``target_true`` is the recorded answer ``answers[0]`` when it differs from ``target_new``, else
        ``None``: a record whose ``alt`` repeats its answer, and every record loaded with
        ``target="answer"``, asks to write in what the record calls true (the released loaders give zsRE
        edits no true target at all), which is an edit, not a no-op."""
        true = self.answers[0] if self.answers else None
        if true is not None and true.strip() == self.target_new.strip():
            true = None
        return Fact(subject=self.subject, prompt=self.src.replace(self.subject, "{}", 1),
                    target_new=self.target_new, target_true=true, case_id=self.case_id,
                    paraphrase_prompts=(self.rephrase,))


def read_records(path: str | Path, what: str = "records") -> list[Any]:
    """The records of a JSON file (a list of objects) or of a ``.jsonl`` file (one object a line).

    The records are returned as parsed; the loaders and :func:`as_facts` check their fields.

    Args:
        path: the file.
        what: what the file holds, for messages ("CounterFact", "facts", ...).

    Raises:
        FileNotFoundError: ``path`` is not a file.
        DataError: the text is not JSON (the message gives the line), or a ``.json`` file holds
            something other than a list (a single record must be wrapped in ``[...]``).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} file not found: {path}")
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".jsonl":
        data = []
        for number, line in enumerate(text.splitlines(), start=1):
            if line.strip():
                try:
                    data.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise DataError(f"{what} file {path}, line {number}: not valid JSON: {exc}") from None
        return data
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(f"{what} file {path} is not valid JSON: {exc}") from None
    if not isinstance(data, list):
        kind = "a JSON object" if isinstance(data, dict) else f"a JSON {type(data).__name__}"
        raise DataError(f"{what} file {path} must hold a JSON list of records, got {kind}; "
                        "put a single record in a list: [{...}]")
    return data


def _check_template(template: str, where: str) -> None:
    """A prompt template is filled with ``str.format``: it needs exactly one bare ``{}`` (the subject),
    and any literal brace written ``{{`` / ``}}``."""
    try:
        fields = [name for _, name, _, _ in string.Formatter().parse(template) if name is not None]
    except ValueError as exc:
        raise DataError(f"{where}: prompt template {template!r} has an unmatched brace ({exc}); write a literal "
                        "brace as '{{' or '}}'") from None
    if fields != [""]:
        raise DataError(f"{where}: prompt template {template!r} must contain exactly one '{{}}' where the subject "
                        f"goes and no other replacement field (found {len(fields)} field(s): {fields})")


def _take(records: Sequence[Any], limit: int | None) -> Sequence[Any]:
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0, got {limit}")
    return records if limit is None else records[:limit]


_KNOWN_FIELDS = ("known_id", "subject", "prompt", "attribute", "template", "relation_id")


def _require_fields(rec: Any, names: Sequence[str], where: str, id_field: str | None = None) -> None:
    """Raise :class:`DataError` unless ``rec`` is a mapping holding every field in ``names``."""
    if not isinstance(rec, Mapping):
        raise DataError(f"{where}: expected a JSON object")
    missing = [k for k in names if k not in rec]
    if missing:
        ident = f" ({id_field}={rec.get(id_field)!r})" if id_field else ""
        raise DataError(f"{where}{ident}: missing field(s) {missing}")


def load_known_facts(path: str | Path | None = None, limit: int | None = None) -> list[KnownFact]:
    """Load ROME's known facts (default: the shipped ``known_1000.json``, 1209 records)."""
    records = read_records(path or data_path("known_1000.json"), "known-facts")
    out = []
    for i, rec in enumerate(_take(records, limit)):
        _require_fields(rec, _KNOWN_FIELDS, f"known fact #{i}", id_field="known_id")
        out.append(KnownFact(**{k: rec[k] for k in _KNOWN_FIELDS},
                             prediction=rec.get("prediction", "")))
    return out


def load_counterfact(path: str | Path | None = None, limit: int | None = None) -> list[Fact]:
    """Load CounterFact records (default: the shipped 869-record subset) as :class:`Fact` s."""
    records = read_records(path or data_path("counterfact_subset.json"), "CounterFact")
    return [Fact.from_counterfact(rec) for rec in _take(records, limit)]


ZSRE_TARGETS: tuple[str, ...] = ("alt", "answer")
"""Where :func:`load_zsre` takes the edit's new answer from: the ``alt`` field or ``answers[0]``."""


def load_zsre(path: str | Path | None = None, limit: int | None = None,
              target: Literal["alt", "answer"] = "alt") -> list[ZsreRecord]:
    """Load zsRE eval records (default: the shipped 1208-record subset of ``zsre_mend_eval.json``).

    Args:
        path: a ``zsre_mend_eval.json``-format file (JSON list or JSON lines); default the shipped subset.
        limit: keep the first ``limit`` records.
        target: the answer each edit writes in (``ZsreRecord.target_new``): ``"alt"`` (default; the
            alternative answer, as EasyEdit reads the file) or ``"answer"`` (``answers[0]``, the recorded
            answer, as the released ROME / MEMIT / PMET / AlphaEdit loaders do). The evaluation scores
            whichever was chosen.

    Raises:
        ValueError: an unknown ``target``.
        pmet_lens.DataError: a record that lacks a field, or has no answer when ``target="answer"``.
    """
    if target not in ZSRE_TARGETS:
        raise ValueError(f"unknown zsRE target {target!r}; choose one of {list(ZSRE_TARGETS)}")
    records = read_records(path or data_path("zsre_mend_eval_subset.json"), "zsRE")
    return [_zsre_record(rec, i, target) for i, rec in enumerate(_take(records, limit))]


def _zsre_record(rec: Any, i: int, target: str) -> ZsreRecord:
    """Record ``i`` of a zsRE file as a :class:`ZsreRecord` editing towards ``target`` ("alt" / "answer")."""
    _require_fields(rec, ("subject", "src", "rephrase", "alt", "answers", "loc", "loc_ans"), f"zsRE record #{i}")
    if target == "answer" and not rec["answers"]:
        raise DataError(f"zsRE record #{i} has an empty 'answers' list, so target='answer' has nothing to "
                        "edit towards; drop the record or load with target='alt'")
    return ZsreRecord(subject=rec["subject"], src=rec["src"], rephrase=rec["rephrase"],
                      target_new=rec["alt"] if target == "alt" else rec["answers"][0],
                      answers=tuple(rec["answers"]), loc=rec["loc"], loc_ans=rec["loc_ans"], case_id=i)


def load_zsre_train(limit: int | None = None, target: Literal["alt", "answer"] = "alt") -> list[ZsreRecord]:
    """The shipped zsRE **training**-split records (``zsre_mend_train_1k.json``, 1000 records of
    ``zsre_mend_train.json``, none in the eval subset), which train MEND's editor network; never report
    them as the zsRE benchmark. Records without the chosen answer (two of the file's ``alt`` are empty)
    are left out; ``case_id`` stays the position in the file. ``limit`` (of the file's records) and
    ``target`` as in :func:`load_zsre`."""
    if target not in ZSRE_TARGETS:
        raise ValueError(f"unknown zsRE target {target!r}; choose one of {list(ZSRE_TARGETS)}")
    records = read_records(data_path("zsre_mend_train_1k.json"), "zsRE")
    out = []
    for i, rec in enumerate(_take(records, limit)):
        answer = rec.get("alt") if target == "alt" else next(iter(rec.get("answers") or []), None)
        if isinstance(answer, str) and answer.strip():
            out.append(_zsre_record(rec, i, target))
    return out


def as_facts(facts: Iterable[Fact | KnownFact | ZsreRecord | Mapping[str, Any]]) -> list[Fact]:
    """Normalise user input to :class:`Fact` s: Facts, known facts, zsRE records, CounterFact dicts,
    or plain dicts with ``subject``, ``prompt`` and ``target_new`` (and optionally ``target_true``)."""
    if isinstance(facts, (Fact, KnownFact, ZsreRecord, Mapping, str)):
        raise TypeError("facts must be a list of records, not a single record; wrap it in a list")
    out: list[Fact] = []
    for i, item in enumerate(facts):
        if isinstance(item, Fact):
            out.append(item)
        elif isinstance(item, (KnownFact, ZsreRecord)):
            out.append(item.to_fact())
        elif isinstance(item, Mapping) and "requested_rewrite" in item:
            out.append(Fact.from_counterfact(item))
        elif isinstance(item, Mapping):
            missing = [k for k in ("subject", "prompt") if k not in item]
            if missing:
                raise DataError(f"record #{i}: missing field(s) {missing} (expected a CounterFact record "
                                "with 'requested_rewrite' or a dict with 'subject', 'prompt', 'target_new')")
            known = {f for f in Fact.__dataclass_fields__}
            unknown = sorted(set(item) - known)
            if unknown:
                raise DataError(f"record #{i}: unknown field(s) {unknown}; valid fields: {sorted(known)}")
            out.append(Fact(**dict(item)))
        else:
            raise DataError(f"record #{i}: expected a Fact or a dict, got {type(item).__name__}")
    return out
