"""Hierarchy: index order, ancestry, distances on a hand-built tree; validation with file lines; wbc.json."""
from __future__ import annotations

import hashlib
import itertools
import json
import pickle
import re
from collections import deque
from pathlib import Path

import pytest

from dinov2_hier.hierarchy import Hierarchy, HierarchyError

REPO = Path(__file__).resolve().parents[1]
WBC = REPO / "hierarchies" / "wbc.json"

# root -> A(a1, a2), B(b1(b1x, b1y)), c   (unbalanced: c is a leaf at depth 1)
EDGES = [("A", "root"), ("a1", "A"), ("a2", "A"), ("B", "root"), ("b1", "B"),
         ("b1x", "b1"), ("b1y", "b1"), ("c", "root")]
SMALL = {
    "name": "small",
    "description": "test tree",
    "root": {"id": "root", "children": [
        {"id": "A", "name": "Group A", "children": [{"id": "a1"}, {"id": "a2", "meta": {"xy": [1, 2]}}]},
        {"id": "B", "children": [{"id": "b1", "children": [{"id": "b1x"}, {"id": "b1y"}]}]},
        {"id": "c"},
    ]},
}


@pytest.fixture(scope="module")
def small() -> Hierarchy:
    return Hierarchy.from_dict(SMALL)


def write(tmp_path: Path, text: str, name: str = "tree.json") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


# ----------------------------------------------------------------------------- structure


def test_index_order(small: Hierarchy) -> None:
    assert small.leaves == ["a1", "a2", "b1x", "b1y", "c"]
    assert small.nodes == ["a1", "a2", "b1x", "b1y", "c", "A", "B", "b1", "root"]
    assert small.internal_nodes == ["A", "B", "b1", "root"]
    assert [small.index(n) for n in ["a1", "a2", "b1x", "b1y", "c", "A", "B", "b1", "root"]] == list(range(9))
    assert (small.num_leaves, small.num_nodes, len(small), small.max_depth) == (5, 9, 9, 3)
    assert small.root == "root" and small.name == "small" and small.source == "<dict>"


def test_parent_children_names(small: Hierarchy) -> None:
    assert small.parent("b1x") == "b1" and small.parent("A") == "root" and small.parent("root") is None
    assert small.children("root") == ["A", "B", "c"]
    assert small.children("b1") == ["b1x", "b1y"] and small.children("c") == []
    assert small.display_name("A") == "Group A" and small.display_name("a1") == "a1"
    assert small.meta("a2") == {"xy": [1, 2]} and small.meta("a1") == {}
    assert [small.is_leaf(n) for n in ["a1", "A", "c", "root"]] == [True, False, True, False]
    assert "b1y" in small and "zzz" not in small and 3 not in small


def test_ancestors_and_depth(small: Hierarchy) -> None:
    assert small.ancestors("b1x") == ["b1x", "b1", "B"]
    assert small.ancestors("a2") == ["a2", "A"]
    assert small.ancestors("c") == ["c"]
    assert small.ancestors("root") == []
    assert {n: small.depth(n) for n in small.nodes} == {
        "a1": 2, "a2": 2, "b1x": 3, "b1y": 3, "c": 1, "A": 1, "B": 1, "b1": 2, "root": 0}
    assert small.ancestor_at_depth("b1x", 1) == "B"
    assert small.ancestor_at_depth("b1x", 0) == "root"
    assert small.ancestor_at_depth("b1x", 3) == "b1x"
    with pytest.raises(HierarchyError, match="depth 1"):
        small.ancestor_at_depth("c", 2)


def test_lca_and_distance_hand_counted(small: Hierarchy) -> None:
    cases = {  # (a, b): (lca, edges)
        ("a1", "a2"): ("A", 2),
        ("a1", "b1x"): ("root", 5),
        ("b1x", "b1y"): ("b1", 2),
        ("b1x", "B"): ("B", 2),
        ("b1y", "c"): ("root", 4),
        ("c", "a1"): ("root", 3),
        ("A", "b1"): ("root", 3),
        ("c", "c"): ("c", 0),
        ("root", "b1y"): ("root", 3),
    }
    for (a, b), (top, edges) in cases.items():
        assert small.lca(a, b) == top and small.lca(b, a) == top, (a, b)
        assert small.distance(a, b) == edges and small.distance(b, a) == edges, (a, b)


