"""Config -> hierarchy, label resolution and supervised terms (the wiring of issue 3).

Every ``(label, dataset)`` pair of the training set is resolved once, at start-up, so an
unknown label stops the run before the first step, and the per-step work is a dict
lookup that turns the batch's label strings into node indices.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torch.utils.data import Dataset

from ..config import ConfigError
from ..data import ImageRecordDataset, SubsetDataset, SyntheticCellDataset
from ..hierarchy import Hierarchy
from ..labels import UNLABELLED_INDEX, LabelResolver, split_label_maps
from ..losses import build_supervised_terms
from ..paths import resolve_resource

logger = logging.getLogger("dinov2_hier.train")


def item_labels(dataset: Dataset) -> list[tuple[str | None, str | None]]:
    """``(label, dataset name)`` of every item, without decoding any image."""
    if isinstance(dataset, ImageRecordDataset):
        return [(r.label, r.dataset) for r in dataset.records]
    if isinstance(dataset, SyntheticCellDataset):
        gen = dataset.generator
        name = gen.dataset_name
        return [(gen.label(i, dataset.label_fraction, dataset.coarse_fraction), name) for i in range(len(dataset))]
    if isinstance(dataset, SubsetDataset):
        pairs = item_labels(dataset.base)
        return [pairs[i] for i in dataset.indices]
    raise TypeError(f"cannot list labels of {type(dataset).__name__}")


@dataclass
class Supervision:
    """What the training loop needs for supervised terms.

    ``targets[i]`` is the node index of item ``i`` (``-1`` unlabelled);
    ``index_of`` maps a batch's ``(label, dataset)`` to that index.
    """

    hierarchy: Hierarchy
    targets: list[int]
    index_of: dict[tuple[str | None, str | None], int]
    #: ``supervision.domains`` when a term uses domains (``boda``), else None.
    domains: list[str] | None = None

    def batch_targets(self, labels: list[str | None], datasets: list[str | None]) -> torch.Tensor:
        """``long [B]`` node indices of a collated batch."""
        return torch.tensor([self.index_of[(l, d)] for l, d in zip(labels, datasets)], dtype=torch.long)

    def batch_domains(self, datasets: list[str | None]) -> torch.Tensor:
        """``long [B]``: the index of each image's dataset name in :attr:`domains`.

        Raises:
            ConfigError: naming a dataset that is not in the vocabulary.
        """
        index = {name: i for i, name in enumerate(self.domains or ())}
        for name in datasets:
            if name not in index:
                raise ConfigError(
                    f"dataset {name!r} of a training batch is not in supervision.domains {self.domains}: "
                    "list it there (or leave supervision.domains null to take the training sources' names)"
                )
        return torch.tensor([index[name] for name in datasets], dtype=torch.long)

    def groups(self) -> list[int]:
        """Depth-1 ancestor (lineage) index of each labelled item, -1 for unlabelled."""
        h = self.hierarchy
        nodes = h.nodes  # a copy per call: once, not once per item
        lineage = {t: h.index(h.ancestors(nodes[t])[-1]) for t in set(self.targets) if t != UNLABELLED_INDEX}
        return [UNLABELLED_INDEX if t == UNLABELLED_INDEX else lineage[t] for t in self.targets]


def build_supervision(cfg: DictConfig, dataset: Dataset, held_out: Dataset | None = None) -> Supervision | None:
    """Resolve every label of ``dataset``; None when no hierarchy is configured.
    ``held_out``: the validation images (:mod:`.validation`), whose labels are resolved
    too (so their batches get targets) but take no part in ``targets`` or the checks."""
    sup = cfg.supervision
    if sup.hierarchy is None:
        _require_hierarchy(cfg)
        if sup.labelled_fraction is not None or sup.balance != "none":
            raise ConfigError("supervision.labelled_fraction/balance need supervision.hierarchy")
        return None
    if sup.unmapped not in ("error", "unlabelled"):
        raise ConfigError(f"supervision.unmapped must be error or unlabelled, got '{sup.unmapped}'")
    hierarchy = Hierarchy.from_json(resolve_resource(sup.hierarchy, "supervision.hierarchy"))
    maps, others = split_label_maps(resolve_resource(sup.label_maps, "supervision.label_maps"), hierarchy)
    resolver = LabelResolver(hierarchy, maps, unmapped=sup.unmapped, other_maps=others,
                             hierarchy_option="supervision.hierarchy=")
    pairs = item_labels(dataset)
    index_of: dict[tuple[str | None, str | None], int] = {}
    extra = set(item_labels(held_out)) if held_out is not None else set()
    for pair in set(pairs) | extra:
        idx = resolver.resolve_index(*pair)
        index_of[pair] = UNLABELLED_INDEX if idx is None else idx
    targets = [index_of[p] for p in pairs]
    _log_label_summary(hierarchy, targets)
    _check_labelled_share(cfg, targets)
    # The held-out images' names too: their validation batches carry domains as well.
    domains = resolve_domains(cfg, pairs + sorted(extra, key=str))
    return Supervision(hierarchy=hierarchy, targets=targets, index_of=index_of, domains=domains)


def uses_domains(cfg: DictConfig) -> bool:
    """Whether a term of ``supervision.losses`` needs the batch's domains (``boda``)."""
    from ..losses.supervised import SUPERVISED_TERMS

    entries = OmegaConf.to_container(cfg.supervision.losses, resolve=True) or []
    names = [e.get("name") for e in entries if isinstance(e, dict)]
    return any(isinstance(n, str) and getattr(SUPERVISED_TERMS.get(n), "uses_domains", False) for n in names)


