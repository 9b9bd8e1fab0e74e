"""Records and the data shipped with the package: facts, CounterFact, zsRE, known facts, splits.

:mod:`.records` defines the record types and their loaders; :mod:`.splits` the fixed CounterFact
tune / report split. The files themselves live read-only in ``pmet_lens/data/files``.
"""

from pmet_lens.data.records import (
    DataError,
    Fact,
    KnownFact,
    ZsreRecord,
    as_facts,
    data_path,
    load_counterfact,
    load_known_facts,
    load_zsre,
    load_zsre_train,
    read_records,
    wikitext_path,
)

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
