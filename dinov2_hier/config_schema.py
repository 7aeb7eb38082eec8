"""Types and ranges of every run-configuration key, checked once on the resolved config.

:func:`dinov2_hier.config.load_config` calls :func:`validate_config` after the layers
(``configs/default.yaml`` < ``--config`` file and its ``base:`` chain < ``key=value``) are
merged and resolved, so that a bad value stops the run with one line naming the key, what
it must be and the value given (a :class:`ConfigError`, exit code 2)
before any data is read or any model is built, instead of a traceback deep in training or
a run that "finishes" without weights.

Where the rules come from:

* **Types** from ``configs/default.yaml`` itself: a key whose default is ``true``/``false``
  takes a bool, an integer default an integer (but ``*_epochs`` keys take any number: the
  default file lets schedule lengths be fractional), a float default a number, a string
  default a string, and a non-empty list default a list of the same length whose items have
  the type of the default's items (integers or floats: numbers). The default file stays the
  one place that declares keys; a new key gets its type by being added there. :data:`TYPES`
  lists the few keys a default cannot describe (``null`` defaults, keys that take two types,
  lists of any length).
* **Ranges and allowed words** from :data:`RULES` (positive sizes, probabilities in
  [0, 1], temperatures > 0, enumerations such as ``student.arch``).

YAML 1.1 (what PyYAML reads) takes ``1e-3`` -- an exponent without a dot -- for a string,
so a number-valued key given a string that Python's ``float`` reads (``"1e-3"``, ``"1E5"``)
gets that number: the saved config then records a number. An integer key accepts a number
with an integral value (``1e5`` -> 100000) and refuses ``8.5``; anything else is refused.
The modules that use a key may still check relations between keys (e.g. the crop size
being a multiple of the patch size); this module checks each key on its own.
"""
from __future__ import annotations

import difflib
import math
from dataclasses import dataclass
from typing import Any, Iterator

from omegaconf import DictConfig, ListConfig, OmegaConf

from .errors import UserError

__all__ = ["ConfigError", "Rule", "RULES", "TYPES", "validate_config", "leaf_keys"]


class ConfigError(UserError, ValueError):
    """A configuration file or override is malformed or names an unknown key.

    Defined here, below :mod:`dinov2_hier.config` (which imports this module and re-exports
    it), so that the validator raises it without importing its caller."""


@dataclass(frozen=True)
class Rule:
    """What a key's value (each item, for a list) must satisfy besides its type.

    ``low`` / ``high``: numeric bounds, inclusive unless ``low_open`` / ``high_open``.
    ``choices``: the words a string value may take. ``ordered``: a two-item list is a
    ``[min, max]`` range (first <= second). ``expect``: the phrase the error message uses
    when the generated one would read badly.
    """

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    choices: tuple[str, ...] | None = None
    ordered: bool = False
    expect: str | None = None


def _choices(*words: str) -> Rule:
    return Rule(choices=words)


POSITIVE_INT = Rule(low=1)            # sizes, counts, intervals: 0 would mean "nothing" or divide by 0
NON_NEGATIVE = Rule(low=0)            # weights, rates, counts where 0 means "off"
POSITIVE = Rule(low=0, low_open=True)  # temperatures, standard deviations, sigmas
PROBABILITY = Rule(low=0, high=1)     # probabilities, fractions, EMA momenta

#: Keys whose type the default value cannot give. Kinds: ``bool``, ``int``, ``number``,
#: ``str``, ``null``, ``list`` (any length, items unchecked here) and ``list[KIND]`` (any
#: length, items of that kind).
TYPES: dict[str, tuple[str, ...]] = {
    "student.layerscale": ("number", "null"),        # null disables LayerScale
    "student.pretrained_weights": ("str", "null"),
    "supervision.hierarchy": ("str", "null"),
    "supervision.labelled_fraction": ("number", "null"),
    # Entries are mappings checked by dinov2_hier.losses.supervised (names and keys per loss).
    "supervision.losses": ("list",),
    "supervision.domains": ("list[str]", "null"),     # set at start-up when a term uses domains (boda)
    "data.train": ("list[str]", "str"),               # one source may be given without brackets
    "data.val": ("list[str]", "str", "null"),         # like data.train; null = no validation sources
    "optim.fused": ("bool", "str"),                   # true | false | auto
    "student.pretrained_heads": ("bool", "str"),      # true | false | auto
    # Its default (false) gives the type too; listed for the optional extra it needs: true
    # without the tensorboard package stops the run before training (train/tensorboard.py).
    "train.tensorboard": ("bool",),
}

