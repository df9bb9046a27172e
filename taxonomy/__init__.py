"""Tree of taxa: CSV/YAML/JSON I/O, resolve, lineage queries, per-level encoding, BioCLIP text.

    from taxonomy import Taxonomy
    tax = Taxonomy.load("configs/taxonomy/whales.yaml")
    t = tax.resolve("humpback whale")
    tax.encode(t), tax.bioclip_text(t, common=True)
"""

from taxonomy.core import Taxon, Taxonomy
from taxonomy.errors import AmbiguousTaxonError, TaxonNotFoundError, TaxonomyError
from taxonomy.spec import RANKS

__all__ = ["RANKS", "AmbiguousTaxonError", "Taxon", "TaxonNotFoundError", "Taxonomy", "TaxonomyError"]
