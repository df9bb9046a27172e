"""Taxonomy errors: each names the file and line (or the node) that caused it."""

from __future__ import annotations

from synthgen.errors import SynthgenError


class TaxonomyError(SynthgenError):
    """A taxonomy file or query is invalid."""


class TaxonNotFoundError(TaxonomyError, KeyError):
    """No taxon matches a name; the message lists the closest names."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class AmbiguousTaxonError(TaxonomyError):
    """A name matches several taxa (e.g. the same name at two ranks); the message lists them."""
