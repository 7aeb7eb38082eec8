"""Label maps and the resolver: every dataset label lands on the intended node of wbc.json."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from dinov2_hier.hierarchy import Hierarchy
from dinov2_hier.labels import (
    UNLABELLED_KEY as UNLABELLED,
    LabelMap,
    LabelMapError,
    LabelResolver,
    count_by_node,
    load_label_maps,
    normalize_label,
)
from tests.conftest import real_data_dir

REPO = Path(__file__).resolve().parents[1]
MAP_DIR = REPO / "hierarchies" / "label_maps"
MAP_FILES = sorted(MAP_DIR.glob("*.json"))


@pytest.fixture(scope="module")
def wbc() -> Hierarchy:
    return Hierarchy.from_json(REPO / "hierarchies" / "wbc.json")


@pytest.fixture(scope="module")
def maps(wbc: Hierarchy) -> dict[str, LabelMap]:
    return load_label_maps(MAP_DIR, wbc)


@pytest.fixture(scope="module")
def small() -> Hierarchy:
    return Hierarchy.from_dict({"name": "small", "root": {"id": "root", "children": [
        {"id": "A", "children": [{"id": "a1"}, {"id": "a2"}]}, {"id": "c"}]}})


def test_expected_datasets(maps: dict[str, LabelMap]) -> None:
    assert sorted(maps) == ["aml_matek", "bccd", "bmc", "lisc", "mll23", "pbc", "raabin", "warty_pig"]
    assert [p.stem for p in MAP_FILES] == sorted(maps)


@pytest.mark.parametrize("path", MAP_FILES, ids=[p.stem for p in MAP_FILES])
def test_every_label_resolves_to_a_wbc_node(path: Path, wbc: Hierarchy) -> None:
    label_map = LabelMap.from_json(path, wbc)
    raw = json.loads(path.read_text(encoding="utf-8"))
    assert label_map.dataset == path.stem and label_map.hierarchy_name == "wbc"
    assert label_map.labels == raw["labels"] and len(label_map) == len(raw["labels"]) > 0
    for label, target in raw["labels"].items():
        assert label_map.map(label) == target and target in wbc, (label, target)
    # The unclassified branch only ever receives non-cell labels.
    for label in raw["labels"]:
        node = label_map.map(label)
        if wbc.ancestor_at_depth(node, 1) == "unclassified":
            assert normalize_label(label) in {"art", "artefact", "ksc", "smudge_cell", "nif", "not_identified",
                                              "oth", "other"}, label


# Every supervision class of the brief / the paper's Table A.1, with the node it must reach.
EXPECTED = {
    "aml_matek": {
        "basophil": "basophil", "eosinophil": "eosinophil", "erythroblast": "erythroblast",
        "lymphocyte typical": "lymphocyte_typical", "lymphocyte atypical": "lymphocyte_atypical",
        "metamyelocyte": "metamyelocyte", "monoblast": "monoblast", "monocyte": "monocyte",
        "myeloblast": "myeloblast", "myelocyte": "myelocyte", "neutrophil band": "neutrophil_band",
        "neutrophil segmented": "neutrophil_segmented", "promyelocyte": "promyelocyte",
        "promyelocyte bilobed": "promyelocyte_bilobed", "smudge cell": "smudge_cell",
        "MYO": "myeloblast", "MYB": "myelocyte", "MOB": "monoblast", "PMB": "promyelocyte_bilobed", "LYA":
        "lymphocyte_atypical", "KSC": "smudge_cell",
    },
    "lisc": {"basophil": "basophil", "eosinophil": "eosinophil", "lymphocyte mature": "lymphocyte",
             "monocyte": "monocyte", "neutrophil": "neutrophil"},
    "raabin": {"eosinophil": "eosinophil", "lymphocyte mature": "lymphocyte", "monocyte": "monocyte",
               "neutrophil": "neutrophil", "Basophil": "basophil"},
    "bmc": {
        "ABE": "eosinophil_abnormal", "ART": "artefact", "BAS": "basophil", "BLA": "blast",
        "EBO": "erythroblast", "EOS": "eosinophil_typical", "FGC": "faggot_cell", "HAC": "hairy_cell",
        "KSC": "smudge_cell", "LYI": "lymphoblast", "LYT": "lymphocyte", "MMZ": "metamyelocyte",
        "MON": "monocyte", "MYB": "myelocyte", "NGB": "neutrophil_band", "NGS": "neutrophil_segmented",
        "NIF": "not_identified", "OTH": "other_cell", "PEB": "proerythroblast", "PLM": "plasma_cell",
        "PMO": "promyelocyte", "fagott cell": "faggot_cell", "eosinophil abnormal": "eosinophil_abnormal",
        "lymphocyte immature": "lymphoblast", "not identified": "not_identified", "other": "other_cell",
    },
    "mll23": {
        "promyelocyte atypical": "promyelocyte_atypical", "basophil": "basophil", "eosinophil": "eosinophil",
        "erythroblast": "erythroblast", "hairy cell": "hairy_cell",
        "lymphocyte large granular": "lymphocyte_large_granular", "lymphocyte neoplastic": "lymphocyte_neoplastic",
        "lymphocyte reactive": "lymphocyte_reactive", "lymphocyte typical": "lymphocyte_typical",
        "metamyelocyte": "metamyelocyte", "monoblast": "monoblast", "myeloblast": "myeloblast",
        "myelocyte": "myelocyte", "neutrophil band": "neutrophil_band",
        "neutrophil segmented": "neutrophil_segmented", "plasma cell": "plasma_cell",
        "promyelocyte": "promyelocyte_typical", "smudge cell": "smudge_cell",
    },
    "pbc": {
        "PMY": "promyelocyte_typical", "MY": "myelocyte", "MMY": "metamyelocyte", "IG": "granulocytic_immature",
        "BNE": "neutrophil_band", "SNE": "neutrophil_segmented", "NEUTROPHIL": "neutrophil",
        "EO": "eosinophil_typical", "BA": "basophil", "MO": "monocyte", "LY": "lymphocyte_typical",
        "ERB": "erythroblast", "PLATELET": "platelet", "ig": "granulocytic_immature", "neutrophil": "neutrophil",
    },
    "bccd": {"neutrophil": "neutrophil", "eosinophil": "eosinophil", "lymphocyte": "lymphocyte",
             "monocyte": "monocyte", "basophil": "basophil", "Neutrophil": "neutrophil"},
    "warty_pig": {"neutrophil": "neutrophil", "eosinophil": "eosinophil", "lymphocyte": "lymphocyte",
                  "monocyte": "monocyte", "basophil": "basophil"},
}


@pytest.mark.parametrize("dataset", sorted(EXPECTED))
def test_dataset_classes_map_as_intended(dataset: str, maps: dict[str, LabelMap]) -> None:
    got = {label: maps[dataset].map(label) for label in EXPECTED[dataset]}
    assert got == EXPECTED[dataset]


def test_pbc_coarse_labels_are_internal_nodes(wbc: Hierarchy, maps: dict[str, LabelMap]) -> None:
    pbc = maps["pbc"]
    ig = pbc.map("IG")
    assert not wbc.is_leaf(ig)
    fine = {pbc.map(code) for code in ("PMY", "MY", "MMY")}
    assert fine <= set(wbc.leaves_under(ig))
    assert set(wbc.leaves_under(ig)) == set(wbc.leaves_under("promyelocyte")) | {"myelocyte", "metamyelocyte"}
    neutrophil = pbc.map("NEUTROPHIL")
    assert not wbc.is_leaf(neutrophil)
    assert wbc.leaves_under(neutrophil) == [pbc.map("BNE"), pbc.map("SNE")] == ["neutrophil_band",
                                                                                 "neutrophil_segmented"]
    # Every fine PBC label sits strictly inside a coarse one of the same lineage.
    assert wbc.lca(pbc.map("MMY"), pbc.map("BNE")) == "granulocytic"


def test_bmc_unspecified_blast_covers_exactly_the_blasts(wbc: Hierarchy, maps: dict[str, LabelMap]) -> None:
    blast = maps["bmc"].map("BLA")
    assert wbc.leaves_under(blast) == ["myeloblast", "monoblast", "lymphoblast"]
    assert maps["bmc"].map("LYI") in wbc.leaves_under(blast)
    assert maps["bmc"].map("MYB") == "myelocyte" != "myeloblast"


def test_real_data_labels_resolve(maps: dict[str, LabelMap], wbc: Hierarchy) -> None:
    root = real_data_dir()
    if root is None:
        pytest.skip("DINOV2_HIER_TEST_DATA not set")
    resolver = LabelResolver(wbc, maps)
    with open(root / "bccd" / "labels.csv", newline="") as f:
        bccd = [row["label"] for row in csv.DictReader(f)]
    with open(root / "pbc_dev" / "labels.csv", newline="") as f:
        pbc = list(csv.DictReader(f))
    assert {resolver.resolve(label, "bccd") for label in bccd} == {
        "neutrophil", "eosinophil", "lymphocyte", "monocyte", "basophil"}
    for row in pbc:
        node = resolver.resolve(row["code"], "pbc")
        coarse = resolver.resolve(row["folder"], "pbc")
        assert node in wbc.leaves_under(coarse) or node == coarse, row


# ----------------------------------------------------------------------------- LabelMap errors


def test_map_unknown_label_names_label_and_dataset(maps: dict[str, LabelMap]) -> None:
    with pytest.raises(LabelMapError) as info:
        maps["pbc"].map("PMYY")
    message = str(info.value)
    assert "'PMYY'" in message and "'pbc'" in message and "did you mean 'PMY'" in message
    assert message.startswith(str(MAP_DIR / "pbc.json"))
    assert "PMYY" not in maps["pbc"] and "pmy" in maps["pbc"] and 5 not in maps["pbc"]


def test_normalized_lookup() -> None:
    assert normalize_label("  Lymphocyte -  typical ") == "lymphocyte_typical"
    lm = LabelMap("d", {"lymphocyte_typical": "a1", "NEUTROPHIL": "A"})
    assert lm.map("Lymphocyte typical") == "a1" and lm.map("neutrophil") == "A"
    with pytest.raises(LabelMapError, match="differ only in case"):
        LabelMap("d", {"MO": "a1", "mo": "a2"})
    assert LabelMap("d", {"MO": "a1", "mo": "a1"}).map("Mo") == "a1"


def test_bad_target_reports_file_line_label_and_suggestion(tmp_path: Path, small: Hierarchy) -> None:
    path = tmp_path / "d.json"
    path.write_text('{\n "dataset": "d",\n "hierarchy": "small",\n "labels": {\n  "x": "a1",\n'
                    '  "y": "a3"\n }\n}\n')
    with pytest.raises(LabelMapError) as info:
        LabelMap.from_json(path, small)
    message = str(info.value)
    assert message.startswith(f"{path}:6: ") and "'y'" in message and "'a3'" in message
    assert "did you mean 'a1' or 'a2'?" in message or "did you mean 'a2' or 'a1'?" in message
    assert LabelMap.from_json(path).map("y") == "a3"  # no hierarchy given: targets not checked


@pytest.mark.parametrize(
    "text, line, fragment",
    [
        ('{"dataset": "d", "hierarchy": "other", "labels": {"x": "a1"}}', 1, "for hierarchy 'other', not 'small'"),
        ('{"dataset": "d",\n "hierachy": "small", "labels": {"x": "a1"}}', 2, "did you mean 'hierarchy'"),
        ('{"dataset": "d", "hierarchy": "small", "labels": {}}', 1, "non-empty"),
        ('{"dataset": "d", "hierarchy": "small",\n "labels": {"x": "a1",\n "x": "a2"}}', 3, "'x' appears twice"),
        ('{"dataset": "d", "hierarchy": "small",\n "labels": {"x": "a1",}}', 2, "invalid JSON"),
        ('{"dataset": "d", "hierarchy": "small", "labels": {"x": "a1"},\n "notes": {"z": "?"}}', None,
         "note for unknown label 'z'"),
    ],
)
def test_malformed_label_maps(tmp_path: Path, small: Hierarchy, text: str, line: int | None, fragment: str) -> None:
    path = tmp_path / "d.json"
    path.write_text(text)
    with pytest.raises(LabelMapError) as info:
        LabelMap.from_json(path, small)
    assert fragment in str(info.value)
    assert info.value.source == str(path) and info.value.line == line


def test_load_label_maps_checks_file_names(tmp_path: Path, small: Hierarchy) -> None:
    (tmp_path / "one.json").write_text('{"dataset": "one", "hierarchy": "small", "labels": {"x": "a1"}}')
    (tmp_path / "two.json").write_text('{"dataset": "two", "hierarchy": "small", "labels": {"y": "A"}}')
    loaded = load_label_maps(tmp_path, small)
    assert sorted(loaded) == ["one", "two"] and loaded["two"].map("y") == "A"
    (tmp_path / "three.json").write_text('{"dataset": "one", "hierarchy": "small", "labels": {"z": "c"}}')
    with pytest.raises(LabelMapError, match="'three.json' does not match its dataset 'one'"):
        load_label_maps(tmp_path, small)
    with pytest.raises(LabelMapError, match="not found"):
        load_label_maps(tmp_path / "absent", small)


# ----------------------------------------------------------------------------- LabelResolver


@pytest.fixture
def resolver(small: Hierarchy) -> LabelResolver:
    return LabelResolver(small, {"ds": LabelMap("ds", {"X1": "a1", "GROUP": "A"}, hierarchy_name="small")})


def test_resolver_behaviour(resolver: LabelResolver, small: Hierarchy) -> None:
    assert resolver.resolve(None, "ds") is None
    assert resolver.resolve("", "ds") is None and resolver.resolve("  ", None) is None
    assert resolver.resolve("X1", "ds") == "a1" and resolver.resolve("GROUP", "ds") == "A"
    assert resolver.resolve("x1", "ds") == "a1"  # normalised lookup inside the map
    assert resolver.resolve("a2", "unmapped_dataset") == "a2"  # no map: labels are node ids
    assert resolver.resolve("c", None) == "c"
    assert resolver.resolve_index("GROUP", "ds") == small.index("A") == 3  # nodes: a1 a2 c A root
    assert resolver.resolve_index(None, "ds") is None


def test_resolver_unknown_labels(resolver: LabelResolver, small: Hierarchy) -> None:
    with pytest.raises(LabelMapError) as info:
        resolver.resolve("X2", "ds")
    assert "'X2'" in str(info.value) and "'ds'" in str(info.value) and "'X1'" in str(info.value)
    with pytest.raises(LabelMapError) as info:
        resolver.resolve("a1", "ds")  # a node id is not a label of a mapped dataset
    assert "'a1'" in str(info.value) and "'ds'" in str(info.value)
    with pytest.raises(LabelMapError) as info:
        resolver.resolve("a3", "other")
    assert "'a3'" in str(info.value) and "'other'" in str(info.value) and "'small'" in str(info.value)
    with pytest.raises(LabelMapError, match="string or None"):
        resolver.resolve(3, "ds")  # type: ignore[arg-type]

    lenient = LabelResolver(small, resolver.label_maps, unmapped="unlabelled")
    assert lenient.resolve("X2", "ds") is None and lenient.resolve("a3", "other") is None
    assert lenient.resolve("X1", "ds") == "a1"


def test_resolver_default_dataset_and_validation(small: Hierarchy) -> None:
    label_map = LabelMap("ds", {"X1": "a1"}, hierarchy_name="small")
    with_default = LabelResolver(small, {"ds": label_map}, default_dataset="ds")
    assert with_default.resolve("X1", None) == "a1"
    with pytest.raises(LabelMapError, match="'c'"):
        with_default.resolve("c", None)  # the default dataset's map decides
    assert with_default.resolve("c", "elsewhere") == "c"
    with pytest.raises(LabelMapError, match="unmapped must be one of"):
        LabelResolver(small, {}, unmapped="drop")
    with pytest.raises(LabelMapError, match="default_dataset 'dz' has no label map"):
        LabelResolver(small, {"ds": label_map}, default_dataset="dz")
    with pytest.raises(LabelMapError, match="'bad' maps to 'zz'"):
        LabelResolver(small, {"ds": LabelMap("ds", {"bad": "zz"})})
    with pytest.raises(LabelMapError, match="registered under 'other'"):
        LabelResolver(small, {"other": label_map})


def test_count_by_node(small: Hierarchy, resolver: LabelResolver) -> None:
    ids = ["A", "a1", None, "c", "a1", "A", "a1", None]
    assert count_by_node(ids) == {"a1": 3, "A": 2, "c": 1, UNLABELLED: 2}
    assert list(count_by_node(ids)) == ["a1", "A", "c", UNLABELLED]
    by_index = resolver.count_by_node(ids)
    assert list(by_index.items()) == [("a1", 3), ("c", 1), ("A", 2), (UNLABELLED, 2)]
    assert count_by_node([]) == {}