#: Ranges and allowed words. The enumerations repeat the names the building code accepts;
#: tests/test_bad_inputs.py checks that they agree with the code's own tuples.
RULES: dict[str, Rule] = {
    "seed": NON_NEGATIVE,
    "compute.device": _choices("auto", "cpu", "cuda"),
    "compute.dtype": _choices("bf16", "fp16", "fp32"),
    "compute.compile": _choices("none", "backbone", "forward"),
    "compute.residual_stream": _choices("fp32", "autocast"),
    "compute.parallel": _choices("ddp", "fsdp"),
    "compute.fsdp.backbone_param_dtype": _choices("bf16", "fp32"),
    "compute.fsdp.heads_param_dtype": _choices("fp32", "bf16"),
    "compute.fsdp.reduce_dtype": _choices("fp32", "bf16"),
    "student.arch": _choices("vit_tiny", "vit_small", "vit_base", "vit_large", "vit_giant2"),
    "student.patch_size": POSITIVE_INT,
    "student.drop_path_rate": Rule(low=0, high=1, high_open=True),  # 1 would drop every branch
    "student.drop_path_schedule": _choices("linear", "uniform"),
    "student.drop_path_mode": _choices("sample", "subset"),
    "student.layerscale": POSITIVE,
    "student.ffn_layer": _choices("mlp", "swiglu", "swiglufused"),
    "student.num_register_tokens": NON_NEGATIVE,
    "teacher.momentum_teacher": PROBABILITY,
    "teacher.final_momentum_teacher": PROBABILITY,
    "teacher.warmup_teacher_temp": POSITIVE,
    "teacher.teacher_temp": POSITIVE,
    "teacher.warmup_teacher_temp_epochs": NON_NEGATIVE,
    **{f"{head}.{key}": rule for head in ("dino", "ibot") for key, rule in {
        "loss_weight": NON_NEGATIVE,
        "head_n_prototypes": POSITIVE_INT,
        "head_hidden_dim": POSITIVE_INT,
        "head_bottleneck_dim": POSITIVE_INT,
        "head_nlayers": POSITIVE_INT,
        "student_temp": POSITIVE,
        "centering": _choices("sinkhorn_knopp", "softmax"),
        "sk_iterations": POSITIVE_INT,
        "center_momentum": PROBABILITY,
    }.items()},
    "dino.koleo_loss_weight": NON_NEGATIVE,
    "dino.targets": _choices("teacher", "swav"),
    "dino.swav_queue_length": NON_NEGATIVE,            # 0 = no queue
    "dino.swav_queue_start_epochs": NON_NEGATIVE,
    "ibot.mask_sample_probability": PROBABILITY,
    "ibot.mask_ratio_min_max": Rule(low=0, high=1, ordered=True),
    "supervision.unmapped": _choices("error", "unlabelled"),
    "supervision.labelled_fraction": PROBABILITY,
    "supervision.balance": _choices("none", "class", "branch"),
    "supervision.crops": _choices("all", "unmasked"),
    "supervision.start_iteration": NON_NEGATIVE,
    "crops.global_crops_size": POSITIVE_INT,
    "crops.global_crops_scale": Rule(low=0, high=1, low_open=True, ordered=True),
    "crops.local_crops_number": NON_NEGATIVE,          # 0 = no local crops
    "crops.local_crops_size": POSITIVE_INT,
    # Independent of global_crops_scale (DINOv2 does not relate the two ranges either).
    "crops.local_crops_scale": Rule(low=0, high=1, low_open=True, ordered=True),
    "crops.hflip_p": PROBABILITY,
    "crops.vflip_p": PROBABILITY,
    "crops.rot90_p": PROBABILITY,
    "crops.color_jitter_p": PROBABILITY,
    "crops.brightness": NON_NEGATIVE,
    "crops.contrast": NON_NEGATIVE,
    "crops.saturation": NON_NEGATIVE,
    "crops.hue": Rule(low=0, high=0.5),                # a fraction of a turn, +- this
    "crops.grayscale_p": PROBABILITY,
    "crops.blur_p": PROBABILITY,
    "crops.blur_sigma": Rule(low=0, low_open=True, ordered=True),
    "crops.solarize_p": PROBABILITY,
    "crops.std": POSITIVE,                             # normalisation divides by it
    "crops.photometric": _choices("loader", "device"),
    "data.synthetic.num_images": POSITIVE_INT,
    "data.synthetic.image_size": POSITIVE_INT,
    "data.synthetic.label_fraction": PROBABILITY,
    "data.synthetic.coarse_fraction": PROBABILITY,
    "data.num_workers": NON_NEGATIVE,
    "data.prefetch_factor": POSITIVE_INT,
    "data.max_unreadable_fraction": PROBABILITY,
    "data.min_draws_before_check": NON_NEGATIVE,
    "data.val_fraction": Rule(low=0, high=1, high_open=True),  # 1 would leave nothing to train on
    "train.batch_size_per_gpu": POSITIVE_INT,
    "train.iterations": POSITIVE_INT,                  # 0 would "finish" without any weights
    "train.epoch_length": POSITIVE_INT,                # the schedules' unit: 0 divides by zero
    "train.log_every": POSITIVE_INT,
    "train.checkpoint_every": POSITIVE_INT,
    "train.keep_checkpoints": NON_NEGATIVE,            # 0 keeps all
    "train.max_consecutive_nonfinite": POSITIVE_INT,
    "train.collapse_check_after": NON_NEGATIVE,
    "train.val_every": NON_NEGATIVE,                   # 0 = no validation pass
    "train.val_max_batches": POSITIVE_INT,
    "optim.base_lr": NON_NEGATIVE,
    "optim.lr_scaling": _choices("sqrt", "linear", "none"),
    "optim.reference_batch_size": POSITIVE_INT,
    "optim.min_lr": NON_NEGATIVE,
    "optim.warmup_epochs": NON_NEGATIVE,
    "optim.weight_decay": NON_NEGATIVE,
    "optim.weight_decay_end": NON_NEGATIVE,
    "optim.layerwise_decay": Rule(low=0, high=1, low_open=True),
    "optim.patch_embed_lr_mult": NON_NEGATIVE,
    "optim.freeze_last_layer_epochs": NON_NEGATIVE,
    "optim.clip_grad": NON_NEGATIVE,                   # 0 = no clipping
    "optim.clip_grad_mode": _choices("per_module", "global"),
    "optim.betas": Rule(low=0, high=1, high_open=True),
    "optim.fused": Rule(choices=("auto",), expect="true, false or auto"),
    "student.pretrained_heads": Rule(choices=("auto",), expect="true, false or auto"),
    "student.head_warmup_epochs": NON_NEGATIVE,
}


