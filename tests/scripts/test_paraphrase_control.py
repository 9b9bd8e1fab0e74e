"""analyses/paraphrase_control.py: which control subjects each template is filled with."""

from __future__ import annotations

from conftest import load_analysis
from pmet_lens.data import Fact, KnownFact

TEMPLATES = ("The mother tongue of {} is", "{}, a native", "{} spoke the language")


def _record(case_id: int, subject: str, prompt: str, new: str, true: str, *, neighbours=(), attributes=()) -> Fact:
    return Fact(subject=subject, prompt=prompt, target_new=new, target_true=true, case_id=case_id, relation_id="P103",
                neighborhood_prompts=tuple(neighbours), attribute_prompts=tuple(attributes))


def test_parse_subject_reads_the_subject_out_of_a_filled_template():
    parse = load_analysis("paraphrase_control").parse_subject
    assert parse("Léon Blum, a native", TEMPLATES) == "Léon Blum"
    assert parse("The mother tongue of J. R. R. Tolkien is", TEMPLATES) == "J. R. R. Tolkien"
    assert parse("George Orwell spoke the language", TEMPLATES) == "George Orwell"
    assert parse("Barack Obama, speaker of", TEMPLATES) is None  # no such template: skipped, not guessed


def test_subjects_by_object_groups_subjects_by_their_true_object():
    control = load_analysis("paraphrase_control")
    records = [
        _record(0, "Danielle Darrieux", "The mother tongue of {} is", "English", "French",
                neighbours=["The mother tongue of Léon Blum is", "Montesquieu, a native", "Barack Obama, speaker of"],
                attributes=["George Orwell spoke the language", "Meryl Streep, a native"]),
        _record(1, "Anatoly Karpov", "{}, a native", "French", "Russian", attributes=["Jean Gabin, a native"]),
        _record(2, "Georges Pompidou", "{} spoke the language", "Dutch", "French"),
        # a subject given two different objects is ambiguous and kept out of both groups
        _record(3, "Léon Blum", "{}, a native", "English", "German"),
        Fact(subject="Paris", prompt="{} is in", target_new="Rome", target_true="France", case_id=4, relation_id="P17"),
    ]
    known = [KnownFact(known_id=0, subject="Elton John", prompt="The mother tongue of Elton John is", attribute="English",
                       template="The mother tongue of {} is", relation_id="P103", prediction="")]
    groups = control.subjects_by_object("P103", records, known)
    assert groups["French"] == {"Danielle Darrieux", "Montesquieu", "Jean Gabin", "Georges Pompidou"}
    assert groups["English"] == {"George Orwell", "Meryl Streep", "Elton John"}
    assert groups["Russian"] == {"Anatoly Karpov"}
    assert groups["German"] == set()
    assert "France" not in groups  # other relations are not read


def test_case_templates_put_the_placeholder_where_the_subject_is():
    control = load_analysis("paraphrase_control")
    fact = Fact(subject="Danielle Darrieux", prompt="The mother tongue of {} is", target_new="English", target_true="French",
                case_id=0, relation_id="P103",
                paraphrase_prompts=("Words. Danielle Darrieux spoke the language", "Danielle Darrieux met Danielle Darrieux"))
    assert control.case_templates(fact) == [("edit", "The mother tongue of {} is"),
                                            ("paraphrase", "Words. {} spoke the language")]