def test_distance_matches_bfs_on_edge_list(small: Hierarchy) -> None:
    # Independent check: breadth-first search on the undirected edge list of the test tree.
    graph: dict[str, set[str]] = {}
    for child, parent in EDGES:
        graph.setdefault(child, set()).add(parent)
        graph.setdefault(parent, set()).add(child)

    def bfs(a: str, b: str) -> int:
        seen, queue = {a: 0}, deque([a])
        while queue:
            node = queue.popleft()
            for nxt in graph[node]:
                if nxt not in seen:
                    seen[nxt] = seen[node] + 1
                    queue.append(nxt)
        return seen[b]

    for a, b in itertools.product(small.nodes, repeat=2):
        assert small.distance(a, b) == bfs(a, b), (a, b)


def test_leaves_under_and_nodes_at_depth(small: Hierarchy) -> None:
    assert small.leaves_under("B") == ["b1x", "b1y"]
    assert small.leaves_under("A") == ["a1", "a2"]
    assert small.leaves_under("a1") == ["a1"]
    assert small.leaves_under("root") == ["a1", "a2", "b1x", "b1y", "c"]
    assert small.nodes_at_depth(0) == ["root"]
    assert small.nodes_at_depth(1) == ["c", "A", "B"]  # index order: leaf c (4) before A (5), B (6)
    assert small.nodes_at_depth(2) == ["a1", "a2", "b1"]
    assert small.nodes_at_depth(3) == ["b1x", "b1y"]
    assert small.nodes_at_depth(4) == []


def test_unknown_id_is_value_error_with_suggestion(small: Hierarchy) -> None:
    with pytest.raises(HierarchyError) as info:
        small.index("b1z")
    err = info.value
    assert isinstance(err, ValueError) and not isinstance(err, KeyError)
    assert "'b1z'" in str(err) and "'small'" in str(err) and "did you mean" in str(err) and "'b1x'" in str(err)
    for call in (small.parent, small.ancestors, small.depth, small.leaves_under, small.meta):
        with pytest.raises(HierarchyError, match="b1z"):
            call("b1z")
    with pytest.raises(HierarchyError, match="zz"):
        small.lca("a1", "zz")


def test_immutable_and_copies(small: Hierarchy) -> None:
    small.leaves.append("x")
    small.meta("a2")["xy"].append(3)
    small.children("root").clear()
    assert small.leaves == ["a1", "a2", "b1x", "b1y", "c"]
    assert small.meta("a2") == {"xy": [1, 2]}
    assert small.children("root") == ["A", "B", "c"]
    with pytest.raises(AttributeError):
        small.root = "A"  # type: ignore[misc]
    source = json.loads(json.dumps(SMALL))
    built = Hierarchy.from_dict(source)
    source["root"]["children"][0]["children"][1]["meta"]["xy"].append(9)
    assert built.meta("a2") == {"xy": [1, 2]}


def test_round_trip_and_pickle(small: Hierarchy) -> None:
    again = Hierarchy.from_dict(small.to_dict())
    assert again == small
    assert again.to_dict() == SMALL  # name omitted where it equals the id, meta only when given
    unpickled = pickle.loads(pickle.dumps(small))
    assert unpickled == small and unpickled.nodes == small.nodes and unpickled.fingerprint() == small.fingerprint()


def test_flat_form_equals_nested(small: Hierarchy) -> None:
    # Nodes listed out of pre-order (children before parents); siblings keep their relative order.
    flat = {"name": "small", "description": "test tree", "nodes": [
        {"id": "b1x", "parent": "b1"},
        {"id": "a1", "parent": "A"},
        {"id": "A", "name": "Group A", "parent": "root"},
        {"id": "B", "parent": "root"},
        {"id": "a2", "parent": "A", "meta": {"xy": [1, 2]}},
        {"id": "root", "parent": None},
        {"id": "b1", "parent": "B"},
        {"id": "c", "parent": "root"},
        {"id": "b1y", "parent": "b1"},
    ]}
    tree = Hierarchy.from_dict(flat)
    assert tree == small
    assert tree.nodes == small.nodes and tree.fingerprint() == small.fingerprint()