# --------------------------------------------------------------------------- type derivation


def leaf_keys(cfg: DictConfig, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """``(dotted key, value)`` of every non-mapping value of ``cfg`` (lists are leaves; a
    mandatory ``???`` value, such as the defaults' ``data.train``, is the string ``"???"``)."""
    for key in cfg.keys():
        value = "???" if OmegaConf.is_missing(cfg, key) else cfg[key]
        if isinstance(value, DictConfig):
            yield from leaf_keys(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def _kind_of(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):  # before int: bool is an int in Python
        return "bool"
    if isinstance(value, int):
        return "int"
    if isinstance(value, float):
        return "number"
    if isinstance(value, str):
        return "str"
    if isinstance(value, (list, ListConfig)):
        return "list"
    return type(value).__name__


@dataclass(frozen=True)
class _Spec:
    kinds: tuple[str, ...]
    item: str | None          # kind of a list's items (None: not checked)
    length: int | None        # a list's length (None: any)
    rule: Rule


def _spec(key: str, default: Any) -> _Spec:
    """The expected type of ``key`` from its default value and :data:`TYPES`."""
    rule = RULES.get(key, Rule())
    if key in TYPES:
        kinds = TYPES[key]
        items = [kind[len("list["):-1] for kind in kinds if kind.startswith("list[")]
        kinds = tuple("list" if kind.startswith("list[") else kind for kind in kinds)
        return _Spec(kinds, items[0] if items else None, None, rule)
    kind = _kind_of(default)
    # default.yaml: "Schedule keys ending in _epochs may be fractional" (30 means 30.0 epochs).
    if kind == "int" and key.endswith("_epochs"):
        kind = "number"
    if kind == "list":
        if not default:  # an empty default says nothing about length or items
            return _Spec(("list",), None, None, rule)
        items = {_kind_of(item) for item in default}
        item = "number" if items <= {"int", "number"} and items else (items.pop() if len(items) == 1 else None)
        return _Spec(("list",), item, len(default), rule)
    return _Spec((kind,), None, None, rule)


# --------------------------------------------------------------------------- messages


def _fmt(x: float) -> str:
    return f"{x:g}"


def _range_text(rule: Rule, number_word: str) -> str:
    low, high = rule.low, rule.high
    if low is not None and high is not None:
        left, right = "(" if rule.low_open else "[", ")" if rule.high_open else "]"
        return f"{number_word} in {left}{_fmt(low)}, {_fmt(high)}{right}"
    if low is not None:
        return f"{number_word} {'>' if rule.low_open else '>='} {_fmt(low)}"
    if high is not None:
        return f"{number_word} {'<' if rule.high_open else '<='} {_fmt(high)}"
    return number_word


def _kind_text(kind: str, rule: Rule, plural: bool = False) -> str:
    if kind == "bool":
        return "true or false"
    if kind == "null":
        return "null"
    if kind == "int":
        return _range_text(rule, "integers" if plural else "an integer")
    if kind == "number":
        return _range_text(rule, "numbers" if plural else "a number")
    if kind == "str":
        if rule.choices:
            return "one of " + ", ".join(rule.choices)
        return "strings" if plural else "a string"
    if kind == "list":
        return "a list"
    return kind


def _expectation(spec: _Spec) -> str:
    if spec.rule.expect:
        return spec.rule.expect
    parts = []
    for kind in spec.kinds:
        if kind == "list" and spec.item is not None:
            items = _kind_text(spec.item, spec.rule, plural=True)
            if spec.rule.ordered and spec.length == 2:
                parts.append(f"a [min, max] pair of {items} with min <= max")
            else:
                parts.append(f"a list of {f'{spec.length} ' if spec.length is not None else ''}{items}")
        else:
            parts.append(_kind_text(kind, spec.rule))
    return " or ".join(parts)


def _shown(value: Any) -> str:
    if isinstance(value, (DictConfig, ListConfig)):
        value = OmegaConf.to_container(value)
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    return repr(value)


# --------------------------------------------------------------------------- checks


class _Refused(Exception):
    """Internal: the value does not fit (the caller words the message)."""


def _number(value: Any, integer: bool) -> int | float:
    """``value`` as a finite number (numeric strings read with ``float``), an integral one
    as ``int`` when ``integer``; :class:`_Refused` otherwise."""
    if isinstance(value, bool):
        raise _Refused
    if isinstance(value, str):
        try:
            value = float(value.strip())
        except ValueError:
            raise _Refused from None
    if not isinstance(value, (int, float)) or not math.isfinite(value):
        raise _Refused
    if integer and isinstance(value, float):
        if not value.is_integer():
            raise _Refused
        return int(value)
    return value


def _in_range(x: float, rule: Rule) -> bool:
    if rule.low is not None and (x <= rule.low if rule.low_open else x < rule.low):
        return False
    if rule.high is not None and (x >= rule.high if rule.high_open else x > rule.high):
        return False
    return True


def _scalar(value: Any, kind: str, rule: Rule) -> Any:
    """``value`` checked (and converted: numeric strings) as one ``kind``; :class:`_Refused`."""
    if kind == "null":
        if value is None:
            return None
        raise _Refused
    if kind == "bool":
        if isinstance(value, bool):
            return value
        raise _Refused
    if kind in ("int", "number"):
        # An int given for a number key stays an int (the saved config shows what was
        # given); only a numeric string or an integral float for an int key is converted.
        number = _number(value, integer=kind == "int")
        if not _in_range(number, rule):
            raise _Refused
        return number
    if kind == "str":
        if not isinstance(value, str) or (rule.choices and value not in rule.choices):
            raise _Refused
        return value
    if kind == "list":
        if isinstance(value, (list, ListConfig)):
            return value
        raise _Refused
    raise AssertionError(f"unknown kind {kind!r}")


def _checked(value: Any, spec: _Spec) -> Any:
    """``value`` as it must be stored (converted where needed); :class:`_Refused`."""
    for kind in spec.kinds:
        try:
            if kind == "list" and spec.item is not None:
                return _checked_list(value, spec)
            return _scalar(value, kind, spec.rule)
        except _Refused:
            continue
    raise _Refused


def _checked_list(value: Any, spec: _Spec) -> Any:
    if not isinstance(value, (list, ListConfig)):
        raise _Refused
    items = list(value)
    if spec.length is not None and len(items) != spec.length:
        raise _Refused
    converted = [_scalar(item, spec.item, spec.rule) for item in items]  # type: ignore[arg-type]
    if spec.rule.ordered and len(converted) == 2 and converted[0] > converted[1]:
        raise _Refused
    if all(a is b for a, b in zip(converted, items)):
        return value
    return converted


def _hint(value: Any, rule: Rule) -> str:
    if rule.choices and isinstance(value, str):
        close = difflib.get_close_matches(value, rule.choices, n=1, cutoff=0.6)
        if close:
            return f"; did you mean '{close[0]}'?"
    return ""


def validate_config(cfg: DictConfig, defaults: DictConfig) -> None:
    """Check every key of the resolved ``cfg`` against the type its value has in
    ``defaults`` (the default file), :data:`TYPES` and :data:`RULES`.

    Numeric strings and integral floats are converted in ``cfg`` in place (see the module
    docstring). Raises :class:`~dinov2_hier.config.ConfigError` on the first bad value,
    in the default file's key order: ``KEY must be EXPECTATION, got VALUE``.
    """
    for key, default in leaf_keys(defaults):
        spec = _spec(key, default)
        value = OmegaConf.select(cfg, key)
        try:
            checked = _checked(value, spec)
        except _Refused:
            hint = _hint(value, spec.rule)
            raise ConfigError(f"{key} must be {_expectation(spec)}, got {_shown(value)}{hint}") from None
        if checked is not value:
            OmegaConf.update(cfg, key, checked, merge=False)
