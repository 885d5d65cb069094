"""The reference corpus's data model: a document, where a domain's text comes from, the assembled corpus.

A :class:`Document` is one chunk of text with its domain, provenance, licence and split group (all
documents of one group land in the same split). :class:`Corpus` holds both splits and the per-domain
source descriptions that SOURCES.md and NOTICE are written from.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from . import DOMAINS


class CorpusError(RuntimeError):
    """Raised when a corpus source cannot be obtained or parsed."""


@dataclass(frozen=True)
class Document:
    text: str
    domain: str
    #: Where the text comes from, e.g. ``cpython-3.11.7/json/decoder.py`` or ``math-gen``.
    source: str
    #: SPDX-style licence identifier of the text.
    license: str
    #: Split unit: all documents with the same group land in the same split.
    group: str

    def to_json(self) -> dict[str, str]:
        return {"text": self.text, "domain": self.domain, "source": self.source, "license": self.license}


@dataclass(frozen=True)
class SourceInfo:
    domain: str
    name: str
    origin: str
    license: str
    license_note: str


@dataclass
class Corpus:
    train: list[Document]
    heldout: list[Document]
    sources: dict[str, SourceInfo]
    #: Characters of raw text read per domain before chunking/capping.
    raw_chars: dict[str, int] = field(default_factory=dict)

    def domain_docs(self, split: str, domain: str) -> list[Document]:
        docs = self.train if split == "train" else self.heldout
        return [d for d in docs if d.domain == domain]

    def stats(self) -> dict[str, dict[str, int]]:
        out: dict[str, dict[str, int]] = {}
        for dom in DOMAINS:
            tr = self.domain_docs("train", dom)
            ho = self.domain_docs("heldout", dom)
            out[dom] = {
                "raw_chars": self.raw_chars.get(dom, 0),
                "train_docs": len(tr),
                "train_chars": sum(len(d.text) for d in tr),
                "train_bytes": sum(len(d.text.encode()) for d in tr),
                "heldout_docs": len(ho),
                "heldout_chars": sum(len(d.text) for d in ho),
                "heldout_bytes": sum(len(d.text.encode()) for d in ho),
            }
        return out
