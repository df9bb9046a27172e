"""Taxonomy: shipped files, resolve, tree queries, encoding, round trips, validation, BioCLIP text, CLI.

Expected values are worked out by hand from the aquarium README's table and the whale lineage.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from cli import app
from synthgen.errors import SynthgenError
from taxonomy import RANKS, AmbiguousTaxonError, Taxon, TaxonNotFoundError, Taxonomy, TaxonomyError

SHIPPED = ["aquarium.csv", "glacierbay-seals.csv", "whales.yaml"]


@pytest.fixture(scope="module")
def aq(configs: Path) -> Taxonomy:
    return Taxonomy.load(configs / "taxonomy" / "aquarium.csv")


@pytest.fixture(scope="module")
def whales(configs: Path) -> Taxonomy:
    return Taxonomy.load(configs / "taxonomy" / "whales.yaml")


@pytest.fixture(scope="module")
def seals_tax(configs: Path) -> Taxonomy:
    return Taxonomy.load(configs / "taxonomy" / "glacierbay-seals.csv")


def names(taxa: list[Taxon]) -> list[str]:
    return [t.name for t in taxa]


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


# ---- shipped files ---------------------------------------------------------------------------
@pytest.mark.parametrize("fname", SHIPPED)
def test_shipped_files_load(configs: Path, fname: str) -> None:
    tax = Taxonomy.load(configs / "taxonomy" / fname)
    assert len(tax) > 0 and tax.labels
    assert len(tax.level_sizes) == len(tax.levels)
    for t in tax.labels.values():
        assert t.body_length_m is not None and t.body_length_m > 0
        assert t.common_name


@pytest.mark.parametrize(("fname", "dataset"), [("aquarium.csv", "aquarium"),
                                                ("glacierbay-seals.csv", "glacierbay-seals")])
def test_shipped_labels_cover_dataset_classes(configs: Path, shared_data: Path, fname: str, dataset: str) -> None:
    names_yaml = yaml.safe_load((shared_data / dataset / "data.yaml").read_text())["names"]
    tax = Taxonomy.load(configs / "taxonomy" / fname)
    assert set(tax.labels) == set(names_yaml.values())


def test_aquarium_lineages_match_readme(aq: Taxonomy) -> None:
    table = {  # ../shared/data/aquarium/README.md; (Selachimorpha) is the unranked clade
        "fish": ["Animalia", "Chordata", "Actinopterygii"],
        "jellyfish": ["Animalia", "Cnidaria", "Scyphozoa"],
        "penguin": ["Animalia", "Chordata", "Aves", "Sphenisciformes", "Spheniscidae"],
        "puffin": ["Animalia", "Chordata", "Aves", "Charadriiformes", "Alcidae", "Fratercula"],
        "shark": ["Animalia", "Chordata", "Chondrichthyes", "Selachimorpha"],
        "starfish": ["Animalia", "Echinodermata", "Asteroidea"],
        "stingray": ["Animalia", "Chordata", "Chondrichthyes", "Myliobatiformes"],
    }
    assert set(aq.labels) == set(table)
    for label, lineage in table.items():
        assert names(aq.lineage(aq.labels[label])) == lineage, label
    ranks = {label: t.rank for label, t in aq.labels.items()}
    assert ranks == {"fish": "class", "jellyfish": "class", "penguin": "family", "puffin": "genus",
                     "shark": "clade", "starfish": "class", "stingray": "order"}
    assert aq.levels == ["kingdom", "phylum", "class", "clade:class", "order", "family", "genus", "species"]
    assert aq.labels["shark"].level == "clade:class"


def test_whales_and_seals_content(whales: Taxonomy, seals_tax: Taxonomy) -> None:
    lengths = {t.name: t.body_length_m for t in whales.leaves()}
    assert lengths == {"Megaptera novaeangliae": 14, "Balaenoptera musculus": 25,
                       "Balaenoptera physalus": 20, "Eubalaena glacialis": 15}
    assert names(whales.lineage("Eubalaena glacialis")) == [
        "Animalia", "Chordata", "Mammalia", "Artiodactyla", "Balaenidae", "Eubalaena", "Eubalaena glacialis"]
    seal = seals_tax.labels["seal"]
    assert (seal.name, seal.rank, seal.common_name, seal.body_length_m) == ("Phoca vitulina", "species",
                                                                            "harbor seal", 1.7)
    assert whales.levels == list(RANKS)


# ---- resolve ---------------------------------------------------------------------------------
def test_resolve_any_rank_any_name(whales: Taxonomy, aq: Taxonomy) -> None:
    g = whales.resolve("Megaptera")
    assert (g.name, g.rank, g.level) == ("Megaptera", "genus", "genus")
    assert whales.resolve("megaptera") == g == whales.resolve("  MEGAPTERA ")
    assert whales.resolve("genus:Megaptera") == g
    sp = whales.resolve("Humpback Whale")  # common name
    assert sp.name == "Megaptera novaeangliae" and sp.label == "humpback_whale"
    assert whales.resolve("humpback_whale") == sp == whales.resolve("megaptera NOVAEANGLIAE")
    assert whales.resolve("rorquals").name == "Balaenopteridae"  # common name above species
    assert whales.resolve(sp) == sp
    assert aq.resolve("shark").name == "Selachimorpha"  # dataset label
    assert aq.resolve("clade:selachimorpha") == aq.resolve("Selachimorpha")
    assert aq.resolve("Chondrichthyes").rank == "class"


def test_resolve_ambiguous_lists_candidates(tmp_path: Path) -> None:
    # Cetacea is an order in older and an unranked clade in newer classifications
    f = write(tmp_path / "t.csv", "label,kingdom,class,clade,order\n"
              "a,Animalia,Mammalia,Cetacea,\n"
              "b,Animalia,Mammalia,,Cetacea\n")
    tax = Taxonomy.load(f)
    with pytest.raises(AmbiguousTaxonError) as e:
        tax.resolve("cetacea")
    msg = str(e.value)
    assert "order" in msg and "clade" in msg and msg.count("Cetacea") >= 2 and str(f) in msg
    assert tax.resolve("order:Cetacea").rank == "order"
    assert tax.resolve("clade:Cetacea").rank == "clade"
    assert tax.resolve("a").rank == "clade" and tax.resolve("b").rank == "order"
    assert isinstance(e.value, TaxonomyError) and isinstance(e.value, SynthgenError)


def test_resolve_not_found_lists_closest(whales: Taxonomy) -> None:
    with pytest.raises(TaxonNotFoundError) as e:
        whales.resolve("Megaptra")
    assert "Megaptra" in str(e.value) and "Megaptera" in str(e.value)
    with pytest.raises(TaxonNotFoundError) as e:
        whales.resolve("blue whal")
    assert "blue whale" in str(e.value)
    with pytest.raises(TaxonNotFoundError):
        whales.resolve("family:Megaptera")  # exists, but not at that rank
    assert isinstance(e.value, SynthgenError)


# ---- tree queries ----------------------------------------------------------------------------
def test_tree_queries(aq: Taxonomy) -> None:
    assert aq.lca("shark", "stingray").name == "Chondrichthyes"
    assert aq.lca("penguin", "puffin").name == "Aves"
    assert aq.lca("fish", "shark").name == "Chordata"
    assert aq.lca("jellyfish", "starfish").name == "Animalia"
    assert aq.lca("Aves", "puffin").name == "Aves"  # an ancestor is its own lca with a descendant
    assert aq.lca("fish", "fish").name == "Actinopterygii"
    assert names(aq.ancestors("puffin")) == ["Animalia", "Chordata", "Aves", "Charadriiformes", "Alcidae"]
    assert aq.parent("shark").name == "Chondrichthyes"
    assert aq.parent("Animalia") is None
    assert sorted(names(aq.children("Chondrichthyes"))) == ["Myliobatiformes", "Selachimorpha"]
    assert sorted(names(aq.descendants("Aves"))) == sorted(
        ["Charadriiformes", "Alcidae", "Fratercula", "Sphenisciformes", "Spheniscidae"])
    assert {t.label for t in aq.leaves("Chordata")} == {"fish", "penguin", "puffin", "shark", "stingray"}
    assert {t.label for t in aq.leaves("Animalia")} == set(aq.labels)
    assert names(aq.leaves("puffin")) == ["Fratercula"]
    assert aq.descendants("puffin") == []
    assert aq.ancestor_at("puffin", "class").name == "Aves"
    assert aq.ancestor_at("shark", "clade:class").name == "Selachimorpha"
    assert aq.ancestor_at("fish", "order") is None
    assert aq.ancestor_at("stingray", "clade:class") is None  # stingray skips the clade level


def test_lca_across_roots_is_none(tmp_path: Path) -> None:
    tax = Taxonomy.load(write(tmp_path / "t.csv", "label,kingdom,family\ntree,Plantae,Pinaceae\n"
                                                  "bird,Animalia,Ardeidae\n"))
    assert tax.lca("tree", "bird") is None
    assert tax.lca("tree", "Plantae").name == "Plantae"


# ---- encoding --------------------------------------------------------------------------------
def test_encoding_hand_worked(aq: Taxonomy) -> None:
    # per level, names sorted case-insensitively get 1..n; 0 = none
    assert aq.level_sizes == [2, 4, 6, 2, 4, 3, 2, 1]
    assert aq.encode("fish") == (1, 1, 1, 0, 0, 0, 0, 0)       # class Actinopterygii: none below class
    assert aq.encode("shark") == (1, 1, 4, 1, 0, 0, 0, 0)      # Chondrichthyes = 4th class
    assert aq.encode("stingray") == (1, 1, 4, 0, 2, 0, 0, 0)   # skips the clade level
    assert aq.encode("puffin") == (1, 1, 3, 0, 1, 1, 1, 0)
    assert aq.encode("jellyfish") == (1, 2, 5, 0, 0, 0, 0, 0)
    assert aq.decode((1, 1, 4, 1, 0, 0, 0, 0)).label == "shark"


@pytest.mark.parametrize("fname", SHIPPED)
def test_encode_decode_every_node(configs: Path, fname: str) -> None:
    tax = Taxonomy.load(configs / "taxonomy" / fname)
    seen = set()
    for t in tax:
        codes = tax.encode(t)
        assert len(codes) == len(tax.levels)
        assert all(0 <= c < n for c, n in zip(codes, tax.level_sizes, strict=True))
        assert tax.decode(codes) == t and tax.decode(list(codes)) == t
        depth = tax.levels.index(t.level)
        assert codes[depth] > 0 and not any(codes[depth + 1:])  # none below the taxon's depth
        for a in tax.lineage(t):
            assert codes[tax.levels.index(a.level)] > 0
        seen.add(codes)
    assert len(seen) == len(tax)


def test_decode_rejects_bad_codes(aq: Taxonomy) -> None:
    for bad in [(0,) * 8, (1, 1, 1), (1, 1, 9, 0, 0, 0, 0, 0), (1, 2, 1, 0, 0, 0, 0, 0), (-1, 0, 0, 0, 0, 0, 0, 0)]:
        with pytest.raises(TaxonomyError):
            aq.decode(bad)


def test_encoding_stable_under_row_order(tmp_path: Path, configs: Path, aq: Taxonomy) -> None:
    lines = (configs / "taxonomy" / "aquarium.csv").read_text().splitlines()
    header_at = next(i for i, ln in enumerate(lines) if ln.startswith("label,"))
    shuffled = [lines[header_at], *reversed(lines[header_at + 1:])]
    other = Taxonomy.load(write(tmp_path / "rev.csv", "\n".join(shuffled) + "\n"))
    for label, t in aq.labels.items():
        assert other.encode(label) == aq.encode(t)


# ---- round trips -----------------------------------------------------------------------------
def _summary(tax: Taxonomy) -> list[tuple]:
    return [(t.name, t.level, t.label, t.common_name, t.body_length_m, tax.encode(t),
             getattr(tax.parent(t), "name", None)) for t in tax]


@pytest.mark.parametrize("fname", SHIPPED)
def test_round_trip_csv_yaml_json_csv(tmp_path: Path, configs: Path, fname: str) -> None:
    tax = Taxonomy.load(configs / "taxonomy" / fname)
    tax.save(tmp_path / "a.yaml")
    a = Taxonomy.load(tmp_path / "a.yaml")
    a.save(tmp_path / "b.json")
    b = Taxonomy.load(tmp_path / "b.json")
    b.save(tmp_path / "c.csv")
    c = Taxonomy.load(tmp_path / "c.csv")
    for other in (a, b, c):
        assert other.levels == tax.levels
        assert other.level_sizes == tax.level_sizes
        assert sorted(_summary(other)) == sorted(_summary(tax))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.yaml", "b.json", "c.csv"]  # no temp files left


def test_json_round_trip_is_exact(aq: Taxonomy, tmp_path: Path) -> None:
    text = aq.to_json()
    back = Taxonomy.from_json(text)
    assert back.to_json() == text
    assert back.levels == aq.levels
    assert Taxonomy.from_json(json.loads(text)).to_json() == text
    aq.save(tmp_path / "taxonomy.json")
    assert Taxonomy.load(tmp_path / "taxonomy.json").to_json() == text


@pytest.mark.parametrize(("text", "levels"), [
    ("label,clade,kingdom,class\na,Bilateria,Animalia,Aves\n", ["clade:root", "kingdom", "class"]),
    ("label,kingdom,class,clade,clade,order\na,Animalia,Chondrichthyes,Elasmobranchii,Selachimorpha,\n"
     "b,Animalia,Chondrichthyes,Elasmobranchii,,Myliobatiformes\n",
     ["kingdom", "class", "clade:class", "clade:class#2", "order"]),
    ("label,kingdom,phylum,class,clade:superorder,order\na,Animalia,Chordata,,Selachimorpha,\n",
     ["kingdom", "phylum", "class", "clade:class", "order"]),
])
def test_clade_levels_round_trip(tmp_path: Path, text: str, levels: list[str]) -> None:
    tax = Taxonomy.load(write(tmp_path / "t.csv", text))
    assert tax.levels == levels
    for suffix in ("yaml", "json", "csv"):
        tax.save(tmp_path / f"out.{suffix}")
        assert Taxonomy.load(tmp_path / f"out.{suffix}").to_json() == tax.to_json(), suffix


def test_species_epithet_joined_to_genus(tmp_path: Path) -> None:
    tax = Taxonomy.load(write(tmp_path / "t.csv", "label,genus,species\na,Phoca,vitulina\nb,Phoca,largha\n"))
    assert tax.labels["a"].name == "Phoca vitulina"
    assert tax.parent("Phoca largha").name == "Phoca"


def test_saved_encoding_survives_added_taxa(aq: Taxonomy) -> None:
    # a model trained with this taxonomy.json must keep its indices when a taxon is added later
    data = aq.to_dict()
    aves = next(x for x in data["taxa"] if x["name"] == "Aves")
    data["taxa"].append(dict(aves, name="Aaa", index=6, label=None, common_name=None))
    grown = Taxonomy.from_json(data)
    for label, t in aq.labels.items():
        assert grown.encode(label) == aq.encode(t)
    assert grown.encode("Aaa") == (1, 1, 6, 0, 0, 0, 0, 0)
    assert grown.level_sizes == [2, 4, 7, 2, 4, 3, 2, 1]


def test_shipped_inputs_are_not_modified(configs: Path, tmp_path: Path) -> None:
    before = {f: (configs / "taxonomy" / f).read_bytes() for f in SHIPPED}
    for f in SHIPPED:
        Taxonomy.load(configs / "taxonomy" / f).save(tmp_path / f"out_{Path(f).stem}.json")
    assert before == {f: (configs / "taxonomy" / f).read_bytes() for f in SHIPPED}


def test_yaml_flat_form_with_parent_links(tmp_path: Path) -> None:
    f = write(tmp_path / "flat.yaml", """