def test_fingerprint_formula_and_sensitivity(small: Hierarchy) -> None:
    preorder = [("root", None), ("A", "root"), ("a1", "A"), ("a2", "A"), ("B", "root"),
                ("b1", "B"), ("b1x", "b1"), ("b1y", "b1"), ("c", "root")]
    canonical = json.dumps({"format": "dinov2_hier.hierarchy.structure/1", "nodes": [list(p) for p in preorder]},
                           separators=(",", ":"))
    assert small.fingerprint() == hashlib.sha256(canonical.encode()).hexdigest()
    assert Hierarchy.from_dict(json.loads(json.dumps(SMALL))).fingerprint() == small.fingerprint()

    moved = json.loads(json.dumps(SMALL))  # b1y moves from b1 to A
    moved["root"]["children"][1]["children"][0]["children"].pop()
    moved["root"]["children"][0]["children"].append({"id": "b1y"})
    assert Hierarchy.from_dict(moved).fingerprint() != small.fingerprint()

    swapped = json.loads(json.dumps(SMALL))  # sibling order changes class indices
    swapped["root"]["children"][0]["children"].reverse()
    assert Hierarchy.from_dict(swapped).fingerprint() != small.fingerprint()

    cosmetic = json.loads(json.dumps(SMALL))  # names and meta do not change indices
    cosmetic["root"]["children"][2]["name"] = "Leaf C"
    cosmetic["root"]["children"][2]["meta"] = {"colour": "red"}
    assert Hierarchy.from_dict(cosmetic).fingerprint() == small.fingerprint()


# ----------------------------------------------------------------------------- validation


def test_duplicate_id_reports_both_lines(tmp_path: Path) -> None:
    text = """{
  "name": "dup",
  "root": {
    "id": "cell",
    "children": [
      {"id": "neutrophil", "children": [{"id": "band"}]},
      {"id": "mono",
       "children": [
         {"id": "neutrophil"}
       ]}
    ]
  }
}
"""
    path = write(tmp_path, text)
    with pytest.raises(HierarchyError) as info:
        Hierarchy.from_json(path)
    assert str(info.value) == f"{path}:9: duplicate node id 'neutrophil' (first defined at line 6)"
    assert info.value.line == 9 and info.value.node_id == "neutrophil"
    with pytest.raises(HierarchyError, match=r"^<dict>: duplicate node id 'neutrophil'"):
        Hierarchy.from_dict(json.loads(text))


@pytest.mark.parametrize(
    "text, line, fragments",
    [
        # unknown key (typo) is named with a suggestion, at the node's line
        ('{"name": "t",\n "root": {"id": "r",\n  "children": [\n   {"id": "x", "chidren": []}]}}',
         4, ["'x'", "'chidren'", "did you mean 'children'"]),
        # children must be a list
        ('{"name": "t",\n "root": {"id": "r", "children": [\n  {"id": "x",\n   "children": {"id": "y"}}]}}',
         3, ["'x'", "'children' must be a JSON list"]),
        # meta must be an object
        ('{"name": "t",\n "root": {"id": "r", "children": [\n\n  {"id": "x", "meta": [1]}]}}',
         4, ["'x'", "'meta' must be a JSON object"]),
        # empty id: found at its own line
        ('{"name": "t",\n "root": {"id": "r", "children": [\n  {"id": "a"},\n  {"id": ""}]}}',
         4, ["empty"]),
        # non-string id
        ('{"name": "t",\n "root": {"id": "r", "children": [\n  {"id": "a"},\n\n  {"id": 7}]}}',
         5, ["must be a string", "7"]),
        # missing id: reported at the parent's line, naming the parent
        ('{"name": "t",\n "root": {"id": "r", "children": [\n  {"id": "a", "children": [\n   {"name": "n"}]}]}}',
         3, ["no 'id'", "'a'"]),
        # id with stray whitespace (a typo that would not match labels)
        ('{"name": "t",\n "root": {"id": "r", "children": [\n  {"id": "a "}]}}', 3, ["'a '", "whitespace"]),
        # root without children
        ('{"name": "t",\n "root": {"id": "lonely"}}', 2, ["'lonely'", "no children"]),
        # a nested node may not carry "parent"
        ('{"name": "t",\n "root": {"id": "r", "children": [\n  {"id": "a", "parent": "r"}]}}', 3, ["'parent'"]),
    ],
)
def test_malformed_nested_trees(tmp_path: Path, text: str, line: int, fragments: list[str]) -> None:
    path = write(tmp_path, text)
    with pytest.raises(HierarchyError) as info:
        Hierarchy.from_json(path)
    message = str(info.value)
    assert message.startswith(f"{path}:{line}: "), message
    for fragment in fragments:
        assert fragment in message, (fragment, message)