def resolve_domains(cfg: DictConfig, pairs: list[tuple[str | None, str | None]]) -> list[str] | None:
    """The domain vocabulary, decided once at start-up and written into ``cfg``
    (``supervision.domains``, so the saved config.yaml records it): the explicit list when
    given, else the sorted distinct dataset names of the training (and held-out validation)
    images. None when no term
    uses domains (the config is left as it is). An explicit list must hold every training
    dataset name (exit 2 naming the first missing one); a name it lists that no training
    image has keeps an empty slot (its centroids stay absent)."""
    if not uses_domains(cfg):
        return None
    if any(d is None for _, d in pairs):
        raise ConfigError(
            "supervision.losses has a term that needs domains (boda) but some training images have no dataset "
            "name: give each manifest a dataset column (python -m eval.combine_manifests --input NAME=CSV writes one)"
        )
    names = sorted({str(d) for _, d in pairs})
    given = cfg.supervision.get("domains")
    if given is None:
        domains = names
    else:
        if isinstance(given, str) or not OmegaConf.is_list(given) and not isinstance(given, list):
            raise ConfigError(f"supervision.domains must be a list of dataset names, got {given!r}")
        domains = [str(d) for d in given]
        if len(set(domains)) != len(domains) or not domains:
            raise ConfigError(f"supervision.domains must list distinct dataset names, got {domains}")
        missing = [n for n in names if n not in domains]
        if missing:
            raise ConfigError(f"supervision.domains {domains} lacks the training dataset {missing[0]!r}")
    cfg.supervision.domains = list(domains)
    logger.info("domains (supervision.domains): %s", ", ".join(f"{i}={n}" for i, n in enumerate(domains)))
    return domains


#: Under this share of labelled training images a supervised arm gets a loud warning.
FEW_LABELS_SHARE = 0.01


def _check_labelled_share(cfg: DictConfig, targets: list[int]) -> None:
    """Supervised terms with no labelled image would train to the end on a zero loss:
    refuse (exit 2); warn when under :data:`FEW_LABELS_SHARE` of the images carry one."""
    if not len(cfg.supervision.losses):
        return
    n_labelled = sum(t != UNLABELLED_INDEX for t in targets)
    terms = ", ".join(str(term.get("name")) for term in cfg.supervision.losses)
    if n_labelled == 0:
        raise ConfigError(
            f"supervision.losses ({terms}) is set but none of the {len(targets)} training images has a label: "
            "a manifest gives labels in its 'label' column (check the header, path,label[,dataset]), an "
            "ImageFolder in its class folders; train the 'unsup' arm for unlabelled data"
        )
    if n_labelled < FEW_LABELS_SHARE * len(targets):
        logger.warning(
            "only %d of %d training images (%.2f%%) carry a label for supervision.losses (%s): the supervised "
            "terms will see a labelled image in few batches", n_labelled, len(targets), 100 * n_labelled / len(targets), terms,
        )


def _log_label_summary(hierarchy: Hierarchy, targets: list[int]) -> None:
    counts: dict[int, int] = {}
    for t in targets:
        counts[t] = counts.get(t, 0) + 1
    n_unlabelled = counts.pop(UNLABELLED_INDEX, 0)
    nodes = hierarchy.nodes  # a copy per call: once, not once per label
    n_leaf = sum(c for t, c in counts.items() if hierarchy.is_leaf(nodes[t]))
    logger.info(
        "labels on '%s': %d images, %d unlabelled, %d at a leaf, %d at an internal node",
        hierarchy.name, len(targets), n_unlabelled, n_leaf, sum(counts.values()) - n_leaf,
    )
    for t in sorted(counts):
        node = nodes[t]
        logger.info("  %-28s depth %d %s %6d", node, hierarchy.depth(node), "leaf" if hierarchy.is_leaf(node) else "node", counts[t])


def build_supervised_heads(cfg: DictConfig, hierarchy: Hierarchy | None, embed_dim: int) -> tuple[nn.ModuleDict, dict[str, float]]:
    """The supervised terms listed in ``supervision.losses``."""
    entries = OmegaConf.to_container(cfg.supervision.losses, resolve=True)
    if not entries:
        return nn.ModuleDict(), {}
    if hierarchy is None:
        _require_hierarchy(cfg)
    domains = cfg.supervision.get("domains")
    domains = None if domains is None else [str(d) for d in domains]
    return build_supervised_terms(entries, hierarchy, embed_dim, domains=domains)


def _require_hierarchy(cfg: DictConfig) -> None:
    """Supervised terms need a label tree: refuse (exit 2) a config that lists terms without one."""
    if len(cfg.supervision.losses) > 0:
        raise ConfigError("supervision.losses is set but supervision.hierarchy is null: name the label tree")