taxa:
  - {name: Animalia, rank: kingdom}
  - {name: Chordata, rank: phylum, parent: Animalia}
  - {name: Chondrichthyes, rank: class, parent: Chordata}
  - {name: Selachimorpha, rank: clade, parent: "class:Chondrichthyes", label: shark, body_length_m: 1.5}
  - {name: Myliobatiformes, rank: order, parent: Chondrichthyes, label: stingray}
""")
    tax = Taxonomy.load(f)
    assert tax.levels == ["kingdom", "phylum", "class", "clade:class", "order"]
    assert tax.labels["shark"].level == "clade:class"
    assert tax.lca("shark", "stingray").name == "Chondrichthyes"
    assert tax.bioclip_text("shark") == "a photo of Animalia Chordata Chondrichthyes."


# ---- validation errors name the file and line -------------------------------------------------
HEAD = "label,kingdom,phylum,class,order,family,genus,species\n"


@pytest.mark.parametrize(("name", "text", "line", "words"), [
    ("two_parents.csv", HEAD + "a,Animalia,Chordata,Mammalia,Carnivora,Phocidae,Phoca,Phoca vitulina\n"
     "b,Animalia,Chordata,Mammalia,Carnivora,Otariidae,Phoca,Phoca largha\n", 3, ["Phoca", "parent"]),
    ("dup_label.csv", HEAD + "seal,Animalia,Chordata,Mammalia,Carnivora,Phocidae,,\n"
     "seal,Animalia,Chordata,Mammalia,Carnivora,Otariidae,,\n", 3, ["seal"]),
    ("bad_length.csv", "label,kingdom,genus,body_length_m\nx,Animalia,Phoca,1.7\ny,Animalia,Pusa,long\n",
     3, ["body_length_m", "long"]),
    ("two_rows_one_taxon.csv", HEAD + "a,Animalia,,,,,Phoca,\nb,Animalia,,,,,Phoca,\n", 3, ["Phoca"]),
    ("unknown_parent.yaml", "taxa:\n  - {name: Animalia, rank: kingdom}\n  - {name: Aves, rank: class, parent: Chordata}\n",
     3, ["Aves", "Chordata"]),
    ("unknown_column.csv", "label,kingdom,suborder,family\nx,Animalia,Foo,Bar\n", 1, ["suborder"]),
    ("unknown_rank.yaml", "taxa:\n  - name: Animalia\n    rank: kingdom\n    children:\n"
     "      - name: Cetacea\n        rank: infraorder\n", 5, ["Cetacea", "infraorder"]),
    ("cycle.yaml", "taxa:\n  - {name: Animalia, rank: kingdom}\n  - {name: Aa, rank: class, parent: Bb}\n"
     "  - {name: Bb, rank: order, parent: Aa}\n", None, ["cycle", "Aa", "Bb"]),
])
def test_validation_errors_name_file_and_line(tmp_path: Path, name: str, text: str, line: int | None,
                                               words: list[str]) -> None:
    f = write(tmp_path / name, text)
    with pytest.raises(TaxonomyError) as e:
        Taxonomy.load(f)
    msg = str(e.value)
    assert str(f) in msg, msg
    if line is not None:
        assert f"{f}:{line}" in msg, msg
    for w in words:
        assert w in msg, msg


@pytest.mark.parametrize(("name", "text"), [
    ("empty.csv", ""), ("blank.csv", "\n\n"), ("header_only.csv", HEAD), ("empty.yaml", ""),
    ("empty.json", ""), ("no_taxa.yaml", "taxa: []\n"),
])
def test_empty_files_are_errors(tmp_path: Path, name: str, text: str) -> None:
    f = write(tmp_path / name, text)
    with pytest.raises(TaxonomyError, match="empty|no taxa") as e:
        Taxonomy.load(f)
    assert str(f) in str(e.value)


def test_other_bad_files(tmp_path: Path) -> None:
    cases = {
        "order.csv": "label,kingdom,genus,family\nx,Animalia,Phoca,Phocidae\n",  # ranks out of order
        "broken.yaml": "taxa: [\n  {name: A, rank: kingdom\n",
        "broken.json": "{not json",
        "notes.txt": "label,kingdom\n",
        "no_taxon.csv": "label,kingdom,genus\nx,,\n",
    }
    for name, text in cases.items():
        f = write(tmp_path / name, text)
        with pytest.raises(TaxonomyError) as e:
            Taxonomy.load(f)
        assert str(f) in str(e.value), (name, str(e.value))
    with pytest.raises(TaxonomyError, match="missing.csv"):
        Taxonomy.load(tmp_path / "missing.csv")


# ---- BioCLIP text ----------------------------------------------------------------------------
def test_bioclip_text(seals_tax: Taxonomy, whales: Taxonomy, aq: Taxonomy) -> None:
    seal = seals_tax.labels["seal"]
    assert seals_tax.bioclip_text(seal) == "a photo of Animalia Chordata Mammalia Carnivora Phocidae Phoca vitulina."
    assert seals_tax.bioclip_text(seal, common=True) == (
        "a photo of Animalia Chordata Mammalia Carnivora Phocidae Phoca vitulina with common name harbor seal.")
    assert seals_tax.bioclip_text("Phocidae") == "a photo of Animalia Chordata Mammalia Carnivora Phocidae."
    assert whales.bioclip_text("Megaptera") == (
        "a photo of Animalia Chordata Mammalia Artiodactyla Balaenopteridae Megaptera.")
    assert whales.bioclip_text("humpback whale", common=True) == (
        "a photo of Animalia Chordata Mammalia Artiodactyla Balaenopteridae Megaptera novaeangliae "
        "with common name humpback whale.")
    assert aq.bioclip_text("shark") == "a photo of Animalia Chordata Chondrichthyes."  # clade left out
    assert aq.bioclip_text("stingray") == "a photo of Animalia Chordata Chondrichthyes Myliobatiformes."
    assert seals_tax.rank_text(seal) == ["kingdom: Animalia", "phylum: Chordata", "class: Mammalia",
                                         "order: Carnivora", "family: Phocidae", "genus: Phoca",
                                         "species: Phoca vitulina"]


# ---- CLI -------------------------------------------------------------------------------------
runner = CliRunner()


def test_cli_show(configs: Path) -> None:
    r = runner.invoke(app, ["taxonomy", "show", str(configs / "taxonomy" / "aquarium.csv")],
                      env={"COLUMNS": "200"})
    assert r.exit_code == 0, r.output
    for s in ["Selachimorpha", "(sharks)", "label=shark", "1.5 m", "clade", "Fratercula", "16 taxa"]:
        assert s in r.output, s


def test_cli_resolve(configs: Path) -> None:
    r = runner.invoke(app, ["taxonomy", "resolve", str(configs / "taxonomy" / "whales.yaml"), "megaptera"],
                      env={"COLUMNS": "200"})
    assert r.exit_code == 0, r.output
    assert "rank:     genus" in r.output
    assert "(1, 1, 1, 1, 2, 3, 0)" in r.output  # Megaptera = 3rd genus, 2nd family (sorted names)
    assert "a photo of Animalia Chordata Mammalia Artiodactyla Balaenopteridae Megaptera." in r.output
    r = runner.invoke(app, ["taxonomy", "resolve", str(configs / "taxonomy" / "whales.yaml"), "blue whale"],
                      env={"COLUMNS": "200"})
    assert r.exit_code == 0 and "with common name blue whale." in r.output


def test_cli_errors_without_traceback(configs: Path, tmp_path: Path) -> None:
    r = runner.invoke(app, ["taxonomy", "resolve", str(configs / "taxonomy" / "whales.yaml"), "Megaptra"],
                      env={"COLUMNS": "200"})
    assert r.exit_code == 1 and "error:" in r.output and "Megaptera" in r.output
    assert "Traceback" not in r.output
    bad = write(tmp_path / "bad.csv", "label,kingdom,suborder\n")
    r = runner.invoke(app, ["taxonomy", "show", str(bad)], env={"COLUMNS": "200"})
    assert r.exit_code == 1 and "suborder" in r.output and "bad.csv" in r.output