@pytest.mark.parametrize(
    "nodes_text, line, fragments",
    [
        ('[\n {"id": "r", "parent": null},\n {"id": "a", "parent": "r"},\n {"id": "b", "parent": "q"}]',
         4, ["'b'", "unknown parent 'q'"]),
        ('[\n {"id": "r", "parent": null},\n {"id": "a", "parent": "r"},\n {"id": "s", "parent": null}]',
         4, ["more than one root", "'r' (line 2)", "'s' (line 4)"]),
        ('[\n {"id": "r", "parent": null},\n {"id": "a", "parent": "r"},\n {"id": "x", "parent": "y"},\n'
         ' {"id": "y", "parent": "x"}]', 4, ["cycle", "'x' -> 'y' -> 'x'"]),
        ('[\n {"id": "r", "parent": null},\n {"id": "a", "parent": "a"}]', 3, ["cycle", "'a'"]),
        ('[\n {"id": "x", "parent": "y"},\n {"id": "y", "parent": "x"}]', 2, ["no root", "cycle"]),
        ('[\n {"id": "r", "parent": null},\n {"id": "a"}]', 3, ["'a'", "no 'parent'"]),
        ('[\n {"id": "r", "parent": null},\n {"id": "a", "parent": "r", "children": []}]', 3, ["'children'"]),
        ('[\n {"id": "r", "parent": null},\n {"id": "a", "parent": "r"},\n {"id": "a", "parent": "r"}]',
         4, ["duplicate node id 'a' (first defined at line 3)"]),
    ],
)
def test_malformed_flat_trees(tmp_path: Path, nodes_text: str, line: int, fragments: list[str]) -> None:
    path = write(tmp_path, '{"name": "t", "nodes": ' + nodes_text + "}")
    with pytest.raises(HierarchyError) as info:
        Hierarchy.from_json(path)
    message = str(info.value)
    assert message.startswith(f"{path}:{line}: "), message
    for fragment in fragments:
        assert fragment in message, (fragment, message)


@pytest.mark.parametrize(
    "data, fragment",
    [
        ({"name": "t"}, "empty tree"),
        ({"name": "t", "nodes": []}, "empty tree"),
        ({"name": "t", "root": {}}, "empty tree"),
        ({"name": "t", "root": {"id": "r", "children": [{"id": "a"}]}, "nodes": []}, "not both"),
        ({"root": {"id": "r", "children": [{"id": "a"}]}}, "'name'"),
        ({"name": "t", "roots": {}}, "did you mean 'root'"),
        ({"name": "t", "root": {"id": "r", "children": ["a"]}}, "must be a JSON object"),
        ([1, 2], "must be a JSON object"),
    ],
)
def test_malformed_documents(data: object, fragment: str) -> None:
    with pytest.raises(HierarchyError, match=re.escape(fragment)):
        Hierarchy.from_dict(data)  # type: ignore[arg-type]


def test_json_syntax_error_reports_line_and_column(tmp_path: Path) -> None:
    path = write(tmp_path, '{\n  "name": "t",\n  "root": {"id": "r",\n    "children": [{"id": "a"},]}\n}\n')
    with pytest.raises(HierarchyError) as info:
        Hierarchy.from_json(path)
    assert (info.value.line, info.value.column) == (4, 30)
    assert str(info.value).startswith(f"{path}:4:30: invalid JSON")


def test_repeated_json_key_is_an_error(tmp_path: Path) -> None:
    # json.loads would keep only the second "children" and silently drop subtree a.
    text = '{"name": "t", "root": {\n  "id": "r",\n  "children": [{"id": "a"}],\n  "children": [{"id": "b"}]}}'
    path = write(tmp_path, text)
    with pytest.raises(HierarchyError) as info:
        Hierarchy.from_json(path)
    assert str(info.value).startswith(f"{path}:2: key 'children' appears twice")
    assert "'r'" in str(info.value)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(HierarchyError, match="cannot read file"):
        Hierarchy.from_json(tmp_path / "absent.json")


# ----------------------------------------------------------------------------- wbc.json

NON_CELL = ["artefact", "smudge_cell", "not_identified", "other_cell"]
RANK = {1: "lineage", 2: "maturity", 3: "cell_type"}


@pytest.fixture(scope="module")
def wbc() -> Hierarchy:
    return Hierarchy.from_json(WBC)


def test_wbc_loads_with_expected_size(wbc: Hierarchy) -> None:
    assert wbc.name == "wbc" and wbc.root == "cell"
    assert (wbc.num_leaves, wbc.num_nodes, wbc.max_depth) == (28, 50, 5)
    assert all(re.fullmatch(r"[a-z][a-z0-9]*(_[a-z0-9]+)*", n) for n in wbc.nodes)


def test_wbc_depth_one_is_lineage_or_unclassified(wbc: Hierarchy) -> None:
    top = wbc.nodes_at_depth(1)
    assert top == ["progenitor", "granulocytic", "monocytic", "lymphoid", "erythroid", "megakaryocytic",
                   "unclassified"]
    for node in top:
        level = wbc.meta(node)["level"]
        assert level == "lineage" or (node == "unclassified" and level == "unclassified"), node


def test_wbc_non_cell_classes_are_under_no_lineage(wbc: Hierarchy) -> None:
    for node in NON_CELL:
        assert wbc.is_leaf(node)
        assert wbc.ancestor_at_depth(node, 1) == "unclassified"
        assert all(wbc.meta(a)["level"] == "unclassified" for a in wbc.ancestors(node))
    lineages = [n for n in wbc.nodes_at_depth(1) if wbc.meta(n)["level"] == "lineage"]
    for lineage in lineages:
        assert not set(NON_CELL) & set(wbc.leaves_under(lineage))


def test_wbc_levels_follow_depth(wbc: Hierarchy) -> None:
    # Lineage > maturity > cell type > morphology (paper, section 2.1.1): in cell branches
    # the semantic level of a node is fixed by its depth, so depth-wise heads/metrics are meaningful.
    for node in wbc.nodes:
        if node == wbc.root or wbc.ancestor_at_depth(node, 1) == "unclassified":
            continue
        depth, level = wbc.depth(node), wbc.meta(node)["level"]
        assert level == (RANK[depth] if depth <= 3 else "morphology"), (node, depth, level)


def test_wbc_key_subtrees(wbc: Hierarchy) -> None:
    assert wbc.leaves_under("blast") == ["myeloblast", "monoblast", "lymphoblast"]
    assert wbc.leaves_under("granulocytic_immature") == [
        "promyelocyte_typical", "promyelocyte_bilobed", "promyelocyte_atypical", "faggot_cell",
        "myelocyte", "metamyelocyte"]
    assert wbc.leaves_under("neutrophil") == ["neutrophil_band", "neutrophil_segmented"]
    assert wbc.ancestors("neutrophil_band") == ["neutrophil_band", "neutrophil", "granulocytic_mature", "granulocytic"]
    assert wbc.ancestors("hairy_cell") == ["hairy_cell", "lymphocyte_atypical", "lymphocyte", "lymphoid_mature",
                                           "lymphoid"]
    assert "plasma_cell" not in wbc.leaves_under("lymphocyte")
    # Eosinophil vs segmented neutrophil: same lineage (LCA granulocytic_mature, 4 edges);
    # eosinophil vs erythroblast: different lineages, joined only at the root (7 edges).
    assert wbc.lca("eosinophil_typical", "neutrophil_segmented") == "granulocytic_mature"
    assert wbc.distance("eosinophil_typical", "neutrophil_segmented") == 4
    assert wbc.lca("eosinophil_typical", "erythroblast") == "cell"
    assert wbc.distance("eosinophil_typical", "erythroblast") == 7
